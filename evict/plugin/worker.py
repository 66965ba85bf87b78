"""EVICT's SGLang workers: EAGLE-3 drafting, cost-aware cut of the draft tree, width-m verification.

Per decode step (SGLang 0.5.23, ``eagle_worker_v2.py``)::

    EvictWorkerV2.forward_batch_generation            (EAGLEWorkerV2's, unchanged)
      EvictDraftWorker.draft
        draft_forward (eager or draft CUDA graph)      -> organize_draft_results keeps the top N-1
          + tap: kept candidates' cumulative scores -> ScoreSink (graph replay refreshes it too)
        TruncationPolicy.decide(scores [bs, N-1])      -> width m, kept positions [bs, m-1]
        cut_draft_tree                                 -> top_scores_index, draft_tokens at width m
        WidthStateSet.activate(m)                      -> target attn backend + verify graph +
                                                          draft-extend graph captured for m
        build_eagle_verify_input(num_draft_tokens=m)   (reads the width-m backend's verify mask)
      verify (run_eagle_verify at width m)             -> accept (greedy or sampling)
      _draft_extend_for_decode (width m)

The policy is ``evict.truncation.TruncationPolicy`` (shared with the reference engine and the
benchmark).  With ``EVICT_DISABLE=1`` the policy runs in ``off`` mode: the full tree every step,
same code path, for A/B runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from sglang.srt.layers.moe.utils import speculative_moe_a2a_backend_context, speculative_moe_backend_context
from sglang.srt.runtime_context import get_exec, get_parallel, get_schedule, get_spec
from sglang.srt.speculative import eagle_worker_v2 as _eagle_worker_v2
from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState
from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input, prepare_for_draft
from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker, EAGLEWorkerV2
from sglang.srt.speculative.spec_utils import draft_tp_context
from sglang.srt.utils.common import get_available_gpu_memory, log_info_on_rank0

from evict.plugin.config import (
    EvictConfigError,
    load_cost_table,
    parse_env,
    resolve_widths,
    target_config_hash,
)
from evict.plugin.metrics import EvictMetrics
from evict.plugin.tree_cut import (
    ACTIVE_SCORE_SINK,
    ScoreSink,
    cut_draft_tree,
    gather_candidate_scores,
    verify_spec_steps,
)
from evict.plugin.width_states import WidthStateSet

__all__ = ["EvictDraftWorker", "EvictWorkerV2", "install_score_tap"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Score tap.  ``EagleDraftWorker.draft_forward`` calls the module-level ``organize_draft_results``
# and drops the cumulative scores.  The tap wraps that one name in ``eagle_worker_v2``: it calls
# the original and, only while an EVICT draft worker's ScoreSink is active, copies the kept
# candidates' scores into it.  For EAGLE/EAGLE3 workers (no active sink) it is a pass-through.
# ---------------------------------------------------------------------------------------------
_original_organize_draft_results = _eagle_worker_v2.organize_draft_results


def _organize_draft_results_with_score_tap(score_list, token_list, parents_list, num_draft_token):
    parent_list, top_scores_index, draft_tokens = _original_organize_draft_results(
        score_list, token_list, parents_list, num_draft_token
    )
    sink = ACTIVE_SCORE_SINK.get()
    if sink is not None:
        sink.write(gather_candidate_scores(score_list, top_scores_index))
    return parent_list, top_scores_index, draft_tokens


def install_score_tap() -> None:
    """Route ``eagle_worker_v2.organize_draft_results`` through the tap (idempotent)."""
    _eagle_worker_v2.organize_draft_results = _organize_draft_results_with_score_tap


install_score_tap()


@contextlib.contextmanager
def _eagle_draft_worker_cls(cls: type) -> Iterator[None]:
    """``EAGLEWorkerV2.__init__`` constructs ``EagleDraftWorker`` by name; build ours instead."""
    saved = _eagle_worker_v2.EagleDraftWorker
    _eagle_worker_v2.EagleDraftWorker = cls
    try:
        yield
    finally:
        _eagle_worker_v2.EagleDraftWorker = saved


class EvictDraftWorker(EagleDraftWorker):
    """EAGLE-3 draft worker that hands the draft tree's scores to the policy and cuts the tree."""

    def __init__(self, server_args: Any, gpu_id: int, nccl_port: int, target_worker: Any) -> None:
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        self.full_num_draft_tokens = self.speculative_num_draft_tokens
        if self.topk < 2:
            raise EvictConfigError(
                f"EVICT needs --speculative-eagle-topk >= 2 (a draft tree), got {self.topk}"
            )
        # Allocated before any draft CUDA graph is captured (the graphs write into it).
        decode_cfg = get_exec().graph.cuda_graph_config
        max_bs = max(
            (decode_cfg.decode.max_bs if decode_cfg is not None else 0) or 0,
            get_schedule().max_running_requests or 0,
            1,
        )
        self.score_sink = ScoreSink(max_bs, self.full_num_draft_tokens - 1, self.device)
        # Set by EvictWorkerV2 once the width states exist.
        self.truncation_policy: Any = None
        self.activate_width: Any = None
        self.last_decision: Any = None

    def draft_forward(self, forward_batch: Any):
        with self.score_sink.active():
            return super().draft_forward(forward_batch)

    def draft(self, batch: Any, *, with_topology: bool = False):
        """``EagleDraftWorker.draft`` (0.5.23) with EVICT's cut before the verify input is built."""
        # draft_forward's eager path organizes the full tree; the width is chosen afterwards.
        self.speculative_num_draft_tokens = self.full_num_draft_tokens
        draft_input = batch.spec_info
        forward_batch, can_run_decode_cuda_graph, kv_loc_plan = prepare_for_draft(
            draft_input,
            self.req_to_token_pool,
            batch,
            self.cuda_graph_runner,
            self.draft_runner,
            self.topk,
            self.speculative_num_steps,
            target_translator=self.target_worker.model_runner.kv_index_translator,
            num_draft_tokens=self.full_num_draft_tokens,
        )
        if (
            can_run_decode_cuda_graph
            and not forward_batch.forward_mode.is_idle()
            and self.seed_dsa_topk_from_draft_extend
            and draft_input.dsa_topk_indices is None
        ):
            can_run_decode_cuda_graph = False

        n_inner = self.speculative_num_steps - 1
        canary_outside_ctx = (
            c.with_ops_outside_graph(
                single_forward_indices=list(range(n_inner)),
                maybe_inaccurate_forward_batch=forward_batch,
            )
            if (c := self.draft_runner.canary_manager) is not None
            else contextlib.nullcontext()
        )
        with canary_outside_ctx:
            if can_run_decode_cuda_graph:
                parent_list, top_scores_index, draft_tokens, draft_probs = self.cuda_graph_runner.execute(
                    forward_batch
                )
                if draft_probs is not None:
                    draft_probs = draft_probs.clone()
            else:
                if not forward_batch.forward_mode.is_idle() and self.speculative_num_steps > 1:
                    self.draft_attn_backend.init_forward_metadata(forward_batch)
                    forward_batch.mark_forward_metadata_ready()
                parent_list, top_scores_index, draft_tokens, draft_probs = self.draft_forward(forward_batch)

        width = self.full_num_draft_tokens
        if not batch.forward_mode.is_idle() and self.truncation_policy is not None:
            try:
                scores = self.score_sink.read(batch.seq_lens.shape[0])
                decision = self.truncation_policy.decide(scores)
            except Exception as exc:  # never fail a request over the cut: verify the full tree
                self.truncation_policy.record_error(exc, "width decision failed; verifying the full tree")
                decision = None
            self.last_decision = decision
            if decision is not None and decision.width < self.full_num_draft_tokens:
                width = decision.width
                top_scores_index, draft_tokens = cut_draft_tree(top_scores_index, draft_tokens, decision.kept)
        if self.activate_width is not None:
            # Must precede build_eagle_verify_input: it writes the width-m backend's verify mask.
            self.activate_width(width)

        verify_input = build_eagle_verify_input(
            batch,
            draft_input,
            parent_list,
            top_scores_index,
            draft_tokens,
            draft_probs,
            target_worker=self.target_worker,
            topk=self.topk,
            num_steps=verify_spec_steps(self.speculative_num_steps, width),
            num_draft_tokens=width,
            tree_mask_mode=self.tree_mask_mode,
            device=self.device,
        )
        if kv_loc_plan is not None:
            verify_input.kv_loc_plan = kv_loc_plan
            verify_input.prepared_out_cache_loc = kv_loc_plan.write_virtual
        if with_topology:
            return verify_input, parent_list, top_scores_index
        return verify_input

    def _draft_extend_for_decode(self, batch: Any, batch_result: Any, *, kv_loc_plan: Any = None):
        # Draft extend runs at the verified width; keep the config bag in step (as SGLang's
        # adaptive runtime-state switch does) for any reader of the static width.
        with get_spec().override(speculative_num_draft_tokens=self.speculative_num_draft_tokens):
            return super()._draft_extend_for_decode(batch, batch_result, kv_loc_plan=kv_loc_plan)


class EvictWorkerV2(EAGLEWorkerV2):
    """``EAGLEWorkerV2`` with an ``EvictDraftWorker``, one captured state per width and metrics."""

    def __init__(self, server_args: Any, gpu_id: int, nccl_port: int, target_worker: Any) -> None:
        # EVICT_* mistakes fail before the draft model loads (the launcher's resolution hook has
        # already checked them and the table); device and dtype are checked once the target is up.
        self.evict_config = parse_env()
        with _eagle_draft_worker_cls(EvictDraftWorker):
            super().__init__(server_args, gpu_id, nccl_port, target_worker)
        if self.adaptive_controller is not None:
            raise EvictConfigError("EVICT does not combine with --speculative-adaptive; drop that flag")
        if get_parallel().pp_size > 1:
            raise EvictConfigError("EVICT supports --pp-size 1 only")
        self.full_num_draft_tokens = self.speculative_num_draft_tokens
        self.truncation_policy = self._build_policy()
        self.width_states: WidthStateSet[SpecRuntimeState] = WidthStateSet(self._apply_width_state)
        self.evict_metrics = EvictMetrics(
            self.truncation_policy,
            self.evict_config.log_interval,
            log_fn=lambda line: log_info_on_rank0(logger, line),
            switches_fn=lambda: self.width_states.switches,
        )

    # -- start-up -------------------------------------------------------------------------------
    def _build_policy(self) -> Any:
        from evict.truncation import TruncationPolicy  # noqa: PLC0415

        cfg = self.evict_config
        n = self.full_num_draft_tokens
        if cfg.disable:
            # Kill switch: only the full tree is captured and verified; same code path otherwise.
            self.evict_widths = (n,)
            return TruncationPolicy([1.0], widths=[n], mode="off", backend="torch")
        model_config = self._target_worker.model_runner.model_config
        table = load_cost_table(
            cfg,
            config_hash=target_config_hash(self.server_args.model_path, self.server_args.revision),
            device=torch.cuda.get_device_name(self.gpu_id) if torch.cuda.is_available() else None,
            tp_size=get_parallel().tp_size,
            dtype=str(model_config.dtype).replace("torch.", ""),
        )
        widths = resolve_widths(cfg.widths, n, table.widths)
        self.evict_widths = widths
        return TruncationPolicy(table, widths=widths, mode=cfg.policy_mode, backend=cfg.backend)

    def init_cuda_graphs(self):
        super().init_cuda_graphs()
        dw = self._draft_worker
        full = SpecRuntimeState(
            speculative_num_steps=self.speculative_num_steps,
            speculative_num_draft_tokens=self.full_num_draft_tokens,
            draft_attn_backend=dw.draft_attn_backend,
            cuda_graph_runner=dw.cuda_graph_runner,
            target_attn_backend=self._target_worker.model_runner.attn_backend,
            target_graph_runner=self._target_worker.model_runner.decode_cuda_graph_runner,
            draft_extend_attn_backend=dw.draft_extend_attn_backend,
            cuda_graph_runner_for_draft_extend=dw.cuda_graph_runner_for_draft_extend,
        )
        self.width_states.register(self.full_num_draft_tokens, full)
        self.width_states.active_width = self.full_num_draft_tokens
        with (
            draft_tp_context(dw.parallel_layout),
            speculative_moe_backend_context(),
            speculative_moe_a2a_backend_context(),
        ):
            for width in self.evict_widths:
                if width == self.full_num_draft_tokens:
                    continue
                before = get_available_gpu_memory(self.device, self.gpu_id)
                tic = time.perf_counter()
                state = self.build_adaptive_runtime_state(
                    speculative_num_steps=self.speculative_num_steps,
                    speculative_num_draft_tokens=width,
                )
                # Drafting never depends on the width: every state drafts with the full-width
                # draft-decode backend and graph; dropping the per-width copy frees its graphs.
                state.draft_attn_backend = full.draft_attn_backend
                state.cuda_graph_runner = full.cuda_graph_runner
                used = before - get_available_gpu_memory(self.device, self.gpu_id)
                self.width_states.register(width, state, memory_gb=used)
                log_info_on_rank0(
                    logger,
                    f"EVICT: captured width {width} in {time.perf_counter() - tic:.1f} s, {used:.3f} GB",
                )
        # Building states must not have moved the live pointers, but re-point at N to be sure.
        self._apply_width_state(self.full_num_draft_tokens, full)
        dw.truncation_policy = self.truncation_policy
        dw.activate_width = self.width_states.activate
        disabled = ", DISABLED (full tree every step)" if self.evict_config.disable else ""
        log_info_on_rank0(
            logger,
            f"EVICT: verify widths {list(self.width_states.widths)} (N={self.full_num_draft_tokens}), "
            f"decision={self.truncation_policy.mode}, backend={self.truncation_policy.backend}{disabled}; "
            f"memory per extra width:\n{self.width_states.memory_report()}",
        )

    def _apply_width_state(self, width: int, state: SpecRuntimeState) -> None:
        """Point target verify and draft extend at ``width``'s captured state (draft decode stays)."""
        self.speculative_num_draft_tokens = width
        dw = self._draft_worker
        dw.speculative_num_draft_tokens = width
        dw.draft_extend_attn_backend = state.draft_extend_attn_backend
        if state.draft_extend_attn_backend is not None:
            dw.draft_runner.attn_backend = state.draft_extend_attn_backend
        dw.cuda_graph_runner_for_draft_extend = state.cuda_graph_runner_for_draft_extend
        target_runner = self._target_worker.model_runner
        target_runner.attn_backend = state.target_attn_backend
        target_runner.decode_cuda_graph_runner = state.target_graph_runner

    # -- per step -------------------------------------------------------------------------------
    def forward_batch_generation(
        self, batch: Any, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None
    ):
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            # Prefill (and mixed chunks) run on the full-width state, as under EAGLE3.
            self.width_states.activate(self.full_num_draft_tokens)
        return super().forward_batch_generation(
            batch,
            on_publish=on_publish,
            grammar_barrier=grammar_barrier,
            pp_proxy_tensors=pp_proxy_tensors,
        )

    def verify(self, batch: Any, pp_proxy_tensors=None, grammar_barrier=None):
        with get_spec().override(speculative_num_draft_tokens=self.speculative_num_draft_tokens):
            result = super().verify(batch, pp_proxy_tensors=pp_proxy_tensors, grammar_barrier=grammar_barrier)
        if not batch.forward_mode.is_idle():
            self.evict_metrics.on_decode_step()
        return result

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        super().on_verify_complete_cpu(num_correct_drafts_per_req, batch_size=batch_size)
        self.evict_metrics.record_num_correct_drafts(num_correct_drafts_per_req)
