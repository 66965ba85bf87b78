"""Timing one call of a forward or a graph replay: CUDA events on a GPU, a chosen clock on CPU.

One place for it because the profiler (eager forwards) and the server's start-up calibration
(graph replays) must measure the same way for their tables to be comparable.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["CLOCKS", "cuda_event_timer", "decode_step_ms", "decode_step_samples", "percentile", "time_call"]

CLOCKS = ("wall", "cpu")


def cuda_event_timer(fn: Callable[[], Any]) -> float:
    """Milliseconds of one call on the current CUDA stream, measured with CUDA events."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def time_call(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of one call: CUDA events on GPU; on CPU ``time.perf_counter`` (``wall``) or the
    process CPU time (``cpu``, ``time.process_time``).

    Why a CPU clock: on a shared machine a niced process is preempted for whole scheduler slices,
    so wall time measures the other tenants. With one intra-op thread, the CPU time consumed by the
    process is the forward's latency on an idle core (compute and memory stalls included, waiting
    for the core excluded). With several threads it would add their times up, so it is refused.
    """
    if device.type == "cuda":
        return cuda_event_timer(fn)
    timer = time.process_time if clock == "cpu" else time.perf_counter
    t0 = timer()
    fn()
    return (timer() - t0) * 1000.0


def decode_step_samples(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    *,
    new_tokens: int = 24,
    repeats: int = 3,
    warmup: int = 1,
) -> list[float]:
    """Per repeat, the median wall ms of a decode step of ``engine`` over ``prompts``.

    ``engine`` is a :class:`evict.engine.SpecEngine` (``generate`` returns per-step times). Only
    the steps in which every prompt is still generating count, so the batch size is the one asked
    for; a step is everything the engine does in it (draft, decision, verify forward, acceptance,
    KV commit, draft extend), the prefill excluded. The median over a decode's steps shrugs off
    the odd disturbed step, which a difference of two whole-decode timings does not.
    """
    batch = [list(p) for p in prompts]
    samples = []
    for rep in range(warmup + repeats):
        res = engine.generate(batch, new_tokens)
        if rep < warmup:
            continue
        ms = [
            1e3 * (s.draft_s + s.decision_s + s.verify_s + s.extend_s)
            for s in res.steps
            if len(s.active) == len(batch)
        ]
        if ms:
            samples.append(statistics.median(ms))
    if not samples:
        raise RuntimeError(f"no decode step with all {len(batch)} prompts active in {new_tokens} new tokens")
    return samples


def decode_step_ms(engine: Any, prompts: Sequence[Sequence[int]], **kwargs: Any) -> float:
    """Median of :func:`decode_step_samples` (same arguments)."""
    return statistics.median(decode_step_samples(engine, prompts, **kwargs))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence, as numpy's default.

    The one percentile of the profiler, the server's calibration and the served bench.
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
