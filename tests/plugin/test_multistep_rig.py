"""The multi-step rig (issue 12): EVICT's per-step decode path through SGLang 0.5.23's own code, on CPU.

Each test drives ``EvictWorkerV2.forward_batch_generation`` (EVICT's worker over SGLang's
``EAGLEWorkerV2``) for 60 decode steps at batch size 3, with the verify width forced through a
scripted sequence that repeats, rises, falls and reaches 1 and N.  The width comes from EVICT's
real ``TruncationPolicy`` (``ScriptedCostPolicy`` only makes the scripted width the one affordable
width), so the worker's ``choose_width`` -> ``cut_draft_tree`` -> ``use_width`` ->
``build_verify_input`` path runs as it does when serving.

Real SGLang code on the path: ``EagleDraftWorker.draft`` / ``draft_forward`` (with
``select_top_k_tokens`` and ``organize_draft_results``), ``prepare_for_draft``,
``build_eagle_verify_input`` and ``build_tree_kernel_efficient``, ``run_eagle_verify`` (with
``eagle_prepare_for_verify``, ``eagle_sample``, ``fill_bonus_tokens``,
``move_accept_tokens_to_target_kvcache`` and ``_compact_accept_to_front``),
``_draft_extend_for_decode`` (its CPU branch computes ``select_index`` from the draft worker's
``speculative_num_draft_tokens``) with ``prepare_for_draft_extend``, and
``eagle_prepare_for_decode`` with a real ``ReqToTokenPool``, ``TokenToKVPoolAllocator`` and
``MHATokenToKVPool``, so every KV slot is allocated, moved and freed by SGLang's own pool code.

Stand-ins, for what only a GPU or a model provides:

- the sgl-kernel CPU operators come from ``evict.testing.cpu_ops`` (registered with
  ``torch.library`` and bound where SGLang's modules bind them when ``is_cpu()``); its tree builder
  keeps the CUDA kernel's host checks (``tree.cuh``: ``depth > 0`` and
  ``depth == 1 || parent_width == topk*(depth-1)+1``) and ``parent_list`` row stride, so a
  configuration a GPU refuses fails here too;
- ``tree_speculative_sampling_target_only`` (a CUDA-only JIT kernel) is ported to torch below;
- the draft and target models return seeded random logits; the target leans towards one child
  of each node so that acceptances of every length occur;
- ``ForwardBatch.init_new`` copies the handful of batch fields the code under test reads;
- attention backends are per-width objects that check the width of every batch they are given.

At every step the rig asserts that verify and draft extend ran at the scripted width (the
backends, ``prepare_for_draft_extend``'s ``num_draft_tokens``, ``select_index``'s stride), that the
KV slots allocated equal the committed ("kept") plus reserved plus freed slots and that the
accepted KV landed in the committed slots, and that the accepted tokens are what the reference
engine's acceptance (``evict.engine.acceptance``) gives on the same tree, built independently
from the draft lists by ``evict.engine.tree_layout``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
from _tiny_configs import tiny_configs  # noqa: E402
from sglang.kernels.ops.speculative import cache_locs, spec_tree  # noqa: E402
from sglang.kernels.ops.speculative import eagle as eagle_kernels  # noqa: E402
from sglang.kernels.ops.speculative.eagle import prepare_draft_extend_inputs  # noqa: E402
from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.mem_cache import allocation  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode  # noqa: E402
from sglang.srt.speculative import eagle_utils, eagle_worker_common, eagle_worker_v2, spec_utils  # noqa: E402
from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState  # noqa: E402
from sglang.srt.speculative.eagle_info import EagleDraftInput  # noqa: E402
from sglang.srt.speculative.eagle_utils import TreeMaskMode, eagle_prepare_for_decode  # noqa: E402
from transformers import PretrainedConfig  # noqa: E402

from evict.engine.acceptance import greedy_accept, sampling_accept  # noqa: E402
from evict.engine.tree_layout import (  # noqa: E402
    PAD_PARENT,
    DraftTree,
    num_candidates,
    select_verify_tree,
    sglang_parents,
)
from evict.plugin import worker as evict_worker  # noqa: E402
from evict.plugin.metrics import EvictMetrics, RealNodeCounter  # noqa: E402
from evict.plugin.tree_cut import ScoreSink  # noqa: E402
from evict.plugin.width_states import WidthStateSet  # noqa: E402
from evict.testing import cpu_ops  # noqa: E402
from evict.truncation import AcceptanceEstimator, TruncationPolicy, choose_widths_batch_budget  # noqa: E402
from evict.truncation.depth import DepthController, DraftShape  # noqa: E402

pytestmark = pytest.mark.sglang

BS, TOPK, STEPS, N = 3, 4, 5, 16  # parent_list is topk*(steps-1)+1 = 17 wide: depths 2..4 are refused
WIDTHS = (1, 2, 3, 4, 5, 8, 16)
VOCAB, HIDDEN, CONTEXT, POOL = 64, 4, 192, 4096
# repeats (4 4 4, 1 1, 16 16, 2 2, 3 3), a rise 1..16, a fall 16..1, and 1 and N next to each other
WIDTH_SCRIPT = [
    16,
    4,
    4,
    4,
    1,
    1,
    2,
    3,
    5,
    8,
    16,
    16,
    8,
    5,
    3,
    2,
    1,
    4,
    8,
    2,
    2,
    16,
    1,
    16,
    3,
    3,
    5,
    4,
    2,
    8,
] * 2

_select_later = getattr(
    spec_utils._select_top_k_tokens_later,
    "_torchdynamo_orig_callable",
    getattr(spec_utils._select_top_k_tokens_later, "__wrapped__", spec_utils._select_top_k_tokens_later),
)

TARGET_CONFIG, DRAFT_CONFIG = tiny_configs(VOCAB)


# ---------------------------------------------------------------------------------------------
# Stand-ins
# ---------------------------------------------------------------------------------------------
def tree_speculative_sampling_target_only_cpu(
    predicts,
    accept_index,
    accept_token_num,
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    uniform_samples,
    uniform_samples_for_final_sampling,
    target_probs,
    draft_probs,
    threshold_single=1.0,
    threshold_acc=1.0,
    deterministic=True,
):
    """Torch port of SGLang's ``tree_speculative_sampling_target_only`` (CUDA only).

    Copies ``kernels/jit/csrc/speculative/sampling.cuh`` (host checks) and
    ``kernels/jit/include/sgl_kernel/speculative/sampling.cuh`` (``TreeSpeculativeSamplingTargetOnly``):
    from the root, try the children in sibling order with a running sum of their target
    probabilities; accept the first child whose sum exceeds the node's coin (or whose probability
    reaches ``threshold_single``); at the last accepted node, sample from ``relu(target - draft)``
    where ``draft`` holds the target probabilities of the rejected children (none after a
    full-depth path) with the final coin.
    """
    bs, n = candidates.shape
    spec_tokens = accept_index.shape[1]
    vocab = target_probs.shape[-1]
    if not (n > 0 and spec_tokens > 0 and vocab > 0):  # CHECK_HOST in sampling.cuh
        raise RuntimeError(f"tree sampling: draft_tokens={n}, spec_tokens={spec_tokens}, vocab={vocab}")
    if tuple(target_probs.shape) != (bs, n, vocab) or tuple(draft_probs.shape) != (bs, n, vocab):
        raise RuntimeError(
            f"tree sampling: probs {tuple(target_probs.shape)} do not match candidates {(bs, n)}"
        )
    if predicts.numel() != bs * n or tuple(uniform_samples.shape) != (bs, n):
        raise RuntimeError("tree sampling: predicts / uniform_samples do not match candidates")
    if not (0 <= threshold_single <= 1 and 0 <= threshold_acc <= 1):
        raise RuntimeError("tree sampling: thresholds must lie in [0, 1]")
    threshold_acc = max(float(threshold_acc), 1e-9)
    for b in range(bs):
        cur_node = 0
        coin = float(uniform_samples[b, 0])
        last = int(retrive_index[b, 0])
        accept_index[b, 0] = last
        accepted = 0
        prob_acc = 0.0
        cur = 0
        for _ in range(1, spec_tokens):
            cur = int(retrive_next_token[b, cur])
            while cur != -1:
                token = int(candidates[b, cur])
                p = float(target_probs[b, cur_node, token])
                prob_acc = float(torch.tensor(prob_acc + p, dtype=torch.float32))
                if p > 0 and (coin < prob_acc / threshold_acc or p >= threshold_single):
                    prob_acc = 0.0
                    cur_node = cur
                    coin = float(uniform_samples[b, cur])
                    predicts[last] = token
                    accepted += 1
                    accept_index[b, accepted] = int(retrive_index[b, cur])
                    last = int(retrive_index[b, cur])
                    break
                draft_probs[b, cur_node, token] = target_probs[b, cur_node, token]
                cur = int(retrive_next_sibling[b, cur])
            if cur == -1:
                break
        accept_token_num[b] = accepted
        q = target_probs[b, cur_node]
        p = draft_probs[b, cur_node] if accepted != spec_tokens - 1 else torch.zeros_like(q)
        residual = (q - p).clamp(min=0)
        u = float(uniform_samples_for_final_sampling[b]) * float(residual.sum())
        csum = residual.cumsum(0)
        hit = ((csum > u) & (residual > 0)).nonzero()
        valid = (residual > 0).nonzero()
        predicts[last] = int(hit[0]) if hit.numel() else (int(valid[-1]) if valid.numel() else vocab - 1)


class ForwardBatchStandIn(SimpleNamespace):
    """The fields of SGLang's ``ForwardBatch`` that the code under test reads, taken from the batch."""

    @classmethod
    def init_new(cls, batch, model_runner, capture_hidden_mode=None, **_kw):
        spec = batch.spec_info
        positions = getattr(spec, "positions", None)
        return cls(
            forward_mode=batch.forward_mode,
            batch_size=len(batch.seq_lens),
            input_ids=batch.input_ids,
            out_cache_loc=batch.out_cache_loc,
            seq_lens=batch.seq_lens.clone(),
            seq_lens_cpu=None if batch.seq_lens_cpu is None else batch.seq_lens_cpu.clone(),
            seq_lens_sum=batch.seq_lens_sum,
            req_pool_indices=batch.req_pool_indices,
            spec_info=spec,
            sampling_info=batch.sampling_info,
            positions=None if positions is None else positions.clone(),
            extend_seq_lens=getattr(batch, "extend_lens", None),
            extend_num_tokens=getattr(batch, "extend_num_tokens", None),
            capture_hidden_mode=capture_hidden_mode,
            moe_num_token_non_padded=None,
            metadata_ready=False,
        )

    def mark_forward_metadata_ready(self):
        self.metadata_ready = True


class WidthBackend:
    """An attention backend of one width state; it refuses a batch of any other width."""

    def __init__(self, role: str, width: int, step=lambda: -1) -> None:
        self.role, self.width, self.step = role, width, step
        self.verify_mask = None
        self.max_context_len = CONTEXT
        self.attn_backends = [self] * STEPS

    def init_forward_metadata(self, fb) -> None:
        if self.role == "draft extend":
            got = sorted(set(fb.extend_seq_lens))
            assert got == [self.width], (
                f"step {self.step()}: draft extend: the width-{self.width} backend was given {got} "
                "tokens per request"
            )


class ScriptedCostPolicy(TruncationPolicy):
    """EVICT's policy, over a step cost under which only the scripted width is affordable."""

    def __init__(self) -> None:
        super().__init__([1.0] * len(WIDTHS), widths=list(WIDTHS), decision="immediate")
        self.want = N

    def step_cost(self, batch_size, device="cpu"):
        cost = torch.full((len(WIDTHS),), 1e6)
        cost[WIDTHS.index(self.want)] = 1.0
        return cost.to(device)


class ScriptedPerRequestPolicy(TruncationPolicy):
    """EVICT_PER_REQUEST=1 with padding free (pad cost 0): the batch verifies the scripted width, and
    the shared budget rule (``choose_widths_batch_budget``, the policy's own per-request rule) picks
    how many of its slots hold real nodes under a step cost linear in the width.

    Why the width is fixed: with a pad cost of 0 the rule always verifies the widest graph (padding
    is free), so the scripted widths are imposed through the rule's ``index`` argument (what a
    host-known width does), and only the budget is chosen.
    """

    def __init__(self) -> None:
        super().__init__(
            lambda bs, widths: 1.0 + 0.12 * (widths.float() - 1.0),
            widths=list(WIDTHS),
            per_request=True,
            pad_cost=0.0,
        )
        self.want = N
        self.decisions = []

    def decide(self, scores):
        cost = self.step_cost(scores.shape[0], scores.device)
        d = choose_widths_batch_budget(
            scores, cost, self.widths.to(scores.device), pad_cost=self.pad_cost, index=WIDTHS.index(self.want)
        )
        self.decisions.append(d)
        return d


# ---------------------------------------------------------------------------------------------
# Environment: a published SGLang context and the CPU kernels bound where SGLang looks for them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sglang_context(tmp_path_factory):
    from sglang.srt.arg_groups.pipeline import run_resolution_pipeline
    from sglang.srt.runtime_context import get_spec, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    root = tmp_path_factory.mktemp("models")
    for name, cfg in (("target", TARGET_CONFIG), ("draft", DRAFT_CONFIG)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    server_args = prepare_server_args(
        [
            "--model-path", str(root / "target"),
            "--speculative-algorithm", "EAGLE3",
            "--speculative-draft-model-path", str(root / "draft"),
            "--device", "cpu",
            "--skip-tokenizer-init",
            "--speculative-num-steps", str(STEPS),
            "--speculative-eagle-topk", str(TOPK),
            "--speculative-num-draft-tokens", str(N),
        ]
    )  # fmt: skip
    run_resolution_pipeline(server_args)
    publish(server_args, role="test")
    try:
        assert get_spec().speculative_num_draft_tokens == N
        assert not get_spec().speculative_use_rejection_sampling
        yield
    finally:
        reset_context()


_PLATFORM_FLAGS = ("_is_cuda", "_is_hip", "_is_musa", "_is_xpu", "_is_npu")


def _as_cpu_platform(monkeypatch, module, **ops) -> None:
    """Make ``module`` take its CPU branch, with the stand-ins bound under SGLang's names."""
    for flag in _PLATFORM_FLAGS:
        if hasattr(module, flag):
            monkeypatch.setattr(module, flag, False)
    monkeypatch.setattr(module, "_is_cpu", True)
    for name, op in ops.items():
        monkeypatch.setattr(module, name, op, raising=False)


@pytest.fixture
def cpu_kernels(monkeypatch, sglang_context):
    cpu_ops.register()
    ops = torch.ops.sgl_kernel
    _as_cpu_platform(
        monkeypatch,
        spec_tree,
        sgl_build_tree_kernel_efficient_cpu=ops.build_tree_kernel_efficient_cpu,
        sgl_verify_tree_greedy_cpu=ops.verify_tree_greedy_cpu,
    )
    _as_cpu_platform(
        monkeypatch,
        cache_locs,
        assign_draft_cache_locs_contiguous_cpu=ops.assign_draft_cache_locs_contiguous_cpu,
        assign_extend_cache_locs_cpu=ops.assign_extend_cache_locs_cpu,
    )
    _as_cpu_platform(
        monkeypatch,
        eagle_kernels,
        fill_bonus_tokens_cpu=ops.fill_bonus_tokens_cpu,
        fill_accept_out_cache_loc_cpu=ops.fill_accept_out_cache_loc_cpu,
    )
    _as_cpu_platform(monkeypatch, allocation, assign_req_to_token_pool_cpu=ops.assign_req_to_token_pool_cpu)
    # Verify samples like a GPU: SGLang forces greedy verification on CPU (``is_all_greedy or
    # is_cpu``); lifting that predicate sends sampled batches to the tree-sampling kernel.
    for flag in ("_is_cpu", *_PLATFORM_FLAGS):
        if hasattr(eagle_utils, flag):
            monkeypatch.setattr(eagle_utils, flag, False)
    monkeypatch.setattr(
        eagle_utils, "tree_speculative_sampling_target_only", tree_speculative_sampling_target_only_cpu
    )
    for flag in _PLATFORM_FLAGS:
        if hasattr(eagle_worker_v2, flag):
            monkeypatch.setattr(eagle_worker_v2, flag, False)
    monkeypatch.setattr(spec_utils, "_select_top_k_tokens_later", _select_later)  # eager, not compiled
    monkeypatch.setattr(eagle_worker_common, "ForwardBatch", ForwardBatchStandIn)
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_uniform_func
    from sglang.srt.speculative.spec_utils import prepare_mamba_track_for_verify

    monkeypatch.setattr(
        eagle_utils,
        "_PREPARE_FOR_VERIFY_DEPS",
        (
            assign_extend_cache_locs_uniform_func,
            CaptureHiddenMode,
            ForwardBatchStandIn,
            ForwardMode,
            prepare_mamba_track_for_verify,
        ),
    )
    monkeypatch.setenv("SGLANG_NATIVE_MOVE_KV_CACHE", "1")  # move_kv_cache in torch, read by the pool
    from sglang.srt.runtime_context import get_parallel

    # one rank: eagle_sample's sampling branch asks the TP group whether to broadcast its result
    with get_parallel().override(tp_group=SimpleNamespace(world_size=1)):
        yield


# ---------------------------------------------------------------------------------------------
# The rig
# ---------------------------------------------------------------------------------------------
class StepRecord(SimpleNamespace):
    pass


class Rig:
    """Scheduler, models and pools around a real ``EvictWorkerV2`` for one decode run."""

    def __init__(
        self,
        monkeypatch,
        *,
        sampling: bool,
        mask_mode: TreeMaskMode,
        seed: int,
        acceptance: bool = False,
        per_request: bool = False,
        depth: bool = False,
    ) -> None:
        self.depth = depth
        self.draft_depth: int | None = None  # a scripted shallower depth for the next tree step
        self.draft_topk = TOPK  # 1: the next step drafts a chain (EVICT_DEPTH_CHAIN)
        self.g = torch.Generator().manual_seed(seed)
        # SGLang draws the verify coins from the global generator (no per-request seed here): seed it
        # too, so that a run is reproducible (unseeded, the coverage checks failed about 1 run in 15)
        torch.manual_seed(seed)
        self.sampling = sampling
        self.per_request = per_request
        self.padded_steps = 0  # steps with at least one padded slot
        self.padded_slots = 0
        self.empty_rows = 0  # requests that verified the root alone inside a wider tree
        self.learned = []  # per-request + calibrated: (verified mask, padded flat mask) per update
        self.rec = StepRecord()
        self.step = 0
        self.plain_steps = 0
        self._install_recorders(monkeypatch)

        # KV: SGLang's pools (page size 1), with every slot counted as it is allocated or freed
        self.kv = MHATokenToKVPool(
            size=POOL,
            page_size=1,
            dtype=torch.float32,
            head_num=1,
            head_dim=2,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
            enable_alt_stream=False,
        )
        self.allocator = TokenToKVPoolAllocator(POOL, torch.float32, "cpu", self.kv, need_sort=False)
        self.req_to_token_pool = ReqToTokenPool(
            size=8, max_context_len=CONTEXT, device="cpu", enable_memory_saver=False
        )
        self.slots_allocated = self.slots_freed = 0
        alloc, free = self.allocator.alloc, self.allocator.free

        def counted_alloc(need):
            out = alloc(need)
            self.slots_allocated += 0 if out is None else int(out.numel())
            return out

        def counted_free(index):
            self.slots_freed += int(index.numel())
            return free(index)

        self.allocator.alloc, self.allocator.free = counted_alloc, counted_free
        self.tree_cache = SimpleNamespace(
            token_to_kv_pool_allocator=self.allocator, supports_prefix_sharing=lambda: False
        )

        self.worker = self._build_worker(mask_mode, acceptance)
        self.policy = self.worker.truncation_policy
        self.reqs = [self._admit(i) for i in range(BS)]
        self.finished = 0
        self.emitted = 0
        self.accepted_at: collections.Counter[tuple[int, int]] = (
            collections.Counter()
        )  # (width, accept length)
        self.batch = self._build_batch()

    # -- wiring ---------------------------------------------------------------------------------
    def _install_recorders(self, monkeypatch) -> None:
        rec = self.rec
        organize, build = (
            evict_worker._original_organize_draft_results,
            evict_worker._original_build_eagle_verify_input,
        )
        prepare_extend = eagle_worker_v2.prepare_for_draft_extend

        def organize_recorded(score_list, token_list, parents_list, num_draft_token):
            rec.lists = (
                [s.clone() for s in score_list],
                [t.clone() for t in token_list],
                [p.clone() for p in parents_list],
            )
            rec.organized_width = num_draft_token
            out = organize(score_list, token_list, parents_list, num_draft_token)
            rec.organized_index = out[1].clone()  # [bs, N-1] flat index of each organized position
            return out

        def build_recorded(
            batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kw
        ):
            rec.build = dict(
                kw, top_scores_index=top_scores_index.clone(), bonus=draft_input.bonus_tokens.clone()
            )
            rec.verify_width = kw["num_draft_tokens"]
            rec.verify_input = build(
                batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kw
            )
            # SGLang's links before EVICT splices the padding out (in place) for the width-m tree
            rec.raw_next = rec.verify_input.retrieve_next_token.clone()
            rec.raw_sibling = rec.verify_input.retrieve_next_sibling.clone()
            return rec.verify_input

        def prepare_extend_recorded(draft_extend_input, batch, predict, num_draft_tokens, *args, **kw):
            rec.extend_width = num_draft_tokens
            rec.extend_tokens_per_req = draft_extend_input.num_tokens_per_req
            return prepare_extend(draft_extend_input, batch, predict, num_draft_tokens, *args, **kw)

        monkeypatch.setattr(evict_worker, "_original_organize_draft_results", organize_recorded)
        monkeypatch.setattr(evict_worker, "_original_build_eagle_verify_input", build_recorded)
        trivial = eagle_worker_v2.EAGLEWorkerV2._build_trivial_verify_input

        def trivial_recorded(worker, batch):  # the plain (steps=0) step's one-node verify input
            rec.verify_input = trivial(worker, batch)
            return rec.verify_input

        monkeypatch.setattr(eagle_worker_v2.EAGLEWorkerV2, "_build_trivial_verify_input", trivial_recorded)
        monkeypatch.setattr(eagle_worker_v2, "prepare_for_draft_extend", prepare_extend_recorded)
        sample = eagle_utils.tree_speculative_sampling_target_only

        def sample_recorded(**kw):
            rec.sampled = {
                k: kw[k].clone()
                for k in ("target_probs", "uniform_samples", "uniform_samples_for_final_sampling")
            }
            return sample(**kw)

        monkeypatch.setattr(eagle_utils, "tree_speculative_sampling_target_only", sample_recorded)
        eagle_sample = eagle_worker_common.eagle_sample

        def eagle_sample_recorded(*args, **kw):
            out = eagle_sample(*args, **kw)
            rec.accept_index = out[2].clone()
            return out

        monkeypatch.setattr(eagle_worker_common, "eagle_sample", eagle_sample_recorded)

    def _build_worker(self, mask_mode, acceptance: bool = False):
        draft_model = SimpleNamespace(
            forward=self._draft_model_forward,
            attn_backend=None,
            draft_attn_backend=None,  # SGLang's ModelRunner for the draft holds the multi-step one
            model_config=SimpleNamespace(
                hf_config=SimpleNamespace(architectures=["LlamaForCausalLMEagle3"]),
                model_is_mrope=False,
                vocab_size=VOCAB,
            ),
            canary_manager=None,
            spec_algorithm=SimpleNamespace(is_standalone=lambda: False),
        )
        target_runner = SimpleNamespace(
            attn_backend=None,
            decode_cuda_graph_runner=None,
            kv_index_translator=None,
            watermark_state=None,
            spec_algorithm=SimpleNamespace(is_standalone=lambda: False),
            model_config=SimpleNamespace(
                model_is_mrope=False,
                vocab_size=VOCAB,
                is_draft_model=False,
                hf_config=PretrainedConfig(architectures=["Qwen3MoeForCausalLM"]),
                linear_attn_registry_result=None,  # no mamba-style state to commit after verify
            ),
        )
        target = SimpleNamespace(
            model_runner=target_runner,
            model_config=SimpleNamespace(vocab_size=VOCAB),
            forward_batch_generation=self._target_model_forward,
        )

        dw = object.__new__(evict_worker.EvictDraftWorker)
        dw.full_num_draft_tokens = dw.speculative_num_draft_tokens = N
        dw.kill_switch = False
        dw.topk, dw.tree_topk, dw.speculative_num_steps = TOPK, TOPK, STEPS
        dw.score_sink = ScoreSink(rows=BS, cols=N - 1, device="cpu")
        dw.req_to_token_pool = self.req_to_token_pool
        dw.draft_runner, dw.target_worker = draft_model, target
        dw.cuda_graph_runner = dw.cuda_graph_runner_for_draft_extend = None
        dw.draft_attn_backend = WidthBackend("draft decode", N)
        dw.draft_extend_attn_backend = None
        dw.seed_dsa_topk_from_draft_extend = dw.index_share_for_mtp_iteration = False
        dw.hot_token_id = None
        dw.plan_stream, dw.plan_stream_ctx = None, contextlib.nullcontext()
        dw.parallel_layout = SimpleNamespace(tp_group=None)
        dw.tree_mask_mode, dw.device = mask_mode, "cpu"
        dw.width_agreement, dw.last_decision, dw.width_counts = None, None, {}
        dw.acceptance, dw._pending_outcome = None, None
        if acceptance:  # EVICT_ACCEPTANCE=calibrated
            dw.acceptance = AcceptanceEstimator(TOPK, STEPS)
            dw.acceptance_candidates = num_candidates(STEPS, TOPK)
            update = dw.acceptance.update

            def update_recorded(feats, verified, accepted, *a, **kw):
                self.rec.learned = (verified.clone(), accepted.clone())
                return update(feats, verified, accepted, *a, **kw)

            dw.acceptance.update = update_recorded

        w = object.__new__(evict_worker.EvictWorkerV2)
        w._draft_worker, w._target_worker = dw, target
        w.full_num_draft_tokens = w.speculative_num_draft_tokens = N
        w.speculative_num_steps, w.topk, w.page_size, w.device = STEPS, TOPK, 1, "cpu"
        w.req_to_token_pool, w.token_to_kv_pool_allocator = self.req_to_token_pool, self.allocator
        w.plan_stream, w.plan_stream_ctx = None, contextlib.nullcontext()
        w.adaptive_controller = None
        w.enable_dp_spec_prefill_coordination = False
        w.evict_widths = WIDTHS
        w.truncation_policy = ScriptedPerRequestPolicy() if self.per_request else ScriptedCostPolicy()
        dw.real_nodes = RealNodeCounter()
        # one captured state per width, as EvictWorkerV2.init_cuda_graphs registers them
        w.width_states = WidthStateSet(w._apply_width_state)
        for m in WIDTHS:
            w.width_states.register(
                m,
                SpecRuntimeState(
                    speculative_num_steps=STEPS,
                    speculative_num_draft_tokens=m,
                    draft_attn_backend=dw.draft_attn_backend,
                    cuda_graph_runner=None,
                    target_attn_backend=WidthBackend("verify", m, lambda: self.step),
                    target_graph_runner=None,
                    draft_extend_attn_backend=WidthBackend("draft extend", m, lambda: self.step),
                    cuda_graph_runner_for_draft_extend=None,
                ),
            )
        w._apply_width_state(N, w.width_states.state(N))
        w.width_states.active_width = N
        w.evict_metrics = EvictMetrics(w.truncation_policy, log_interval=0)
        dw.truncation_policy, dw.use_width = w.truncation_policy, w.use_width
        w.depth, w.plain_costs, w._plain_step = None, None, False
        w._depth_pending = collections.deque(maxlen=4)
        dw.step_cost, dw.full_num_steps, w.full_num_steps = None, STEPS, STEPS
        w.depth_states, w._step_shape = {}, None
        if self.depth:  # EVICT_DEPTH=1 with the plan scripted: plain when the script says 0
            rig = self

            class ScriptedDepth(DepthController):
                def plan(self, batch_size):  # the scripted shape (default: the full tree)
                    d = 0 if rig.policy.want == 0 else (rig.draft_depth or STEPS)
                    return self._count(DraftShape(TOPK if d == 0 else rig.draft_topk, d))

            # as _start_depth lists them: plain, the chains that fill a width, the tree's depths
            chains = [d for d in range(2, STEPS + 1) if d + 1 in WIDTHS]
            shapes = [
                DraftShape(TOPK, 0),
                *(DraftShape(1, d) for d in chains),
                *(DraftShape(TOPK, d) for d in range(1, STEPS + 1)),
            ]
            # every shape priced as the scripted policy prices the widths: only the scripted width pays
            scripted = lambda bs: w.truncation_policy.step_cost(bs).expand(len(shapes), -1)  # noqa: E731
            w.depth = ScriptedDepth(shapes, list(WIDTHS), scripted)
            for d in range(1, STEPS):
                n_d = w._depth_width(d, WIDTHS)
                w.depth_states[DraftShape(TOPK, d)] = evict_worker.DraftDepthState(
                    d, n_d, WidthBackend("draft decode", n_d), None
                )
            for d in chains:
                w.depth_states[DraftShape(1, d)] = evict_worker.DraftDepthState(
                    d, d + 1, WidthBackend("draft decode", d + 1), None
                )
            dw.depth_observer = w._observe_tree
        return w

    # -- requests -------------------------------------------------------------------------------
    def _admit(self, index: int) -> SimpleNamespace:
        """A request after its prefill: prompt KV written, first draft input from a draft extend."""
        prompt = int(torch.randint(4, 24, (1,), generator=self.g))
        row = self.req_to_token_pool.alloc_rows(1)[0]
        slots = self.allocator.alloc(prompt)
        self.req_to_token_pool.req_to_token[row, :prompt] = slots.to(torch.int32)
        self.kv.k_buffer[0][slots] = -1.0
        topk_p, topk_index = torch.softmax(torch.randn(1, VOCAB, generator=self.g) * 3, -1).topk(TOPK, dim=-1)
        return SimpleNamespace(
            rid=f"r{self.step}-{index}",
            kv=SimpleNamespace(req_pool_idx=row, kv_allocated_len=prompt, kv_committed_len=prompt),
            decode_batch_idx=0,
            prompt_len=prompt,
            max_new=int(torch.randint(25, 70, (1,), generator=self.g)),
            topk_p=topk_p,
            topk_index=topk_index,
            hidden=torch.randn(1, HIDDEN, generator=self.g),
            bonus=torch.randint(0, VOCAB, (1,), generator=self.g).to(torch.int32),
        )

    def _build_batch(self) -> SimpleNamespace:
        temps = torch.full((BS, 1), 0.8 if self.sampling else 1.0)
        return SimpleNamespace(
            reqs=self.reqs,
            forward_mode=ForwardMode.DECODE,
            is_extend_in_batch=False,
            device="cpu",
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool_allocator=self.allocator,
            tree_cache=self.tree_cache,
            model_config=SimpleNamespace(vocab_size=VOCAB),
            sampling_info=SimpleNamespace(
                is_all_greedy=not self.sampling,
                temperatures=temps,
                top_ks=torch.full((BS,), VOCAB, dtype=torch.int32),
                top_ps=torch.ones(BS),
                need_top_k_sampling=False,
                need_top_p_sampling=False,
                need_min_p_sampling=False,
                acc_additive_penalties=None,
                acc_scaling_penalties=None,
                logit_bias=None,
                sampling_seed=None,
                has_watermark_candidates=False,
                penalizer_orchestrator=SimpleNamespace(is_required=False),
            ),
            maybe_evict_swa=lambda: None,
            hisparse_coordinator=None,
            has_grammar=False,
            return_logprob=False,
            mamba_track_indices=None,
            multimodal_inputs=[None] * BS,
            chunked_req=None,
            input_ids=None,
            out_cache_loc=None,
            spec_info=None,
        )

    def _sync_batch_from_reqs(self) -> None:
        b = self.batch
        b.req_pool_indices = torch.tensor([r.kv.req_pool_idx for r in self.reqs], dtype=torch.int64)
        b.seq_lens = torch.tensor([r.kv.kv_committed_len for r in self.reqs], dtype=torch.int64)
        b.seq_lens_cpu = b.seq_lens.clone()
        b.seq_lens_sum = int(b.seq_lens.sum())
        b.forward_mode = ForwardMode.DECODE
        b.input_ids = b.out_cache_loc = None

    # -- models ---------------------------------------------------------------------------------
    def _draft_model_forward(self, fb):
        rows = int(fb.input_ids.numel())
        logits = torch.randn(rows, VOCAB, generator=self.g) * 3
        hidden = torch.randn(rows, HIDDEN, generator=self.g)
        if fb.forward_mode == ForwardMode.DRAFT_EXTEND_V2:
            m = self.rec.verify_width
            assert fb.extend_num_tokens == rows == fb.out_cache_loc.numel() == BS * m, (
                f"draft extend ran {fb.extend_num_tokens} tokens over {rows} ids and "
                f"{fb.out_cache_loc.numel()} KV slots; verify ran {BS} x {m}"
            )
            # the draft model writes its KV into the verify window's slots, in the committed order
            assert torch.equal(fb.out_cache_loc, self.rec.verify_out_cache_loc)
            # hidden states arrive compacted: row b*m+j holds the j-th accepted node of request b
            got = fb.spec_info.hidden_states[:, 0].long().view(BS, m)
            for b in range(BS):
                n_acc = int(fb.spec_info.num_accept_tokens[b])
                assert got[b, :n_acc].tolist() == self.rec.accept_index[b, :n_acc].tolist()
            hidden[:, 0] = torch.arange(rows, dtype=hidden.dtype)  # row marker: shows select_index
        else:
            dw = self.worker._draft_worker
            if self.rec.draft_calls == 0:  # the draft writes topk*steps slots past each prefix, all owned
                b, span = self.batch, dw.topk * dw.speculative_num_steps
                for i, r in enumerate(self.reqs):
                    seq = int(b.seq_lens[i])
                    assert seq + span <= r.kv.kv_allocated_len
                    want = self.req_to_token_pool.req_to_token[r.kv.req_pool_idx, seq : seq + span].long()
                    assert torch.equal(b.out_cache_loc.view(BS, span)[i], want)
            self.rec.draft_calls += 1
            assert rows == BS * self.draft_topk == BS * dw.topk and fb.out_cache_loc.numel() == rows
        return SimpleNamespace(
            logits_output=LogitsProcessorOutput(next_token_logits=logits, hidden_states=hidden)
        )

    def _target_model_forward(self, batch=None, forward_batch=None, is_verify=False, pp_proxy_tensors=None):
        fb, v = forward_batch, forward_batch.spec_info
        m = v.draft_token_num
        assert is_verify and fb.forward_mode == ForwardMode.TARGET_VERIFY
        assert self.worker._target_worker.model_runner.attn_backend.width == m, (
            "verify ran on another width's backend"
        )
        assert fb.input_ids.numel() == fb.out_cache_loc.numel() == BS * m
        self.rec.verify_out_cache_loc = fb.out_cache_loc.clone()
        # the target writes the KV of every tree node: marker (step, b*m + node)
        marks = torch.stack(
            [torch.full((BS * m,), float(self.step)), torch.arange(BS * m, dtype=torch.float32)], 1
        )
        self.kv.k_buffer[0][fb.out_cache_loc, 0] = marks
        # logits: random, leaning at most nodes towards one of the node's children
        logits = torch.randn(BS * m, VOCAB, generator=self.g)
        tokens = v.draft_token.view(BS, m)
        nxt, sib = v.retrieve_next_token, v.retrieve_next_sibling
        for b in range(BS):
            for j in range(m):
                kids, c = [], int(nxt[b, j])
                while c != -1:
                    kids.append(c)
                    c = int(sib[b, c])
                if kids and float(torch.rand((), generator=self.g)) < 0.8:
                    pick = kids[int(torch.randint(len(kids), (1,), generator=self.g))]
                    logits[b * m + j, int(tokens[b, pick])] += 6.0
                pad_kids = self._padded_children(b, j)
                if pad_kids and float(torch.rand((), generator=self.g)) < 0.5:
                    # a padded child (the root token) is what the target wants here: accepting it
                    # would be wrong, so only its absence from the links keeps the step lossless
                    logits[b * m + j, int(tokens[b, pad_kids[0]])] += 9.0
        self.rec.target_logits = logits.clone()
        hidden = torch.zeros(BS * m, HIDDEN)
        hidden[:, 0] = torch.arange(BS * m, dtype=torch.float32)  # node marker
        out = LogitsProcessorOutput(next_token_logits=logits, hidden_states=hidden)
        return SimpleNamespace(logits_output=out, routed_experts_output=None, indexer_topk_output=None)

    def _padded_children(self, b: int, j: int) -> list[int]:
        """Children of node j in SGLang's own (unspliced) links that EVICT padded."""
        if not self.per_request or getattr(self.rec, "raw_next", None) is None:
            return []
        real = self._real_slots()
        if real is None:
            return []
        out, c = [], int(self.rec.raw_next[b, j])
        while c != -1:
            if not bool(real[b, c]):
                out.append(c)
            c = int(self.rec.raw_sibling[b, c])
        return out

    def _real_slots(self):
        """[BS, m] bool: the verify slots holding real nodes this step (None: no padding)."""
        d = self.worker._draft_worker.last_decision
        if d is None or d.kept_counts is None or d.budget_index is None or d.budget_index >= d.width_index:
            return None
        m = d.width
        kept = self.rec.build["top_scores_index"]  # the frame: flat indices of slots 1..m-1
        real = torch.ones(BS, m, dtype=torch.bool)
        for b in range(BS):
            flat_real = {int(x) for x in self._real_flat(d, b)}
            real[b, 1:] = torch.tensor([int(x) in flat_real for x in kept[b]], dtype=torch.bool)
        return real

    def _real_flat(self, d, b: int) -> list[int]:
        """Flat candidate indices of request b's real nodes (the decision holds positions among N-1)."""
        organized = self.rec.organized_index[b]
        return [int(organized[int(p)]) for p in d.kept[b] if int(p) >= 0]

    def _draft_input(self) -> EagleDraftInput:
        """The batch's draft input: each request's state from its last draft extend."""
        return EagleDraftInput(
            topk_p=torch.cat([r.topk_p for r in self.reqs]),
            topk_index=torch.cat([r.topk_index for r in self.reqs]),
            hidden_states=torch.cat([r.hidden for r in self.reqs]),
            bonus_tokens=torch.cat([r.bonus for r in self.reqs]),
            capture_hidden_mode=CaptureHiddenMode.LAST,
        )

    # -- one decode step --------------------------------------------------------------------------
    def run_step(self, want: int, depth: int = STEPS, topk: int = TOPK) -> None:
        """One tree step drafted ``depth`` deep (EVICT_DEPTH=1 below the full depth; ``topk`` 1: a
        chain of ``depth``), verified at ``want``."""
        self.draft_depth, self.draft_topk = depth, topk
        rec, b = self.rec, self.batch
        rec.__dict__.clear()
        rec.draft_calls = 0
        self._sync_batch_from_reqs()
        b.spec_info = self._draft_input()
        allocated_before = [r.kv.kv_allocated_len for r in self.reqs]
        eagle_prepare_for_decode(b)  # SGLang's KV reservation for this step
        for r, before in zip(self.reqs, allocated_before):
            assert r.kv.kv_allocated_len >= max(before, r.kv.kv_committed_len + max(N, TOPK * STEPS))
        self._check_kv_accounting("after the step's reservation")
        seq = b.seq_lens.clone()
        rows = b.req_pool_indices
        self.policy.want = want

        result = self.worker.forward_batch_generation(b)

        m = want
        ctx = f"step {self.step} (width {m})"
        # -- the width: chosen, verified, and drafted-extended at the same m ---------------------
        assert self.worker._draft_worker.last_decision is not None
        assert self.worker._draft_worker.last_decision.width == m, ctx
        shape = DraftShape(topk, depth)
        n_d = N if shape not in self.worker.depth_states else self.worker.depth_states[shape].num_draft_tokens
        ctx += f", {shape}" if shape in self.worker.depth_states else ""
        assert rec.organized_width == n_d, f"{ctx}: drafting must organize the whole tree it drafted"
        assert rec.draft_calls == depth - 1, ctx
        assert rec.build["num_steps"] == depth, (
            f"{ctx}: the verify tree was built with depth {rec.build['num_steps']}"
        )
        assert rec.build["topk"] == topk, f"{ctx}: the verify tree was built at topk {rec.build['topk']}"
        assert (
            self.worker.speculative_num_steps == STEPS
            and self.worker._draft_worker.full_num_draft_tokens == N
            and self.worker._draft_worker.topk == TOPK
        )
        # the draft extend ran at the tree's topk: the next step may draft the tree
        assert result.next_draft_input.topk_p.shape == (BS, TOPK), ctx
        assert rec.verify_width == m and result.speculative_num_draft_tokens == m, ctx
        assert rec.extend_width == m, f"{ctx}: verify ran at width {m}, draft extend at {rec.extend_width}"
        assert rec.extend_tokens_per_req == m, ctx
        accept_lens, accept_index = result.accept_lens.long(), result.accept_index.long()
        spec_steps = min(depth, m - 1)
        assert accept_index.shape == (BS, spec_steps + 1), ctx
        assert bool((accept_lens >= 1).all()) and bool((accept_lens <= spec_steps + 1).all()), ctx
        # select_index: the bonus row of each request, stride m (SGLang's kernel computes the same)
        select = result.next_draft_input.hidden_states[:, 0].long()
        want_select = torch.arange(BS) * m + accept_lens - 1
        assert select.tolist() == want_select.tolist(), f"{ctx}: draft extend read rows {select.tolist()}"
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        _, kernel_select, _ = prepare_draft_extend_inputs(
            result.accept_lens.to(dev), result.next_token_ids.to(dev), rec.verify_width
        )
        assert kernel_select.cpu().tolist() == want_select.tolist(), ctx

        # -- the tree SGLang verified is the reference engine's cut of the same draft --------------
        score_list, token_list, parents_list = rec.lists
        tree_scores = torch.cat(score_list, 1).flatten(1)
        tree = DraftTree(
            tree_scores,
            torch.cat(token_list, 1),
            sglang_parents(parents_list, topk, tree_scores.shape[1]),
        )
        kept = rec.build["top_scores_index"]
        assert kept.shape == (BS, m - 1), ctx
        if m > 1 and self.worker._draft_worker.acceptance is None:
            top = torch.topk(tree_scores, m - 1, dim=-1).indices.sort(-1).values
            assert torch.equal(kept, top), f"{ctx}: the verified nodes are not the top {m - 1} by score"
        elif m > 1:  # calibrated ranking: still the top of what the drafter organized, ancestor-closed
            parents = tree.parents.gather(1, kept)
            assert bool(((parents < 0) | (kept.unsqueeze(1) == parents.unsqueeze(2)).any(2)).all()), ctx
        vt = select_verify_tree(tree, kept, rec.build["bonus"].long())
        v = rec.verify_input
        real = self._real_slots() if self.per_request else None
        if self.per_request:
            self._check_padding(ctx, m, vt, real)
        if real is not None:  # the reference tree: padded slots hold the root token, linked to nothing
            vt = dataclasses.replace(
                vt,
                tokens=torch.where(real, vt.tokens, vt.tokens[:, :1].expand(BS, m)),
                parent=torch.where(real, vt.parent, torch.full_like(vt.parent, PAD_PARENT)),
            )
        assert v.draft_token_num == m and v.spec_steps == spec_steps, ctx
        assert torch.equal(v.draft_token.view(BS, m), vt.tokens), f"{ctx}: SGLang verified a different tree"

        # -- acceptance -------------------------------------------------------------------------
        offs = (torch.arange(BS) * m).view(BS, 1)
        logits = rec.target_logits.view(BS, m, VOCAB)
        if not self.sampling:
            ref = greedy_accept(vt.tokens, vt.parent, logits.argmax(-1))
        else:
            s = rec.sampled
            ref = sampling_accept(
                vt.tokens,
                vt.parent,
                s["target_probs"],
                s["uniform_samples"],
                s["uniform_samples_for_final_sampling"],
            )
            assert torch.allclose(s["target_probs"], torch.softmax(logits / 0.8, -1), atol=1e-6), (
                f"{ctx}: sampled from other probabilities"
            )
        predict = result.next_token_ids.view(BS, m).long()
        for i in range(BS):
            n_acc = int(accept_lens[i])
            path = (accept_index[i, :n_acc] - offs[i]).tolist()
            # a chain from the root through kept nodes, each the previous node's child
            assert path[0] == 0 and all(int(vt.parent[i, c]) == p for p, c in zip(path, path[1:])), ctx
            assert n_acc <= m, ctx
            if real is not None:
                assert all(bool(real[i, c]) for c in path), f"{ctx}: request {i} accepted a padded slot"
            assert n_acc == int(ref.num_accepted[i]) + 1, (
                f"{ctx}: request {i} accepted {n_acc - 1}, reference {int(ref.num_accepted[i])}"
            )
            assert path == ref.path[i, :n_acc].tolist(), (
                f"{ctx}: request {i} accepted {path}, reference {ref.path[i, :n_acc].tolist()}"
            )
            emitted = predict[i, :n_acc].tolist()
            assert emitted[:-1] == vt.tokens[i, path[1:]].tolist(), ctx
            if not self.sampling:
                assert emitted == ref.emitted[i, :n_acc].tolist(), f"{ctx}: request {i} emitted {emitted}"
            assert int(result.next_draft_input.bonus_tokens[i]) == emitted[-1], ctx
            assert bool(accept_index[i, n_acc:].eq(-1).all()), ctx

        # -- KV: the accepted nodes' KV now sits in the committed slots, in path order ------------
        k = self.kv.k_buffer[0][:, 0]
        for i in range(BS):
            n_acc = int(accept_lens[i])
            slots = self.req_to_token_pool.req_to_token[
                int(rows[i]), int(seq[i]) : int(seq[i]) + n_acc
            ].long()
            assert torch.equal(slots, rec.verify_out_cache_loc.view(BS, m)[i, :n_acc]), ctx
            assert k[slots, 0].eq(self.step).all(), ctx
            assert k[slots, 1].long().tolist() == accept_index[i, :n_acc].tolist(), (
                f"{ctx}: KV of request {i} not moved"
            )

        self._finish_step(result, seq, accept_lens, m, ctx)

    def _finish_step(self, result, seq, accept_lens, m: int, ctx: str) -> None:
        """The scheduler's side of a step: commit, finish and admit requests, KV accounting."""
        assert torch.equal(result.new_seq_lens, seq + accept_lens), ctx
        nd = result.next_draft_input
        for i, r in enumerate(self.reqs):
            r.kv.kv_committed_len += int(accept_lens[i])
            r.topk_p, r.topk_index = nd.topk_p[i : i + 1], nd.topk_index[i : i + 1]
            r.hidden, r.bonus = nd.hidden_states[i : i + 1], nd.bonus_tokens[i : i + 1]
        self.emitted += int(accept_lens.sum())
        self.accepted_at.update((m, int(a)) for a in accept_lens)
        self._check_kv_accounting(ctx)
        for i, r in enumerate(self.reqs):
            if r.kv.kv_committed_len - r.prompt_len >= r.max_new:
                row = r.kv.req_pool_idx
                self.allocator.free(
                    self.req_to_token_pool.req_to_token[row, : r.kv.kv_allocated_len].long().clone()
                )
                self.req_to_token_pool.free_rows([row])
                self.reqs[i] = self._admit(i)
                self.finished += 1
        self.batch.reqs = self.reqs
        self._check_kv_accounting(f"{ctx}, after finishing requests")
        self.step += 1

    def run_plain_step(self) -> None:
        """EVICT_DEPTH=1 chose plain decoding: SGLang's steps=0 path through EVICT's worker.

        No drafting, a one-node verify of the bonus token on the width-1 state, then the draft
        extend at width 1 (the drafter stays warm): the emitted token is the target's own
        (greedy: its argmax), and the next draft input comes from that extend.
        """
        rec, b = self.rec, self.batch
        rec.__dict__.clear()
        rec.draft_calls = 0
        rec.verify_width = 1  # the draft-extend stand-in checks against the verified width
        self._sync_batch_from_reqs()
        b.spec_info = self._draft_input()
        bonus = b.spec_info.bonus_tokens.clone()
        eagle_prepare_for_decode(b)
        self._check_kv_accounting("after the plain step's reservation")
        seq = b.seq_lens.clone()
        steps_before = self.worker.speculative_num_steps
        result = self.worker.forward_batch_generation(b)
        ctx = f"step {self.step} (plain)"
        assert self.worker._plain_step, ctx
        assert self.worker.speculative_num_steps == steps_before == STEPS, f"{ctx}: steps not restored"
        assert rec.draft_calls == 0 and "build" not in rec.__dict__, f"{ctx}: the plain step drafted"
        assert result.speculative_num_draft_tokens == 1 and rec.extend_width == 1, ctx
        accept_lens = result.accept_lens.long()
        assert accept_lens.tolist() == [1] * BS, ctx
        assert result.accept_index.long().view(BS, -1)[:, 0].tolist() == list(range(BS)), ctx
        assert torch.equal(rec.verify_input.draft_token.view(BS).long(), bonus.long()), (
            f"{ctx}: the verified token is not the last emitted one"
        )
        emitted = result.next_token_ids.view(BS, -1)[:, 0].long()
        if not self.sampling:
            assert emitted.tolist() == rec.target_logits.argmax(-1).tolist(), (
                f"{ctx}: not the target's argmax"
            )
        assert torch.equal(result.next_draft_input.bonus_tokens.long(), emitted), ctx
        self.accepted_at.update([(1, 1)] * BS)
        self.plain_steps += 1
        self._finish_step(result, seq, accept_lens, 1, ctx)

    def _check_padding(self, ctx: str, m: int, vt, real) -> None:
        """Per-request widths: the decision, the links SGLang walks, and what the estimator learns."""
        rec, d = self.rec, self.worker._draft_worker.last_decision
        assert d.kept_counts is not None and d.budget_index is not None, ctx
        assert d.budget_index <= d.width_index, ctx
        v = rec.verify_input
        nxt, sib = v.retrieve_next_token.view(BS, m), v.retrieve_next_sibling.view(BS, m)
        if real is None:  # the full budget: SGLang's own links, untouched
            assert bool((d.kept_counts == max(m - 1, 0)).all()), ctx
            assert torch.equal(nxt, rec.raw_next.view(BS, m)) and torch.equal(
                sib, rec.raw_sibling.view(BS, m)
            ), ctx
            return
        counts = real[:, 1:].sum(1)
        assert torch.equal(counts, d.kept_counts.cpu()), ctx
        self.padded_steps += 1
        self.padded_slots += int((~real).sum())
        self.empty_rows += int((counts == 0).sum())
        bonus = rec.build["bonus"].long()
        tokens = v.draft_token.view(BS, m)
        for b in range(BS):
            # padded slots hold the root token
            assert bool((tokens[b, ~real[b]] == bonus[b]).all()), f"{ctx}: request {b} padding"
            # walking the links from the root reaches every real node, through its real parent, and
            # no padded node
            seen, stack = {}, [0]
            while stack:
                cur = stack.pop()
                c = int(nxt[b, cur])
                while c != -1:
                    assert c not in seen, ctx
                    seen[c] = cur
                    stack.append(c)
                    c = int(sib[b, c])
            want = {j for j in range(1, m) if bool(real[b, j])}
            assert set(seen) == want, f"{ctx}: request {b} links reach {sorted(seen)}, real {sorted(want)}"
            assert all(int(vt.parent[b, c]) == p for c, p in seen.items()), ctx
        learned = getattr(rec, "learned", None)
        if self.worker._draft_worker.acceptance is not None:
            assert learned is not None, f"{ctx}: the estimator did not learn from this step"
            verified = learned[0]
            for b in range(BS):
                flat_real = set(self._real_flat(d, b))
                got = {int(x) for x in verified[b].nonzero().flatten()}
                assert got == flat_real, (
                    f"{ctx}: request {b} learned from {sorted(got)}, real {sorted(flat_real)}"
                )

    def _check_kv_accounting(self, ctx: str) -> None:
        """Allocated = kept (committed) + reserved (allocated, not committed) + freed; no slot twice."""
        kept = sum(r.kv.kv_committed_len for r in self.reqs)
        reserved = sum(r.kv.kv_allocated_len - r.kv.kv_committed_len for r in self.reqs)
        assert all(0 <= r.kv.kv_committed_len <= r.kv.kv_allocated_len <= CONTEXT for r in self.reqs), ctx
        assert self.slots_allocated == kept + reserved + self.slots_freed, (
            f"{ctx}: {self.slots_allocated} slots allocated, but {kept} kept + {reserved} reserved + "
            f"{self.slots_freed} freed"
        )
        assert POOL - self.allocator.available_size() == kept + reserved, ctx
        owned = torch.cat(
            [
                self.req_to_token_pool.req_to_token[r.kv.req_pool_idx, : r.kv.kv_allocated_len].long()
                for r in self.reqs
            ]
        )
        assert owned.unique().numel() == owned.numel(), f"{ctx}: a KV slot is owned twice"
        assert not bool(torch.isin(owned, self.allocator.free_pages).any()), f"{ctx}: an owned slot is free"


def _run(
    monkeypatch,
    *,
    sampling: bool,
    mask_mode: TreeMaskMode,
    seed: int,
    acceptance: bool = False,
    per_request: bool = False,
) -> Rig:
    rig = Rig(
        monkeypatch,
        sampling=sampling,
        mask_mode=mask_mode,
        seed=seed,
        acceptance=acceptance,
        per_request=per_request,
    )
    for want in WIDTH_SCRIPT:
        rig.run_step(want)
    return rig


def _check_coverage(rig: Rig) -> None:
    assert rig.step == len(WIDTH_SCRIPT) >= 50
    assert rig.policy.counters.steps == len(WIDTH_SCRIPT)
    assert rig.finished >= 2, "requests finish and free their KV during the run"
    assert rig.worker.width_states.switches >= 20
    # acceptance of every kind: none at all, and the whole depth at narrow and full widths
    assert any(a == 1 for (m, a) in rig.accepted_at if m > 1)
    for m in (3, 4):
        assert (m, m) in rig.accepted_at, f"no full-depth acceptance at width {m}"
    assert max(a for (m, a) in rig.accepted_at if m == N) >= 4


@pytest.mark.usefixtures("cpu_kernels")
def test_greedy_multistep_decode_follows_the_scripted_widths(monkeypatch):
    rig = _run(monkeypatch, sampling=False, mask_mode=TreeMaskMode.FULL_MASK, seed=1)
    _check_coverage(rig)


@pytest.mark.usefixtures("cpu_kernels")
def test_sampling_multistep_decode_follows_the_scripted_widths(monkeypatch):
    rig = _run(monkeypatch, sampling=True, mask_mode=TreeMaskMode.QLEN_ONLY, seed=2)
    _check_coverage(rig)


@pytest.mark.usefixtures("cpu_kernels")
def test_calibrated_acceptance_learns_from_every_verification_and_stays_lossless(monkeypatch):
    """EVICT_ACCEPTANCE=calibrated: nodes ranked by the estimator; every step's checks still hold."""
    rig = _run(monkeypatch, sampling=False, mask_mode=TreeMaskMode.FULL_MASK, seed=3, acceptance=True)
    _check_coverage(rig)
    est = rig.worker._draft_worker.acceptance
    trials = sum(row["trials"] for row in est.reliability())
    # one trial per verified node whose parent was accepted: at least the root's kept children each step
    assert trials >= sum(1 for m in WIDTH_SCRIPT if m > 1)


# ---------------------------------------------------------------------------------------------
# Per-request widths (EVICT_PER_REQUEST=1, pad cost 0): one width for the batch, padding per request
# ---------------------------------------------------------------------------------------------
def _check_per_request_coverage(rig: Rig, root_alone: bool = True) -> None:
    assert rig.step == len(rig.policy.decisions) == len(WIDTH_SCRIPT) >= 50
    assert rig.finished >= 2, "requests finish and free their KV during the run"
    assert rig.worker.width_states.switches >= 20
    # the budget rule really padded: some request kept fewer than m-1 real nodes on many steps,
    # some verified the root alone inside a wider tree
    short = [d for d in rig.policy.decisions if bool((d.kept_counts < d.width - 1).any())]
    assert len(short) == rig.padded_steps >= 10, (len(short), rig.padded_steps)
    assert rig.padded_slots >= 50 and (rig.empty_rows >= 1 or not root_alone), (
        rig.padded_slots,
        rig.empty_rows,
    )
    assert any(a == 1 for (m, a) in rig.accepted_at if m > 1)
    assert any(a >= 3 for (m, a) in rig.accepted_at)
    # the metrics line's real nodes per request: exactly the kept counts of every step
    want = sum(int(d.kept_counts.sum()) for d in rig.policy.decisions) / (BS * rig.step)
    assert rig.worker._draft_worker.real_nodes.mean() == pytest.approx(want)


@pytest.mark.usefixtures("cpu_kernels")
def test_per_request_greedy_multistep_decode_pads_and_stays_lossless(monkeypatch):
    rig = _run(monkeypatch, sampling=False, mask_mode=TreeMaskMode.FULL_MASK, seed=4, per_request=True)
    _check_per_request_coverage(rig)


@pytest.mark.usefixtures("cpu_kernels")
def test_per_request_sampling_multistep_decode_pads_and_stays_lossless(monkeypatch):
    rig = _run(monkeypatch, sampling=True, mask_mode=TreeMaskMode.QLEN_ONLY, seed=5, per_request=True)
    _check_per_request_coverage(rig, root_alone=False)  # the sampled coins vary from run to run


@pytest.mark.usefixtures("cpu_kernels")
def test_per_request_calibrated_acceptance_learns_only_from_real_nodes(monkeypatch):
    rig = _run(
        monkeypatch,
        sampling=False,
        mask_mode=TreeMaskMode.FULL_MASK,
        seed=6,
        acceptance=True,
        per_request=True,
    )
    _check_per_request_coverage(rig, root_alone=False)  # calibrated scores rarely leave a request bare


# plain decoding (0) between tree steps of every width, and runs of it: up, down and to 0
DEPTH_SCRIPT = [16, 0, 0, 4, 0, 16, 1, 0, 8, 0, 0, 0, 16, 2, 0, 3, 16, 0, 5, 0] * 3


def _run_depth(monkeypatch, *, sampling: bool, seed: int) -> Rig:
    rig = Rig(monkeypatch, sampling=sampling, mask_mode=TreeMaskMode.FULL_MASK, seed=seed, depth=True)
    for want in DEPTH_SCRIPT:
        rig.policy.want = want
        if want == 0:
            rig.run_plain_step()
        else:
            rig.run_step(want)
    assert rig.step == len(DEPTH_SCRIPT) and rig.plain_steps == DEPTH_SCRIPT.count(0)
    assert rig.finished >= 1, "requests finish and free their KV during the run"
    # the tree steps fed the depth controller, the plain ones did not
    assert rig.worker.depth.counts_by_shape[DraftShape(TOPK, 0)] == DEPTH_SCRIPT.count(0)
    assert rig.worker.depth._seen_host[-1], "the full tree's scores never reached the controller"
    return rig


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_depth_changes_to_plain_decoding_and_back_stay_lossless(monkeypatch, sampling):
    """EVICT_DEPTH=1 (issue 20): SGLang's steps=0 path between tree steps, through EVICT's worker."""
    rig = _run_depth(monkeypatch, sampling=sampling, seed=5)
    assert any(a > 1 for (m, a) in rig.accepted_at if m > 1), "tree steps still accept drafts"


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_tp_ranks_agree_on_the_depth(monkeypatch, sampling):
    """EVICT_DEPTH=1 with TP > 1: this rank always plans plain decoding, a stand-in second rank
    plans the tree on the script's tree steps; the agreed (deeper) plan is what runs, losslessly."""
    import torch.distributed as dist

    from evict.plugin.tp_sync import WidthAgreement

    rig = Rig(monkeypatch, sampling=sampling, mask_mode=TreeMaskMode.FULL_MASK, seed=7, depth=True)
    w = rig.worker
    plain, tree = w.depth.shapes[0], w.depth.shapes[-1]
    monkeypatch.setattr(w.depth, "plan", lambda bs: w.depth._count(plain))
    w.depth_agreement = WidthAgreement(group=None)
    proposals = [w.depth.index[tree] if want else w.depth.index[plain] for want in DEPTH_SCRIPT]

    def all_reduce(tensor, op=None, group=None):  # the other rank's proposal, MAX-reduced
        assert op == dist.ReduceOp.MAX and tensor.device.type == "cpu"
        tensor.fill_(max(int(tensor[0]), proposals.pop(0)))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for want in DEPTH_SCRIPT:
        rig.policy.want = want
        if want == 0:
            rig.run_plain_step()
        else:
            rig.run_step(want)  # asserts the tree was drafted and verified at the scripted width
    assert not proposals, "the ranks agreed once per decode step"
    assert w.depth_agreement.calls == len(DEPTH_SCRIPT)
    assert w.depth_agreement.changed == sum(1 for want in DEPTH_SCRIPT if want)
    assert rig.plain_steps == DEPTH_SCRIPT.count(0) and rig.finished >= 1


# (width, depth): shallower trees of every depth between full-depth and plain steps, up and down
SHALLOW_SCRIPT = [
    (16, 5), (5, 1), (8, 2), (0, 0), (4, 3), (2, 1), (16, 4), (1, 2), (0, 0), (0, 0),
    (3, 1), (16, 2), (5, 5), (8, 3), (4, 1), (16, 5), (2, 4), (0, 0), (5, 1), (16, 3),
] * 2  # fmt: skip


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_shallower_draft_depths_stay_lossless(monkeypatch, sampling):
    """EVICT_DEPTH=1 drafting the tree 1..S deep (issue 20): SGLang's draft with fewer steps on a
    depth's own draft state, cut and verified on the width states; the rig checks each step's depth
    (draft calls, organized width, tree-builder depth), the cut against the reference engine's, the
    KV accounting and the acceptance."""
    rig = Rig(monkeypatch, sampling=sampling, mask_mode=TreeMaskMode.FULL_MASK, seed=11, depth=True)
    w = rig.worker
    trees = {sh.depth: st.num_draft_tokens for sh, st in w.depth_states.items() if sh.topk == TOPK}
    assert trees == {1: 5, 2: 16, 3: 16, 4: 16}
    for want, depth in SHALLOW_SCRIPT:
        rig.policy.want = want
        if want == 0:
            rig.run_plain_step()
        else:
            rig.run_step(want, depth)
    assert rig.finished >= 1, "requests finish and free their KV during the run"
    counts = {s.depth: n for s, n in w.depth.counts_by_shape.items()}
    assert counts == dict(collections.Counter(d for _, d in SHALLOW_SCRIPT)), counts
    seen = [s for s, ok in zip(w.depth.shapes, w.depth._seen_host, strict=True) if not ok]
    assert all(s.topk == 1 for s in seen), f"every depth's scores reached the controller, not {seen}"
    assert any(a > 1 for (m, a) in rig.accepted_at if m > 1), "shallower trees still accept drafts"


# (width, depth, topk): chains of 2..4 (each filling width 3, 4, 5) between trees of every depth
# and plain steps, chain to tree and back, chains cut below their length too
CHAIN_SCRIPT = [
    (4, 3, 1), (16, 5, 4), (3, 2, 1), (0, 0, 4), (5, 4, 1), (5, 4, 1), (2, 1, 4), (2, 3, 1),
    (8, 2, 4), (4, 4, 1), (0, 0, 4), (3, 3, 1), (16, 4, 4), (1, 2, 1), (4, 3, 1), (5, 5, 4),
] * 2  # fmt: skip


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_chains_between_trees_stay_lossless(monkeypatch, sampling):
    """EVICT_DEPTH=1 drafting a chain (EVICT_DEPTH_CHAIN, issue 20): EVICT's topk-1 draft loop on
    the chain's own draft state (one row per request, the drafter's probabilities as scores), its
    verify tree built at topk 1 on the width states, and the draft extend back at the tree's topk,
    so the next step can draft the tree. The rig checks each step as for trees: draft calls and
    rows, the verified nodes against the reference cut, KV, acceptance (greedy: the target's
    tokens; sampling: the reference acceptance on the same uniforms)."""
    rig = Rig(monkeypatch, sampling=sampling, mask_mode=TreeMaskMode.FULL_MASK, seed=5, depth=True)
    w = rig.worker
    chains = {sh.depth: st.num_draft_tokens for sh, st in w.depth_states.items() if sh.topk == 1}
    assert chains == {2: 3, 3: 4, 4: 5}, chains
    for want, depth, topk in CHAIN_SCRIPT:
        rig.policy.want = want
        if want == 0:
            rig.run_plain_step()
        else:
            rig.run_step(want, depth, topk)
    assert rig.finished >= 1, "requests finish and free their KV during the run"
    want_counts = collections.Counter(str(DraftShape(k, d)) for _, d, k in CHAIN_SCRIPT)
    assert {str(s): n for s, n in w.depth.counts_by_shape.items()} == dict(want_counts)
    chain_rows = [i for i, s in enumerate(w.depth.shapes) if s.topk == 1]
    assert all(w.depth._seen_host[i] for i in chain_rows), "every chain's scores reached the controller"
    # a chain's scores are the drafter's cumulative probabilities, not SGLang's topk-1 ones
    profile = w.depth._read_profile()
    for i in chain_rows:
        d = w.depth.shapes[i].depth
        row = profile[i, :d]
        assert bool((row > 0).all() and (row < 1).all()), (w.depth.shapes[i], row)
        assert bool((row[1:] <= row[:-1] + 1e-6).all()), "a chain's cumulative scores never grow"
    assert any(a > 1 for (m, a) in rig.accepted_at if m > 1), "chains still accept drafts"
