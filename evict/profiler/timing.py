"""Timing one call of a forward or a graph replay: CUDA events on a GPU, a chosen clock on CPU.

One place for it because the profiler (eager forwards) and the server's start-up calibration
(graph replays) must measure the same way for their tables to be comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CLOCKS", "cuda_event_timer", "time_call"]

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
