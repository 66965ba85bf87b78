"""Tests of the domain-shift run (evict.bench.domain_shift): the error arithmetic on hand-made
request-steps, and a tiny end-to-end run on the reference engine that must produce before/after
numbers for every arm.

That decay follows a shift faster than no decay is the estimator's own property, tested on a
synthetic shift in tests/test_acceptance.py (test_old_evidence_decays_after_a_domain_shift).
"""

from __future__ import annotations

import math

import pytest

from evict.bench.domain_shift import (
    DEFAULT_HALF_LIFE,
    ShiftPoint,
    ShiftTrace,
    default_arms,
    render_shift,
    run_shift,
    shift_engine_factory,
    shift_phases,
    summarize_shift,
    window_errors,
)
from evict.bench.runner import Bench


def test_errors_are_ratios_of_sums_before_and_after_the_switch():
    # phase 0: predicted 3 against 4 realized twice, then 2 against 2; phase 1: 6 against 3, then 3 against 3
    pts = [ShiftPoint(0, 3, 4), ShiftPoint(0, 3, 4), ShiftPoint(0, 2, 2)]
    pts += [ShiftPoint(1, 6, 3), ShiftPoint(1, 6, 3), ShiftPoint(1, 3, 3)]
    assert window_errors(pts[3:], 2) == pytest.approx([12 / 6 - 1, 9 / 6 - 1])
    s = summarize_shift({"x": ShiftTrace(pts, [10, 7])}, window=2)["x"]
    assert s["before_all"] == pytest.approx(8 / 10 - 1)
    assert s["before_last"] == pytest.approx(5 / 6 - 1)  # the last two steps before the switch
    assert s["after_first"] == pytest.approx(1.0)  # the shock: twice what was realized
    assert s["after_last"] == pytest.approx(0.5)
    assert s["after_all"] == pytest.approx(15 / 9 - 1)
    assert s["after_mean_abs"] == pytest.approx((1.0 + 0.5) / 2)
    assert (s["realized_before"], s["realized_after"]) == pytest.approx((10 / 3, 3.0))
    assert (s["steps_before"], s["steps_after"], s["trials_before"], s["trials_after"]) == (3, 3, 10, 7)
    with pytest.raises(ValueError, match="window"):
        window_errors(pts, 0)


def test_arms_are_raw_default_decay_no_decay_and_extras():
    arms = default_arms([256])
    assert [a.name for a in arms] == ["raw", "decay", "no-decay", "decay(h=256)"]
    assert [a.half_life for a in arms[1:]] == [DEFAULT_HALF_LIFE, None, 256.0]
    assert not arms[0].calibrated and all(a.calibrated for a in arms[1:])
    with pytest.raises(ValueError, match="half-life"):
        default_arms([math.inf])


def _flat_table():
    """Every width costs the same: EVICT verifies the whole tree, so the estimator gets trials
    even from the random tiny drafter (with a rising cost it would verify the root only)."""
    from evict.profiler.table import CostTable

    med = [[1.0] * 4]
    return CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "tiny", "device": "cpu", "dtype": "float32", "tp_size": 1},
            "batch_sizes": [1],
            "widths": [1, 2, 4, 8],
            "latency_ms": {"median": med, "p10": med, "p90": med},
            "fixed_ms": [0.5],
        }
    )


def test_tiny_domain_shift_run_gives_before_and_after_numbers_for_every_arm():
    pytest.importorskip("evict.engine")
    from test_bench import ByteTokenizer, _tiny_pair

    target, drafter = _tiny_pair()
    arms = default_arms([1.0])
    bench = Bench(shift_engine_factory(target, drafter, arms), target, num_experts=8, table=_flat_table())
    phases = shift_phases(ByteTokenizer(), 1, 16)  # stdlib code + prose, then third-party code + prose
    assert [p.domain for ph in phases for p in ph] == ["code", "prose", "code-ood", "prose-ood"]
    ids = [[list(p.ids) for p in ph] for ph in phases]
    new = 6
    traces = run_shift(bench, arms, (2, 2, 4), ids, batch_size=1, max_new_tokens=new, log=lambda s: None)
    assert set(traces) == {a.name for a in arms}
    for name, trace in traces.items():
        for phase in (0, 1):
            pts = [p for p in trace.points if p.phase == phase]
            # every prompt's tokens after the prefill's first came from verifies (the last may overshoot)
            assert sum(p.realized for p in pts) >= 2 * (new - 1)
            assert all(1.0 <= p.predicted <= 4.0 for p in pts)  # B(m) = 1 + kept scores, m <= N = 4
        # the estimator learned in both phases; raw scores have none
        assert (min(trace.trials) > 0) == (name != "raw")
    # cold start: before any outcome the estimator's scores are the raw ones, so the first step is
    # decided and predicted exactly as raw EVICT's
    first = traces["raw"].points[0]
    for name in ("decay", "no-decay", "decay(h=1)"):
        assert traces[name].points[0] == first
    summary = summarize_shift(traces, window=3)
    for name, s in summary.items():
        for key in ("before_all", "before_last", "after_first", "after_last", "after_all", "after_mean_abs"):
            assert math.isfinite(s[key]), (name, key)
        b = [p for p in traces[name].points if p.phase == 1]
        assert s["after_first"] == pytest.approx(
            sum(p.predicted for p in b[:3]) / sum(p.realized for p in b[:3]) - 1
        )
    md = render_shift(summary, 3)
    assert all(f"| {a.name} |" in md for a in arms) and "ood: first window" in md
