"""``evict-profile``: measure verify latency by batch size and width and write a cost table.

Why a separate tool: EVICT's width rule needs T(bs, m) for the model, device, dtype and parallel
layout that serve traffic; this command measures it once (offline) and writes the JSON table that
the plugin, the reference engine and the benchmark load (schema in :mod:`evict.profiler.table`).

    evict-profile --model PATH [--batch-sizes 1,4,16]
                  [--widths 1,2,4,8,16,32,64] [--context-len 256] [--repeats 10] [--out FILE]
    evict-profile --check TABLE --model PATH [--tolerance 0.25]

Every argument and path is checked before a model loads; an expected problem prints one
``evict-profile: error: ...`` line (exit 2), Ctrl-C one line (exit 130), never a traceback.

An SGLang server needs no table from here: without ``EVICT_COST_TABLE`` it calibrates its own at
start-up from its captured graphs (:mod:`evict.plugin.calibration`). ``--backend sglang`` is
retired, with a message saying so: its eager forward was not what the server runs (graph replay per
width, the server's attention backend and TP group) and it left out drafting and draft-extend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BATCH_SIZES = [1, 4, 16]
DEFAULT_WIDTHS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def default_model_path() -> Path:
    """The shipped testbed target (``evict/testbed/target``)."""
    try:
        from evict.models import TESTBED_DIR

        return Path(TESTBED_DIR) / "target"
    except Exception:
        import evict

        return Path(evict.__file__).resolve().parent / "testbed" / "target"


def parse_int_list(values: Sequence[str] | str, name: str, minimum: int = 1) -> list[int]:
    """Parse ``["1,4", "16"]`` or ``"1 4 16"`` into sorted unique ints >= ``minimum``.

    Raises ValueError with a message naming the option and the bad item.
    """
    if isinstance(values, str):
        values = [values]
    out: list[int] = []
    for chunk in values:
        for item in chunk.replace(",", " ").split():
            try:
                v = int(item)
            except ValueError:
                raise ValueError(f"{name}: {item!r} is not an integer (give e.g. {name} 1,4,16)") from None
            if v < minimum:
                raise ValueError(f"{name}: {v} is below the minimum {minimum}")
            out.append(v)
    if not out:
        raise ValueError(f"{name}: empty list")
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    from evict.boundary import OneLineArgumentParser  # noqa: PLC0415
    from evict.models.testbeds import testbed_choices  # noqa: PLC0415 (torch loads only when used)

    p = OneLineArgumentParser(
        prog="evict-profile",
        description="Measure verify latency vs number of verified tree tokens and batch size; write an EVICT cost table.",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="HF checkpoint directory (default: the shipped testbed target)",
    )
    p.add_argument(
        "--testbed",
        default=None,
        metavar="NAME",
        help=f"a shipped testbed instead of --model/--draft-model: {testbed_choices()} "
        "(the padded variant is made in the cache on first use)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "sglang"],
        default="torch",
        help="timing backend: torch (sglang is retired: an SGLang server calibrates its own table at start-up)",
    )
    p.add_argument("--batch-sizes", nargs="+", default=None, help="batch sizes, e.g. 1,4,16 (default 1,4,16)")
    p.add_argument(
        "--widths", nargs="+", default=None, help="verified tokens per request incl. the root (default 1..64)"
    )
    p.add_argument(
        "--context-len", type=int, default=256, help="tokens of KV context per request (default 256)"
    )
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per grid point (default 10)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed forwards before each grid point (default 2)"
    )
    p.add_argument(
        "--tokens",
        choices=["draft", "random"],
        default="draft",
        help="verified tokens: the model's own top predictions on held-out text (draft, default) or random ids",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of trees and token choice (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument(
        "--impl",
        choices=["auto", "engine", "hf"],
        default="auto",
        help="torch backend model code: auto = the reference engine's Qwen3MoeTarget for qwen3_moe, else transformers",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="CPU timing: wall = time.perf_counter (default); cpu = process CPU time, robust to other "
        "tenants on a shared machine (needs OMP_NUM_THREADS=1)",
    )
    p.add_argument("--model-id", default=None, help="model id stored in the table (default: from the path)")
    p.add_argument(
        "--tp-size",
        type=int,
        default=1,
        help="tensor-parallel size: 1 (a TP server calibrates its own table at start-up)",
    )
    p.add_argument(
        "--draft-model",
        type=Path,
        default=None,
        help="EAGLE-3 drafter dir: also measure the per-step drafting cost into fixed_ms",
    )
    p.add_argument(
        "--draft-steps",
        type=int,
        default=5,
        help="--draft-model: EAGLE speculative_num_steps of the drafting timed (default 5)",
    )
    p.add_argument(
        "--draft-topk",
        type=int,
        default=4,
        help="--draft-model: EAGLE topk, tokens per request per tree forward (default 4)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("cost_table.json"), help="output JSON (default ./cost_table.json)"
    )
    p.add_argument("--plot", type=Path, default=None, help="output PNG (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument(
        "--replot", type=Path, default=None, metavar="TABLE", help="only redraw the PNG of an existing TABLE"
    )
    p.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="TABLE",
        help="re-measure a few points of TABLE and report the drift",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="--check: largest accepted relative error (default 0.25)",
    )
    p.add_argument(
        "--check-points", type=int, default=4, help="--check: number of grid points to re-measure (default 4)"
    )
    p.add_argument(
        "--allow-table-mismatch",
        "--allow-mismatch",
        dest="allow_mismatch",
        action="store_true",
        help="--check: warn instead of failing on metadata mismatch (the flag evict generate and evict-bench use)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


SGLANG_RETIRED = (
    "--backend sglang is retired: a separate profiler does not time what the server runs (its CUDA "
    "graph per width, attention backend, TP group, drafting and draft-extend). Start the server with "
    "--speculative-algorithm EVICT and without EVICT_COST_TABLE: it calibrates its own table at start-up "
    "from its captured graphs and caches it (EVICT_CACHE_DIR; EVICT_RECALIBRATE=1 measures again)"
)


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"evict-profile: error: {msg}")


def _validate(args: argparse.Namespace) -> None:
    """Turn every bad argument into a clear SystemExit before anything heavy is loaded."""
    try:
        args.batch_sizes = parse_int_list(
            args.batch_sizes or [",".join(map(str, DEFAULT_BATCH_SIZES))], "--batch-sizes"
        )
        args.widths = parse_int_list(args.widths or [",".join(map(str, DEFAULT_WIDTHS))], "--widths")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    for name, low in (("context_len", 1), ("repeats", 1), ("warmup", 0), ("tp_size", 1), ("check_points", 1)):
        if getattr(args, name) < low:
            raise _fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.draft_steps < 1 or args.draft_topk < 1:
        raise _fail("--draft-steps and --draft-topk must be >= 1")
    if not args.tolerance > 0:
        raise _fail(f"--tolerance must be > 0, got {args.tolerance}")
    if args.testbed is not None:
        if args.model is not None or args.draft_model is not None:
            raise _fail("--testbed names both models; leave out --model and --draft-model")
        from evict.models.testbeds import testbed_dir  # noqa: PLC0415

        try:
            root = testbed_dir(args.testbed)
        except (ValueError, FileNotFoundError) as exc:
            raise _fail(f"--testbed: {exc}") from None
        args.model, args.draft_model = root / "target", root / "drafter"
    if args.model is None and args.replot is None:
        args.model = default_model_path()
        if not (args.model / "config.json").is_file():
            raise _fail(
                f"no --model given and the shipped testbed target {args.model} is missing; "
                "pass --model PATH or build it with scripts/train_testbed.py"
            )
    if args.draft_model is not None and not (args.draft_model / "config.json").is_file():
        raise _fail(f"--draft-model {args.draft_model} has no config.json; pass an EAGLE-3 drafter directory")
    if args.backend == "sglang":
        raise _fail(SGLANG_RETIRED)
    if args.tp_size != 1:
        raise _fail(
            "--tp-size > 1: the torch backend runs on one device; a TP server calibrates its own table "
            "at start-up (leave EVICT_COST_TABLE unset)"
        )
    _validate_files(args)


def _validate_files(args: argparse.Namespace) -> None:
    """Every path is checked before a model loads: a bad ``--out`` used to surface after profiling."""
    from evict.boundary import BoundaryError, check_input_file, check_output_file  # noqa: PLC0415

    if args.replot is not None and args.check is not None:
        raise _fail("--replot and --check do different jobs; give one of them")
    if args.no_plot and args.plot is not None:
        raise _fail("--plot and --no-plot contradict each other; drop one")
    if args.check is not None and args.no_plot is False and args.plot is not None:
        raise _fail("--check writes no plot; drop --plot (or use --replot TABLE)")
    try:
        if args.replot is not None:
            check_input_file(args.replot, "--replot", "cost table JSON")
        if args.check is not None:
            check_input_file(args.check, "--check", "cost table JSON")
        if args.check is None and args.replot is None:
            check_output_file(args.out, "--out", "cost_table.json")
        if args.check is None and not args.no_plot:
            png = args.plot or (args.replot or args.out).with_suffix(".png")
            check_output_file(png, "--plot", "cost_table.png")
            if png.resolve() == (args.replot or args.out).resolve():
                raise BoundaryError(f"--plot {png} is the table itself; give a .png path")
    except BoundaryError as exc:
        raise _fail(str(exc)) from None


def _default_device_dtype(args: argparse.Namespace) -> None:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"


def union_summary(rows: dict[int, list[tuple[int, float, float]]]) -> list[str]:
    """One line per batch size: T(widest)/T(narrowest), the expert union's growth, and the
    correlation of latency with the union. ``rows``: bs -> [(width, median_ms, expert_union)].

    Why: on an MoE target whose cost is reading experts, latency should follow the union; this is
    the check that a testbed (or a real model) behaves so (docs/testbed.md)."""
    from evict.profiler.experts import latency_union_correlation  # noqa: PLC0415

    lines = []
    for bs in sorted(rows):
        row = sorted(rows[bs])
        if len(row) < 2 or row[0][1] <= 0 or not any(u > 0 for _, _, u in row):
            continue
        r = latency_union_correlation([ms for _, ms, _ in row], [u for _, _, u in row])
        lines.append(
            f"bs={bs}: T(m={row[-1][0]})/T(m={row[0][0]}) = {row[-1][1] / row[0][1]:.2f}x, "
            f"experts {row[0][2]:.1f} -> {row[-1][2]:.1f} per layer; "
            f"correlation of latency with the expert union {r:.3f}"
        )
    return lines


def _print_result(result, out=sys.stdout) -> None:
    print(f"{'bs':>4} {'width':>5} {'median_ms':>10} {'p10_ms':>8} {'p90_ms':>8} {'experts':>8}", file=out)
    for p in result.points:
        print(
            f"{p.batch_size:>4} {p.width:>5} {p.median_ms:>10.3f} {p.p10_ms:>8.3f} {p.p90_ms:>8.3f} {p.expert_union:>8.2f}",
            file=out,
        )
    for bs, ms in sorted(result.fixed_ms.items()):
        print(f"fixed_ms bs={bs}: {ms:.3f} (drafting)", file=out)
    rows = {}
    for p in result.points:
        rows.setdefault(p.batch_size, []).append((p.width, p.median_ms, p.expert_union))
    for line in union_summary(rows):
        print(line, file=out)


def _measure(args: argparse.Namespace, points: list[tuple[int, int]] | None = None):
    """Run the chosen backend over the grid (or over ``points``) and return a ProfileResult."""
    from evict.profiler.torch_backend import ProfileSpec

    spec = ProfileSpec(
        model_path=args.model,
        batch_sizes=args.batch_sizes,
        widths=args.widths,
        context_len=args.context_len,
        repeats=args.repeats,
        warmup=args.warmup,
        tokens=args.tokens,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        impl=args.impl,
        clock=args.clock,
        model_id=getattr(args, "model_id", None),
        progress=not args.quiet,
        points=points,
    )
    from evict.profiler.torch_backend import profile

    result = profile(spec)
    if args.draft_model is not None:
        from evict.profiler.torch_backend import add_draft_costs

        add_draft_costs(result, spec, args.draft_model, args.draft_steps, args.draft_topk)
    return result


def check_points(batch_sizes: Sequence[int], widths: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Up to ``n`` grid points spread over the table: corners first, then the middle."""
    bmin, bmax, bmid = batch_sizes[0], batch_sizes[-1], batch_sizes[len(batch_sizes) // 2]
    wmin, wmax, wmid = widths[0], widths[-1], widths[len(widths) // 2]
    order = [(bmin, wmin), (bmax, wmax), (bmin, wmax), (bmid, wmid), (bmax, wmin), (bmid, wmax), (bmin, wmid)]
    out: list[tuple[int, int]] = []
    for pt in order:
        if pt not in out:
            out.append(pt)
    return out[:n]


def _run_check(args: argparse.Namespace) -> int:
    from evict.profiler.table import CostTable, checkpoint_config_hash
    from evict.profiler.torch_backend import device_name, read_model_config, resolve_device

    meta = CostTable.load(args.check).metadata
    read_model_config(args.model)  # a clear error for a bad --model before anything is timed
    if args.backend != meta.get("backend", args.backend):
        print(
            f"evict-profile: note: table backend {meta.get('backend')!r}, re-measuring with {args.backend!r}",
            file=sys.stderr,
        )
    # Re-measure with the table's own settings unless the user overrides them explicitly.
    args.dtype = args.dtype or meta.get("dtype")
    _default_device_dtype(args)
    device = resolve_device(args.device)
    table = CostTable.open(
        args.check,
        config_hash=checkpoint_config_hash(args.model),
        device=device_name(device),
        tp_size=args.tp_size,
        dtype=args.dtype,
        allow_mismatch=args.allow_mismatch,
    )
    args.context_len = int(meta.get("context_len") or args.context_len)
    args.repeats = int(meta.get("repeats") or args.repeats)
    tokens = str(meta.get("tokens", args.tokens))
    args.tokens = "random" if tokens.startswith("random") else "draft"
    args.seed = int(meta.get("seed", args.seed))
    if str(meta.get("clock", "")).startswith("time.process_time"):
        args.clock = "cpu"
    args.batch_sizes, args.widths = table.batch_sizes, table.widths
    pts = check_points(table.batch_sizes, table.widths, args.check_points)
    result = _measure(args, points=pts)
    worst = 0.0
    print(f"{'bs':>4} {'width':>5} {'table_ms':>9} {'now_ms':>9} {'rel_err':>8}")
    for bs, w in pts:
        i, j = table.batch_sizes.index(bs), table.widths.index(w)
        old = table.median[i][j]
        new = result.point(bs, w).median_ms
        rel = abs(new - old) / old
        worst = max(worst, rel)
        flag = "  DRIFT" if rel > args.tolerance else ""
        print(f"{bs:>4} {w:>5} {old:>9.3f} {new:>9.3f} {rel:>8.1%}{flag}")
    verdict = "OK" if worst <= args.tolerance else "FAILED"
    print(f"max relative error {worst:.1%} (tolerance {args.tolerance:.1%}): {verdict}")
    return 0 if worst <= args.tolerance else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``evict-profile``; returns the exit code.

    An expected error prints one ``evict-profile: error: ...`` line and returns 2; Ctrl-C prints one
    line and returns 130 (a table is saved atomically, so an interrupt leaves the previous one).
    """
    from evict.boundary import EXIT_BAD_INPUT, run_console  # noqa: PLC0415

    def run() -> int:
        try:
            return _main(argv)
        except SystemExit as exc:
            if isinstance(exc.code, str):  # one of ours (_fail): print it, status 2 like argparse
                print(exc.code, file=sys.stderr)
                return EXIT_BAD_INPUT
            raise

    return run_console(
        "evict-profile", run, on_interrupt="nothing was written (a previous table is unchanged)"
    )


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)

    from evict.profiler.table import CostTableError
    from evict.profiler.torch_backend import ProfileError

    try:
        if args.replot is not None:
            from evict.profiler.plot import plot_table
            from evict.profiler.table import CostTable

            table = CostTable.load(args.replot)
            print(f"wrote {plot_table(table, args.plot or args.replot.with_suffix('.png'))}")
            if table.expert_union is not None:
                rows = {
                    bs: list(zip(table.widths, table.median[i], table.expert_union[i]))
                    for i, bs in enumerate(table.batch_sizes)
                }
                print("\n".join(union_summary(rows)))
            return 0
        if args.check is not None:
            return _run_check(args)
        _default_device_dtype(args)
        result = _measure(args)
        result.meta["command"] = " ".join(["evict-profile", *(sys.argv[1:] if argv is None else argv)])
        from evict.profiler.torch_backend import result_to_table

        table = result_to_table(result, source=str(args.out))
        table.save(args.out)
        _print_result(result)
        print(f"wrote {args.out}")
        if not args.no_plot:
            from evict.profiler.plot import plot_table

            png = plot_table(table, args.plot or args.out.with_suffix(".png"))
            print(f"wrote {png}")
        return 0
    except (ProfileError, CostTableError) as exc:
        raise _fail(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
