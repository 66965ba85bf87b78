"""EVICT's worker classes against the real sglang==0.5.23 worker code (CPU; skipped without sglang).

The worker needs a GPU to run end to end; here its step logic runs with SGLang's real draft-tree
functions and stand-ins for the GPU parts (attention backends, graph runners, the target model).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
from sglang.srt.speculative import eagle_worker_v2, spec_utils  # noqa: E402

import evict.plugin  # noqa: E402
from evict.plugin import worker as evict_worker  # noqa: E402
from evict.plugin.tree_cut import ScoreSink, gather_candidate_scores  # noqa: E402
from evict.truncation import TruncationPolicy, choose_width  # noqa: E402

pytestmark = pytest.mark.sglang

_original = evict_worker._original_organize_draft_results
_select_later = getattr(spec_utils._select_top_k_tokens_later, "_torchdynamo_orig_callable", None)


def draft_lists(bs=2, topk=4, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def step(rows):
        return torch.softmax(torch.randn(rows, 50, generator=g) * 2.5, dim=-1).topk(topk, dim=-1)

    p, idx = step(bs)
    hidden, scores, out = torch.zeros(bs, 2), None, ([], [], [])
    for i in range(steps):
        if i == 0:
            _, hidden, scores, info = spec_utils._select_top_k_tokens_first(p, idx, hidden, topk)
        else:
            _, hidden, scores, info = _select_later(i, p, idx, hidden, scores, topk)
        for lst, t in zip(out, info):
            lst.append(t)
        if i < steps - 1:
            p, idx = step(bs * topk)
    return out


def test_classes_extend_sglangs_eagle_workers():
    assert issubclass(evict_worker.EvictWorkerV2, eagle_worker_v2.EAGLEWorkerV2)
    assert issubclass(evict_worker.EvictDraftWorker, eagle_worker_v2.EagleDraftWorker)
    assert evict.plugin.create_evict_worker(None) is evict_worker.EvictWorkerV2


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        ("EvictDraftWorker", "__init__"),
        ("EvictDraftWorker", "draft"),
        ("EvictDraftWorker", "draft_forward"),
        ("EvictDraftWorker", "_draft_extend_for_decode"),
        ("EvictWorkerV2", "__init__"),
        ("EvictWorkerV2", "init_cuda_graphs"),
        ("EvictWorkerV2", "forward_batch_generation"),
        ("EvictWorkerV2", "verify"),
        ("EvictWorkerV2", "on_verify_complete_cpu"),
    ],
)
def test_overrides_keep_sglangs_signatures(cls, name):
    """An SGLang upgrade that changes a hooked method's parameters must fail here, not at serve time."""
    ours = getattr(getattr(evict_worker, cls), name)
    theirs = getattr(
        evict_worker.EvictWorkerV2.__mro__[1] if cls == "EvictWorkerV2" else eagle_worker_v2.EagleDraftWorker,
        name,
    )
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)


def test_draft_worker_name_swap_is_scoped():
    with evict_worker._eagle_draft_worker_cls(evict_worker.EvictDraftWorker):
        assert eagle_worker_v2.EagleDraftWorker is evict_worker.EvictDraftWorker
    assert eagle_worker_v2.EagleDraftWorker is not evict_worker.EvictDraftWorker


def test_score_tap_is_a_pass_through_for_eagle_and_fills_evicts_sink():
    assert eagle_worker_v2.organize_draft_results is evict_worker._organize_draft_results_with_score_tap
    lists = draft_lists()
    ref = _original(*lists, 8)
    got = eagle_worker_v2.organize_draft_results(*lists, 8)  # no sink active: EAGLE3's behaviour
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    sink = ScoreSink(rows=4, cols=7, device="cpu")
    with sink.active():
        eagle_worker_v2.organize_draft_results(*lists, 8)
    assert torch.equal(sink.read(2), gather_candidate_scores(lists[0], ref[1]))


class _Recorder:
    def __init__(self):
        self.events = []
        self.build_kwargs = None


def make_draft_worker(monkeypatch, rec, policy, n=8, topk=4, steps=3):
    """An EvictDraftWorker with stand-ins for its GPU parts; SGLang's own ``draft`` runs it.

    ``draft_forward`` runs SGLang's tree code; the tree build (a GPU kernel) is recorded instead.
    """
    dw = object.__new__(evict_worker.EvictDraftWorker)
    dw.full_num_draft_tokens, dw.speculative_num_draft_tokens = n, 3  # stale width from a previous step
    dw.topk, dw.speculative_num_steps = topk, steps
    dw.score_sink = ScoreSink(rows=8, cols=n - 1, device="cpu")
    dw.req_to_token_pool = dw.cuda_graph_runner = None
    dw.draft_runner = SimpleNamespace(canary_manager=None)
    dw.target_worker = SimpleNamespace(model_runner=SimpleNamespace(kv_index_translator=None))
    dw.seed_dsa_topk_from_draft_extend = False
    dw.draft_attn_backend = SimpleNamespace(init_forward_metadata=lambda fb: None)
    dw.tree_mask_mode, dw.device = 0, "cpu"
    dw.truncation_policy = policy
    dw.width_agreement = None
    dw.last_decision = None
    dw.width_counts = {}
    dw.acceptance, dw._pending_outcome = None, None
    dw.kill_switch = False

    def use_width(m):
        rec.events.append(("use", m))
        dw.speculative_num_draft_tokens = m

    dw.use_width = use_width
    dw.lists = draft_lists(topk=topk, steps=steps)

    def fake_draft_forward(forward_batch):
        if forward_batch.forward_mode.is_idle():
            return None, None, None, None
        with dw.score_sink.active():
            out = eagle_worker_v2.organize_draft_results(*dw.lists, dw.speculative_num_draft_tokens)
        return (*out, None)

    dw.draft_forward = fake_draft_forward

    def fake_prepare(draft_input, pool, batch, runner, draft_runner, topk, steps, **kw):
        rec.events.append(("prepare", kw["num_draft_tokens"]))
        fb = SimpleNamespace(forward_mode=batch.forward_mode, mark_forward_metadata_ready=lambda: None)
        return fb, False, None

    def fake_build(batch, draft_input, parent_list, top_scores_index, draft_tokens, draft_probs, **kw):
        rec.events.append(("build", kw["num_draft_tokens"]))
        rec.build_kwargs = dict(kw, top_scores_index=top_scores_index, draft_tokens=draft_tokens)
        return SimpleNamespace(spec_steps=kw["num_steps"])

    monkeypatch.setattr(eagle_worker_v2, "prepare_for_draft", fake_prepare)
    monkeypatch.setattr(evict_worker, "_original_build_eagle_verify_input", fake_build)
    return dw


def make_batch(bs=2, idle=False):
    return SimpleNamespace(
        spec_info=SimpleNamespace(),
        forward_mode=SimpleNamespace(is_idle=lambda: idle),
        seq_lens=torch.zeros(bs, dtype=torch.long),
    )


def test_draft_cuts_the_tree_and_switches_width_before_building_the_verify_input(monkeypatch):
    rec = _Recorder()
    widths = [2, 4, 8]
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=widths, decision="immediate")  # steep: narrow wins
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.draft(make_batch())
    m = dw.last_decision.width
    assert m in widths and m < 8
    # drafting plans the whole tree; the width is applied before the verify input is built
    assert rec.events == [("prepare", 8), ("use", m), ("build", m)]
    kw = rec.build_kwargs
    ref_parents, ref_idx, ref_tok = _original(*dw.lists, m)
    assert torch.equal(kw["top_scores_index"], ref_idx)
    assert torch.equal(kw["draft_tokens"], ref_tok)
    assert dw.speculative_num_draft_tokens == m  # what draft extend reads after verify


def test_the_tree_is_built_with_the_real_depth_and_only_spec_steps_is_lowered(monkeypatch):
    """Defect 2: the CUDA tree kernel refuses any depth whose parent stride is not topk*(d-1)+1."""
    rec = _Recorder()
    for cost, want in (([1.0, 50.0, 60.0], 2), ([1.0, 1.0, 60.0], 4)):
        policy = TruncationPolicy(cost, widths=[2, 4, 8], decision="immediate")
        dw = make_draft_worker(monkeypatch, rec, policy, steps=5)
        verify_input = dw.draft(make_batch())
        assert dw.last_decision.width == want
        assert rec.build_kwargs["num_steps"] == 5  # parent_list's real stride
        assert verify_input.spec_steps == min(5, want - 1)  # accept_index columns fit the width


def test_consecutive_steps_at_one_width_leave_that_width_for_draft_extend(monkeypatch):
    """Defect 1: draft() resets the draft worker to N; every step must set the verified width back.

    Before the fix only a width *change* re-applied the width, so from the second step at the same
    width, draft extend ran at N on an m-wide verify (a crash in SGLang's draft-extend load_batch).
    """
    from evict.plugin.width_states import WidthStateSet

    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    w = _fake_evict_worker()
    w._draft_worker = dw
    dw.draft_extend_attn_backend = dw.cuda_graph_runner_for_draft_extend = None
    w.width_states = WidthStateSet(lambda m, state: rec.events.append(("swap", m)))
    for m in (2, 4, 8):
        w.width_states.register(m, object())
    w.width_states.active_width = 8
    dw.use_width = w.use_width
    seen = []
    for _ in range(4):
        dw.draft(make_batch())
        seen.append((dw.last_decision.width, dw.speculative_num_draft_tokens, w.speculative_num_draft_tokens))
    m = seen[0][0]
    assert m < 8 and seen == [(m, m, m)] * 4
    assert dw.width_counts == {m: 4}  # what the metrics line reports
    assert rec.events.count(("swap", m)) == 1  # the state is swapped once, the width set every step


def test_lagged_decision_verifies_this_steps_best_nodes_at_the_previous_steps_width(monkeypatch):
    rec = _Recorder()
    widths, cost = [2, 4, 8], [1.0, 1.15, 1.6]
    policy = TruncationPolicy(cost, widths=widths, decision="lagged")
    dw = make_draft_worker(monkeypatch, rec, policy)
    confident = draft_lists(seed=1)
    unsure = [[s * 0.05 for s in confident[0]], *confident[1:]]

    def own_width(lists):  # what an immediate decision would pick for these drafts
        kept = _original(*lists, 8)[1]
        return choose_width(gather_candidate_scores(lists[0], kept), cost, widths).width

    assert own_width(confident) != own_width(unsure)
    steps = [confident, unsure, confident, confident]
    want = [own_width(confident), own_width(confident), own_width(unsure), own_width(confident)]
    for lists, m in zip(steps, want):
        dw.lists = lists
        rec.events.clear()
        dw.draft(make_batch())
        assert rec.events == [("prepare", 8), ("use", m), ("build", m)]
        # this step's top m-1 nodes: exactly what SGLang organizes for a width-m tree
        assert torch.equal(rec.build_kwargs["top_scores_index"], _original(*lists, m)[1])
        assert torch.equal(rec.build_kwargs["draft_tokens"], _original(*lists, m)[2])


def test_a_failing_decision_verifies_the_full_tree_and_is_counted(monkeypatch, caplog):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)

    def broken(scores):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(policy, "decide", broken)
    with caplog.at_level("ERROR", logger="evict"):
        dw.draft(make_batch())
        dw.draft(make_batch())
    assert rec.events == [("prepare", 8), ("use", 8), ("build", 8)] * 2
    assert torch.equal(rec.build_kwargs["top_scores_index"], _original(*dw.lists, 8)[1])
    assert dw.last_decision is None and policy.stats()["errors"] == 2
    assert sum("verifying the full tree" in r.getMessage() for r in caplog.records) == 1  # logged once


class _FakeAgreement:
    """Stands in for the all-reduce: what the other ranks proposed this step."""

    def __init__(self, others):
        self.others, self.proposed = list(others), []

    def agree(self, index):
        self.proposed.append(index)
        return max(index, self.others.pop(0))


def test_tp_ranks_verify_the_widest_proposal_and_a_fallback_anywhere_is_a_fallback_everywhere(monkeypatch):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.width_agreement = _FakeAgreement([0, 1, 2])  # other ranks: narrowest, middle, full (their fallback)
    got = []
    for _ in range(3):
        dw.draft(make_batch())
        got.append(rec.events[-1][1])
    own_index = dw.width_agreement.proposed[0]
    assert dw.width_agreement.proposed == [own_index] * 3  # one collective per step
    assert got == [[2, 4, 8][max(own_index, k)] for k in (0, 1, 2)]
    # an overruled rank still verifies an ancestor-closed prefix of its kept candidates
    assert rec.build_kwargs["num_draft_tokens"] == 8


def test_a_rank_whose_decision_failed_proposes_the_full_tree(monkeypatch):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    monkeypatch.setattr(policy, "decide", lambda scores: 1 / 0)
    dw.width_agreement = _FakeAgreement([0])
    dw.draft(make_batch())
    assert dw.width_agreement.proposed == [2] and rec.events[-1] == ("build", 8)


def test_an_overruled_rank_decides_again_at_the_agreed_width(monkeypatch):
    """Issue 22 item 5: a rank overruled to a wider width keeps that width's top m-1 (the rule's tree,
    as every rank with the same scores does), not the first m-1 candidates (another tree)."""
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    monkeypatch.setattr(policy, "decide", lambda scores: 1 / 0)
    dw.width_agreement = SimpleNamespace(agree=lambda index: 1)  # the others agreed on width 4
    dw.draft(make_batch())
    assert rec.events[-1] == ("build", 4)
    top = _original(*dw.lists, 4)[1]  # SGLang's own selection at width 4
    assert not torch.equal(top, _original(*dw.lists, 8)[1][:, :3])  # the two trees differ here
    assert torch.equal(rec.build_kwargs["top_scores_index"], top)
    assert dw.last_decision is not None and dw.last_decision.width == 4


def test_an_overruled_rank_that_cannot_decide_keeps_the_first_candidates(monkeypatch):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    monkeypatch.setattr(policy, "decide", lambda scores: 1 / 0)
    monkeypatch.setattr(evict_worker, "_decide_at", lambda *a: 1 / 0)
    dw.width_agreement = SimpleNamespace(agree=lambda index: 1)
    dw.draft(make_batch())
    full_idx = _original(*dw.lists, 8)[1]
    assert rec.events[-1] == ("build", 4)
    assert torch.equal(rec.build_kwargs["top_scores_index"], full_idx[:, :3])  # ancestor-closed prefix
    assert policy.stats()["errors"] == 2


def test_an_agreed_index_outside_this_ranks_widths_verifies_the_full_tree(monkeypatch):
    """Issue 22 item 5: ranks with different widths used to index ``policy.widths`` out of range
    outside any try (an IndexError that failed the step)."""
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.width_agreement = SimpleNamespace(agree=lambda index: 5)  # another rank has six widths
    dw.draft(make_batch())
    assert rec.events[-1] == ("build", 8) and dw.last_decision is None
    assert policy.stats()["errors"] == 1


def test_flat_cost_and_kill_switch_verify_the_full_tree(monkeypatch):
    for policy in (
        TruncationPolicy([1.0, 1.0, 1.0], widths=[2, 4, 8], decision="immediate"),
        TruncationPolicy([1.0], widths=[8], decision="off"),
    ):
        rec = _Recorder()
        dw = make_draft_worker(monkeypatch, rec, policy)
        verify_input = dw.draft(make_batch())
        assert rec.events == [("prepare", 8), ("use", 8), ("build", 8)]
        assert rec.build_kwargs["num_steps"] == 3 and verify_input.spec_steps == 3
        assert torch.equal(rec.build_kwargs["top_scores_index"], _original(*dw.lists, 8)[1])


def test_kill_switch_builds_sglangs_full_tree_without_reading_scores(monkeypatch):
    """EVICT_DISABLE=1 takes SGLang's own path: the full tree, counted, with no score read or decision."""
    rec = _Recorder()
    policy = TruncationPolicy([1.0], widths=[8], decision="off")
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.kill_switch = True

    def no_read(bs):
        raise AssertionError("the kill switch read the draft scores")

    monkeypatch.setattr(dw.score_sink, "read", no_read)
    monkeypatch.setattr(policy, "decide", lambda scores: pytest.fail("the kill switch decided"))
    verify_input = dw.draft(make_batch())
    assert rec.events == [("prepare", 8), ("use", 8), ("build", 8)]
    assert rec.build_kwargs["num_draft_tokens"] == 8 and verify_input.spec_steps == 3
    assert torch.equal(rec.build_kwargs["top_scores_index"], _original(*dw.lists, 8)[1])
    stats = policy.stats()
    assert stats["steps"] == 1 and stats["mean_width"] == 8 and stats["requests"] == 2
    assert math.isnan(stats["mean_predicted_accepted"]) and dw.width_counts == {8: 1}
    dw.draft(make_batch(idle=True))  # idle: nothing counted
    assert policy.stats()["steps"] == 1


def test_idle_batch_takes_no_decision(monkeypatch):
    rec = _Recorder()
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.draft(make_batch(idle=True))
    assert dw.last_decision is None and policy.counters.steps == 0
    assert rec.events == [("prepare", 8), ("use", 8), ("build", 8)]


def test_eagle3_draft_workers_are_untouched_by_the_hooks(monkeypatch):
    """Outside an EVICT draft, the hooked name is SGLang's function, called with the same arguments."""
    seen = []
    monkeypatch.setattr(
        evict_worker, "_original_build_eagle_verify_input", lambda *a, **k: seen.append((a, k))
    )
    assert eagle_worker_v2.build_eagle_verify_input is evict_worker._build_eagle_verify_input_with_cut
    eagle_worker_v2.build_eagle_verify_input(1, 2, 3, 4, 5, 6, num_draft_tokens=8, num_steps=3)
    assert seen == [((1, 2, 3, 4, 5, 6), {"num_draft_tokens": 8, "num_steps": 3})]


def test_a_chain_draft_plans_no_write_window_a_tree_or_eagle3_draft_keeps_sglangs(monkeypatch):
    """On a GPU SGLang's topk-1 draft reserves the verify window for every chain token
    (``target_translator``); EVICT may cut the chain, so its chains draft without that plan, like
    trees. Trees and EAGLE3's drafts get SGLang's arguments unchanged."""
    seen = []
    monkeypatch.setattr(evict_worker, "_original_prepare_for_draft", lambda *a, **k: seen.append(k))
    assert eagle_worker_v2.prepare_for_draft is evict_worker._prepare_for_draft_tree_window
    eagle_worker_v2.prepare_for_draft(1, 2, target_translator="t", num_draft_tokens=4)  # EAGLE3
    for topk in (4, 1):
        token = evict_worker.ACTIVE_DRAFT_WORKER.set(SimpleNamespace(topk=topk))
        try:
            eagle_worker_v2.prepare_for_draft(1, 2, target_translator="t", num_draft_tokens=4)
        finally:
            evict_worker.ACTIVE_DRAFT_WORKER.reset(token)
    assert [k["target_translator"] for k in seen] == ["t", "t", None]


def _fake_evict_worker(n=8):
    from evict.plugin.width_states import WidthStateSet

    w = object.__new__(evict_worker.EvictWorkerV2)
    w.full_num_draft_tokens = w.speculative_num_draft_tokens = n
    w._draft_worker = SimpleNamespace(
        speculative_num_draft_tokens=n,
        draft_extend_attn_backend="extend-backend-N",
        draft_runner=SimpleNamespace(attn_backend="extend-backend-N"),
        cuda_graph_runner_for_draft_extend="extend-graph-N",
        draft_attn_backend="draft-decode",
        cuda_graph_runner="draft-decode-graph",
    )
    w._target_worker = SimpleNamespace(
        model_runner=SimpleNamespace(
            attn_backend="verify-backend-N", decode_cuda_graph_runner="verify-graph-N"
        )
    )
    w.width_states = WidthStateSet(w._apply_width_state)
    for m in (4, n):
        w.width_states.register(
            m,
            evict_worker.SpecRuntimeState(
                speculative_num_steps=3,
                speculative_num_draft_tokens=m,
                draft_attn_backend=f"draft-decode-{m}",
                cuda_graph_runner=f"draft-decode-graph-{m}",
                target_attn_backend=f"verify-backend-{m}",
                target_graph_runner=f"verify-graph-{m}",
                draft_extend_attn_backend=f"extend-backend-{m}",
                cuda_graph_runner_for_draft_extend=f"extend-graph-{m}",
            ),
        )
    w.width_states.active_width = n
    return w


def test_width_switch_repoints_verify_and_draft_extend_but_not_drafting():
    w = _fake_evict_worker()
    assert w.width_states.activate(4)
    dw, tr = w._draft_worker, w._target_worker.model_runner
    assert (w.speculative_num_draft_tokens, dw.speculative_num_draft_tokens) == (4, 4)
    assert (tr.attn_backend, tr.decode_cuda_graph_runner) == ("verify-backend-4", "verify-graph-4")
    assert dw.draft_extend_attn_backend == dw.draft_runner.attn_backend == "extend-backend-4"
    assert dw.cuda_graph_runner_for_draft_extend == "extend-graph-4"
    # the draft tree is built the same way at every width: draft decode is never switched
    assert (dw.draft_attn_backend, dw.cuda_graph_runner) == ("draft-decode", "draft-decode-graph")


def test_prefill_batches_run_on_the_full_width_state(monkeypatch):
    w = _fake_evict_worker()
    w.width_states.activate(4)
    seen = []
    monkeypatch.setattr(
        eagle_worker_v2.EAGLEWorkerV2,
        "forward_batch_generation",
        lambda self, batch, **kw: seen.append(self._target_worker.model_runner.decode_cuda_graph_runner),
    )
    extend = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: True), is_extend_in_batch=False)
    decode = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: False), is_extend_in_batch=False)
    w.forward_batch_generation(decode)
    w.forward_batch_generation(extend)
    assert seen == ["verify-graph-4", "verify-graph-8"]


def test_realized_accept_lengths_reach_the_policy_counters():
    w = _fake_evict_worker()
    policy = TruncationPolicy([1.0], widths=[8], decision="off")
    w.adaptive_controller = None
    w.evict_metrics = evict_worker.EvictMetrics(policy, log_interval=0)
    w.on_verify_complete_cpu([0, 2, 5], batch_size=3)
    assert policy.stats()["mean_realized_accepted"] == pytest.approx((1 + 3 + 6) / 3)


# The SGLang 0.5.23 functions EVICT's hooks and overrides rely on, pinned by the hash of their
# source.  When SGLang changes one of them, re-read it next to evict/plugin/worker.py (which names
# are looked up at module level, which widths each stage reads) and then update the pin.
_PINNED_SOURCES = {
    "eagle_worker_v2.EagleDraftWorker.draft": "bc895b907be4e337",
    "eagle_worker_v2.EagleDraftWorker.draft_forward": "e1dc83274e26941e",
    "eagle_worker_v2.EagleDraftWorker._draft_extend_for_decode": "43fac9eb9ad0ac5e",
    "eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs": "c8de8ece3ae79b4e",
    "eagle_worker_v2.EagleDraftWorker.init_attention_backend": "78c4d23dcfc2d774",
    "eagle_worker_v2.EAGLEWorkerV2.build_adaptive_runtime_state": "b8cf55ebbb680cf5",
    "eagle_worker_v2.EAGLEWorkerV2._override_worker_state": "b348755147c9ee83",
    "eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation": "e41ad8d8053cf2c0",
    "eagle_worker_v2.EAGLEWorkerV2.verify": "b411b3e604893569",
    "eagle_worker_common.build_eagle_verify_input": "710372aeb30979fe",
    # EVICT_DEPTH_CHAIN: a chain drafts without the translator's window plan, runs SGLang's tree
    # loop at topk 1 (EvictDraftWorker._chain_draft_forward) and verifies at the worker's topk (the
    # tree path's accepted-path compaction is the identity on a chain)
    "eagle_worker_common.prepare_for_draft": "cce2ddd443d964f8",
    "eagle_worker_common.run_eagle_verify": "81c06a4353ac0444",
    "spec_utils.select_top_k_tokens": "042cc9d58cf2b4be",
    # EVICT_PER_REQUEST splices padded nodes out of the first-child / next-sibling lists it builds
    "eagle_utils.build_tree_kernel_efficient": "4663a0ad18708537",
}


@pytest.mark.parametrize("qualname", sorted(_PINNED_SOURCES))
def test_the_sglang_code_evict_hooks_into_is_the_code_it_was_written_against(qualname):
    import hashlib
    import importlib

    module, *attrs = qualname.split(".")
    obj = importlib.import_module(f"sglang.srt.speculative.{module}")
    for a in attrs:
        obj = getattr(obj, a)
    obj = getattr(obj, "__wrapped__", obj)
    digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    assert digest == _PINNED_SOURCES[qualname], (
        f"SGLang's {qualname} changed (installed sglang differs from 0.5.23): re-check EVICT's hooks in "
        "evict/plugin/worker.py against it, then update _PINNED_SOURCES"
    )


def test_the_hooked_names_are_called_by_name_where_evict_expects_them():
    """The three hooks work only while SGLang looks these names up in eagle_worker_v2 at call time."""
    draft_src = inspect.getsource(eagle_worker_v2.EagleDraftWorker.draft)
    forward_src = inspect.getsource(eagle_worker_v2.EagleDraftWorker.draft_forward)
    capture_src = inspect.getsource(eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs)
    assert "verify_input = build_eagle_verify_input(" in draft_src
    assert "= prepare_for_draft(" in draft_src and "target_translator=" in draft_src
    assert "organize_draft_results(" in forward_src
    assert '"cuda": EAGLEDraftCudaGraphRunner,' in capture_src  # _without_draft_decode_graph swaps it
    assert "self.speculative_num_draft_tokens" in inspect.getsource(
        eagle_worker_v2.EagleDraftWorker._draft_extend_for_decode
    )


def test_a_width_state_shares_the_workspace_and_the_draft_decode_graph(monkeypatch):
    """Defect 4: each extra width used to allocate a new attention workspace and draft-decode graphs."""
    calls = SimpleNamespace(workspace=[], decode_runner=[], factory=[], verify_graph=[])

    def capture():  # stands in for EagleDraftWorker._capture_cuda_graphs on a GPU: picks the class as it does
        cls = eagle_worker_v2._select_spec_graph_runner_cls(
            builtin_runner_cls=lambda: eagle_worker_v2.EAGLEDraftCudaGraphRunner, oot_runner_cls=lambda: None
        )
        calls.decode_runner.append(cls)
        if cls is not None:
            dw.cuda_graph_runner = cls(dw)
        dw.cuda_graph_runner_for_draft_extend = "extend-graph-4"

    class Factory:
        def __init__(self, runner, topk, steps, **kw):
            calls.factory.append(steps)

        def create_draft_extend_backend(self):
            return "extend-backend-4"

    w = _fake_evict_worker()
    dw = w._draft_worker
    dw.topk, dw.seed_dsa_topk_from_draft_extend = 4, False
    dw.draft_runner.model_config = SimpleNamespace(hf_config=SimpleNamespace())
    dw._capture_cuda_graphs = capture
    w.speculative_num_steps, w.device, w.gpu_id = 3, "cpu", 0
    w._additional_graph_memory_usage, w._additional_graph_time_usage = {}, {}
    free = iter([10.0, 9.5])  # GB free before and after the verify capture
    monkeypatch.setattr(evict_worker, "get_available_gpu_memory", lambda device, gpu_id: next(free))
    w._override_worker_state = lambda steps, width: contextlib.nullcontext()
    w._target_worker.model_runner._get_attention_backend = lambda init_new_workspace: (
        calls.workspace.append(init_new_workspace) or "verify-backend-4"
    )
    monkeypatch.setattr(evict_worker, "DraftBackendFactory", Factory)
    monkeypatch.setattr(evict_worker, "check_cuda_graph_backend", lambda phase, backend: False)
    monkeypatch.setattr(
        evict_worker,
        "DecodeCudaGraphRunner",
        lambda runner, attn_backend, speculative_num_steps, speculative_num_draft_tokens: (
            calls.verify_graph.append((attn_backend, speculative_num_draft_tokens)) or "verify-graph-4"
        ),
    )
    full = w.width_states.state(8)
    saved_cls = eagle_worker_v2.EAGLEDraftCudaGraphRunner
    saved_select = eagle_worker_v2._select_spec_graph_runner_cls
    state = w.build_width_state(4, full)
    assert calls.workspace == [False]  # the global workspace, not another 384 MB
    assert calls.decode_runner == [None]  # no draft-decode capture (nor its log lines) for a width state
    assert dw.cuda_graph_runner == "draft-decode-graph"  # N's draft-decode graphs, untouched
    assert eagle_worker_v2.EAGLEDraftCudaGraphRunner is saved_cls  # restored after the build
    assert eagle_worker_v2._select_spec_graph_runner_cls is saved_select
    # the verify capture is counted in SGLang's own graph-memory figures
    assert w._additional_graph_memory_usage == {"target_verify": pytest.approx(0.5)}
    assert calls.verify_graph == [("verify-backend-4", 4)] and calls.factory == [3]
    assert (state.draft_attn_backend, state.cuda_graph_runner) == (
        full.draft_attn_backend,
        full.cuda_graph_runner,
    )
    assert (state.target_attn_backend, state.target_graph_runner) == ("verify-backend-4", "verify-graph-4")
    assert (state.draft_extend_attn_backend, state.cuda_graph_runner_for_draft_extend) == (
        "extend-backend-4",
        "extend-graph-4",
    )
    assert state.speculative_num_draft_tokens == 4


class _Key(tuple):
    size = property(lambda self: self[0])
    stream_idx = property(lambda self: None)


class _FakeGraphRunner:
    """A graph runner whose backend 'replays' graphs by counting (SGLang's ShapeKey has ``size``)."""

    def __init__(self, sizes, log, name):
        self.backend = SimpleNamespace(
            _graphs={_Key((b,)): None for b in sizes},
            replay=lambda key, fb: log.append((name, key.size)),
            replay_session=contextlib.nullcontext,
        )


def _calibrating_worker(tmp_path, with_graphs=True):
    from evict.plugin.config import parse_env

    w = _fake_evict_worker()
    log = []
    for m in w.width_states.widths:
        state = w.width_states.state(m)
        if with_graphs:
            state.target_graph_runner = _FakeGraphRunner([1, 2, 4], log, f"verify-{m}")
            state.cuda_graph_runner_for_draft_extend = _FakeGraphRunner([1, 2, 4, 8], log, f"extend-{m}")
            state.cuda_graph_runner = _FakeGraphRunner([1, 2, 4], log, "draft")
        else:
            state.target_graph_runner = state.cuda_graph_runner = None
    w.evict_config = parse_env({"EVICT_CACHE_DIR": str(tmp_path)})
    w.server_args = SimpleNamespace(model_path=str(tmp_path / "model"), revision=None)
    w.speculative_num_steps, w.topk, w.gpu_id = 3, 4, 0
    w._target_worker.model_runner.model_config = SimpleNamespace(dtype=torch.float32)
    return w, log


def test_without_a_table_the_server_calibrates_from_its_captured_graphs(monkeypatch, tmp_path):
    from evict.plugin import calibration

    clock = iter(range(10**6))
    monkeypatch.setattr(
        evict_worker,
        "calibrate_or_load",
        lambda replay, **kw: calibration.calibrate_or_load(
            replay,
            timer=lambda fn: (fn(), float(next(clock) % 7 + 1))[1],
            cache_folder=tmp_path,
            repeats=3,
            **kw,
        ),
    )
    monkeypatch.setattr(evict_worker, "get_parallel", lambda: SimpleNamespace(tp_size=1, tp_rank=0))
    w, log = _calibrating_worker(tmp_path)
    policy = w._calibrate_policy()
    assert policy.decision == "immediate" and policy.widths.tolist() == [4, 8]
    # every width's verify and draft-extend graph, and the draft graph, replayed at the shared sizes
    assert {name for name, _ in log} == {"draft", "verify-4", "verify-8", "extend-4", "extend-8"}
    assert {bs for _, bs in log} == {1, 2, 4}
    assert list(tmp_path.glob("calibration/*.json"))  # cached for the next start


def test_without_a_table_or_graphs_the_server_measures_its_served_steps(monkeypatch, tmp_path, caplog):
    """CPU / --disable-cuda-graph: no replay, so the rule serves on costs timed from its own steps."""
    monkeypatch.setattr(evict_worker, "get_parallel", lambda: SimpleNamespace(tp_size=1, tp_rank=0))
    monkeypatch.setattr(evict_worker, "log_info_on_rank0", lambda lg, msg: lg.info(msg))
    w, log = _calibrating_worker(tmp_path, with_graphs=False)
    with caplog.at_level("INFO"):
        policy = w._calibrate_policy()
    assert policy.decision == "immediate" and policy.widths.tolist() == [4, 8] and log == []
    assert any("measured on the served decode steps" in r.getMessage() for r in caplog.records)


def test_without_a_table_graphs_or_live_costs_the_server_verifies_the_full_tree_and_says_why(
    monkeypatch, tmp_path, caplog
):
    from evict.plugin.config import parse_env

    monkeypatch.setattr(evict_worker, "get_parallel", lambda: SimpleNamespace(tp_size=1, tp_rank=0))
    w, log = _calibrating_worker(tmp_path, with_graphs=False)
    w.evict_config = parse_env({"EVICT_CACHE_DIR": str(tmp_path), "EVICT_LIVE_COSTS": "0"})
    with caplog.at_level("WARNING"):
        policy = w._calibrate_policy()
    assert policy.decision == "off" and policy.widths.tolist() == [8] and log == []
    assert any("nothing to calibrate from" in r.getMessage() for r in caplog.records)


def test_calibrated_acceptance_learns_from_the_verified_cut_tree(monkeypatch):
    """The estimator sees this step's verified nodes (the cut) and the accepted path, nothing else."""
    from evict.truncation import AcceptanceEstimator
    from evict.truncation.tree import num_candidates

    rec = _Recorder()
    policy = TruncationPolicy([1.0, 1.0, 50.0], widths=[2, 4, 8], decision="immediate")  # width 4 wins
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.acceptance = AcceptanceEstimator(4, 3)
    dw.acceptance_candidates = num_candidates(3, 4)
    dw.draft(make_batch())
    m = dw.last_decision.width
    assert m == 4
    kept = rec.build_kwargs["top_scores_index"]  # [2, 3] flat indices the verify tree holds
    parents = _original(*dw.lists, 8)[0]  # organize's parent_list
    from evict.truncation.tree import flat_parents

    flat_par = flat_parents(parents, 4, dw.acceptance_candidates)
    # request 0 accepts verify node 1 (its first kept candidate) then stops; request 1 accepts nothing
    accept_index = torch.tensor([[0, 1, -1, -1], [4, -1, -1, -1]])
    dw.learn(accept_index, m)
    rel = dw.acceptance.reliability()
    # trials = verified nodes whose parent was accepted (the root always is)
    want_trials, want_acc = 0, 0
    for b, accepted in ((0, {int(kept[0, 0])}), (1, set())):
        acc_flat = accepted
        for f in kept[b].tolist():
            p = int(flat_par[b, f])
            if p < 0 or p in acc_flat:
                want_trials += 1
                want_acc += f in acc_flat
    assert sum(r["trials"] for r in rel) == want_trials > 0
    assert round(sum(r["trials"] * r["realized"] for r in rel)) == want_acc == 1
    assert dw._pending_outcome is None  # consumed once
