"""Time EVICT's width decision on CPU (torch backend): microseconds per call.

The decision runs once per decode step, so it must cost a small fraction of a step (milliseconds
on GPU servers).  Measures ``choose_width`` (with configuration checks, as a one-off caller would
use it), ``TruncationPolicy.decide`` (the per-step path: costs validated once and cached) and
``choose_widths_per_request`` (and, for reference, the one ``torch.sort`` they all need), for bs in {1, 8, 32, 64} x N in {8, 32, 64} with 7 allowed widths,
single-threaded, median of many calls after warm-up.

Usage: ``python scripts/bench_truncation.py [--calls 2000] [--warmup 200] [--markdown]``
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evict.profiler.table import CostTable
from evict.truncation import TruncationPolicy, choose_width, choose_widths_per_request

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example_cost_table.json"
WIDTHS = [1, 2, 4, 8, 16, 32, 64]
BATCHES = [1, 8, 32, 64]
NODES = [8, 32, 64]


def tree_scores(bs: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Cumulative-product scores of random trees (parent index < child index)."""
    probs = torch.rand(bs, n, generator=gen)
    scores = torch.empty(bs, n)
    for i in range(n):
        parent = torch.randint(-1, i, (bs,), generator=gen) if i > 0 else torch.full((bs,), -1)
        base = torch.where(parent >= 0, scores.gather(1, parent.clamp(min=0).unsqueeze(1)).squeeze(1), 1.0)
        scores[:, i] = base * probs[:, i]
    return scores


def time_us(fn: Callable[[], object], calls: int, warmup: int, best: bool = False) -> float:
    """Median (or, with ``best``, minimum: the uncontended cost on a busy machine) in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return (min(samples) if best else statistics.median(samples)) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    table = CostTable.load(EXAMPLE)
    widths = torch.tensor(WIDTHS)
    logging.getLogger("evict").setLevel(
        logging.ERROR
    )  # the example table stops at bs 16: clamping is fine here
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, 1 thread, "
        f"load average {load:.1f} at start"
    )
    print(f"median of {args.calls} calls after {args.warmup} warm-up; microseconds per call")
    print()
    print("| bs | N | choose_width | policy.decide | policy.decide (min) | per_request | torch.sort alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for bs in BATCHES:
        cost = table.step_cost(bs, widths)
        pol = TruncationPolicy(table, WIDTHS)
        for n in NODES:
            scores = tree_scores(bs, n, gen)
            a = time_us(lambda s=scores, c=cost: choose_width(s, c, widths), args.calls, args.warmup)
            b = time_us(lambda s=scores, p=pol: p.decide(s), args.calls, args.warmup)
            b_min = time_us(lambda s=scores, p=pol: p.decide(s), args.calls, args.warmup, best=True)
            c_ = time_us(
                lambda s=scores, c=cost: choose_widths_per_request(s, c, widths), args.calls, args.warmup
            )
            d = time_us(
                lambda s=scores: torch.sort(s, dim=-1, descending=True, stable=True), args.calls, args.warmup
            )
            print(f"| {bs} | {n} | {a:.1f} | {b:.1f} | {b_min:.1f} | {c_:.1f} | {d:.1f} |", flush=True)


if __name__ == "__main__":
    main()
