"""EVICT's SGLang workers: EAGLE-3 drafting, cost-aware cut of the draft tree, width-m verification.

Per decode step (SGLang 0.5.23, ``eagle_worker_v2.py``)::

    EAGLEWorkerV2.forward_batch_generation              (SGLang's, unchanged)
      EvictDraftWorker.draft -> EagleDraftWorker.draft   (SGLang's, unchanged, at the full width N)
        draft_forward (eager or draft CUDA graph)        -> organize_draft_results keeps the top N-1
          hook 1: the kept candidates' scores -> ScoreSink (graph replay refreshes it too)
        build_eagle_verify_input
          hook 2: EvictDraftWorker.build_verify_input
            TruncationPolicy.decide(scores [bs, N-1])    -> width m, kept positions [bs, m-1]
            WidthAgreement.agree (TP > 1 only)           -> the same m on every rank
            cut_draft_tree                               -> top_scores_index, draft_tokens at width m
            EvictWorkerV2.use_width(m)                   -> verify + draft-extend state of width m,
                                                            and the width every later stage reads
            SGLang's build_eagle_verify_input(num_draft_tokens=m, num_steps=N's)
      verify (run_eagle_verify at width m)               -> accept (greedy or sampling)
      _draft_extend_for_decode (width m)

The hook surface is two module-level names of ``eagle_worker_v2`` (``organize_draft_results`` and
``build_eagle_verify_input``), each replaced by a pass-through that acts only while an EVICT draft
worker is drafting, plus subclass overrides; no SGLang function body is copied.
``tests/plugin/test_plugin_worker.py`` pins the source of every SGLang function these hooks rely
on, so an upgrade that changes them fails a test instead of serving silently wrong trees.

The policy is ``evict.truncation.TruncationPolicy`` (shared with the reference engine and the
benchmark).  With ``EVICT_DISABLE=1`` the policy runs in ``off`` mode: the full tree every step,
same code path, for A/B runs.

Costs: the policy reads this server's own step times.  At start-up, graph replays on varied
tokens (:func:`evict.plugin.calibration.realistic_graph_replay`) or ``EVICT_COST_TABLE`` give the
prior; then every decode step is timed (:class:`evict.plugin.live_costs.StepTimer`, around
``forward_batch_generation``) and corrects the table (:class:`~evict.plugin.live_costs.LiveCosts`),
which is published to the policy every few steps, identically on every TP rank.  Without graphs
or a table (CPU) the first steps of each batch-size bucket time each width.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.environ import envs
from sglang.srt.layers.attention.qsa.config import parse_qsa_profile
from sglang.srt.layers.moe.utils import speculative_moe_a2a_backend_context, speculative_moe_backend_context
from sglang.srt.runtime_context import get_exec, get_parallel, get_schedule, get_spec
from sglang.srt.speculative import eagle_worker_v2 as _eagle_worker_v2
from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState
from sglang.srt.speculative.draft_utils import DraftBackendFactory
from sglang.srt.speculative.eagle_worker_v2 import (
    Backend,
    DecodeCudaGraphRunner,
    EagleDraftWorker,
    EAGLEWorkerV2,
    Phase,
    check_cuda_graph_backend,
)
from sglang.srt.speculative.spec_utils import draft_tp_context
from sglang.srt.utils.common import get_available_gpu_memory, log_info_on_rank0

from evict.kernels import make_decider
from evict.plugin.calibration import (
    GraphReplay,
    calibrate_or_load,
    calibration_key,
    default_batch_sizes,
    load_cached,
    realistic_graph_replay,
    tp_max_reduce,
)
from evict.plugin.config import (
    EvictConfigError,
    depth_width,
    load_cost_table,
    parse_env,
    resolve_pad_cost,
    served_chains,
    served_depths,
    served_widths,
    target_config_hash,
)
from evict.plugin.live_costs import LiveCosts, StepTimer, bucket_sizes, cuda_event_marks, host_marks
from evict.plugin.metrics import EvictMetrics, RealNodeCounter
from evict.plugin.server_args_hook import depth_graph_reserve, width_graph_reserve
from evict.plugin.tp_sync import WidthAgreement, policy_fingerprint
from evict.plugin.tree_cut import (
    ACTIVE_SCORE_SINK,
    ScoreSink,
    cut_draft_tree,
    fill_padding_tokens,
    gather_candidate_scores,
    padded_frame,
    ramp_kept,
    unlink_padding,
    verify_spec_steps,
)
from evict.plugin.width_states import WidthStateSet
from evict.truncation import (
    AcceptanceEstimator,
    AcceptanceFeatures,
    TruncationPolicy,
    choose_width,
    choose_widths_batch_budget,
    flat_outcomes,
)
from evict.truncation.depth import DepthController, DraftShape
from evict.truncation.tree import flat_parents, num_candidates

__all__ = ["EvictDraftWorker", "EvictWorkerV2", "install_hooks"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Hooks.  ``EagleDraftWorker.draft`` calls the module-level ``prepare_for_draft`` and
# ``build_eagle_verify_input``, and ``draft_forward`` calls the module-level
# ``organize_draft_results`` (which drops the cumulative scores).  The three names are wrapped
# once, at import: the wrappers call SGLang's originals and act only while an EVICT draft worker is
# drafting (context variables), so EAGLE/EAGLE3 workers in the same process see SGLang's behaviour
# unchanged.
# ---------------------------------------------------------------------------------------------
_original_organize_draft_results = _eagle_worker_v2.organize_draft_results
_original_build_eagle_verify_input = _eagle_worker_v2.build_eagle_verify_input
_original_prepare_for_draft = _eagle_worker_v2.prepare_for_draft

ACTIVE_DRAFT_WORKER: contextvars.ContextVar[EvictDraftWorker | None] = contextvars.ContextVar(
    "evict_active_draft_worker", default=None
)


def _organize_draft_results_with_score_tap(score_list, token_list, parents_list, num_draft_token):
    parent_list, top_scores_index, draft_tokens = _original_organize_draft_results(
        score_list, token_list, parents_list, num_draft_token
    )
    sink = ACTIVE_SCORE_SINK.get()
    if sink is not None:
        sink.write(gather_candidate_scores(score_list, top_scores_index))
    return parent_list, top_scores_index, draft_tokens


def _build_eagle_verify_input_with_cut(
    batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
):
    worker = ACTIVE_DRAFT_WORKER.get()
    if worker is None:
        return _original_build_eagle_verify_input(
            batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
        )
    return worker.build_verify_input(
        batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
    )


def _prepare_for_draft_tree_window(*args, **kwargs):
    """SGLang's ``prepare_for_draft``, except that an EVICT chain plans no write window.

    Why: on a GPU, SGLang's topk-1 draft reserves the verify's KV window for all of the chain's
    tokens up front (``target_translator``: the plan verify and draft extend then write through),
    but EVICT may cut the chain to fewer. Without a translator the chain takes the tree's path:
    the draft writes its own slots, verify and draft extend allocate for the width verified.
    """
    worker = ACTIVE_DRAFT_WORKER.get()
    if worker is not None and worker.topk == 1:
        kwargs["target_translator"] = None
    return _original_prepare_for_draft(*args, **kwargs)


def install_hooks() -> None:
    """Route three ``eagle_worker_v2`` names through EVICT's pass-through wrappers (idempotent)."""
    _eagle_worker_v2.organize_draft_results = _organize_draft_results_with_score_tap
    _eagle_worker_v2.build_eagle_verify_input = _build_eagle_verify_input_with_cut
    _eagle_worker_v2.prepare_for_draft = _prepare_for_draft_tree_window


install_hooks()


@contextlib.contextmanager
def _eagle_draft_worker_cls(cls: type) -> Iterator[None]:
    """``EAGLEWorkerV2.__init__`` constructs ``EagleDraftWorker`` by name; build ours instead."""
    saved = _eagle_worker_v2.EagleDraftWorker
    _eagle_worker_v2.EagleDraftWorker = cls
    try:
        yield
    finally:
        _eagle_worker_v2.EagleDraftWorker = saved


class _SkipDraftDecodeCapture:
    """Stands in for ``EAGLEDraftCudaGraphRunner`` while a width state is captured (never built)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("EVICT: a width state must not capture draft-decode graphs")


@contextlib.contextmanager
def _without_draft_decode_graph() -> Iterator[None]:
    """Make ``EagleDraftWorker._capture_cuda_graphs`` capture only its draft-extend graph.

    A width state reuses the full state's draft-decode graphs, so a second capture would only cost
    memory.  ``_capture_cuda_graphs`` picks the draft-decode runner class through the module-level
    ``_select_spec_graph_runner_cls`` from the module-level ``EAGLEDraftCudaGraphRunner`` and skips
    the whole capture (its begin/end log lines included) when the class is None.  Here the name is
    a marker that the selector turns into None, so nothing is captured and nothing is logged.
    """
    saved_cls = _eagle_worker_v2.EAGLEDraftCudaGraphRunner
    saved_select = _eagle_worker_v2._select_spec_graph_runner_cls

    def select(*, builtin_runner_cls, oot_runner_cls):
        chosen = saved_select(builtin_runner_cls=builtin_runner_cls, oot_runner_cls=oot_runner_cls)
        return None if chosen is _SkipDraftDecodeCapture else chosen

    _eagle_worker_v2.EAGLEDraftCudaGraphRunner = _SkipDraftDecodeCapture
    _eagle_worker_v2._select_spec_graph_runner_cls = select
    try:
        yield
    finally:
        _eagle_worker_v2.EAGLEDraftCudaGraphRunner = saved_cls
        _eagle_worker_v2._select_spec_graph_runner_cls = saved_select


def _pads(decision: Any) -> bool:
    """Whether a decision is a per-request cut with padding: its budget is below its width (host ints)."""
    budget = getattr(decision, "budget_index", None)
    return (
        decision is not None
        and getattr(decision, "kept_counts", None) is not None
        and budget is not None
        and int(budget) < int(decision.width_index)
    )


class _NoGraphs(RuntimeError):
    """No captured graphs to replay (CPU, ``--disable-cuda-graph``)."""


def _graph_sizes(runner: Any) -> list[int]:
    """Batch sizes a graph runner captured (SGLang 0.5.23: ``runner.backend._graphs`` by ShapeKey)."""
    graphs = getattr(getattr(runner, "backend", None), "_graphs", None)
    if not graphs:
        return []
    return sorted({int(k.size) for k in graphs if getattr(k, "stream_idx", None) in (None, 0)})


def _replay_graph(runner: Any, bs: int) -> Any:
    """Replay ``runner``'s graph for batch size ``bs`` on its static buffers (timing only).

    Inside the runner's model context and the backend's ``replay_session()``, as SGLang's own
    ``execute`` replays: the breakable backend (``--cuda-graph-backend breakable``) runs the eager
    pieces between its graph segments only while its session is open.
    """
    backend = runner.backend
    for key in backend._graphs:
        if int(key.size) == bs and getattr(key, "stream_idx", None) in (None, 0):
            model_context = getattr(runner, "model_context", None)
            with (
                model_context() if callable(model_context) else contextlib.nullcontext(),
                backend.replay_session(),
            ):
                return backend.replay(key, None)
    raise _NoGraphs(f"no graph captured for batch size {bs}")


def _table_summary(table: Any) -> str:
    """A cost table's step times in one log line: ``bs 1: 2:12.3 4:15.0; bs 4: ...``."""
    rows = []
    for b in table.batch_sizes:
        cost = table.step_cost(b, table.widths).tolist()
        rows.append(f"bs {b}: " + " ".join(f"{w}:{c:.1f}" for w, c in zip(table.widths, cost)))
    return "; ".join(rows)


def _decide_at(policy: TruncationPolicy, scores: torch.Tensor, index: int, widths: tuple[int, ...]):
    """The policy's rule at a width index the TP ranks agreed on (no counters, nothing held).

    What an overruled rank verifies: the same rule as every other rank's at the same width, so
    ranks whose scores are identical keep identical trees (for one width: its top m-1 nodes).
    """
    cost = policy.step_cost(scores.shape[0], scores.device)
    if getattr(policy, "per_request", False):
        return choose_widths_batch_budget(
            scores, cost, widths, pad_cost=policy.pad_cost, index=index, check=False
        )
    return choose_width(scores, cost, widths, index=index, check=False)


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
        self.truncation_policy: TruncationPolicy | None = None
        self.use_width: Callable[[int], None] | None = None
        self.width_agreement: WidthAgreement | None = None  # TP > 1 only
        self.last_decision: Any = None
        self.width_counts: dict[int, int] = {}  # verified width -> decode steps (for the log line)
        # EVICT_ACCEPTANCE=calibrated: set by EvictWorkerV2; learns from each verification.
        self.acceptance: AcceptanceEstimator | None = None
        self.acceptance_candidates = num_candidates(self.speculative_num_steps, self.topk)
        self._pending_outcome: tuple[AcceptanceFeatures, torch.Tensor] | None = None
        self.real_nodes = RealNodeCounter()  # EVICT_PER_REQUEST=1: real candidates per request-step
        self._widths_of: TruncationPolicy | None = None  # the policy _widths_cache was read from
        self._widths_cache: tuple[int, ...] = ()
        # Live step costs (set by EvictWorkerV2): without a prior table, a batch-size bucket's first
        # steps are spent timing each width once or more (explore_index).
        self.live_costs: LiveCosts | None = None
        # EVICT_DISABLE=1 (set by EvictWorkerV2): SGLang's own step, no score tap, no decision.
        self.kill_switch = False
        # EVICT_DEPTH=1 (set by EvictWorkerV2): receives each drafted tree's kept scores and their
        # flat candidate indices.
        self.depth_observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        # EVICT_DEPTH=1, a step that drafts fewer than the server's steps (EvictWorkerV2 sets both
        # for that step): its own [W] step prices (inf past its widest width) and the full depth.
        self.step_cost: torch.Tensor | None = None
        self.full_num_steps = self.speculative_num_steps
        # The server's tree topk. EVICT_DEPTH=1 sets ``topk`` to 1 while a chain is drafted and
        # verified; the draft extend always runs at the tree's (the next step may be a tree).
        self.tree_topk = self.topk

    def draft_forward(self, forward_batch: Any):
        # Also entered by draft CUDA-graph capture, which then records the score copy.  The kill
        # switch is fixed for the server's life: its steps never read the scores, so none are copied.
        if self.kill_switch:
            return super().draft_forward(forward_batch)
        with self.score_sink.active():
            if self.topk == 1 and not forward_batch.forward_mode.is_idle():
                return self._chain_draft_forward(forward_batch)
            return super().draft_forward(forward_batch)

    def _chain_draft_forward(self, forward_batch: Any):
        """SGLang's ``draft_forward`` for a chain (EVICT_DEPTH=1), keeping the drafter's probabilities.

        Why its own loop: SGLang's topk-1 draft takes the argmax and scores every token 1, and
        EVICT ranks and prices a chain by its cumulative probabilities like any tree. This is
        SGLang's tree loop at topk 1 (``select_top_k_tokens``, one draft forward per step on the
        chain's multi-step backend, softmax + ``fast_topk``), minus what EVICT refuses or never
        drafts a chain with (DP attention's idle ranks, DSA index sharing, rejection sampling).
        The draft input comes from a draft extend at the tree's topk: the chain starts from its
        best token (``topk_p`` / ``topk_index`` are sorted, column 0 is the top-1).
        """
        spec_info = forward_batch.spec_info
        topk_p, topk_index = spec_info.topk_p[:, :1], spec_info.topk_index[:, :1]  # [bs, 1]
        hidden_states = spec_info.hidden_states
        if self.hot_token_id is not None:
            topk_index = self.hot_token_id[topk_index]
        out_cache_loc = _eagle_worker_v2.per_step_draft_out_cache_loc(
            forward_batch.out_cache_loc, forward_batch.batch_size, 1, self.speculative_num_steps
        )
        score_list: list[torch.Tensor] = []
        token_list: list[torch.Tensor] = []
        parents_list: list[torch.Tensor] = []
        scores = None
        for i in range(self.speculative_num_steps):
            input_ids, hidden_states, scores, tree_info = _eagle_worker_v2.select_top_k_tokens(
                i, topk_p, topk_index, hidden_states, scores, 1
            )
            score_list.append(tree_info[0])
            token_list.append(tree_info[1])
            parents_list.append(tree_info[2])
            if i == self.speculative_num_steps - 1:
                break
            forward_batch.input_ids = input_ids
            forward_batch.out_cache_loc = out_cache_loc[i]
            spec_info.hidden_states = hidden_states
            with _eagle_worker_v2.forward_context(
                _eagle_worker_v2.ForwardContext(attn_backend=self.draft_attn_backend.attn_backends[i]),
                forward_batch=forward_batch,
            ):
                logits_output = self.draft_runner.forward(forward_batch).logits_output
            probs = _eagle_worker_v2.renorm_draft_probs(
                logits_output.next_token_logits, forward_batch.sampling_info, False
            )
            topk_p, topk_index = _eagle_worker_v2.fast_topk(probs, 1, dim=-1)
            forward_batch.positions.add_(1)
            if self.draft_runner.model_config.model_is_mrope:
                forward_batch.mrope_positions.add_(1)
            if self.hot_token_id is not None:
                topk_index = self.hot_token_id[topk_index]
            hidden_states = logits_output.hidden_states
        parent_list, top_scores_index, draft_tokens = _eagle_worker_v2.organize_draft_results(
            score_list, token_list, parents_list, self.speculative_num_draft_tokens
        )
        return parent_list, top_scores_index, draft_tokens, None

    def draft(self, batch: Any, *, with_topology: bool = False):
        """SGLang's draft at the full width N; the cut happens in :meth:`build_verify_input`."""
        # The previous step left the verified width here for its draft extend; drafting (and the
        # KV plan of prepare_for_draft) always runs on the whole tree.
        self.speculative_num_draft_tokens = self.full_num_draft_tokens
        token = ACTIVE_DRAFT_WORKER.set(self)
        try:
            return super().draft(batch, with_topology=with_topology)
        finally:
            ACTIVE_DRAFT_WORKER.reset(token)

    def kept_scores(
        self, batch: Any, parent_list: torch.Tensor, top_scores_index: torch.Tensor
    ) -> torch.Tensor:
        """The N-1 kept candidates' scores the policy ranks: the drafter's, or calibrated ones.

        Calibrated: the estimator works on flat candidate indices with their flat parents (SGLang's
        ``parent_list`` convention); only the kept candidates are known here, which is enough
        because their set is ancestor-closed.  Its features are held until the verification's
        outcome arrives (:meth:`learn`).
        """
        scores = self._scores(batch.seq_lens.shape[0])
        self._pending_outcome = None
        full_steps = getattr(
            self, "full_num_steps", self.speculative_num_steps
        )  # absent on test-built workers
        if (
            self.acceptance is None
            or self.speculative_num_steps != full_steps
            or self.topk != getattr(self, "tree_topk", self.topk)
        ):
            return scores  # the estimator learns the full tree's layout only
        bs, k = top_scores_index.shape[0], self.acceptance_candidates
        flat = torch.zeros((bs, k), dtype=torch.float32, device=scores.device)
        flat.scatter_(1, top_scores_index.long(), scores.to(torch.float32))
        parents = flat_parents(parent_list, self.topk, k)
        calibrated, feats = self.acceptance.calibrate(flat, parents)
        if feats is not None:
            # build_verify_input replaces the kept index with an owned copy of what is verified
            self._pending_outcome = (feats, top_scores_index)
        return calibrated.gather(1, top_scores_index.long())

    def _scores(self, bs: int) -> torch.Tensor:
        """The kept candidates' scores of this step's draft: ``[bs, n-1]`` for its width ``n``."""
        return self.score_sink.read(bs, self.full_num_draft_tokens - 1)

    def _host_widths(self, policy: TruncationPolicy) -> tuple[int, ...]:
        """The policy's widths as host ints, read once per policy (never per step)."""
        if getattr(self, "_widths_of", None) is not policy:
            self._widths_cache = tuple(int(w) for w in policy.widths.tolist())
            self._widths_of = policy
        return self._widths_cache

    def learn(self, accept_index: torch.Tensor, width: int) -> None:
        """Feed one verification's outcome to the estimator (device ops only, no host sync).

        ``accept_index [bs, spec_steps+1]`` holds global verify indices ``b*width + j`` (-1 = none).
        """
        pending, self._pending_outcome = self._pending_outcome, None
        if pending is None or self.acceptance is None:
            return
        feats, kept = pending  # [bs, width-1]: the verified candidates, in verify order
        bs = accept_index.shape[0]
        base = torch.arange(bs, device=accept_index.device).unsqueeze(1) * width
        local = torch.where(accept_index >= 0, accept_index - base, torch.full_like(accept_index, -1))
        path = torch.full((bs, width), -1, dtype=torch.long, device=accept_index.device)
        cols = min(width, local.shape[1])
        path[:, :cols] = local[:, :cols]
        verified, accepted = flat_outcomes(kept, path, self.acceptance_candidates)
        self.acceptance.update(feats, verified, accepted)

    def choose_width(self, batch: Any, scores: torch.Tensor | None = None) -> tuple[int, torch.Tensor | None]:
        """This step's verify width and kept positions ``[bs, m-1]`` (None = the whole tree).

        Never raises: a failed decision verifies the full tree.  Under TP > 1 the ranks agree on
        the widest proposal (``WidthAgreement``, a host collective: no device sync), so a fallback
        on one rank is a fallback on every rank, and a rank overruled to a wider width decides again
        at the agreed width (the same rule as the others', so identical scores keep identical
        trees).  ``off`` takes no collective: every rank verifies the full tree by construction
        (the ranks' policies were checked identical at start-up).  Idle batches take no decision
        and no collective: without DP attention (which EVICT refuses) the ranks of a TP group are
        idle together.  Host reads: immediate mode's one (the chosen index); none in lagged mode
        after its first step (but the held index) and none in off mode.
        """
        n = self.full_num_draft_tokens
        policy = self.truncation_policy
        if policy is None or batch.forward_mode.is_idle():
            return n, None
        widths = self._host_widths(policy)
        if scores is None:
            scores = self._scores(batch.seq_lens.shape[0])
        decision, index = None, len(widths) - 1
        explore = None
        live = getattr(self, "live_costs", None)  # absent on workers built without __init__ (tests)
        if live is not None and policy.decision != "off":
            # No table yet: time this width (any width is lossless; the same on every TP rank, whose
            # counts are reduced alike). Cheap host ints only.
            explore = live.explore_index(scores.shape[0])
        try:
            if explore is not None:
                decision = _decide_at(policy, scores, explore, widths)
                policy.counters.record(decision)
            elif (step_cost := getattr(self, "step_cost", None)) is not None:  # a shallower draft
                decision = policy.decide(scores, cost=step_cost)
            else:
                decision = policy.decide(scores)
            index = decision.width_index
        except Exception as exc:  # never fail a request over the cut: verify the full tree
            policy.counters.record_error(exc, "width decision failed; verifying the full tree")
        if self.width_agreement is not None and policy.decision != "off":
            agreed = self.width_agreement.agree(index)
            if agreed != index:
                decision, index = None, agreed
                if 0 <= agreed < len(widths):
                    try:
                        decision = _decide_at(policy, scores, agreed, widths)
                    except Exception as exc:  # the first m-1 candidates below (ancestor-closed)
                        policy.counters.record_error(exc, "decision at the agreed width failed")
        if not 0 <= index < len(widths):
            # The ranks index different widths: impossible once start-up agreed on the policy.
            policy.counters.record_error(
                IndexError(f"agreed width index {index} outside {list(widths)}"),
                "the TP ranks' widths differ; verifying the full tree",
            )
            decision, index = None, len(widths) - 1
        self.last_decision = decision
        width = min(widths[index], n)
        self.width_counts[width] = self.width_counts.get(width, 0) + 1
        if decision is not None and _pads(decision):
            return width, decision.kept  # per request: real positions, then -1 (padding)
        if width >= n:
            return n, None
        if decision is not None:
            return width, decision.kept
        return width, ramp_kept(batch.seq_lens.shape[0], width, self.device)

    def build_verify_input(
        self, batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
    ):
        """SGLang's ``build_eagle_verify_input`` on the cut tree, after switching to its width."""
        if self.kill_switch:
            return self._build_full_verify_input(
                batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
            )
        scores = None
        if self.truncation_policy is not None and not batch.forward_mode.is_idle():
            try:
                scores = self.kept_scores(batch, parent_list, top_scores_index)
            except Exception as exc:  # the estimator must never fail a request: rank by raw scores
                self.truncation_policy.counters.record_error(
                    exc, "acceptance estimator failed; using raw scores"
                )
                self._pending_outcome = None
        width, kept = self.choose_width(batch, scores)
        observer = getattr(self, "depth_observer", None)
        if observer is not None and not batch.forward_mode.is_idle():
            try:
                observer(
                    scores if scores is not None else self._scores(batch.seq_lens.shape[0]), top_scores_index
                )
            except Exception as exc:  # the depth estimate must never fail a request
                self.truncation_policy.counters.record_error(exc, "depth observation failed")
        real = None  # per-request widths: [bs, m-1] real (True) or padding slots of the cut tree
        if kept is not None and _pads(self.last_decision):
            try:
                ranked = scores if scores is not None else self._scores(batch.seq_lens.shape[0])
                kept, real = padded_frame(ranked, kept)
            except Exception as exc:  # never fail a request over the cut: same width, no padding
                self.truncation_policy.counters.record_error(
                    exc, "per-request cut failed; verifying without padding"
                )
                kept, real = ramp_kept(batch.seq_lens.shape[0], width, self.device), None
        if kept is not None:
            top_scores_index, draft_tokens = cut_draft_tree(top_scores_index, draft_tokens, kept)
        if real is not None:  # padded slots hold the root token (a valid id; costed as a node by default)
            draft_tokens = fill_padding_tokens(draft_tokens, real, draft_input.bonus_tokens)
        if getattr(self.truncation_policy, "per_request", False) and not batch.forward_mode.is_idle():
            if real is not None:
                self.real_nodes.add_counts(self.last_decision.kept_counts)
            else:
                self.real_nodes.add_full(batch.seq_lens.shape[0], width)
        if self._pending_outcome is not None:  # the estimator learns about the real nodes verified
            if real is not None:
                verified = torch.where(real, top_scores_index, -1)
            elif kept is not None:
                verified = top_scores_index  # gathered by cut_draft_tree: this step's own tensor
            else:
                # The full tree: SGLang's top_scores_index, which after a draft-graph replay is the
                # graph's output storage in the shared graph pool; the verify replay may reuse that
                # block before learn() reads it (garbage indices -> an out-of-bounds scatter).
                verified = top_scores_index.clone()
            self._pending_outcome = (self._pending_outcome[0], verified)
        if self.use_width is not None:
            # Before the build (it writes the width-m backend's verify mask), and on every step:
            # verify and draft extend read the width from the workers, not from this call.
            self.use_width(width)
        kwargs["num_draft_tokens"] = width  # num_steps stays N's: the tree kernel's stride
        verify_input = _original_build_eagle_verify_input(
            batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
        )
        if not batch.forward_mode.is_idle():
            verify_input.spec_steps = verify_spec_steps(kwargs["num_steps"], width)
            if real is not None:
                # Padded slots stay in the width-m tree (mask, positions, KV slots: rejected like any
                # node, freed with them) but out of the child/sibling lists: never reached, never accepted.
                nxt, sib = unlink_padding(
                    verify_input.retrieve_next_token, verify_input.retrieve_next_sibling, real, self.topk
                )
                verify_input.retrieve_next_token.copy_(nxt)
                verify_input.retrieve_next_sibling.copy_(sib)
        return verify_input

    def _build_full_verify_input(
        self, batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
    ):
        """The kill switch's step: SGLang's verify input for the whole tree, only counted.

        Why a path of its own: ``EVICT_DISABLE=1`` is the A/B baseline against EAGLE3, so it must cost
        what EAGLE3 costs (issue 19: within 2%); a profile of the general path with the ``off``
        decision put 1-2% of the scheduler's samples in the score tap, the decision and counters.
        """
        n = self.full_num_draft_tokens
        if not batch.forward_mode.is_idle():
            policy = self.truncation_policy
            if policy is not None:
                policy.counters.record_unpriced(int(batch.seq_lens.shape[0]), n)
            self.width_counts[n] = self.width_counts.get(n, 0) + 1
        if self.use_width is not None:
            self.use_width(n)
        kwargs["num_draft_tokens"] = n
        return _original_build_eagle_verify_input(
            batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kwargs
        )

    def _draft_extend_for_decode(self, batch: Any, batch_result: Any, *, kv_loc_plan: Any = None):
        # Draft extend runs at the verified width; keep the config bag in step (as SGLang's
        # adaptive runtime-state switch does) for any reader of the static width. After a chain
        # it runs at the tree's topk: the next step's draft input holds the tree's top-k.
        topk, self.topk = self.topk, getattr(self, "tree_topk", self.topk)
        try:
            if self.speculative_num_draft_tokens == self.full_num_draft_tokens:
                return super()._draft_extend_for_decode(batch, batch_result, kv_loc_plan=kv_loc_plan)
            with get_spec().override(speculative_num_draft_tokens=self.speculative_num_draft_tokens):
                return super()._draft_extend_for_decode(batch, batch_result, kv_loc_plan=kv_loc_plan)
        finally:
            self.topk = topk


@dataclasses.dataclass(frozen=True)
class DraftDepthState:
    """What drafting ``steps`` deep needs besides the width states: SGLang's multi-step draft
    attention backend for that many steps (None for one step) and its draft graph (None on CPU)."""

    steps: int
    num_draft_tokens: int  # n_d: the widest captured width this depth fills, root included
    draft_attn_backend: Any
    cuda_graph_runner: Any


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
        self._draft_worker.kill_switch = self.evict_config.disable
        self.depth: DepthController | None = None  # EVICT_DEPTH=1: set up in init_cuda_graphs
        self.depth_agreement: WidthAgreement | None = None  # EVICT_DEPTH=1 with TP > 1
        self.depth_states: dict[DraftShape, DraftDepthState] = {}  # EVICT_DEPTH=1: shallower trees, chains
        self._depth_prices: torch.Tensor | None = None  # [W] uncorrected ms of this step's depth
        self.full_num_steps = self.speculative_num_steps
        self.plain_costs: LiveCosts | None = None
        self._plain_step = False
        # per verified step: (shape drafted, predicted accepted length per request), None if plain
        self._depth_pending: deque[tuple[DraftShape, torch.Tensor] | None] = deque(maxlen=4)
        self.width_states: WidthStateSet[SpecRuntimeState] = WidthStateSet(self._apply_width_state)
        self.evict_metrics = EvictMetrics(
            self.truncation_policy,
            self.evict_config.log_interval,
            log_fn=lambda line: log_info_on_rank0(logger, line),
            switches_fn=lambda: self.width_states.switches,
            logging_rank=get_parallel().tp_rank == 0,
            width_counts_fn=lambda: self._draft_worker.width_counts,
            real_nodes_fn=lambda: (
                self._draft_worker.real_nodes.summary()
                if getattr(self.truncation_policy, "per_request", False)
                else None
            ),
            step_ms_fn=lambda: live.take_interval() if (live := getattr(self, "live_costs", None)) else None,
            shapes_fn=lambda: (
                {str(k): n for k, n in sorted(d.counts_by_shape.items())}
                if (d := getattr(self, "depth", None))
                else None
            ),
        )

    # -- start-up -------------------------------------------------------------------------------
    def _build_policy(self) -> TruncationPolicy:
        """The policy from ``EVICT_COST_TABLE``; without one, a full-tree placeholder until calibration."""
        cfg = self.evict_config
        n = self.full_num_draft_tokens
        self.needs_calibration = False
        self.cost_prior: Any = None  # the start-up table live step costs start from (None: explore)
        self.live_costs: LiveCosts | None = None
        self.step_timer: StepTimer | None = None
        self._cost_rows: torch.Tensor | None = None
        if cfg.disable:
            # Kill switch: only the full tree is captured and verified; same code path otherwise.
            self.evict_widths = (n,)
            return TruncationPolicy([1.0], widths=[n], decision="off")
        table = load_cost_table(
            cfg,
            config_hash=target_config_hash(self.server_args.model_path, self.server_args.revision),
            device=self._device_name(),
            tp_size=get_parallel().tp_size,
            dtype=self._dtype_name(),
        )
        self.evict_widths = served_widths(cfg, n, table.widths if table is not None else None)
        self.cost_prior = table
        if table is None:
            # No table given: init_cuda_graphs measures one from the captured graphs.
            self.needs_calibration = True
            return TruncationPolicy([1.0], widths=[n], decision="off")
        return TruncationPolicy(
            table,
            widths=self.evict_widths,
            decision=cfg.policy_decision,
            decider=make_decider(cfg.backend),
            **self._per_request(table),
        )

    def _per_request(self, table: Any) -> dict[str, Any]:
        """``per_request``/``pad_cost`` for a served policy (EVICT_PER_REQUEST, EVICT_PAD_COST)."""
        cfg = self.evict_config
        if not cfg.per_request or cfg.disable:
            return {}
        return {"per_request": True, "pad_cost": resolve_pad_cost(cfg, table)}

    def _gpu_name(self) -> str | None:
        return torch.cuda.get_device_name(self.gpu_id) if torch.cuda.is_available() else None

    def _device_name(self) -> str:
        """What tables are checked and cached against: the GPU's name, else the CPU's model.

        On a CPU too: a table measured on another machine must not be used silently.
        """
        gpu = self._gpu_name()
        if gpu is not None and torch.device(self.device).type == "cuda":
            return gpu
        from evict.profiler.torch_backend import device_name  # noqa: PLC0415

        return device_name(torch.device("cpu"))

    def _dtype_name(self) -> str:
        return str(self._target_worker.model_runner.model_config.dtype).replace("torch.", "")

    def _live_costs_on(self) -> bool:
        """``EVICT_LIVE_COSTS``; unset: on, except under ``--enable-deterministic-inference``.

        Why not there: live costs make the width follow measured time, and a seeded sampled
        request's output depends on the tree it was verified with, so the same seed would not
        repeat. A fixed table keeps the width a function of the scores alone.
        """
        cfg = self.evict_config
        if cfg.live_costs is not None:
            return bool(cfg.live_costs)
        return not bool(getattr(self.server_args, "enable_deterministic_inference", False))

    def _calibrate_policy(self) -> TruncationPolicy:
        """Measure this server's cost table from its own captured graphs (or the cache).

        Never stops the server: without CUDA graphs (CPU, ``--disable-cuda-graph``) there is
        nothing to replay, and a failed calibration is logged; both verify the full tree, and the
        log says how to give a table instead.
        """
        cfg, n = self.evict_config, self.full_num_draft_tokens
        full_tree = TruncationPolicy([1.0], widths=[n], decision="off")
        try:
            replay, batch_sizes = self._graph_replay()
        except _NoGraphs as exc:
            if self._live_costs_on():
                # Eager serving (CPU, --disable-cuda-graph): the costs come from the served steps
                # (init_cuda_graphs starts them): a cached live table, else the first steps time
                # each width. The policy below is only the placeholder they replace.
                log_info_on_rank0(
                    logger,
                    f"EVICT: no EVICT_COST_TABLE and {exc}: the step costs are measured on the served "
                    "decode steps (each width timed at each batch size it serves, then corrected every "
                    "step)",
                )
                return TruncationPolicy(
                    [1.0] * len(self.width_states.widths),
                    widths=self.width_states.widths,
                    decision=cfg.policy_decision,
                    decider=make_decider(cfg.backend),
                    **self._per_request(None),
                )
            logger.warning(
                "EVICT: no EVICT_COST_TABLE and %s, and live step costs are off (EVICT_LIVE_COSTS=0, or "
                "--enable-deterministic-inference), so there is nothing to calibrate from; verifying the "
                "full tree. Give a table (EVICT_COST_TABLE=T.json) or set EVICT_LIVE_COSTS=1",
                exc,
            )
            return full_tree
        tp = get_parallel().tp_size
        key = calibration_key(
            model_path=self.server_args.model_path,
            revision=self.server_args.revision,
            gpu_name=self._device_name(),
            tp_size=tp,
            dtype=self._dtype_name(),
            widths=self.width_states.widths,
            batch_sizes=batch_sizes,
            draft_steps=self.speculative_num_steps,
            draft_topk=self.topk,
        )
        try:
            table = calibrate_or_load(
                replay,
                key=key,
                recalibrate=cfg.recalibrate,
                reduce=tp_max_reduce(get_tp_group().device_group) if tp > 1 else None,
                write_cache=get_parallel().tp_rank == 0,
                log=lambda line: log_info_on_rank0(logger, line),
            )
        except Exception as exc:  # with TP > 1 every rank replays the same graphs and fails alike
            logger.error(
                "EVICT: start-up calibration failed (%r); verifying the full tree", exc, exc_info=exc
            )
            return full_tree
        self.cost_prior = table
        log_info_on_rank0(logger, f"EVICT: start-up cost table (ms): {_table_summary(table)}")
        return TruncationPolicy(
            table,
            widths=self.width_states.widths,
            decision=cfg.policy_decision,
            decider=make_decider(cfg.backend),
            **self._per_request(table),
        )

    def _graph_replay(self) -> tuple[GraphReplay, tuple[int, ...]]:
        """Replays of the captured draft-decode, target-verify(m) and draft-extend(m) graphs."""
        full = self.width_states.state(self.full_num_draft_tokens)
        if full.target_graph_runner is None or full.cuda_graph_runner is None:
            raise _NoGraphs("no CUDA graphs were captured")
        states = {w: self.width_states.state(w) for w in self.width_states.widths}
        captured = set(_graph_sizes(full.target_graph_runner))
        for state in states.values():
            captured &= set(_graph_sizes(state.target_graph_runner))
            if state.cuda_graph_runner_for_draft_extend is not None:
                captured &= set(_graph_sizes(state.cuda_graph_runner_for_draft_extend))
        captured &= set(_graph_sizes(full.cuda_graph_runner))
        if not captured:
            raise _NoGraphs("the captured graphs share no batch size")

        # Varied tokens at traffic-like positions before every replay (capture-time inputs are all
        # token 0: one set of experts for every verified token, so verify(m) came out flat in m).
        target_cfg = self._target_worker.model_runner.model_config
        draft_cfg = getattr(getattr(self._draft_worker, "draft_runner", None), "model_config", None)
        replay = realistic_graph_replay(
            _replay_graph,
            draft_runner=full.cuda_graph_runner,
            verify_runners={w: s.target_graph_runner for w, s in states.items()},
            extend_runners={w: s.cuda_graph_runner_for_draft_extend for w, s in states.items()},
            vocab_size=int(getattr(target_cfg, "vocab_size", 0) or 2),
            draft_vocab_size=int(getattr(draft_cfg, "vocab_size", 0) or 0) or None,
        )
        return replay, default_batch_sizes(sorted(captured))

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
        with self._capture_context():
            for width in self.evict_widths:
                if width == self.full_num_draft_tokens:
                    continue
                before = get_available_gpu_memory(self.device, self.gpu_id)
                tic = time.perf_counter()
                state = self.build_width_state(width, full)
                seconds = time.perf_counter() - tic
                used = before - get_available_gpu_memory(self.device, self.gpu_id)
                self.width_states.register(width, state, memory_gb=used, seconds=seconds)
                log_info_on_rank0(
                    logger,
                    f"EVICT: captured width {width} (target verify + draft extend) in {seconds:.1f} s, "
                    f"{used:.3f} GB",
                )
        # Building states must not have moved the live pointers, but re-point at N to be sure.
        self._apply_width_state(self.full_num_draft_tokens, full)
        if get_parallel().tp_size > 1:
            # The target's TP group (not the draft's, which draft_tp_context may patch in), on its
            # CPU (gloo) side: the agreed index is read on the host without a device sync.
            dw.width_agreement = WidthAgreement(get_tp_group().cpu_group, "cpu")
        if self.needs_calibration:
            self.truncation_policy = self._calibrate_policy()
        if self._live_costs_on() and self.truncation_policy.decision != "off":
            self.truncation_policy = self._start_live_costs(self.truncation_policy)
        self._set_policy(self.truncation_policy)
        self._agree_on_policy("start-up")
        if self.evict_config.acceptance == "calibrated" and self.truncation_policy.decision != "off":
            # Learns only from past verifications (lossless); identical on every TP rank.
            dw.acceptance = AcceptanceEstimator(self.topk, self.speculative_num_steps, device=self.device)
        if self.evict_config.depth and self.truncation_policy.decision != "off":
            self._start_depth()
        self._hook_recapture()
        disabled = ", DISABLED (full tree every step)" if self.evict_config.disable else ""
        per_request = (
            f", per-request widths (pad cost {self.truncation_policy.pad_cost:g})"
            if getattr(self.truncation_policy, "per_request", False)
            else ""
        )
        tp = f", widths agreed across {get_parallel().tp_size} TP ranks" if dw.width_agreement else ""
        log_info_on_rank0(
            logger,
            f"EVICT: verify widths {list(self.width_states.widths)} (N={self.full_num_draft_tokens}), "
            f"decision={self.truncation_policy.decision}, backend={self.truncation_policy.backend}, "
            f"acceptance={'calibrated' if dw.acceptance is not None else 'raw'}{per_request}{disabled}{tp}; "
            f"capture time and memory per extra width:\n{self.width_states.memory_report()}\n"
            f"{self._memory_estimates()}",
        )

    # -- depth (EVICT_DEPTH=1) -------------------------------------------------------------------
    def _start_depth(self) -> None:
        """Each decode step: plain decoding, the tree drafted to a depth d of 1..S, or the full tree;
        then (if it drafted) the width as usual.

        Plain decoding is SGLang's own ``speculative_num_steps == 0`` path (a one-node verify of the
        last token through the width-1 state, then the draft extend that keeps the drafter warm), so
        nothing of the step is EVICT's code. A shallower tree is SGLang's draft run with
        ``speculative_num_steps = d`` on a draft-decode state of its own (``_build_depth_state``:
        the multi-step attention backend and, on a GPU, the draft graph for d steps, as
        ``adaptive_runtime_state.py`` builds them for chains), keeping the best ``n_d - 1`` of its
        ``K(d)`` candidates for the widest captured width ``n_d`` it fills; verify and draft extend
        run on the width states as for any step. The choice is :class:`DepthController`'s, over
        the policy's step costs of the full tree, the measured cost of a plain step (timed on the
        served steps like the widths; from the table's ``draft_ms`` when it prices drafting), and
        for depth d the full tree's costs less the drafting it skips (the table's ``draft_ms``, else
        ``(S - d) / S`` of the full tree's measured drafting: its width-1 step less a plain step),
        corrected by each depth's own measured steps (``DepthController.record_step``).

        Chains (``EVICT_DEPTH_CHAIN=1``, :func:`served_chains`): a chain of d tokens is a draft
        state at topk 1 (one row per request: SGLang's MoE default is the (3, 1, 4) chain), drafted
        by :meth:`EvictDraftWorker._chain_draft_forward` with the drafter's probabilities, its
        verify tree built at topk 1 and verified on the width states like a tree. It is priced as
        the tree of its depth until its own steps are measured (or from the table's topk-1
        drafting), and the controller weighs it as a second family with its own reliability.

        With TP > 1 every rank plans, then the ranks agree on the last-listed plan (one host
        ``all_reduce(MAX)`` of the shape index over the TP group's CPU group, as for widths; plain
        first, then the chains, then the tree by depth, the full tree last): ranks
        that drafted differently would run collectives of different sizes. The plain step's timings
        are max-reduced like the widths', so the ranks normally plan alike and the agreement only
        proves it.
        """
        s, k = self.speculative_num_steps, self.topk
        widths = tuple(int(w) for w in self.truncation_policy.widths.tolist())
        depths, why = served_depths(self.evict_config, s, k, self.full_num_draft_tokens, widths)
        chains = served_chains(self.evict_config, s, k, self.full_num_draft_tokens, widths)
        # the full tree last (the shape forced while its widths are timed, and the fallback)
        shapes = [DraftShape(k, 0), *(DraftShape(1, d) for d in chains), *(DraftShape(k, d) for d in depths)]
        tp = get_parallel().tp_size
        if self.live_costs is not None:
            reduce = tp_max_reduce(get_tp_group().cpu_group) if tp > 1 else None
            self.plain_costs = LiveCosts((1,), self.live_costs.batch_sizes, None, reduce=reduce)
        for shape in shapes[1:-1]:
            self.depth_states[shape] = self._build_depth_state(shape, widths)
        # probe_budget=0: the full tree's served cost is measured on its own steps, so a probe is
        # also how a tree priced too dear by a stale table gets re-measured
        self.depth = DepthController(shapes, widths, self._depth_costs, probe_budget=0.0)
        if tp > 1:
            self.depth_agreement = WidthAgreement(get_tp_group().cpu_group, "cpu")
        self._draft_worker.depth_observer = self._observe_tree
        if getattr(self.server_args, "enable_deterministic_inference", False):
            logger.warning(
                "EVICT: EVICT_DEPTH=1 under --enable-deterministic-inference: the draft depth follows "
                "the server's recent history (as --speculative-adaptive's steps do), so a seeded sampled "
                "request repeats only when the depth decisions do; greedy output is unaffected"
            )
        drafted = ", ".join(
            f"{shape}: {st.num_draft_tokens - 1} of {shape.candidates}"
            for shape, st in self.depth_states.items()
        )
        chain_line = f" or a chain of {', '.join(map(str, chains))}" if chains else ""
        log_info_on_rank0(
            logger,
            f"EVICT: depth decision on: plain decoding or the ({s}, {k}) tree drafted to depth "
            f"{', '.join(map(str, depths))}{chain_line} each step{f' (candidates kept: {drafted})' if drafted else ''}"
            f"{f'; only the full depth: {why}' if why else ''}; a plain step's cost is "
            f"{'timed on the served steps' if self.plain_costs else 'from the cost table'}"
            f"{f', agreed across {tp} TP ranks' if self.depth_agreement else ''}",
        )

    def _depth_width(self, depth: int, widths: tuple[int, ...], topk: int | None = None) -> int:
        """``n_d``: the widest captured width a depth-``depth`` tree (of the server's topk, or
        ``topk``: 1 for a chain) fills (root included)."""
        return depth_width(depth, topk or self.topk, self.full_num_draft_tokens, widths)

    def _build_depth_state(self, shape: DraftShape, widths: tuple[int, ...]) -> DraftDepthState:
        """The draft-decode state for ``shape``: its multi-step attention backend for ``shape.depth``
        steps of ``shape.topk`` rows per request and, with CUDA graphs, its draft graph (captured
        into the shared pool, the draft extend graph left out: extends run on the width states).
        Restores the worker's own state afterwards."""
        dw = self._draft_worker
        depth, topk = shape.depth, shape.topk
        n_d = self._depth_width(depth, widths, topk)
        tic, before = time.perf_counter(), self._free_gpu_gb()
        graphs = dw.cuda_graph_runner is not None  # the server captures draft-decode graphs
        tree_topk = dw.topk
        with self._override_worker_state(depth, n_d), self._capture_context():
            dw.topk = topk  # a chain's backend and graph hold one row per request
            dw.draft_attn_backend = dw.draft_runner.draft_attn_backend = DraftBackendFactory(
                dw.draft_runner,
                topk,
                depth,
                seed_dsa_topk_from_draft_extend=dw.seed_dsa_topk_from_draft_extend,
                qsa_profile=parse_qsa_profile(dw.draft_runner.model_config.hf_config),
            ).create_decode_backend()
            dw.cuda_graph_runner = None
            full_n, dw.full_num_draft_tokens = dw.full_num_draft_tokens, n_d
            try:
                if graphs:
                    with envs.SGLANG_DISABLE_DRAFT_EXTEND_CUDA_GRAPH.override(True):
                        dw._capture_cuda_graphs()
            finally:
                dw.full_num_draft_tokens = full_n
                dw.topk = tree_topk
            state = DraftDepthState(depth, n_d, dw.draft_attn_backend, dw.cuda_graph_runner)
        log_info_on_rank0(
            logger,
            f"EVICT: {shape} draft state (keeps {n_d - 1} of {shape.candidates} "
            f"candidates) in {time.perf_counter() - tic:.1f} s, {before - self._free_gpu_gb():.3f} GB",
        )
        return state

    def _free_gpu_gb(self) -> float:
        return float(get_available_gpu_memory(self.device, self.gpu_id)) if torch.cuda.is_available() else 0.0

    @contextlib.contextmanager
    def _at_depth(self, shape: DraftShape, batch_size: int) -> Iterator[None]:
        """Draft this step as ``shape`` (SGLang's own draft, on the shape's depth state; a chain:
        :meth:`EvictDraftWorker._chain_draft_forward`, its verify tree built at topk 1); verify and
        draft extend stay on the width states, the draft extend at the tree's topk. Everything is
        restored afterwards."""
        dw, state = self._draft_worker, self.depth_states[shape]
        fields = [
            (self, "speculative_num_steps"),
            (dw, "speculative_num_steps"),
            (dw, "full_num_draft_tokens"),
            (dw, "draft_attn_backend"),
            (dw.draft_runner, "draft_attn_backend"),
            (dw, "cuda_graph_runner"),
            (dw, "step_cost"),
            (dw, "topk"),
        ]
        saved = [getattr(obj, name) for obj, name in fields]
        row = self.depth.index[shape]
        self.speculative_num_steps = dw.speculative_num_steps = state.steps
        dw.topk = shape.topk  # a chain's draft and verify input at topk 1
        dw.full_num_draft_tokens = state.num_draft_tokens
        dw.draft_attn_backend = dw.draft_runner.draft_attn_backend = state.draft_attn_backend
        dw.cuda_graph_runner = state.cuda_graph_runner
        # the uncorrected row is what this step's timing sample is priced at (_after_timed_step)
        self._depth_prices = self.depth.shape_costs(batch_size)[row].to(torch.float64)
        dw.step_cost = (self._depth_prices * self.depth.cost_factors(batch_size)[row]).to(torch.float32)
        try:
            yield
        finally:
            for (obj, name), value in zip(fields, saved, strict=True):
                setattr(obj, name, value)

    def _plain_cost(self, batch_size: int, full: torch.Tensor) -> float:
        """ms of a plain step: measured, else the table's drafting-free step, else a width-1 tree step."""
        plain = self.plain_costs
        if plain is not None and any(plain.observed[plain.bucket(batch_size)]):
            return float(plain.predict(batch_size, 1))
        table = self.cost_prior
        if self._table_prices_depths():
            return float(table.shape_cost(batch_size, [1], self.topk, 0)[0])
        return float(full[0])  # an upper bound: the tree drafted, then cut to the root

    def _skipped_share(self, batch_size: int, shape: DraftShape) -> float:
        """The share of the full tree's drafting that drafting ``shape`` does not run.

        From the table's per-shape drafting where it prices the shape's topk that deep, else
        ``(S - d) / S``: a chain then starts priced like the tree of its depth (on a GPU at small
        batches, one row per request costs about what ``topk`` do), and its own measured steps
        correct it (``DepthController.record_step``)."""
        s, k, table = self.full_num_steps, self.topk, self.cost_prior
        if self._table_prices_depths() and self._table_prices_depths(shape.topk, shape.depth):
            full = table.draft_cost(batch_size, k, s) - table.draft_cost(batch_size, k, 0)
            if full > 0:
                skip = table.draft_cost(batch_size, k, s) - table.draft_cost(
                    batch_size, shape.topk, shape.depth
                )
                return min(max(skip / full, 0.0), 1.0)
        return (s - shape.depth) / s

    def _table_prices_depths(self, topk: int | None = None, depth: int | None = None) -> bool:
        """Whether the start-up table prices drafting ``topk`` (default: the tree's) ``depth`` deep
        (default: the full depth)."""
        table = self.cost_prior
        need = self.full_num_steps if depth is None else depth
        return table is not None and getattr(table, "draft_shapes", {}).get(topk or self.topk, 0) >= need

    def _depth_costs(self, batch_size: int) -> torch.Tensor:
        """``[D, W]`` ms of each offered shape at each width (uncorrected; the controller applies its
        measured factors): plain decoding (one token at any width), each shallower depth (the
        full tree's costs less the drafting it skips, inf past its widest width), the full tree."""
        full = self.truncation_policy.step_cost(batch_size).detach().to("cpu", torch.float64)
        plain = self._plain_cost(batch_size, full)
        rows = [torch.full_like(full, plain)]
        widths = self.truncation_policy.widths  # host tensor
        for shape in self.depth.shapes[1:] if self.depth is not None else ():
            if shape not in self.depth_states:  # the full tree
                rows.append(full)
                continue
            # the full tree's drafting as this server prices it (its width-1 step less a plain
            # step: both measured once live costs run), times the share this shape's draft skips
            # (from the table's per-shape drafting when it has one, else (S - d) / S)
            skipped = max(float(full[0]) - plain, 0.0) * self._skipped_share(batch_size, shape)
            n_d = self.depth_states[shape].num_draft_tokens
            row = (full - skipped).clamp(min=plain)
            row[widths > n_d] = float("inf")
            rows.append(row)
        return torch.stack(rows)

    def _plan_depth(self, batch_size: int) -> DraftShape:
        """The controller's plan, except while this batch size's plain step or widths are still
        being timed; with TP > 1, the last-listed plan of any rank (a collective: every rank, every
        decode step)."""
        plain, live = self.plain_costs, getattr(self, "live_costs", None)
        if plain is not None and plain.explore_index(batch_size) is not None:
            shape = self.depth.force(self.depth.shapes[0])
        elif live is not None and live.explore_index(batch_size) is not None:
            shape = self.depth.force(self.depth.shapes[-1])  # the full tree's widths are being timed
        else:
            shape = self.depth.plan(batch_size)
        agreement = getattr(self, "depth_agreement", None)
        if agreement is not None:
            shape = self.depth.shapes[agreement.agree(self.depth.index[shape])]
        return shape

    def _observe_tree(self, scores: torch.Tensor, top_scores_index: torch.Tensor) -> None:
        """A drafted tree's kept scores ``[bs, n-1]`` at their flat candidate indices: the
        controller's input. The kept nodes are the drafter's best ``n-1`` of the tree, so for every
        depth cap the kept ones of that depth are its best too (exact up to their count)."""
        dw = self._draft_worker
        shape = DraftShape(dw.topk, dw.speculative_num_steps)  # the chain's topk 1 while one is drafted
        flat = torch.zeros((scores.shape[0], shape.candidates), dtype=torch.float32, device=scores.device)
        flat.scatter_(1, top_scores_index.long(), scores.float())
        self.depth.observe(shape, flat)

    # -- live step costs ------------------------------------------------------------------------
    def _start_live_costs(self, policy: TruncationPolicy) -> TruncationPolicy:
        """Serve ``policy``'s rule on costs corrected from every decode step (:mod:`live_costs`).

        The prior is the start-up table (``EVICT_COST_TABLE`` or the graph-replay calibration),
        else this setup's cached live table (same cache and key scheme as the calibration), else
        none: each batch-size bucket then times its widths on its first steps. The policy reads one
        ``[rows, W]`` tensor on the draft's device, refreshed in place when the table is published
        (every few steps, max-reduced over the TP ranks on their CPU group first).
        """
        dw, cfg = self._draft_worker, self.evict_config
        rows = dw.score_sink.rows
        widths = tuple(int(w) for w in policy.widths.tolist())
        buckets = bucket_sizes(rows)
        parallel = get_parallel()
        key = calibration_key(
            model_path=self.server_args.model_path,
            revision=self.server_args.revision,
            gpu_name=self._device_name(),
            tp_size=parallel.tp_size,
            dtype=self._dtype_name(),
            widths=widths,
            batch_sizes=buckets,
            draft_steps=self.speculative_num_steps,
            draft_topk=self.topk,
        )
        prior, source = self.cost_prior, "the start-up table"
        if prior is None and not cfg.recalibrate:
            prior, source = load_cached(key), f"the cached live table {key.path()}"
        if prior is None:
            source = "no table: each width is timed on the first steps of each batch size"
        live = LiveCosts(
            widths,
            buckets,
            prior,
            reduce=tp_max_reduce(get_tp_group().cpu_group) if parallel.tp_size > 1 else None,
            metadata={
                **key.table_metadata(),
                **({"model_config_hash": key.config_hash} if key.config_hash else {}),
                "clock": "cuda events" if dw.score_sink.buffer.device.type == "cuda" else "host perf_counter",
            },
        )
        self.live_costs = dw.live_costs = live
        self._live_key = key
        self._live_observed = 0
        self._cost_rows = live.cost_grid(rows).to(dw.score_sink.buffer.device)
        marks = cuda_event_marks() if dw.score_sink.buffer.device.type == "cuda" else host_marks()
        self.step_timer = StepTimer(marks)
        log_info_on_rank0(logger, f"EVICT: live step costs from {source} (ms): {live.summary()}")
        return TruncationPolicy(
            self._live_cost,
            widths=widths,
            decision=policy.decision,
            decider=policy.decider,
            per_request=policy.per_request,
            pad_cost=policy.pad_cost,
        )

    def _live_cost(self, batch_size: int, widths: Any) -> torch.Tensor:
        """The policy's cost source: a view of the live cost rows (refreshed in place)."""
        rows = self._cost_rows
        return rows[min(max(int(batch_size), 1), rows.shape[0]) - 1]

    def _after_timed_step(self, batch_size: int) -> None:
        """One decode step done: end its timing, feed every readable sample, publish every K steps.

        A plain step (EVICT_DEPTH=1) is timed as width 0 and its samples go to ``plain_costs``: it
        verifies one token like a tree cut to width 1, but drafts nothing. A step that drafted a
        shallower tree or a chain is timed as width ``-i`` (``i``: the shape's index in
        ``DepthController.shapes``) with its uncorrected price, never entering the full tree's
        table. With EVICT_DEPTH=1 every sample also goes to ``DepthController.record_step`` under
        its shape.
        """
        live, timer, plain = self.live_costs, self.step_timer, getattr(self, "plain_costs", None)
        shape = getattr(self, "_step_shape", None)
        width = 0 if getattr(self, "_plain_step", False) else self.speculative_num_draft_tokens
        try:
            # A plain or full step priced from a cell not yet timed in its bucket (the 1 ms
            # placeholder, a prior, another bucket's cost) must not set that shape's correction in
            # DepthController.record_step (one such plain step put the plain price at 10x).
            if width == 0:
                predicted = plain.predict(batch_size, 1) if plain is not None else float("nan")
                price_measured = plain is not None and plain.measured(batch_size, 1)
            elif shape is not None and shape in self.depth_states:
                j = self._draft_worker._host_widths(self.truncation_policy).index(width)
                predicted = float(self._depth_prices[j])  # priced by _at_depth for this step
                price_measured = True  # a modelled price: what its correction is for
                width = -self.depth.index[shape]
            else:
                predicted = live.predict(batch_size, width) if width in live.widths else float("nan")
                price_measured = live.measured(batch_size, width)
            timer.end(batch_size, width, predicted, price_measured=price_measured)
            for sample in timer.poll():
                if sample.width == 0:
                    if plain is not None:
                        plain.observe(dataclasses.replace(sample, width=1))
                elif sample.width > 0:
                    live.observe(sample)
                if getattr(self, "depth", None) is not None and sample.price_measured:
                    # every shape's steps, the measured plain and full ones too (their ratio stays
                    # near 1): a shape's correction must not fall back on another shape's ratio
                    self.depth.record_step(
                        self._sampled_shape(sample.width),
                        sample.batch_size,
                        sample.predicted_ms,
                        sample.measured_ms,
                    )
        except Exception as exc:  # a local failure: this rank loses a sample, never the cadence below
            self.truncation_policy.counters.record_error(exc, "timing a decode step failed")
        # Every rank, every decode step: the publications are TP collectives every sync_every steps.
        if plain is not None:
            plain.on_step()
        if live.on_step():
            self._refresh_live_costs()

    def _sampled_shape(self, width: int) -> DraftShape:
        """The shape a timing sample's width tags: 0 plain, -i the controller's shape i (a shallower
        tree or a chain), else the full tree."""
        if width == 0:
            return self.depth.shapes[0]
        return self.depth.shapes[-width] if width < 0 else self.depth.shapes[-1]

    def _refresh_live_costs(self) -> None:
        """Copy the published table into the rows the policy reads; log and cache newly measured cells."""
        live, rows = self.live_costs, self._cost_rows
        grid = live.cost_grid(rows.shape[0])
        if rows.device.type == "cuda":
            rows.copy_(grid.pin_memory(), non_blocking=True)  # queued, no host wait
        else:
            rows.copy_(grid)
        observed = sum(sum(r) for r in live.observed)
        if observed <= self._live_observed:
            return
        self._live_observed = observed
        log_info_on_rank0(logger, f"EVICT: live step costs (ms, * = measured): {live.summary()}")
        if get_parallel().tp_rank == 0:
            path = self._live_key.path()
            try:
                live.table().save(path)
            except OSError as exc:  # a read-only cache must not stop the server
                logger.warning("EVICT: could not cache the live cost table at %s (%s)", path, exc)

    def _capture_context(self) -> contextlib.AbstractContextManager:
        """The scopes SGLang captures the draft's graphs in (draft TP layout, speculative MoE)."""
        stack = contextlib.ExitStack()
        stack.enter_context(draft_tp_context(self._draft_worker.parallel_layout))
        stack.enter_context(speculative_moe_backend_context())
        stack.enter_context(speculative_moe_a2a_backend_context())
        return stack

    def _set_policy(self, policy: TruncationPolicy) -> None:
        """Serve ``policy``: on both workers and the metrics, with every step cost already on device.

        The cost vector of each batch size the draft can see is computed and copied now, so no
        decode step waits for a host-to-device copy (the first step at a new size used to).
        """
        dw = self._draft_worker
        self.truncation_policy = self.evict_metrics.policy = dw.truncation_policy = policy
        dw.use_width = self.use_width
        device = dw.score_sink.buffer.device
        try:
            for bs in range(1, dw.score_sink.rows + 1):
                policy.step_cost(bs, device)
        except Exception as exc:  # a bad cost source fails the first step instead (and falls back)
            logger.warning("EVICT: could not precompute the step costs (%r); computing them per step", exc)

    def _fingerprint_batch_sizes(self) -> tuple[int, ...]:
        rows = self._draft_worker.score_sink.rows
        return tuple(sorted({1, rows, *(1 << i for i in range(rows.bit_length()) if (1 << i) <= rows)}))

    def _agree_on_policy(self, when: str) -> bool:
        """TP > 1: check that every rank serves the same policy; if not, all verify the full tree.

        Why: ranks agree on a width *index* each step, so they must index the same widths, with
        the same rule.  A rank whose start-up calibration failed (or whose table differs) would
        otherwise index out of range or choose another tree.  A collective: every rank calls it at
        the same points (start-up, and after a graph recapture).
        """
        agreement = self._draft_worker.width_agreement
        if agreement is None:
            return True
        fingerprint = policy_fingerprint(self.truncation_policy, self._fingerprint_batch_sizes())
        if agreement.same_everywhere(fingerprint):
            return True
        logger.error(
            "EVICT (%s): the TP ranks hold different policies (this rank: decision=%s, widths=%s); every "
            "rank verifies the full tree. Give every rank the same EVICT_COST_TABLE, or look for a "
            "calibration error in the other ranks' logs",
            when,
            self.truncation_policy.decision,
            self.truncation_policy.widths.tolist(),
        )
        self._set_policy(TruncationPolicy([1.0], widths=[self.full_num_draft_tokens], decision="off"))
        self._draft_worker.acceptance = None
        return False

    def _memory_estimates(self) -> str:
        """The reserve EVICT's formula predicts per width, beside SGLang's own graph-memory figures."""
        runner = self._target_worker.model_runner
        extra = [w for w in self.width_states.widths if w != self.full_num_draft_tokens]
        sizes = _graph_sizes(self.width_states.state(self.full_num_draft_tokens).target_graph_runner)
        context_len = getattr(getattr(runner, "model_config", None), "context_len", None)
        line = "EVICT: no predicted graph memory (no context length)"
        # the live backend's class first (what was built), then the flag
        for backend in (
            type(runner.attn_backend).__name__,
            getattr(self.server_args, "attention_backend", None),
        ):
            try:
                reserve = width_graph_reserve(
                    str(backend),
                    extra,
                    self.full_num_draft_tokens,
                    sizes,
                    int(context_len),
                    draft_extend=self._draft_worker.draft_extend_attn_backend is not None,
                )
            except Exception as exc:  # unknown backend or no captured sizes: the measurement stands
                line = f"EVICT: no predicted graph memory ({exc})"
                continue
            predicted = ", ".join(f"{w}: {b / 2**30:.3f}" for w, b in reserve.gpu_bytes.items())
            line = f"EVICT: predicted graph memory per extra width (GB, {reserve.basis}): {predicted or '-'}"
            if getattr(self, "depth_states", None):  # EVICT_DEPTH=1: measured in each depth's line
                per_depth = []
                for topk in sorted({sh.topk for sh in self.depth_states}, reverse=True):
                    depths = [sh.depth for sh in self.depth_states if sh.topk == topk]
                    drafts = depth_graph_reserve(str(backend), depths, topk, sizes, int(context_len))
                    name = "chain" if topk == 1 else "d"
                    per_depth += [f"{name}={d}: {b / 2**30:.3f}" for d, b in drafts.gpu_bytes.items()]
                line += f"; per shallower depth's and chain's draft graphs: {', '.join(per_depth)}"
            break
        try:
            usage = self.graph_memory_usage
        except Exception:  # noqa: BLE001 (a log line only)
            usage = {}
        sglang = ", ".join(f"{k}={v:.3f}" for k, v in sorted(usage.items()) if v)
        return f"{line}; SGLang's graph memory estimate (GB, EVICT's widths included): {sglang or '-'}"

    def build_width_state(self, width: int, full: SpecRuntimeState) -> SpecRuntimeState:
        """Target-verify and draft-extend state for ``width``; shares all that the width does not change.

        Unlike SGLang's ``build_adaptive_runtime_state`` (made for changing the number of draft
        steps), a width state needs no draft-decode backend or graphs (drafting always builds the
        full tree: ``full``'s are reused, and none is captured or logged) and no workspace of its
        own (width states never run concurrently, so the target's attention backend reuses the one
        global workspace instead of allocating another 384 MB per width with
        ``init_new_workspace=True``).
        """
        dw = self._draft_worker
        target_runner = self._target_worker.model_runner
        with self._override_worker_state(self.speculative_num_steps, width):
            dw.draft_attn_backend = dw.draft_runner.draft_attn_backend = full.draft_attn_backend
            dw.draft_extend_attn_backend = DraftBackendFactory(
                dw.draft_runner,
                dw.topk,
                self.speculative_num_steps,
                seed_dsa_topk_from_draft_extend=dw.seed_dsa_topk_from_draft_extend,
                qsa_profile=parse_qsa_profile(dw.draft_runner.model_config.hf_config),
            ).create_draft_extend_backend()
            if dw.draft_extend_attn_backend is not None:
                dw.draft_runner.attn_backend = dw.draft_extend_attn_backend
            with _without_draft_decode_graph():
                dw._capture_cuda_graphs()  # the draft-extend graph of this width only
            target_attn_backend = target_runner._get_attention_backend(init_new_workspace=False)
            target_graph_runner = self._capture_verify_graph(width, target_attn_backend)
            return SpecRuntimeState(
                speculative_num_steps=self.speculative_num_steps,
                speculative_num_draft_tokens=width,
                draft_attn_backend=full.draft_attn_backend,
                cuda_graph_runner=full.cuda_graph_runner,
                target_attn_backend=target_attn_backend,
                target_graph_runner=target_graph_runner,
                draft_extend_attn_backend=dw.draft_extend_attn_backend,
                cuda_graph_runner_for_draft_extend=dw.cuda_graph_runner_for_draft_extend,
            )

    def _capture_verify_graph(self, width: int, attn_backend: Any) -> Any:
        """The target-verify graphs of ``width`` (None with decode graphs off), counted as SGLang's.

        Call inside ``_override_worker_state(steps, width)``.  The memory and time go to SGLang's
        own ``target_verify`` figures (``_additional_graph_memory_usage``), as its adaptive runtime
        states do, so its graph-memory report includes EVICT's widths.
        """
        if check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED):
            return None
        before = get_available_gpu_memory(self.device, self.gpu_id)
        tic = time.perf_counter()
        runner = DecodeCudaGraphRunner(
            self._target_worker.model_runner,
            attn_backend=attn_backend,
            speculative_num_steps=self.speculative_num_steps,
            speculative_num_draft_tokens=width,
        )
        used = before - get_available_gpu_memory(self.device, self.gpu_id)
        memory = getattr(self, "_additional_graph_memory_usage", None)
        if isinstance(memory, dict):
            memory["target_verify"] = memory.get("target_verify", 0.0) + used
        seconds = getattr(self, "_additional_graph_time_usage", None)
        if isinstance(seconds, dict):
            seconds["target_verify"] = seconds.get("target_verify", 0.0) + time.perf_counter() - tic
        return runner

    # -- graph recapture (weight updates, PD role switch, elastic EP) -----------------------------
    _RECAPTURE_ENTRY_POINTS = ("init_decode_cuda_graph", "_recapture_elastic_cuda_graphs")

    def _hook_recapture(self) -> None:
        """Rebuild the width states whenever SGLang recaptures the target's decode graphs.

        SGLang 0.5.23 recaptures only the live (full-width) target runner:
        ``ModelRunner.recapture_decode_cuda_graph`` (weight updates with ``recapture_cuda_graph``)
        and ``ensure_decode_cuda_graphs`` (PD role switch) both call ``init_decode_cuda_graph``,
        elastic EP calls ``_recapture_elastic_cuda_graphs``.  Each replaces
        ``decode_cuda_graph_runner`` and nothing else, so EVICT's stored states would keep the old
        runners (the next switch back to N would even drop the new one).  Both methods are looked
        up on the runner instance, so wrapping them there catches every path.
        """
        runner = self._target_worker.model_runner
        for name in self._RECAPTURE_ENTRY_POINTS:
            original = getattr(runner, name, None)
            if original is None or getattr(original, "_evict_recapture", False):
                continue

            def wrapped(*args, _original=original, _name=name, **kwargs):
                return self._recapture(_name, _original, *args, **kwargs)

            wrapped._evict_recapture = True
            setattr(runner, name, wrapped)

    def _recapture(self, what: str, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        n = self.full_num_draft_tokens
        # SGLang captures the live runner's graphs with the live attention backend: make it N's.
        self.width_states.activate(n)
        runner = self._target_worker.model_runner
        before = runner.decode_cuda_graph_runner
        result = original(*args, **kwargs)
        if runner.decode_cuda_graph_runner is not before:  # e.g. elastic EP without graphs: nothing new
            self._rebuild_width_states(what)
        return result

    def _rebuild_width_states(self, what: str) -> None:
        """After SGLang recaptured N's verify graphs: recapture every other width's, or stop using them.

        The draft's graphs are not recaptured (SGLang's recapture leaves them too).  If a width
        fails, no stale state is kept: EVICT verifies the full tree from then on, and says so.
        """
        n = self.full_num_draft_tokens
        runner = self._target_worker.model_runner
        full = dataclasses.replace(
            self.width_states.state(n),
            target_attn_backend=runner.attn_backend,
            target_graph_runner=runner.decode_cuda_graph_runner,
        )
        states = {n: full}
        try:
            with self._capture_context():
                for width in self.width_states.widths:
                    if width == n:
                        continue
                    old = self.width_states.state(width)
                    tic = time.perf_counter()
                    with self._override_worker_state(self.speculative_num_steps, width):
                        graph = self._capture_verify_graph(width, old.target_attn_backend)
                    states[width] = dataclasses.replace(old, target_graph_runner=graph)
                    log_info_on_rank0(
                        logger,
                        f"EVICT: recaptured the width-{width} verify graphs after {what} "
                        f"in {time.perf_counter() - tic:.1f} s",
                    )
        except Exception as exc:
            logger.error(
                "EVICT: recapturing the verify graphs of the extra widths after %s failed (%r); their "
                "captured states are stale, so EVICT verifies the full tree (width %d) from now on",
                what,
                exc,
                n,
                exc_info=exc,
            )
            self.width_states.reset({n: full}, active=n)
            self._set_policy(TruncationPolicy([1.0], widths=[n], decision="off"))
            self._draft_worker.acceptance = None
        else:
            self.width_states.reset(states, active=n)
        self._apply_width_state(n, full)
        self._agree_on_policy(f"after {what}")

    def use_width(self, width: int) -> None:
        """Verify and draft-extend this step at ``width``: its captured state, and the width itself.

        The state swap happens only when the width changes; the width is written every step,
        because ``EvictDraftWorker.draft`` resets the draft worker's to N for drafting and draft
        extend reads it back (``prepare_draft_extend_inputs`` strides by it).
        """
        self.width_states.activate(width)
        self.speculative_num_draft_tokens = self._draft_worker.speculative_num_draft_tokens = width

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
        extend = batch.forward_mode.is_extend() or batch.is_extend_in_batch
        if extend:
            # Prefill (and mixed chunks) run on the full-width state, as under EAGLE3.
            self.use_width(self.full_num_draft_tokens)
        timer = getattr(self, "step_timer", None)
        timed = timer is not None and not extend and not batch.forward_mode.is_idle()
        if timed:
            batch_size = int(batch.seq_lens.shape[0])
            timer.begin()
        elif timer is not None and extend:
            timer.interrupt()  # the last decode step ends at its own end, not at this prefill
        depth = getattr(self, "depth", None)
        shape = None
        if depth is not None and not extend and not batch.forward_mode.is_idle():
            depth.on_requests([req.rid for req in batch.reqs])
            shape = self._plan_depth(int(batch.seq_lens.shape[0]))
        self._step_shape = shape
        self._plain_step = shape is not None and shape.depth == 0
        kwargs = dict(
            on_publish=on_publish, grammar_barrier=grammar_barrier, pp_proxy_tensors=pp_proxy_tensors
        )
        if self._plain_step:  # SGLang's steps=0 path: verify the last token alone (width 1)
            steps = self.speculative_num_steps
            self.use_width(1)
            self.speculative_num_steps = 0
            try:
                result = super().forward_batch_generation(batch, **kwargs)
            finally:
                self.speculative_num_steps = steps
        elif shape is not None and shape in self.depth_states:  # a shallower tree, or a chain
            with self._at_depth(shape, int(batch.seq_lens.shape[0])):
                result = super().forward_batch_generation(batch, **kwargs)
        else:
            result = super().forward_batch_generation(batch, **kwargs)
        if timed:
            try:
                self._after_timed_step(batch_size)
            except Exception as exc:  # bookkeeping must never fail a request: stop correcting
                logger.error(
                    "EVICT: live step costs failed (%r); keeping the current table", exc, exc_info=exc
                )
                self.step_timer = None
        return result

    def verify(self, batch: Any, pp_proxy_tensors=None, grammar_barrier=None):
        if self.speculative_num_draft_tokens == self.full_num_draft_tokens:  # the config bag's own width
            result = super().verify(batch, pp_proxy_tensors=pp_proxy_tensors, grammar_barrier=grammar_barrier)
        else:
            with get_spec().override(speculative_num_draft_tokens=self.speculative_num_draft_tokens):
                result = super().verify(
                    batch, pp_proxy_tensors=pp_proxy_tensors, grammar_barrier=grammar_barrier
                )
        if not batch.forward_mode.is_idle():
            self._draft_worker.learn(result.accept_index, self.speculative_num_draft_tokens)
            self.evict_metrics.on_decode_step()
            if getattr(self, "depth", None) is not None:
                plain = getattr(self, "_plain_step", False)
                decision = None if plain else self._draft_worker.last_decision
                shape = getattr(self, "_step_shape", None) or self.depth.shapes[-1]
                self._depth_pending.append(None if decision is None else (shape, decision.expected_accepted))
        return result

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        super().on_verify_complete_cpu(num_correct_drafts_per_req, batch_size=batch_size)
        self.evict_metrics.record_num_correct_drafts(num_correct_drafts_per_req)
        depth = getattr(self, "depth", None)
        if depth is not None and self._depth_pending and num_correct_drafts_per_req:
            # the step whose results these are (steps are processed in order); its work is done, so
            # reading its predicted accepted length waits for nothing still running
            pending = self._depth_pending.popleft()
            if pending is not None:
                shape, expected = pending
                realized = 1.0 + sum(num_correct_drafts_per_req) / len(num_correct_drafts_per_req)
                depth.record_outcome(shape, float(expected.float().mean()), realized)
