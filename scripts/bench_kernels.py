#!/usr/bin/env python
"""Micro-benchmark of EVICT's width decision: Triton kernel vs torch rule vs a host-side decision.

Why: at high batch sizes and short decode steps the width choice must cost a few microseconds of
GPU time and must not copy the scores to the host in the step's critical path. This measures, for
each batch size and tree size, with CUDA events (mean over many calls, after warm-up):

- ``kernel``: ``choose_width_triton(..., check=False)``, the decision left on device (no sync);
- ``kernel+read``: the same plus ``to_width_decision()`` (reads two ints back: immediate mode);
- ``graph``: the kernel replayed from a CUDA graph (static shapes, so it can live in the step's graph);
- ``torch``: ``evict.truncation.choose_width`` on the GPU tensors (sorts on device, one int sync);
- ``host``: copy the scores to the host, decide there with the same rule, copy kept indices back.

Then the host's view of a decode step (``TruncationPolicy.decide`` as the plugin calls it): with
about ``--queued-us`` of GPU work queued just before (this step's drafter), the host time until
``decide`` returns, in immediate mode (must wait for the drafter to read the width) and in lagged
mode (reads the previous step's index from pinned memory: returns at once), per backend.

It also checks that the kernel and the torch rule choose the same width on every input.

Usage:
    python scripts/bench_kernels.py                       # GPU: the full grid
    python scripts/bench_kernels.py --json out.json       # also write the numbers
    python scripts/bench_kernels.py --interpreter         # CPU: kernel-vs-rule check in Triton's
                                                          # interpreter, with its run time
    python scripts/bench_kernels.py --compile-check 90    # no GPU needed: compile every kernel
                                                          # variant to a cubin for sm_90
Without a GPU (and without --interpreter) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_WIDTHS = [1, 2, 4, 8, 16, 32, 64]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bs", type=int, nargs="+", default=[1, 8, 32, 128], help="batch sizes")
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64], help="candidates per request (K)")
    p.add_argument("--widths", type=int, nargs="+", default=DEFAULT_WIDTHS, help="allowed widths")
    p.add_argument("--iters", type=int, default=500, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls before each measurement")
    p.add_argument(
        "--queued-us",
        type=float,
        default=2000.0,
        help="GPU work queued before each decide() in the host-wait table (a drafter's time)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument(
        "--interpreter",
        action="store_true",
        help="run the kernel-vs-rule correctness check on CPU in Triton's interpreter and time it",
    )
    p.add_argument(
        "--compile-check",
        type=int,
        default=None,
        metavar="ARCH",
        help="compile the kernels for CUDA compute capability ARCH (e.g. 80, 90) without a GPU and exit",
    )
    args = p.parse_args(argv)
    if min(args.bs) < 1 or min(args.k) < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--bs and --k must be >= 1, --iters >= 1, --warmup >= 0")
    return args


def _scores(bs: int, k: int, device: str, seed: int) -> torch.Tensor:
    """Cumulative-probability-like scores: products of a few uniforms (many small values)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(bs, k, generator=gen) ** torch.randint(1, 4, (bs, k), generator=gen)
    return s.to(device)


def _cost(widths: list[int]) -> torch.Tensor:
    """A staircase step cost (ms): flat, then growing with the tree, as MoE verify costs do."""
    w = torch.tensor(widths, dtype=torch.float32)
    return 10.0 + 0.15 * w + 2.0 * (w > 8).float()


def _time_cuda(fn, iters: int, warmup: int) -> float:
    """Mean microseconds per call on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def run_gpu(args: argparse.Namespace) -> list[dict]:
    from evict.kernels import choose_width_triton
    from evict.truncation import choose_width

    dev = "cuda"
    widths_h = torch.tensor(args.widths)
    cost_h = _cost(args.widths)
    widths, cost = widths_h.to(dev), cost_h.to(dev)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  widths: {args.widths}  (microseconds per decision)")
    header = f"{'bs':>5} {'K':>4} {'kernel':>9} {'kern+read':>10} {'graph':>9} {'torch':>9} {'host':>9}  same"
    print(header)
    for bs in args.bs:
        for k in args.k:
            scores = _scores(bs, k, dev, seed=bs * 1000 + k)

            def kernel(scores=scores):
                return choose_width_triton(scores, cost, widths, check=False)

            def kernel_read(scores=scores):
                return kernel(scores).to_width_decision()

            def torch_rule(scores=scores):  # host widths, as TruncationPolicy passes them
                return choose_width(scores, cost, tuple(args.widths), check=False)

            def host(scores=scores):
                d = choose_width(scores.cpu(), cost_h, widths_h, check=False)
                return d.kept.to(dev, non_blocking=False)

            row = {"bs": bs, "K": k}
            row["kernel_us"] = _time_cuda(kernel, args.iters, args.warmup)
            row["kernel_read_us"] = _time_cuda(kernel_read, args.iters, args.warmup)
            try:
                kernel()  # compile outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    kernel()
                row["graph_us"] = _time_cuda(graph.replay, args.iters, args.warmup)
            except Exception as exc:  # report, keep benchmarking the rest
                row["graph_us"] = float("nan")
                row["graph_error"] = repr(exc)
            row["torch_us"] = _time_cuda(torch_rule, args.iters, args.warmup)
            row["host_us"] = _time_cuda(host, max(1, args.iters // 5), max(1, args.warmup // 5))
            a, b = kernel_read(), torch_rule()
            row["same_width"] = (a.width, a.width_index) == (b.width, b.width_index)
            row["same_kept"] = row["same_width"] and bool(torch.equal(a.kept, b.kept))
            rows.append(row)
            print(
                f"{bs:>5} {k:>4} {row['kernel_us']:>9.1f} {row['kernel_read_us']:>10.1f} {row['graph_us']:>9.1f} "
                f"{row['torch_us']:>9.1f} {row['host_us']:>9.1f}  {'yes' if row['same_kept'] else 'NO'}"
            )
    return rows


def _spin_cycles(us: float) -> int:
    """GPU clock cycles of ``torch.cuda._sleep`` that take about ``us`` microseconds here."""
    torch.cuda._sleep(1_000_000)  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_us = 10_000_000 / (start.elapsed_time(end) * 1000.0)
    return max(1, int(us * cycles_per_us))


def run_host_wait(args: argparse.Namespace) -> list[dict]:
    """Host microseconds until ``policy.decide`` returns, with a drafter's worth of GPU work queued."""
    from evict.kernels import make_decider
    from evict.truncation import TruncationPolicy

    cost = _cost(args.widths)
    cycles = _spin_cycles(args.queued_us)
    k = max(args.k)
    rows = []
    print(f"\nhost wait per step with ~{args.queued_us:.0f} us of GPU work queued before decide (K={k}, us)")
    print(f"{'bs':>5} {'backend':>8} {'immediate':>10} {'lagged':>9}")
    for bs in args.bs:
        scores = _scores(bs, k, "cuda", seed=bs)
        for backend in ("torch", "triton"):
            row = {"bs": bs, "K": k, "backend": backend, "queued_us": args.queued_us}
            for mode in ("immediate", "lagged"):
                policy = TruncationPolicy(cost, args.widths, decision=mode, decider=make_decider(backend))
                for _ in range(args.warmup):
                    policy.decide(scores)
                waits = []
                for _ in range(max(1, args.iters // 10)):
                    torch.cuda.synchronize()
                    torch.cuda._sleep(cycles)  # stands for this step's drafter
                    t0 = time.perf_counter()
                    policy.decide(scores)
                    waits.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
                waits.sort()
                row[f"{mode}_us"] = waits[len(waits) // 2]
            rows.append(row)
            print(f"{bs:>5} {backend:>8} {row['immediate_us']:>10.1f} {row['lagged_us']:>9.1f}")
    return rows


def run_interpreter(args: argparse.Namespace) -> list[dict]:
    """Kernel vs torch rule on CPU in Triton's interpreter (what CI runs), with timings."""
    from evict.kernels import choose_width_triton
    from evict.truncation import choose_width

    widths = torch.tensor(args.widths)
    cost = _cost(args.widths)
    rows = []
    print("Triton interpreter on CPU (correctness, not speed): seconds per decision")
    print(f"{'bs':>5} {'K':>4} {'kernel_s':>9} {'torch_s':>9}  same")
    t_all = time.perf_counter()
    for bs in args.bs:
        for k in args.k:
            scores = _scores(bs, k, "cpu", seed=bs * 1000 + k)
            t0 = time.perf_counter()
            a = choose_width_triton(scores, cost, widths).to_width_decision()
            t1 = time.perf_counter()
            b = choose_width(scores, cost, widths)
            t2 = time.perf_counter()
            same = (a.width, a.width_index) == (b.width, b.width_index) and bool(torch.equal(a.kept, b.kept))
            rows.append({"bs": bs, "K": k, "kernel_s": t1 - t0, "torch_s": t2 - t1, "same_kept": same})
            print(f"{bs:>5} {k:>4} {t1 - t0:>9.3f} {t2 - t1:>9.5f}  {'yes' if same else 'NO'}")
    print(f"total {time.perf_counter() - t_all:.1f} s (includes the first call's kernel set-up)")
    return rows


def compile_check(arch: int) -> int:
    """Compile every kernel variant ahead of time for ``sm_<arch>`` (Triton -> PTX -> cubin).

    Needs no GPU: it catches what the interpreter cannot (type and lowering errors of the compiled
    path). The kernels must not be interpreted here, so TRITON_INTERPRET must be unset.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "bench_kernels: --compile-check needs TRITON_INTERPRET unset (the interpreter compiles nothing)"
        )
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from evict.kernels import _triton_width as tw

    target = GPUTarget("cuda", arch, 32)
    ptr = {"scores_ptr": "*fp32", "widths_ptr": "*i64", "width_ptr": "*i64", "benefit_ptr": "*fp32"}
    rank_sig = {
        **ptr,
        "stride": "i32",
        "rank_ptr": "*i32",
        "bad_ptr": "*i8",
        "kept_ptr": "*i64",
        "BS": "i32",
        "K": "i32",
        "W": "i32",
    }
    decide_sig = {
        "benefit_ptr": "*fp32",
        "bad_ptr": "*i8",
        "cost_ptr": "*fp32",
        "widths_ptr": "*i64",
        "rank_ptr": "*i32",
        "index_ptr": "*i64",
        "objective_ptr": "*fp32",
        "best_ptr": "*i64",
        "chosen_ptr": "*i64",
        "width_ptr": "*i64",
        "expected_ptr": "*fp32",
        "kept_ptr": "*i64",
        "BS": "i32",
        "K": "i32",
        "W": "i32",
    }
    jobs = []
    for keep in (False, True):
        for bk, bj in ((16, 16), (64, 64), (256, 16)):
            c = {"KEEP_ONLY": keep, "BLOCK_R": 1, "BLOCK_K": bk, "BLOCK_J": bj, "BLOCK_W": 16}
            jobs.append((f"rank_kernel KEEP_ONLY={keep} BLOCK_K={bk}", tw.rank_kernel, rank_sig, c))
    for has_index in (False, True):
        c = {"HAS_INDEX": has_index, "BLOCK_R": 1, "BLOCK_K": 64, "BLOCK_W": 16, "BLOCK_B": 64}
        jobs.append((f"decide_kernel HAS_INDEX={has_index}", tw.decide_kernel, decide_sig, c))
    for name, fn, sig, consts in jobs:
        full_sig = {**sig, **{k: "constexpr" for k in consts}}
        full_sig = {a: full_sig[a] for a in fn.arg_names}
        t0 = time.perf_counter()
        kernel = triton.compile(
            ASTSource(fn=fn, signature=full_sig, constexprs=consts),
            target=target,
            options={"enable_fp_fusion": False},
        )
        print(f"sm_{arch} {name}: {sorted(kernel.asm)} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.compile_check is not None:
        return compile_check(args.compile_check)
    if args.interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first used
        try:
            import triton  # noqa: F401
        except ImportError:
            print("bench_kernels: --interpreter needs triton (pip install 'evict[triton]'); nothing measured")
            return 0
        rows = run_interpreter(args)
    else:
        if not torch.cuda.is_available():
            print(
                "bench_kernels: this benchmark needs a CUDA GPU (none found); nothing measured. "
                "On CPU, `--interpreter` checks the kernel against the torch rule in Triton's interpreter."
            )
            return 0
        rows = run_gpu(args)
        host_wait = run_host_wait(args)
    if args.json is not None:
        meta = {"torch": torch.__version__, "widths": args.widths, "iters": args.iters}
        out = {"meta": meta, "rows": rows}
        if torch.cuda.is_available() and not args.interpreter:
            meta["device"] = torch.cuda.get_device_name()
            out["host_wait"] = host_wait
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.get("same_kept", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
