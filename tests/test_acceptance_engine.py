"""The acceptance estimator inside the reference engine: on held-out prompts, EVICT's predicted
accepted length moves toward the realized one compared with raw drafter scores."""

from __future__ import annotations

import torch
from engine_fixtures import oracle_pair

from evict.engine import SpecEngine
from evict.truncation import AcceptanceEstimator, TruncationPolicy

WIDTHS = [1, 2, 4, 8, 16]
STAIRCASE = [1.0, 1.35, 1.8, 2.6, 4.0]


def prompts(seed: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (6,), generator=g).tolist() for _ in range(n)]


def predicted_vs_realized(engine: SpecEngine, batch: list[list[int]]) -> tuple[float, float]:
    engine.policy.counters.reset()
    engine.generate(batch, 16)
    s = engine.policy.stats()
    return s["mean_predicted_accepted"], s["mean_realized_accepted"]


def test_calibrated_prediction_is_closer_to_realized_on_held_out_prompts():
    target, drafter = oracle_pair(0)
    train, held_out = prompts(0, 8), prompts(1, 8)

    def engine(est: AcceptanceEstimator | None) -> SpecEngine:
        policy = TruncationPolicy(STAIRCASE, widths=WIDTHS)
        return SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy, acceptance=est)

    raw_pred, raw_real = predicted_vs_realized(engine(None), held_out)
    est = AcceptanceEstimator(topk=2, max_depth=4)
    cal = engine(est)
    cal.generate(train, 16)  # learn on other prompts first (as a server does over time)
    cal_pred, cal_real = predicted_vs_realized(cal, held_out)
    raw_err, cal_err = abs(raw_pred - raw_real) / raw_real, abs(cal_pred - cal_real) / cal_real
    assert raw_err > 0.1  # the sharpened drafter is miscalibrated here ...
    assert cal_err < 0.5 * raw_err, (
        raw_pred,
        raw_real,
        cal_pred,
        cal_real,
    )  # ... and learning fixes most of it
