"""Live step costs (pure: a fake clock, a fake TP reduction; no sglang, no GPU)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from evict.plugin.live_costs import LiveCosts, StepSample, StepTimer, bucket_sizes, host_marks
from evict.profiler.table import CostTable

WIDTHS = (2, 4, 8)
BUCKETS = (1, 2, 4)


def _table(grid: list[list[float]], bss=BUCKETS, widths=WIDTHS) -> CostTable:
    return CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "m", "device": "cpu:x", "dtype": "float32", "tp_size": 1},
            "batch_sizes": list(bss),
            "widths": list(widths),
            "latency_ms": {"median": grid, "p10": grid, "p90": grid},
        }
    )


def true_cost(bs: int, width: int) -> float:
    """The 'real' server: 20 ms + 3 ms per verified token."""
    return 20.0 + 3.0 * bs * width


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, ms: float) -> None:
        self.t += ms / 1000.0


def test_bucket_sizes_double_up_to_the_largest():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)


def test_step_timer_counts_the_host_gap_to_the_next_step_but_not_idle_time():
    clock = FakeClock()
    timer = StepTimer(host_marks(clock), max_gap_ms=10.0)
    timer.begin()
    clock.advance(30.0)
    timer.end(1, 4, predicted_ms=25.0)
    clock.advance(5.0)  # scheduler work: part of the step
    timer.begin()
    assert [(s.width, s.measured_ms, s.predicted_ms) for s in timer.poll()] == [
        (4, pytest.approx(35.0), 25.0)
    ]
    clock.advance(40.0)
    timer.end(2, 8, predicted_ms=41.0)
    clock.advance(1000.0)  # idle: not part of the step
    timer.begin()
    (s,) = timer.poll()
    assert (s.batch_size, s.width, s.measured_ms) == (2, 8, pytest.approx(40.0))
    clock.advance(10.0)
    timer.end(1, 2, predicted_ms=1.0)
    timer.interrupt()  # a prefill follows: the step ends at its own end
    (s,) = timer.poll()
    assert s.measured_ms == pytest.approx(10.0)


def test_step_timer_reads_marks_only_once_they_ran():
    """CUDA events: a sample waits until its marks report done (read one step late, never waited for)."""
    done: set[int] = set()
    counter = iter(range(1000))
    times: dict[int, float] = {}
    now = [0.0]

    def mark() -> int:
        k = next(counter)
        times[k] = now[0]
        return k

    from evict.plugin.live_costs import Marks

    timer = StepTimer(Marks(mark, lambda k: k in done, lambda a, b: times[b] - times[a]), max_gap_ms=5.0)
    timer.begin()
    now[0] = 12.0
    timer.end(1, 2, 10.0)
    now[0] = 13.0
    timer.begin()  # mark 2
    assert timer.poll() == []  # not run yet
    done.update({0, 1, 2})
    (s,) = timer.poll()
    assert s.measured_ms == pytest.approx(13.0)


def test_median_ignores_outliers():
    live = LiveCosts(WIDTHS, BUCKETS, prior=_table([[10.0] * 3] * 3), sync_every=1)
    for ms in [30.0, 31.0, 500.0, 29.0, 30.0, 0.0, float("nan"), 1e4]:
        live.observe(StepSample(1, 4, ms, 10.0))
    live.publish()
    assert live.grid[0][1] == pytest.approx(30.5)  # median of 29, 30, 30, 31, 500, 1e4
    assert live.observed[0][1]


def test_unobserved_cells_scale_by_the_ratio_observed_nearby():
    prior = _table([[10.0, 20.0, 40.0], [12.0, 24.0, 48.0], [20.0, 40.0, 80.0]])
    live = LiveCosts(WIDTHS, BUCKETS, prior=prior, min_obs=2, sync_every=1)
    for _ in range(3):
        live.observe(StepSample(1, 4, 40.0, 20.0))  # the real server is 2x the prior at bs 1
    live.publish()
    assert live.grid[0] == [20.0, 40.0, 80.0]  # the row's unseen widths follow the same ratio
    assert live.grid[1] == [24.0, 48.0, 96.0]  # rows without observations borrow the nearest row's
    assert live.grid[2] == [40.0, 80.0, 160.0]
    for _ in range(3):
        live.observe(StepSample(4, 8, 120.0, 80.0))  # bs 4 is only 1.5x
    live.publish()
    assert live.grid[2] == [30.0, 60.0, 120.0]
    assert live.grid[0] == [20.0, 40.0, 80.0]


def test_predicted_converges_to_measured_from_a_wrong_prior():
    """A served loop: the rule picks widths from the table; a 10x-wrong table converges within 10%."""
    wrong = _table([[1.0, 1.5, 2.0], [1.1, 1.6, 2.1], [1.2, 1.7, 2.2]])  # flat-ish and far too low
    live = LiveCosts(WIDTHS, BUCKETS, prior=wrong, sync_every=8)
    rng = random.Random(0)
    clock = FakeClock()
    timer = StepTimer(host_marks(clock), max_gap_ms=5.0)
    first = last = None
    for step in range(400):
        bs = rng.choice(BUCKETS)
        cost = live.step_cost(bs, WIDTHS)
        accepted = torch.tensor([1.0, 2.0, 3.0])  # B(m) per request
        j = int(torch.argmax(accepted / cost))
        width = WIDTHS[j]
        timer.begin()
        clock.advance(true_cost(bs, width) * rng.uniform(0.95, 1.05) * (20 if rng.random() < 0.03 else 1))
        timer.end(bs, width, live.predict(bs, width))
        clock.advance(0.5)
        for s in timer.poll():
            live.observe(s)
        live.on_step()
        if step == 6:  # before the first publication: the wrong table predicts
            first = live.take_interval()
        if step == 199:
            live.take_interval()  # warm-up over
        if step == 399:
            last = live.take_interval()
    assert first is not None and last is not None
    assert first[2] > 5  # the wrong table predicted a tenth of the real step at first
    pred, meas, ratio, n = last
    assert n == 200
    assert abs(ratio - 1) < 0.10, (pred, meas, ratio)


def test_without_a_prior_rows_are_explored_then_shaped_by_the_first_full_row():
    live = LiveCosts(WIDTHS, BUCKETS, prior=None, min_obs=2, sync_every=1)
    assert live.exploring
    seen = []
    while (j := live.explore_index(1)) is not None:
        seen.append(WIDTHS[j])
        live.observe(StepSample(1, WIDTHS[j], true_cost(1, WIDTHS[j]), float("nan")))
    assert sorted(seen) == [2, 2, 4, 4, 8, 8]
    live.publish()
    assert live.grid[0] == [true_cost(1, w) for w in WIDTHS]
    # bs 4 has one observation at width 2: the other widths follow bs 1's shape, scaled
    live.observe(StepSample(4, 2, 2 * true_cost(1, 2), float("nan")))
    live.observe(StepSample(4, 2, 2 * true_cost(1, 2), float("nan")))
    live.publish()
    assert live.grid[2] == [2 * true_cost(1, w) for w in WIDTHS]
    assert live.explore_index(4) == 1  # still explores width 4 at bs 4


def test_tp_ranks_publish_the_identical_max_table():
    """Two ranks measure differently; after the reduction both publish the max, and explore alike."""
    ranks = [LiveCosts(WIDTHS, BUCKETS, prior=_table([[10.0] * 3] * 3), sync_every=4) for _ in range(2)]
    pending: list[torch.Tensor] = []

    def make_reduce(r: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:  # a fake all_reduce(MAX) over the two ranks
            pending.append(t.clone())
            if len(pending) == 2:
                out = torch.maximum(pending[0], pending[1])
                reduce.out = out  # type: ignore[attr-defined]
            return t

        return reduce

    for step in range(8):
        for r, live in enumerate(ranks):
            live.observe(StepSample(2, 4, 30.0 + 5 * r + step % 2, float("nan")))
    stats = []
    for live in ranks:
        live.reduce = lambda t, _s=stats: (_s.append(t.clone()), t)[1]
        live.publish()
    reduced = torch.maximum(stats[0], stats[1])
    for live in ranks:
        live.reduce = lambda t, _r=reduced: _r
        live.publish()
    assert ranks[0].grid == ranks[1].grid
    assert ranks[0].grid[1][1] == pytest.approx(35.5)


def test_on_step_publishes_only_every_sync_every_steps_and_reports_the_interval():
    live = LiveCosts(WIDTHS, BUCKETS, prior=_table([[10.0] * 3] * 3), sync_every=5)
    for _ in range(4):
        live.observe(StepSample(1, 2, 20.0, 10.0))
        assert not live.on_step()
    assert live.grid[0][0] == 10.0  # nothing published between syncs: every rank reads the same table
    live.observe(StepSample(1, 2, 20.0, 10.0))
    assert live.on_step()
    assert live.grid[0][0] == 20.0
    assert live.take_interval() == (10.0, 20.0, 2.0, 5)
    p, m, r, n = live.take_interval()
    assert n == 0 and math.isnan(p)
    assert "bs 1: 2:20.0*" in live.summary()


def test_cost_grid_rows_match_the_table_at_every_batch_size():
    live = LiveCosts(WIDTHS, (1, 2, 4, 8), prior=None, sync_every=1)
    for b, scale in ((1, 1.0), (2, 1.5), (4, 2.5), (8, 4.0)):
        for w in WIDTHS:
            for _ in range(3):
                live.observe(StepSample(b, w, scale * true_cost(1, w), float("nan")))
    live.publish()
    grid = live.cost_grid(10)
    assert grid.shape == (10, 3) and grid.dtype == torch.float32
    for b in range(1, 11):
        assert grid[b - 1].tolist() == pytest.approx(live.step_cost(b, WIDTHS).tolist(), rel=1e-5)
        assert grid[b - 1].tolist() == pytest.approx(live.row(b), rel=1e-5)
        assert live.predict(b, 4) == pytest.approx(float(grid[b - 1, 1]), rel=1e-5)
