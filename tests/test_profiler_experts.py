"""The profiler's check that verify latency follows the expert union (printed and plotted)."""

from __future__ import annotations

import pytest


def test_latency_union_correlation_is_pearson_and_nan_when_undefined():
    import math

    from evict.profiler.experts import latency_union_correlation

    assert latency_union_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert latency_union_correlation([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # a saturating union against a linear cost: clearly below 1
    assert latency_union_correlation([1, 2, 3, 4], [4, 8, 8, 8]) < 0.9
    assert math.isnan(latency_union_correlation([1, 1, 1], [1, 2, 3]))
    assert math.isnan(latency_union_correlation([1.0], [2.0]))
    assert math.isnan(latency_union_correlation([1, 2], [1, 2, 3]))
