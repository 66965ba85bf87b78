"""Oracle-gap decomposition: how much of the oracle cut's lead can any width rule reach?

Why: ``evict-bench``'s oracle-cut row knows which draft nodes the target will accept and verifies
exactly those. Its lead over EVICT mixes two things: *how many* nodes to verify (the width) and
*which* nodes (the ranking). EVICT, raw or calibrated, ranks nodes by score and chooses only the
width, as does any static tree cut by score. This run separates the two on one captured decode, so
a missed speed target can be read against the ceiling of what the rule can choose:

- ``static m``: the same draft tree cut to a fixed width ``m`` (its best ``m`` is the reference);
- ``evict (table)``: EVICT's rule (:func:`evict.truncation.choose_width`, the code the plugin and
  the engine run) deciding from the cost table, as deployed;
- ``evict (measured)``: the same rule deciding from the step times measured here (draft, decision,
  verify, acceptance and draft extend: everything a decode step costs in this engine);
- ``width oracle``: the best width per step for the tokens each width *would* have accepted,
  nodes still ranked by score -- the ceiling of every score-ranked rule;
- ``node oracle``: the exact accepted path per request (the batch verifies the longest, rounded
  up to an allowed width) -- the oracle cut.

With the plain decode step timed too (``PLAIN``: an autoregressive step, no draft), two rows add
the depth choice EVICT_DEPTH makes (plain decoding or the tree):

- ``plain or tree (rule)``: plain decoding when the previous step's scores, priced by the measured
  costs, value it above the best width of the tree (what a lagged depth decision knows), else
  EVICT's width on this step's scores;
- ``plain or tree oracle``: the best of plain decoding and every width per step, for the tokens
  each would really emit (Dinkelbach again) -- the ceiling of deciding the depth and the width.

How: one greedy decode per batch size verifies the whole draft tree (the uncut static tree) and
records, per step, every request's scores and accepted path. Greedy acceptance under a cut to the
top ``m - 1`` nodes is then exact without decoding again: the kept set is ancestor-closed, so a
request accepts the leading nodes of its full-tree path that rank below ``m - 1``. Step times are
measured per (active batch size, width) by decoding the same prompts with static trees of each
width, interleaved, and every row is charged from them: throughput is sum of emitted tokens over
sum of step times. The width oracle maximizes that ratio of sums exactly (Dinkelbach: each step
maximizes ``tokens - lambda * time`` for the ratio ``lambda`` it converges to).

Usage::

    python -m evict.bench.oracle_gap --threads 1 --batch-sizes 1 4 --num-prompts 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evict.boundary import OneLineArgumentParser, check_output_file, run_console
from evict.profiler.timing import decode_step_ms
from evict.truncation import (
    choose_width,
    expected_accepted_lengths,
    sanitize_scores,
    sort_candidates,
    validate_widths,
)

from .modes import num_candidates, parse_tree
from .prompts import build_ood_prompts, build_prompts

__all__ = [
    "CapturedStep",
    "GapRow",
    "acceptance_by_width",
    "capture_steps",
    "measure_step_ms",
    "timing_sizes",
    "gap_rows",
    "render_gap",
    "DEFAULT_WIDTHS",
    "PLAIN",
]

DEFAULT_WIDTHS: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: The key of the plain (autoregressive) decode step in ``measure_step_ms``'s engines and times.
PLAIN = 0


@dataclass
class CapturedStep:
    """One full-tree decode step of a batch: what any cut of it would have verified and accepted."""

    scores: torch.Tensor  # float32 [bs, K]: the drafter's cumulative scores (CPU)
    path_ranks: list[list[int]]  # per request: the score rank of each accepted node (root excluded)

    @property
    def batch_size(self) -> int:
        return int(self.scores.shape[0])


def capture_steps(
    engine: Any, batches: Sequence[Sequence[Sequence[int]]], max_new_tokens: int
) -> list[CapturedStep]:
    """Decode ``batches`` with ``engine`` (a full-tree static ``SpecEngine``), recording each step.

    A node's rank is its position in the order every cut keeps: scores cleaned by
    :func:`evict.truncation.sanitize_scores`, then :func:`~evict.truncation.sort_candidates` (stable,
    ties to the lower flat index).
    """
    steps: list[CapturedStep] = []

    def observe(tree: Any, kept: torch.Tensor, acc: Any, stats: Any) -> None:
        scores = tree.scores.detach().float().cpu()
        _, order = sort_candidates(sanitize_scores(scores)[0])  # exactly the order keep_top cuts
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
        kept_c, path = kept.cpu(), acc.path.cpu()
        ranks = []
        for b in range(scores.shape[0]):
            flat = [int(kept_c[b, j - 1]) for j in path[b].tolist()[1:] if j > 0]
            ranks.append(sorted(int(rank[b, f]) for f in flat))
        steps.append(CapturedStep(scores=scores, path_ranks=ranks))

    engine.observer = observe
    try:
        for batch in batches:
            engine.generate([list(p) for p in batch], max_new_tokens)
    finally:
        engine.observer = None
    return steps


def acceptance_by_width(step: CapturedStep, widths: torch.Tensor) -> torch.Tensor:
    """Tokens each request would emit per step under a cut to each width: long ``[bs, W]``.

    ``1 + #(accepted nodes ranked below m - 1)``: the bonus token plus the leading part of the path
    that the ancestor-closed top-(m-1) set holds.
    """
    out = torch.ones((step.batch_size, widths.numel()), dtype=torch.long)
    for b, ranks in enumerate(step.path_ranks):
        r = torch.tensor(ranks, dtype=torch.long).view(-1, 1)
        out[b] += (r < (widths.view(1, -1) - 1)).sum(dim=0)
    return out


def timing_sizes(batch_size: int) -> list[int]:
    """Active batch sizes to time for a run at ``batch_size``: powers of two below it, and itself."""
    return sorted({1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size} | {batch_size})


def measure_step_ms(
    engines: dict[int, Any],
    prompts: Sequence[Sequence[int]],
    sizes: Sequence[int],
    *,
    new_tokens: int = 24,
    repeats: int = 3,
) -> dict[tuple[int, int], float]:
    """Median ms of a decode step per (batch size, width), widths interleaved.

    ``engines`` maps each width to a static engine of the same draft tree; batch size b decodes the
    first b ``prompts``. Every repeat visits the (size, width) points in a new shuffled order so
    machine noise hits them alike; the first repeat is a warm-up. A step is timed as the engine
    runs it (:func:`evict.profiler.timing.decode_step_ms`): drafting, decision, verify, acceptance,
    KV commit and draft extend.
    """
    points = [(b, w) for b in sizes for w in engines]
    samples: dict[tuple[int, int], list[float]] = {p: [] for p in points}
    for rep in range(repeats + 1):
        order = list(points)
        random.Random(rep).shuffle(order)
        for b, w in order:
            ms = decode_step_ms(engines[w], prompts[:b], new_tokens=new_tokens, repeats=1, warmup=0)
            if rep:
                samples[(b, w)].append(ms)
    return {p: statistics.median(v) for p, v in samples.items()}


def _cost_lookup(step_ms: dict[tuple[int, int], float], widths: Sequence[int]):  # noqa: ANN202
    """``T(bs, m)`` from the measured grid, linear in the batch size between timed sizes (a batch
    shrinks as its requests finish, so every size up to the run's occurs)."""
    sizes = sorted({b for b, _ in step_ms})
    grid = torch.tensor([[step_ms[(b, w)] for w in widths] for b in sizes], dtype=torch.float32)

    def cost(bs: int) -> torch.Tensor:
        if bs <= sizes[0]:
            return grid[0].clone()
        if bs >= sizes[-1]:
            return grid[-1].clone()
        hi = next(i for i, b in enumerate(sizes) if b >= bs)
        lo = hi - 1
        t = (bs - sizes[lo]) / (sizes[hi] - sizes[lo])
        return grid[lo] + t * (grid[hi] - grid[lo])

    return cost


@dataclass
class GapRow:
    name: str
    tokens: float = 0.0
    time_ms: float = 0.0
    width_sum: float = 0.0
    request_steps: int = 0
    batch_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, tokens: float, time_ms: float, width: int, bs: int) -> None:
        self.tokens += tokens
        self.time_ms += time_ms
        self.width_sum += width
        self.request_steps += bs
        self.batch_steps += 1

    @property
    def throughput(self) -> float:
        """Tokens per ms."""
        return self.tokens / self.time_ms if self.time_ms else float("nan")


def _width_oracle(
    accs: list[torch.Tensor], costs: list[torch.Tensor], start: float, iters: int = 50
) -> list[int]:
    """Per-step width indices that maximize sum(tokens) / sum(time) exactly (Dinkelbach iteration)."""
    lam = start
    picks: list[int] = []
    for _ in range(iters):
        new = [int((a.sum(dim=0).float() - lam * c).argmax()) for a, c in zip(accs, costs)]
        tok = sum(float(a[:, j].sum()) for a, j in zip(accs, new))
        tim = sum(float(c[j]) for c, j in zip(costs, new))
        if new == picks:
            break
        picks, lam = new, tok / tim
    return picks


def gap_rows(
    steps: Sequence[CapturedStep],
    widths: Sequence[int],
    step_ms: dict[tuple[int, int], float],
    table: Any = None,
) -> tuple[list[GapRow], dict[str, float]]:
    """Every row of the decomposition on one capture, charged from the measured step times.

    Returns the rows (static widths first) and diagnostics: the best static width, and how much of
    the realized accepted length's variance EVICT's predicted ``B(m)`` explains at that width.
    """
    w = validate_widths(widths)
    cost = _cost_lookup(step_ms, [int(v) for v in w])
    accs = [acceptance_by_width(s, w) for s in steps]
    costs = [cost(s.batch_size) for s in steps]
    benefits = [expected_accepted_lengths(s.scores, w) for s in steps]
    rows = [GapRow(f"static {int(m)}") for m in w]
    for a, c, s in zip(accs, costs, steps):
        for j, row in enumerate(rows):
            row.add(float(a[:, j].sum()), float(c[j]), int(w[j]), s.batch_size)
    best = max(range(len(rows)), key=lambda j: rows[j].throughput)
    deciders: list[tuple[str, Any]] = []
    if table is not None:
        deciders.append(("evict (table)", lambda s: table.step_cost(s.batch_size, w)))
    deciders.append(("evict (measured)", lambda s: cost(s.batch_size)))
    picks: dict[str, list[int]] = {}
    for name, step_cost in deciders:
        row = GapRow(name)
        picks[name] = [choose_width(s.scores, step_cost(s), w).width_index for s in steps]
        for a, c, s, j in zip(accs, costs, steps, picks[name]):
            row.add(float(a[:, j].sum()), float(c[j]), int(w[j]), s.batch_size)
        rows.append(row)
    row = GapRow("width oracle")
    for a, c, s, j in zip(accs, costs, steps, _width_oracle(accs, costs, rows[best].throughput)):
        row.add(float(a[:, j].sum()), float(c[j]), int(w[j]), s.batch_size)
    rows.append(row)
    row = GapRow("node oracle")
    for c, s in zip(costs, steps):
        need = 1 + max(len(r) for r in s.path_ranks)
        j = int((w >= need).nonzero()[0]) if bool((w >= need).any()) else len(w) - 1
        row.add(float(sum(len(r) + 1 for r in s.path_ranks)), float(c[j]), int(w[j]), s.batch_size)
    rows.append(row)
    if any(m == PLAIN for _, m in step_ms):
        rows += _plain_or_tree_rows(
            steps, w, accs, costs, benefits, picks["evict (measured)"], _cost_lookup(step_ms, [PLAIN])
        )
    pred = torch.cat([b[:, best] for b in benefits]).double()
    real = torch.cat([a[:, best] for a in accs]).double()
    corr = float(torch.corrcoef(torch.stack([pred, real]))[0, 1]) if real.numel() > 1 else float("nan")
    return rows, {"best_static_width": float(w[best]), "r2_predicted_vs_realized": corr * corr}


def _plain_or_tree_rows(
    steps: Sequence[CapturedStep],
    w: torch.Tensor,
    accs: list[torch.Tensor],
    costs: list[torch.Tensor],
    benefits: list[torch.Tensor],
    width_picks: list[int],
    plain_cost: Any,
) -> list[GapRow]:
    """The depth choice on the capture: plain decoding (1 token per request, one plain step's time)
    or the tree at a width. The rule decides plain-or-tree from the previous step's scores (a lagged
    decision: the depth is chosen before drafting), then the width from this step's (``width_picks``:
    the ``evict (measured)`` row's choices); the oracle picks per step whatever maximizes the run's
    tokens / time for what each choice would emit."""
    rule = GapRow("plain or tree (rule)")
    prev: torch.Tensor | None = None
    for a, c, b, s, j in zip(accs, costs, benefits, steps, width_picks):
        bs, t_plain = s.batch_size, float(plain_cost(s.batch_size)[0])
        go_plain = False
        if prev is not None:  # per-request value of each width, from the previous step's scores
            tree_value = float((prev.mean(dim=0) * bs / c).max())
            go_plain = bs / t_plain > tree_value
        if go_plain:
            rule.add(float(bs), t_plain, 1, bs)
        else:
            rule.add(float(a[:, j].sum()), float(c[j]), int(w[j]), bs)
        prev = b.float()
    ext_accs = [torch.cat([a, torch.ones((a.shape[0], 1), dtype=a.dtype)], dim=1) for a in accs]
    ext_costs = [torch.cat([c, plain_cost(s.batch_size)[:1]]) for c, s in zip(costs, steps)]
    oracle = GapRow("plain or tree oracle")
    start = max(rule.throughput, 1e-9)
    for a, c, s, j in zip(ext_accs, ext_costs, steps, _width_oracle(ext_accs, ext_costs, start)):
        oracle.add(float(a[:, j].sum()), float(c[j]), 1 if j == len(w) else int(w[j]), s.batch_size)
    return [rule, oracle]


def render_gap(bs: int, rows: Sequence[GapRow], diag: dict[str, float]) -> str:
    """Markdown table: throughput relative to the best static width of the same tree."""
    statics = [r for r in rows if r.name.startswith("static ")]
    ref = max(statics, key=lambda r: r.throughput)
    lines = [
        f"### batch size {bs}: {ref.batch_steps} steps, best static width {int(diag['best_static_width'])}, "
        f"R^2 of EVICT's predicted vs realized accepted length there {diag['r2_predicted_vs_realized']:.2f}",
        "",
        "| row | x best static width | tokens/step/request | mean width |",
        "|---|---|---|---|",
    ]
    shown = [ref] + [r for r in rows if not r.name.startswith("static ")]
    for r in shown:
        name = f"{r.name} (best static)" if r is ref else r.name
        lines.append(
            f"| {name} | {r.throughput / ref.throughput:.3f} | {r.tokens / r.request_steps:.2f} "
            f"| {r.width_sum / r.batch_steps:.1f} |"
        )
    others = ", ".join(f"{r.name.split()[1]}: {r.throughput / ref.throughput:.2f}" for r in statics)
    lines += ["", f"Static widths of the same tree: {others}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from evict.models.testbeds import testbed_choices  # noqa: PLC0415 (torch loads only when used)

    p = OneLineArgumentParser(
        prog="python -m evict.bench.oracle_gap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="default 1 4")
    p.add_argument(
        "--num-prompts",
        type=int,
        default=8,
        help="code and as many prose prompts from the held-out stdlib, and as many from third-party "
        "packages (default 8: 32 prompts)",
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    p.add_argument("--timing-repeats", type=int, default=3, help="timed repeats per point (default 3)")
    p.add_argument(
        "--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS), help="allowed widths (root included)"
    )
    p.add_argument("--evict-tree", type=parse_tree, default=None, help="draft tree (default: the table's)")
    p.add_argument(
        "--cost-table", type=Path, default=None, help="as evict-bench (default: shipped or measured)"
    )
    p.add_argument("--allow-table-mismatch", action="store_true")
    p.add_argument(
        "--testbed",
        default=None,
        metavar="NAME|DIR",
        help=f"testbed name ({testbed_choices()}) or a folder with target/ and drafter/",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write every row and step time here")
    return p


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "timing_repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    try:
        widths = [int(v) for v in validate_widths(args.widths)]
    except ValueError as exc:
        parser.error(f"--widths: {exc}")
    if widths[0] < 2:
        parser.error("--widths must be >= 2 (width 1 verifies no draft node)")
    if args.json is not None:
        check_output_file(args.json, "--json", "oracle_gap.json")
    torch.set_num_threads(args.threads)
    from evict.engine import SpecEngine  # noqa: PLC0415 (heavy)

    from .cli import _load, evict_tree_for  # noqa: PLC0415 (the bench's testbed and cost-table loading)

    args.clock, args.extra_cost_table = "cpu", []  # what the bench's loader reads
    target, drafter, tokenizer, table, _, table_path = _load(args, args.device)
    steps_, topk, _ = args.evict_tree or evict_tree_for(table)
    k = num_candidates(steps_, topk)
    widths = [m for m in widths if m <= k + 1]
    full = widths[-1]
    prompts = [list(p.ids) for p in build_prompts(tokenizer, args.num_prompts, args.prompt_tokens)]
    prompts += [list(p.ids) for p in build_ood_prompts(tokenizer, args.num_prompts, args.prompt_tokens)]
    print(
        f"draft tree ({steps_}, {topk}), widths {widths}, {len(prompts)} prompts x {args.max_new_tokens} "
        f"new tokens, cost table {Path(table_path).name if table_path else '-'}"
    )
    report: dict[str, Any] = {"command": "python -m evict.bench.oracle_gap " + " ".join(argv or sys.argv[1:])}
    for bs in args.batch_sizes:
        batches = [prompts[i : i + bs] for i in range(0, len(prompts) - bs + 1, bs)]
        if not batches:
            parser.error(f"batch size {bs} needs at least {bs} prompts")
        engines = {
            m: SpecEngine(target, drafter, mode="static", steps=steps_, topk=topk, num_draft_tokens=m)
            for m in widths
        }
        timed = {**engines, PLAIN: SpecEngine(target, None, mode="ar")}  # the plain step, timed alike
        print(f"bs {bs}: capturing {len(batches)} batches at the full width {full} ...", flush=True)
        steps = capture_steps(engines[full], batches, args.max_new_tokens)
        sizes = timing_sizes(bs)
        print(
            f"bs {bs}: timing {len(widths)} widths and the plain step at batch sizes {sizes} (wall clock) ...",
            flush=True,
        )
        step_ms = measure_step_ms(timed, prompts, sizes, repeats=args.timing_repeats)
        rows, diag = gap_rows(steps, widths, step_ms, table)
        print(render_gap(bs, rows, diag))
        report[str(bs)] = {
            "rows": [r.__dict__ | {"throughput": r.throughput} for r in rows],
            "diagnostics": diag,
            "step_ms": {f"{b},{m}": v for (b, m), v in sorted(step_ms.items())},
        }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 on bad input (one line), 130 on Ctrl-C."""
    return run_console("oracle_gap", lambda: _main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
