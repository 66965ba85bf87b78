"""Domain-shift run: does the acceptance estimator stay calibrated when the text changes?

Why: the online estimator (:class:`evict.truncation.AcceptanceEstimator`) learns how often the
drafter's nodes are accepted, and decays old evidence by a half-life so that it can follow a change
of domain (issue 14: "Robust to domain shift").  Whether the decay matters is a measurement: decode
one domain (the held-out stdlib split), then the other (third-party packages' sources and
docstrings, ``evict-bench --ood-prompts``), with the *same* estimator carried across, and compare
the predicted accepted length per step (EVICT's ``B(m*)``) with the realized one before and after
the switch, for several arms side by side:

- ``raw``: EVICT ranking by the drafter's raw scores (no estimator; the reference);
- ``decay``: the estimator with its default half-life;
- ``no-decay``: the estimator that never forgets (infinite half-life);
- ``decay(h=H)``: optional extra half-lives (``--half-lives``).

Each arm is its own EVICT engine (its own width decisions, as deployed), built through the bench's
:class:`~evict.bench.runner.Bench` (same policy construction) on the bench's prompts.  Decoding is
greedy, so every arm emits the same tokens; only where steps start and which nodes are verified
differ.  The calibration error of a stretch of request-steps is ``sum(predicted) / sum(realized) -
1`` (signed: > 0 is overconfident); per-step errors are dominated by the 0/1 luck of each node, so
the error is reported over sliding windows of ``window`` request-steps and over whole phases.

Usage::

    python -m evict.bench.domain_shift --threads 1 --num-prompts 4 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evict.boundary import OneLineArgumentParser, check_output_file, run_console
from evict.truncation import AcceptanceEstimator

from .modes import ModeSpec, parse_tree
from .prompts import Prompt, build_ood_prompts, build_prompts
from .runner import Bench

__all__ = [
    "DEFAULT_HALF_LIFE",
    "ShiftArm",
    "ShiftPoint",
    "ShiftTrace",
    "default_arms",
    "shift_phases",
    "shift_engine_factory",
    "run_shift",
    "window_errors",
    "summarize_shift",
    "render_shift",
    "main",
]

# the estimator's own default, read from its signature so that this run always tests what ships
DEFAULT_HALF_LIFE: float = float(inspect.signature(AcceptanceEstimator).parameters["half_life"].default)
PHASES = ("stdlib", "ood")


@dataclass(frozen=True)
class ShiftArm:
    """One engine of the run: EVICT with raw scores (``calibrated=False``) or with an estimator.

    ``half_life``: trials after which evidence weighs half; ``None`` never forgets.
    """

    name: str
    calibrated: bool
    half_life: float | None = None


@dataclass(frozen=True)
class ShiftPoint:
    """One request-step: which phase (0 before the switch, 1 after), EVICT's ``B(m*)`` and the
    tokens that verify produced (accepted + bonus)."""

    phase: int
    predicted: float
    realized: float


@dataclass
class ShiftTrace:
    """One arm's run: its request-steps in order, and the estimator's trials per phase (verified
    nodes whose parent was accepted; 0 for ``raw``), to set against the half-life."""

    points: list[ShiftPoint]
    trials: list[int]


def default_arms(extra_half_lives: Sequence[float] = ()) -> list[ShiftArm]:
    """``raw``, ``decay`` (the default half-life), ``no-decay`` and one arm per extra half-life."""
    arms = [
        ShiftArm("raw", calibrated=False),
        ShiftArm("decay", calibrated=True, half_life=DEFAULT_HALF_LIFE),
        ShiftArm("no-decay", calibrated=True, half_life=None),
    ]
    for h in extra_half_lives:
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"a half-life must be a positive finite number of trials, got {h}")
        arms.append(ShiftArm(f"decay(h={h:g})", calibrated=True, half_life=float(h)))
    return arms


def shift_phases(
    tokenizer: Any, num_per_domain: int, prompt_tokens: int, first: str = "stdlib"
) -> list[list[Prompt]]:
    """The two phases' prompts: the held-out stdlib split and the out-of-domain one, ``first`` first.

    Each phase has ``num_per_domain`` code and as many prose prompts, alternating, exactly as
    ``evict-bench`` builds them (``--num-prompts`` and ``--ood-prompts``).
    """
    if first not in PHASES:
        raise ValueError(f"first must be one of {PHASES}, got {first!r}")
    stdlib = build_prompts(tokenizer, num_per_domain, prompt_tokens)
    ood = build_ood_prompts(tokenizer, num_per_domain, prompt_tokens)
    return [stdlib, ood] if first == "stdlib" else [ood, stdlib]


def shift_engine_factory(
    target: Any, drafter: Any, arms: Sequence[ShiftArm], device: str = "cpu"
) -> Callable[[ModeSpec, Any], Any]:
    """A :class:`Bench` engine factory: the arm named like the mode gets its estimator (or none).

    Why a factory of its own: the bench's gives every calibrated mode the default half-life; this
    run varies it.  Each engine keeps its estimator across ``generate`` calls, which is what lets
    evidence from the first phase carry into the second.
    """
    from evict.engine import SpecEngine  # noqa: PLC0415 (heavy; only for real runs)

    by_name = {a.name: a for a in arms}

    def factory(mode: ModeSpec, policy: Any) -> Any:
        arm = by_name[mode.name]
        est = None
        if arm.calibrated:
            est = AcceptanceEstimator(mode.topk, mode.steps, half_life=arm.half_life, device=device)
        return SpecEngine(
            target,
            drafter,
            mode="evict",
            steps=mode.steps,
            topk=mode.topk,
            num_draft_tokens=mode.num_draft,
            policy=policy,
            acceptance=est,
        )

    return factory


def arm_mode(arm: ShiftArm, tree: tuple[int, int, int]) -> ModeSpec:
    """The bench mode that runs ``arm`` on the draft tree ``tree`` = (steps, topk, N)."""
    s, k, n = tree
    return ModeSpec(
        name=arm.name,
        kind="evict",
        steps=s,
        topk=k,
        num_draft=n,
        role="evict-cal" if arm.calibrated else "evict",
        acceptance="calibrated" if arm.calibrated else "raw",
    )


def run_shift(
    bench: Bench,
    arms: Sequence[ShiftArm],
    tree: tuple[int, int, int],
    phases: Sequence[Sequence[Sequence[int]]],
    batch_size: int,
    max_new_tokens: int,
    log: Callable[[str], None] = print,
) -> dict[str, ShiftTrace]:
    """Decode every phase's prompt batches in order with every arm; per arm its :class:`ShiftTrace`.

    A phase's prompts are cut into consecutive batches of ``batch_size`` (a remainder is dropped:
    the switch falls between batches, as a server's would between requests).  Non-finite
    predictions (a row that fell back to the full tree) are left out.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 1, got {batch_size}, {max_new_tokens}")
    out: dict[str, ShiftTrace] = {}
    for arm in arms:
        engine = bench.engine(arm_mode(arm, tree))
        est = getattr(engine, "acceptance", None)
        if est is not None:
            est.reset_diagnostics()  # its trial counter: the trials each phase taught it
        trace = ShiftTrace(points=[], trials=[])
        for phase, prompts in enumerate(phases):
            n = (len(prompts) // batch_size) * batch_size
            if n == 0:
                raise ValueError(
                    f"phase {phase} has {len(prompts)} prompts, fewer than batch size {batch_size}"
                )
            for start in range(0, n, batch_size):
                res = engine.generate([list(p) for p in prompts[start : start + batch_size]], max_new_tokens)
                for st in res.steps:
                    for p, a in zip(st.predicted_accepted or [], st.accepted):
                        if math.isfinite(float(p)):
                            trace.points.append(ShiftPoint(phase, float(p), float(a)))
            seen = sum(int(r["trials"]) for r in est.reliability()) if est is not None else 0
            trace.trials.append(seen - sum(trace.trials))
        out[arm.name] = trace
        counts = [sum(p.phase == i for p in trace.points) for i in range(len(phases))]
        log(f"{arm.name}: request-steps {counts}, trials {trace.trials}")
    return out


def _error(points: Sequence[ShiftPoint]) -> float:
    """``sum(predicted) / sum(realized) - 1`` (NaN for no points)."""
    real = sum(p.realized for p in points)
    return sum(p.predicted for p in points) / real - 1.0 if real > 0 else float("nan")


def window_errors(points: Sequence[ShiftPoint], window: int) -> list[float]:
    """Calibration error of every run of ``window`` consecutive request-steps (sliding by one)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 request-steps, got {window}")
    return [_error(points[i : i + window]) for i in range(len(points) - window + 1)]


def summarize_shift(traces: dict[str, ShiftTrace], window: int) -> dict[str, dict[str, float]]:
    """Per arm, the calibration errors before and after the switch (signed relative errors).

    - ``before_all`` / ``after_all``: over the whole phase;
    - ``before_last``: the last ``window`` request-steps before the switch (what was learned);
    - ``after_first``: the first ``window`` after it (the shock);
    - ``after_last``: the last ``window`` of the second phase (the recovery);
    - ``after_mean_abs``: mean absolute error of all windows inside the second phase;
    - ``realized_before`` / ``realized_after``: mean realized accepted length per request-step;
    - ``steps_before`` / ``steps_after``: request-steps per phase;
    - ``trials_before`` / ``trials_after``: the estimator's trials per phase (0 for raw scores).
    """
    out = {}
    for name, trace in traces.items():
        a = [p for p in trace.points if p.phase == 0]
        b = [p for p in trace.points if p.phase == 1]
        trials = list(trace.trials) + [0, 0]
        wins = window_errors(b, window)
        out[name] = {
            "before_all": _error(a),
            "before_last": _error(a[-window:]),
            "after_first": _error(b[:window]),
            "after_last": _error(b[-window:]),
            "after_all": _error(b),
            "after_mean_abs": sum(abs(e) for e in wins) / len(wins) if wins else float("nan"),
            "realized_before": sum(p.realized for p in a) / len(a) if a else float("nan"),
            "realized_after": sum(p.realized for p in b) / len(b) if b else float("nan"),
            "steps_before": float(len(a)),
            "steps_after": float(len(b)),
            "trials_before": float(trials[0]),
            "trials_after": float(trials[1]),
        }
    return out


def render_shift(summary: dict[str, dict[str, float]], window: int, order: Sequence[str] = PHASES) -> str:
    """A markdown table of :func:`summarize_shift`'s numbers (errors in percent)."""
    pct = lambda x: "n/a" if math.isnan(x) else f"{100 * x:+.1f}%"  # noqa: E731
    first, second = order
    lines = [
        f"Calibration error, sum(predicted) / sum(realized) - 1 of accepted length per request-step "
        f"({first} first, then {second}; windows of {window} request-steps):",
        "",
        f"| arm | {first}: all | {first}: last window | {second}: first window | {second}: last window "
        f"| {second}: all | {second}: mean abs window | realized {first} / {second} | request-steps | trials |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {pct(s['before_all'])} | {pct(s['before_last'])} | {pct(s['after_first'])} "
            f"| {pct(s['after_last'])} | {pct(s['after_all'])} | {100 * s['after_mean_abs']:.1f}% "
            f"| {s['realized_before']:.2f} / {s['realized_after']:.2f} "
            f"| {int(s['steps_before'])} + {int(s['steps_after'])} "
            f"| {int(s['trials_before'])} + {int(s['trials_after'])} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from evict.models.testbeds import testbed_choices  # noqa: PLC0415 (torch loads only when used)

    p = OneLineArgumentParser(
        prog="python -m evict.bench.domain_shift",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--num-prompts", type=int, default=4, help="code and as many prose prompts per phase (default 4)"
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    p.add_argument("--batch-size", type=int, default=1, help="requests decoded together (default 1)")
    p.add_argument("--first", choices=list(PHASES), default="stdlib", help="the phase decoded first")
    p.add_argument("--window", type=int, default=32, help="sliding window in request-steps (default 32)")
    p.add_argument(
        "--half-lives",
        type=float,
        nargs="*",
        default=[],
        help="extra calibrated arms with these half-lives in trials (the default half-life and no decay always run)",
    )
    p.add_argument(
        "--evict-tree", type=parse_tree, default=None, help="EVICT's draft tree (default: the table's)"
    )
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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument(
        "--json", type=Path, default=None, help="also write the summary and every request-step here"
    )
    return p


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > 2 * args.num_prompts:
        parser.error(f"--batch-size {args.batch_size} needs at least that many prompts per phase")
    if args.json is not None:
        check_output_file(args.json, "--json", "shift.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = default_arms(args.half_lives)
    from .cli import _load, evict_tree_for  # noqa: PLC0415 (the bench's testbed and cost-table loading)

    # what the bench's loader reads: one batch size, the CPU clock for a single-threaded table
    args.batch_sizes, args.clock, args.extra_cost_table = [args.batch_size], "cpu", []
    target, drafter, tokenizer, table, _, table_path = _load(args, args.device)
    tree = args.evict_tree or evict_tree_for(table)
    cfg = target.config
    bench = Bench(
        shift_engine_factory(target, drafter, arms, args.device),
        target,
        num_experts=int(getattr(cfg, "num_experts", 0) or 0),
        table=table,
    )
    phases = shift_phases(tokenizer, args.num_prompts, args.prompt_tokens, args.first)
    ids = [[list(p.ids) for p in ph] for ph in phases]
    print(f"EVICT tree {tree}, {len(ids[0])} + {len(ids[1])} prompts, bs {args.batch_size}")
    points = run_shift(bench, arms, tree, ids, args.batch_size, args.max_new_tokens)
    summary = summarize_shift(points, args.window)
    order = tuple(PHASES) if args.first == "stdlib" else tuple(reversed(PHASES))
    print(render_shift(summary, args.window, order))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "command": "python -m evict.bench.domain_shift " + " ".join(argv or sys.argv[1:]),
                    "tree": list(tree),
                    "cost_table": Path(table_path).name if table_path else None,
                    "arms": [asdict(a) for a in arms],
                    "order": list(order),
                    "window": args.window,
                    "summary": summary,
                    "traces": {k: asdict(v) for k, v in points.items()},
                },
                indent=1,
            )
            + "\n"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 on bad input (one line), 130 on Ctrl-C."""
    return run_console("domain_shift", lambda: _main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
