"""Width-state switching, score sink, tree cut and metrics (pure: runs without sglang)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evict.plugin.metrics import EvictMetrics, format_stats
from evict.plugin.tree_cut import (
    ACTIVE_SCORE_SINK,
    ScoreSink,
    cut_draft_tree,
    gather_candidate_scores,
    verify_spec_steps,
)
from evict.plugin.width_states import WidthStateSet
from evict.truncation import TruncationPolicy, keep_top


class FakeWorker:
    """Stands in for EvictWorkerV2: the attributes its width switch rewrites."""

    def __init__(self) -> None:
        self.num_draft_tokens = None
        self.target_graph = None
        self.extend_graph = None
        self.applied: list[int] = []

    def apply(self, width: int, state: SimpleNamespace) -> None:
        self.num_draft_tokens = width
        self.target_graph = state.target_graph
        self.extend_graph = state.extend_graph
        self.applied.append(width)


def make_states(worker: FakeWorker, widths=(2, 4, 8)) -> WidthStateSet:
    states = WidthStateSet(worker.apply)
    for w in widths:
        states.register(
            w, SimpleNamespace(target_graph=f"verify{w}", extend_graph=f"extend{w}"), memory_gb=0.5 * w
        )
    return states


def test_width_switch_selects_the_state_of_that_width():
    worker = FakeWorker()
    states = make_states(worker)
    assert states.widths == (2, 4, 8)
    for w in (8, 2, 4, 8):
        assert states.activate(w)
        assert (worker.num_draft_tokens, worker.target_graph, worker.extend_graph) == (
            w,
            f"verify{w}",
            f"extend{w}",
        )
    assert states.switches == 4
    assert not states.activate(8)  # already active: no pointer swap
    assert worker.applied == [8, 2, 4, 8]


def test_uncaptured_width_is_refused_and_state_kept():
    worker = FakeWorker()
    states = make_states(worker)
    states.activate(4)
    with pytest.raises(KeyError, match=r"width 3.*\[2, 4, 8\]"):
        states.activate(3)
    assert states.active_width == 4 and worker.target_graph == "verify4"


def test_register_validates_and_reports_memory():
    states = make_states(FakeWorker())
    with pytest.raises(ValueError, match="already registered"):
        states.register(4, SimpleNamespace())
    with pytest.raises(ValueError, match="int >= 1"):
        states.register(0, SimpleNamespace())
    report = states.memory_report()
    assert "width   2:   1.000 GB" in report and "total        7.000 GB" in report


def test_score_sink_keeps_its_buffer_and_handles_large_eager_batches():
    sink = ScoreSink(rows=4, cols=3, device="cpu")
    address = sink.buffer.data_ptr()
    s = torch.rand(2, 3)
    assert sink.write(s)
    assert torch.equal(sink.read(2), s)
    assert not sink.write(torch.rand(2, 5))  # wider than the full tree keeps: ignored
    assert torch.equal(sink.read(2), s)
    shallow = torch.rand(2, 2)  # a shallower draft keeps fewer candidates: the first columns
    assert sink.write(shallow)
    assert torch.equal(sink.read(2, 2), shallow) and torch.equal(sink.read(2)[:, 2], s[:, 2])
    big = torch.rand(6, 3)
    assert sink.write(big)
    assert torch.equal(sink.read(6), big)
    assert sink.buffer.data_ptr() == address  # captured graphs keep writing the same memory
    with pytest.raises(RuntimeError, match="no scores recorded"):
        sink.read(5)


def test_score_sink_context_sets_the_tap_target():
    sink = ScoreSink(rows=2, cols=2, device="cpu")
    assert ACTIVE_SCORE_SINK.get() is None
    with sink.active():
        assert ACTIVE_SCORE_SINK.get() is sink
    assert ACTIVE_SCORE_SINK.get() is None


def test_cut_draft_tree_and_scores():
    score_list = [torch.tensor([[[0.6, 0.3]]]), torch.tensor([[[0.3, 0.2], [0.2, 0.05]]])]
    flat = torch.tensor([[0.6, 0.3, 0.3, 0.2, 0.2, 0.05]])
    top = torch.tensor([[0, 1, 2, 3]])  # what organize_draft_results keeps for N=5 (sorted)
    assert torch.equal(gather_candidate_scores(score_list, top), flat[:, :4])
    tokens = torch.tensor([[10, 11, 12, 13]])
    kept = keep_top(gather_candidate_scores(score_list, top), 3)  # top-2 of the 4 kept
    idx, tok = cut_draft_tree(top, tokens, kept)
    assert idx.tolist() == [[0, 1]] and tok.tolist() == [[10, 11]]


def test_verify_spec_steps_bounds_depth_by_width():
    assert [verify_spec_steps(5, w) for w in (1, 2, 4, 6, 32)] == [0, 1, 3, 5, 5]


def test_metrics_log_every_interval_with_predicted_and_realized():
    policy = TruncationPolicy([1.0, 1.0, 1.0], widths=[2, 3, 4], decision="immediate")
    lines: list[str] = []
    metrics = EvictMetrics(policy, log_interval=2, log_fn=lines.append, switches_fn=lambda: 5)
    scores = torch.tensor([[0.5, 0.25, 0.125], [0.9, 0.8, 0.7]])
    for _ in range(3):
        policy.decide(scores)
        metrics.on_decode_step()
        metrics.record_num_correct_drafts([1, 3])  # accepted lengths 2 and 4
    assert len(lines) == 1  # steps 2 only (interval 2, 3 steps)
    stats = policy.stats()
    assert stats["mean_width"] == 4.0  # flat cost: the full tree
    assert stats["mean_realized_accepted"] == pytest.approx(3.0)
    assert stats["mean_predicted_accepted"] == pytest.approx((1 + 0.875 + 1 + 2.4) / 2)
    line = format_stats(stats, 5)
    assert "mean_width=4.00" in line and "realized=3.00" in line and "width_switches=5" in line
    assert "errors=0" in line and "widths=" not in line
    assert format_stats(stats, 5, {8: 3, 2: 1}).endswith(" widths=2:1,8:3")
    assert EvictMetrics(policy, log_interval=0, log_fn=lines.append).log_interval == 0


def test_log_interval_zero_never_logs_and_never_divides_by_zero():
    policy = TruncationPolicy([1.0], widths=[4], decision="off")
    lines: list[str] = []
    metrics = EvictMetrics(policy, log_interval=0, log_fn=lines.append)
    for _ in range(5):
        policy.decide(torch.ones(1, 3))
        metrics.on_decode_step()
    assert lines == [] and metrics.steps == 5


def test_only_the_logging_rank_reads_the_counters():
    class CountingPolicy(TruncationPolicy):
        reads = 0

        def stats(self):
            CountingPolicy.reads += 1
            return super().stats()

    lines: list[str] = []
    for rank0 in (True, False):
        policy = CountingPolicy([1.0], widths=[4], decision="off")
        metrics = EvictMetrics(policy, log_interval=1, log_fn=lines.append, logging_rank=rank0)
        for _ in range(3):
            policy.decide(torch.ones(1, 3))
            metrics.on_decode_step()
    assert CountingPolicy.reads == 3 and len(lines) == 3  # rank 0's three lines; the other rank read nothing
