"""Timing one call of a forward or a graph replay: CUDA events on a GPU, a chosen clock on CPU.

One place for it because the profiler (eager forwards) and the server's start-up calibration
(graph replays) must measure the same way for their tables to be comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["CLOCKS", "cuda_event_timer", "decode_step_ms", "decode_step_samples", "time_call"]

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
    device: torch.device,
    clock: str = "wall",
    repeats: int = 5,
    warmup: int = 2,
    tokens: tuple[int, int] = (4, 16),
) -> list[float]:
    """Ms of one decode step of ``engine`` (anything with ``generate(prompts, n)``) on ``prompts``, per repeat.

    Each sample decodes the prompts twice, ``tokens`` new tokens apart, and divides the time
    difference by the difference in decode steps, so the prefill cancels and ``clock`` can be the
    process CPU time (a shared machine) as well as the wall clock.
    """
    batch = [list(p) for p in prompts]
    samples = []
    for rep in range(warmup + repeats):
        steps, times = [], []
        for n in tokens:
            box: list[Any] = []
            times.append(time_call(lambda n=n, box=box: box.append(engine.generate(batch, n)), device, clock))
            steps.append(len(box[0].steps))
        if rep >= warmup and steps[1] > steps[0]:
            samples.append((times[1] - times[0]) / (steps[1] - steps[0]))
    if not samples:
        raise RuntimeError(
            f"decoding {tokens[1]} tokens took no more steps than {tokens[0]}: nothing to time"
        )
    return samples


def decode_step_ms(engine: Any, prompts: Sequence[Sequence[int]], **kwargs: Any) -> float:
    """Median of :func:`decode_step_samples` (same arguments)."""
    return float(torch.tensor(decode_step_samples(engine, prompts, **kwargs)).median())
