"""Issue 22: the GPU-only code paths of the plugin, read against SGLang 0.5.23, checked with CPU fakes.

Each test fails on the defect it names: graph-output storage kept across the verify replay (1), host
reads in lagged/off/immediate steps under TP and blocking cost copies (2), the per-width memory
reserve (3), the pad-cost default (4), TP divergence (5), stale width states after a recapture (6),
start-up logging and the breakable graph backend (7).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sglang.srt.speculative import eagle_worker_v2  # noqa: E402
from test_plugin_worker import (  # noqa: E402
    _fake_evict_worker,
    _FakeGraphRunner,
    _original,
    _Recorder,
    draft_lists,
    make_batch,
    make_draft_worker,
)

from evict.plugin import worker as evict_worker  # noqa: E402
from evict.plugin.config import parse_env, resolve_pad_cost  # noqa: E402
from evict.plugin.server_args_hook import MIB, depth_graph_reserve, width_graph_reserve  # noqa: E402
from evict.plugin.tp_sync import WidthAgreement, policy_fingerprint  # noqa: E402
from evict.plugin.tree_cut import ScoreSink  # noqa: E402
from evict.truncation import AcceptanceEstimator, TruncationPolicy  # noqa: E402
from evict.truncation.depth import DraftShape  # noqa: E402
from evict.truncation.tree import num_candidates  # noqa: E402

pytestmark = pytest.mark.sglang


# ---------------------------------------------------------------------------------------------
# 1. tensors kept across a graph replay are owned
# ---------------------------------------------------------------------------------------------
def test_a_full_tree_step_keeps_its_own_copy_of_the_draft_graphs_kept_indices(monkeypatch):
    """``top_scores_index`` of a replayed draft graph lives in the shared graph pool; the verify replay
    may reuse that block before ``learn`` reads it.  Here the 'graph output' is overwritten with
    garbage after drafting, as the pool would: ``learn`` must still see this step's indices."""
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 1.0, 1.0], widths=[2, 4, 8], decision="immediate")  # full tree
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.acceptance = AcceptanceEstimator(4, 3)
    dw.acceptance_candidates = num_candidates(3, 4)
    graph_out = torch.zeros(8, 7, dtype=torch.long)  # the draft graph's static output block
    organize = dw.draft_forward

    def replayed(forward_batch):  # what the draft graph runner hands back: views of its outputs
        parent_list, top_scores_index, draft_tokens, probs = organize(forward_batch)
        graph_out[: top_scores_index.shape[0]].copy_(top_scores_index)
        return parent_list, graph_out[: top_scores_index.shape[0]], draft_tokens, probs

    dw.draft_forward = replayed
    dw.draft(make_batch())
    assert dw.last_decision.width == 8
    kept = _original(*dw.lists, 8)[1]
    graph_out.fill_(10**6)  # the verify replay recycled the block
    assert torch.equal(dw._pending_outcome[1], kept)
    dw.learn(torch.tensor([[0, 1, -1, -1], [8, -1, -1, -1]]), 8)  # an out-of-bounds scatter before the fix
    assert sum(r["trials"] for r in dw.acceptance.reliability()) > 0


# ---------------------------------------------------------------------------------------------
# 2. host syncs: lagged and off read nothing under TP, immediate reads one value
# ---------------------------------------------------------------------------------------------
_HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")


class _ReadGuard:
    """Records every host read of a tensor during EVICT's step, except the ones allowed."""

    def __init__(self, monkeypatch, allowed):
        self.active, self.reads = False, []
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def guarded(t, *args, _original=original, _name=name, **kwargs):
                if self.active and not any(a(t) for a in allowed):
                    self.reads.append(_name)
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, guarded)


def _fake_all_reduce(others):
    """``dist.all_reduce`` of a one-rank world whose other rank proposed ``others`` (MAX / MIN)."""

    def all_reduce(tensor, op=None, group=None):
        other = others.pop(0) if isinstance(others, list) else others
        fn = max if op == dist.ReduceOp.MAX else min
        tensor.fill_(fn(int(tensor.reshape(-1)[0]), other))

    return all_reduce


def _guarded_steps(monkeypatch, decision, others, steps=12):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 1.4, 2.2], widths=[2, 4, 8], decision=decision)
    dw = make_draft_worker(monkeypatch, rec, policy)
    agreement = WidthAgreement(group=None)
    dw.width_agreement = agreement
    monkeypatch.setattr(dist, "all_reduce", _fake_all_reduce(others))
    assert agreement._buf.device.type == "cpu"  # the CPU group's host buffer: reading it waits on no GPU
    held = policy._held
    shares_agreement = lambda t: t.untyped_storage().data_ptr() == agreement._buf.untyped_storage().data_ptr()  # noqa: E731
    assert policy.widths.device.type == "cpu"  # the policy's widths are host values (read once per policy)
    guard = _ReadGuard(
        monkeypatch, [lambda t: t is held._buffer, shares_agreement, lambda t: t is policy.widths]
    )
    build = dw.build_verify_input

    def guarded_build(*args, **kwargs):
        guard.active = True
        try:
            return build(*args, **kwargs)
        finally:
            guard.active = False

    dw.build_verify_input = guarded_build
    gen = torch.Generator().manual_seed(3)
    per_step, widths = [], []
    for i in range(steps):
        dw.lists = draft_lists(seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        if i % 3 == 1:  # an unsure drafter: another width
            dw.lists = [[s * 0.05 for s in dw.lists[0]], *dw.lists[1:]]
        before = len(guard.reads)
        dw.draft(make_batch())
        per_step.append(len(guard.reads) - before)
        widths.append(rec.events[-1][1])
    return per_step, widths, agreement, policy


@pytest.mark.parametrize("others", [0, [0, 2, 0, 1] * 3])  # the other rank agrees, or overrules us
def test_lagged_steps_under_tp_read_nothing_on_the_host_after_the_first(monkeypatch, others):
    per_step, widths, agreement, _ = _guarded_steps(monkeypatch, "lagged", others)
    assert per_step[1:] == [0] * (len(per_step) - 1), per_step  # the first step decides on its own scores
    assert agreement.calls == len(per_step)  # one host collective per step, no device read
    if isinstance(others, list):
        assert agreement.changed > 0 and 8 in widths


def test_off_steps_under_tp_take_no_collective_and_read_nothing(monkeypatch):
    per_step, widths, agreement, _ = _guarded_steps(monkeypatch, "off", 0)
    assert per_step == [0] * len(per_step) and agreement.calls == 0 and set(widths) == {8}


def test_immediate_steps_under_tp_read_one_value_on_the_host(monkeypatch):
    per_step, _, agreement, _ = _guarded_steps(monkeypatch, "immediate", [0, 2, 0, 1] * 3)
    assert per_step == [1] * len(per_step)  # the chosen index; the agreement reads a host buffer
    assert agreement.calls == len(per_step) and agreement.changed > 0


def test_a_cuda_step_cost_is_copied_from_pinned_memory_without_blocking(monkeypatch):
    """The first step at a new batch size used to copy its cost vector with a blocking ``.to``."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: calls.append("pin") or t.clone())
    real_to = torch.Tensor.to

    def to(t, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls.append(("to", kwargs.get("non_blocking", False)))
            return t
        return real_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    policy = TruncationPolicy([1.0, 2.0, 3.0], widths=[2, 4, 8])
    policy.step_cost(4, "cuda:0")
    policy.step_cost(4, "cuda:0")  # cached: no second copy
    assert calls == ["pin", ("to", True)]


def test_the_server_precomputes_every_step_cost_before_serving(monkeypatch):
    w = _fake_evict_worker()
    dw = w._draft_worker
    dw.score_sink = ScoreSink(rows=16, cols=7, device="cpu")
    w.evict_metrics = SimpleNamespace(policy=None)
    seen = []
    policy = TruncationPolicy(lambda bs, widths: seen.append(bs) or torch.ones(3), widths=[2, 4, 8])
    w._set_policy(policy)
    assert sorted(seen) == list(range(1, 17)) and dw.truncation_policy is policy
    policy._cost_fn = lambda bs, widths: pytest.fail("a step computed (and copied) its cost vector")
    for bs in (1, 7, 16):
        policy.step_cost(bs, dw.score_sink.buffer.device)


# ---------------------------------------------------------------------------------------------
# 3. memory reserve per width, from the backend's allocations
# ---------------------------------------------------------------------------------------------
def test_flashinfer_reserve_counts_indices_mask_and_workspaces_per_captured_size():
    r = width_graph_reserve("flashinfer", (4, 8), 8, [1, 2, 4], 1000)
    # width 4: T = 4 * 4 = 16 tokens; per backend 4*16*1000 (kv_indices) + 16*1000 (mask) + 3 x 8 MiB
    per_backend = 64_000 + 16_000 + 3 * 8 * MIB
    assert r.gpu_bytes == {4: 2 * per_backend}  # target verify + draft extend; N is SGLang's
    assert r.pinned_bytes == {4: 2 * 3 * 8 * MIB}
    # the figure: 23 captured sizes -> ~370 MB of workspaces alone per width
    big = width_graph_reserve("FlashInferAttnBackend", (2, 32), 32, range(1, 24), 1)
    assert big.gpu_bytes[2] == 2 * (4 * 23 * 2 + 23 * 2 + 23 * 8 * MIB)
    assert big.gpu_bytes[2] / MIB == pytest.approx(368, abs=0.1)


def test_triton_and_fa3_reserves():
    r = width_graph_reserve("triton", (2, 4, 8), 8, [8, 1], 100)
    # width 2: T = 16; 2 backends x int64 kv_indices 8*16*100, + target verify mask 8*2*(100+2)
    assert r.gpu_bytes == {2: 2 * 12_800 + 1_632, 4: 2 * 25_600 + 3_328}
    assert width_graph_reserve("triton", (2,), 8, [8], 100, draft_extend=False).gpu_bytes == {
        2: 12_800 + 1_632
    }
    assert width_graph_reserve("fa3", (4,), 8, [2, 4], 50).gpu_bytes == {4: 4 * 4 * 54}
    with pytest.raises(ValueError, match="no graph-memory model"):
        width_graph_reserve("trtllm_mha", (4,), 8, [4], 50)


def test_shallower_depths_reserve_their_draft_decode_graphs():
    """EVICT_DEPTH=1: each shallower depth's multi-step draft backend, per SGLang's allocations."""
    r = depth_graph_reserve("flashinfer", (1, 2), 4, [1, 2, 4], 1000)
    # depth d: int32 kv_indices [d, 4 * 4 * 1000]; d - 1 step backends x 3 captured sizes x 8 MiB
    assert r.gpu_bytes == {1: 4 * 16_000, 2: 4 * 2 * 16_000 + 3 * 8 * MIB}
    assert r.pinned_bytes == {1: 0, 2: 3 * 8 * MIB}
    assert depth_graph_reserve("triton", (2,), 4, [8, 1], 100).gpu_bytes == {2: 8 * 2 * 8 * 4 * 100}
    assert depth_graph_reserve("fa3", (1, 3), 4, [8], 100).gpu_bytes == {1: 0, 3: 2 * 2 * 4 * 8 * 100}
    with pytest.raises(ValueError, match="no graph-memory model"):
        depth_graph_reserve("trtllm_mha", (1,), 4, [4], 50)


def test_the_start_up_log_shows_the_predicted_reserve_beside_sglangs_estimate(monkeypatch):
    w = _fake_evict_worker()
    state = w.width_states.state(8)
    state.target_graph_runner = _FakeGraphRunner([1, 2, 4], [], "verify-8")
    w.server_args = SimpleNamespace(attention_backend="flashinfer")
    w._target_worker.model_runner.model_config = SimpleNamespace(context_len=1000)
    monkeypatch.setattr(
        type(w), "graph_memory_usage", property(lambda self: {"target_verify": 0.75, "draft_extend": 0.25})
    )
    line = w._memory_estimates()
    want = 2 * (64_000 + 16_000 + 3 * 8 * MIB) / 2**30
    assert f"4: {want:.3f}" in line and "target_verify=0.750" in line and "draft_extend=0.250" in line
    assert "depth" not in line
    # EVICT_DEPTH=1: each shallower depth's draft graphs are predicted too (measured in its own line)
    # and each chain's (EVICT_DEPTH_CHAIN=1: one row per request)
    w.depth_states, w.topk = {DraftShape(4, 1): None, DraftShape(4, 2): None, DraftShape(1, 3): None}, 4
    line = w._memory_estimates()
    drafts = depth_graph_reserve("flashinfer", (1, 2), 4, [1, 2, 4], 1000)
    assert f"d=2: {drafts.gpu_bytes[2] / 2**30:.3f}" in line and "d=1: " in line
    chains = depth_graph_reserve("flashinfer", (3,), 1, [1, 2, 4], 1000)
    assert f"chain=3: {chains.gpu_bytes[3] / 2**30:.3f}" in line
    assert chains.gpu_bytes[3] < depth_graph_reserve("flashinfer", (3,), 4, [1, 2, 4], 1000).gpu_bytes[3]


# ---------------------------------------------------------------------------------------------
# 4. the pad cost's default
# ---------------------------------------------------------------------------------------------
def test_a_padded_slot_costs_a_node_unless_the_table_measured_less(caplog):
    cfg = parse_env({"EVICT_PER_REQUEST": "1"})
    modeled = SimpleNamespace(metadata={"padding_cost": 0.0, "modeled": True, "backend": "modeled"})
    with caplog.at_level(logging.WARNING):
        assert resolve_pad_cost(cfg, modeled) == 1.0
    assert any("not a measurement" in r.getMessage() for r in caplog.records)
    assert resolve_pad_cost(cfg, None) == 1.0
    assert resolve_pad_cost(cfg, SimpleNamespace(metadata={"padding_cost": 0.3, "backend": "sglang"})) == 0.3
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1", "EVICT_PAD_COST": "0"}), modeled) == 0.0


def test_the_shipped_modeled_table_does_not_set_the_pad_cost():
    from evict.paths import shipped_config
    from evict.profiler.table import CostTable

    table = CostTable.load(shipped_config("modeled_h100_qwen3_30b_a3b_cost_table.json"))
    assert table.metadata["padding_cost"] == 0.0  # the model's premise...
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1"}), table) == 1.0  # ...is not a measurement


# ---------------------------------------------------------------------------------------------
# 5. TP: one policy on every rank
# ---------------------------------------------------------------------------------------------
def test_the_policy_fingerprint_sees_widths_costs_and_mode():
    a = TruncationPolicy([1.0, 2.0, 3.0], widths=[2, 4, 8])
    same = TruncationPolicy(torch.tensor([1.0, 2.0, 3.0]), widths=(2, 4, 8))
    assert policy_fingerprint(a, (1, 4)) == policy_fingerprint(same, (1, 4))
    others = [
        TruncationPolicy([1.0, 2.0, 3.5], widths=[2, 4, 8]),
        TruncationPolicy([1.0, 2.0, 3.0], widths=[2, 4, 16]),
        TruncationPolicy([1.0, 2.0, 3.0], widths=[2, 4, 8], decision="lagged"),
        TruncationPolicy([1.0], widths=[8], decision="off"),
    ]
    assert len({policy_fingerprint(p, (1, 4)) for p in [a, *others]}) == 5


def test_ranks_whose_policies_differ_all_fall_back_to_the_full_tree(monkeypatch, caplog):
    w = _fake_evict_worker()
    dw = w._draft_worker
    dw.score_sink = ScoreSink(rows=4, cols=7, device="cpu")
    dw.acceptance = "estimator"
    w.evict_metrics = SimpleNamespace(policy=None)
    w._set_policy(TruncationPolicy([1.0, 2.0], widths=[4, 8]))
    dw.width_agreement = WidthAgreement(group=None)
    mine = policy_fingerprint(w.truncation_policy, w._fingerprint_batch_sizes())
    monkeypatch.setattr(dist, "all_reduce", _fake_all_reduce(mine))  # the other rank: the same policy
    assert w._agree_on_policy("start-up") and w.truncation_policy.decision == "immediate"
    monkeypatch.setattr(dist, "all_reduce", _fake_all_reduce(mine ^ 1))  # its calibration fell back
    with caplog.at_level(logging.ERROR):
        assert not w._agree_on_policy("start-up")
    assert w.truncation_policy.decision == "off" and w.truncation_policy.widths.tolist() == [8]
    assert dw.truncation_policy is w.truncation_policy and dw.acceptance is None
    assert any("different policies" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# 6. graph recapture (weight updates, PD role switch, elastic EP)
# ---------------------------------------------------------------------------------------------
def _recapturing_worker(monkeypatch, fail_width=None):
    from sglang.srt.model_executor.model_runner import ModelRunner

    w = _fake_evict_worker()
    dw = w._draft_worker
    dw.score_sink = ScoreSink(rows=4, cols=7, device="cpu")
    dw.width_agreement, dw.acceptance = None, None
    w.evict_metrics = SimpleNamespace(policy=None)
    w._set_policy(TruncationPolicy([1.0, 2.0], widths=[4, 8]))
    w.speculative_num_steps = 3
    w._override_worker_state = lambda steps, width: contextlib.nullcontext()
    w._capture_context = contextlib.nullcontext
    runner = w._target_worker.model_runner
    runner.is_draft_worker, runner.eager_runner = False, None
    seen = []

    def init_decode_cuda_graph():  # SGLang's: captures N's graphs with the live backend
        seen.append(runner.attn_backend)
        runner.decode_cuda_graph_runner = "verify-graph-8-new"

    def capture(width, backend):
        if width == fail_width:
            raise RuntimeError("out of memory")
        return f"verify-graph-{width}-new({backend})"

    runner.init_decode_cuda_graph = init_decode_cuda_graph
    runner.recapture_decode_cuda_graph = ModelRunner.recapture_decode_cuda_graph.__get__(runner)
    w._capture_verify_graph = capture
    w._hook_recapture()
    return w, runner, seen


def test_a_weight_update_recapture_rebuilds_every_widths_verify_graphs(monkeypatch):
    w, runner, seen = _recapturing_worker(monkeypatch)
    w.width_states.activate(4)  # serving at width 4 when the weights change
    runner.recapture_decode_cuda_graph()  # SGLang's own entry point (weight updater)
    assert seen == ["verify-backend-8"]  # captured at N with N's backend, not the live width's
    assert w.width_states.state(8).target_graph_runner == "verify-graph-8-new"
    assert w.width_states.state(4).target_graph_runner == "verify-graph-4-new(verify-backend-4)"
    w.width_states.activate(4)
    assert runner.decode_cuda_graph_runner == "verify-graph-4-new(verify-backend-4)"
    w.width_states.activate(8)  # used to swap the old N runner back in, dropping SGLang's new one
    assert runner.decode_cuda_graph_runner == "verify-graph-8-new"
    assert w.truncation_policy.widths.tolist() == [4, 8]
    runner._recapture_elastic_cuda_graphs = lambda: None  # a path that recaptured nothing
    w._hook_recapture()
    w._capture_verify_graph = lambda width, backend: pytest.fail("nothing to rebuild")
    runner._recapture_elastic_cuda_graphs()


def test_a_failed_recapture_refuses_the_stale_widths_and_says_so(monkeypatch, caplog):
    w, runner, _ = _recapturing_worker(monkeypatch, fail_width=4)
    with caplog.at_level(logging.ERROR):
        runner.recapture_decode_cuda_graph()
    assert w.width_states.widths == (8,) and runner.decode_cuda_graph_runner == "verify-graph-8-new"
    assert w.truncation_policy.decision == "off" and w._draft_worker.truncation_policy is w.truncation_policy
    assert any("verifies the full tree" in r.getMessage() for r in caplog.records)


def test_sglang_recaptures_through_the_names_evict_wraps():
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert "self.init_decode_cuda_graph()" in inspect.getsource(ModelRunner.recapture_decode_cuda_graph)
    assert "self.init_decode_cuda_graph()" in inspect.getsource(ModelRunner.ensure_decode_cuda_graphs)
    assert "self._recapture_elastic_cuda_graphs()" in inspect.getsource(ModelRunner)
    for name in evict_worker.EvictWorkerV2._RECAPTURE_ENTRY_POINTS:
        assert callable(getattr(ModelRunner, name))


# ---------------------------------------------------------------------------------------------
# 7. start-up logs and the breakable backend
# ---------------------------------------------------------------------------------------------
def test_a_width_state_captures_and_logs_no_draft_decode_graph(monkeypatch):
    """SGLang's own ``_capture_cuda_graphs`` with the GPU checks faked: under EVICT's scope it must
    not log "Capture draft decode ... 0.00 GB" (it did, once per width, capturing nothing)."""
    logs, built = [], []
    monkeypatch.setattr(eagle_worker_v2, "_is_cpu", False)
    monkeypatch.setattr(eagle_worker_v2, "check_cuda_graph_backend", lambda phase, backend: False)
    monkeypatch.setattr(eagle_worker_v2, "get_model", lambda: SimpleNamespace(model_impl="sglang"))
    decode = SimpleNamespace(backend="full")
    exec_cfg = SimpleNamespace(graph=SimpleNamespace(cuda_graph_config=SimpleNamespace(decode=decode)))
    monkeypatch.setattr(eagle_worker_v2, "get_exec", lambda: exec_cfg)
    monkeypatch.setattr(eagle_worker_v2, "get_batch_sizes_to_capture", lambda runner: ([1, 2], None))
    monkeypatch.setattr(eagle_worker_v2, "get_available_gpu_memory", lambda device, gpu_id: 10.0)
    monkeypatch.setattr(eagle_worker_v2, "log_info_on_rank0", lambda lg, msg: logs.append(msg))
    monkeypatch.setattr(
        eagle_worker_v2, "EAGLEDraftCudaGraphRunner", lambda worker: built.append(worker) or "g"
    )
    dw = object.__new__(evict_worker.EvictDraftWorker)
    dw.target_worker = SimpleNamespace(device="cuda")
    dw.speculative_num_steps, dw.topk, dw.speculative_num_draft_tokens = 3, 4, 4
    dw.device, dw.gpu_id = "cpu", 0
    dw._specialized_graph_memory_usage, dw._specialized_graph_time_usage = {}, {}
    dw.draft_extend_attn_backend = None
    dw.draft_runner = SimpleNamespace()
    eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs(dw)  # control: SGLang captures and logs it
    assert len(built) == 1 and any("Capture draft decode" in m for m in logs)
    logs.clear()
    with evict_worker._without_draft_decode_graph():
        eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs(dw)
    assert len(built) == 1 and not any("Capture draft decode" in m for m in logs), logs


def test_start_up_reports_capture_time_and_memory_per_width():
    from evict.plugin.width_states import WidthStateSet

    states = WidthStateSet(lambda m, s: None)
    states.register(8, "N")
    states.register(4, "s4", memory_gb=0.4, seconds=12.5)
    states.register(2, "s2", memory_gb=0.3, seconds=11.0)
    report = states.memory_report()
    assert "width   2:   0.300 GB    11.0 s" in report and "width   4:   0.400 GB    12.5 s" in report
    assert "total        0.700 GB    23.5 s" in report


def test_calibration_replays_inside_the_backends_replay_session():
    """``--cuda-graph-backend breakable`` runs its eager pieces only inside ``replay_session()``;
    the start-up calibration used to call ``backend.replay`` outside it."""
    state = {"open": False, "replays": []}

    @contextlib.contextmanager
    def session():
        state["open"] = True
        try:
            yield
        finally:
            state["open"] = False

    class Key(tuple):
        size = property(lambda self: self[0])
        stream_idx = None

    runner = SimpleNamespace(
        backend=SimpleNamespace(
            _graphs={Key((2,)): None},
            replay_session=session,
            replay=lambda key, fb: state["replays"].append(state["open"]),
        ),
        model_context=contextlib.nullcontext,
    )
    evict_worker._replay_graph(runner, 2)
    assert state["replays"] == [True] and not state["open"]
