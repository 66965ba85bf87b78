"""``evict`` console script. Subcommand ``generate``: run the reference engine on the shipped pair.

Example::

    evict generate --prompt "def main(" --mode all --max-new-tokens 64

prints, per mode, the generated text, tokens/s, mean accepted length and mean verified width.
EVICT mode needs a cost table: ``--cost-table PATH`` (checked strictly against this machine), else
the shipped ``configs/testbed_cpu_cost_table.json`` when it was measured on this kind of machine,
else this machine's own table, measured once (seconds) and cached (see :mod:`evict.profiler.auto`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evict.boundary import BoundaryError, OneLineArgumentParser, check_input_file, run_console
from evict.paths import TESTBED_COST_TABLE

__all__ = ["main", "build_parser"]


class CliError(BoundaryError):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from evict.models.testbeds import testbed_choices  # noqa: PLC0415 (torch loads only when used)

    parser = OneLineArgumentParser(prog="evict", description="EVICT reference engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate", help="generate text with the shipped testbed pair (AR / static tree / EVICT)"
    )
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--mode", default="all", choices=["ar", "static", "evict", "all"])
    g.add_argument("--steps", type=int, default=4, help="EAGLE draft steps (speculative_num_steps)")
    g.add_argument("--topk", type=int, default=4, help="children per expanded node (speculative_eagle_topk)")
    g.add_argument(
        "--num-draft-tokens",
        type=int,
        default=16,
        help="static tree width N, root included; also EVICT's largest width",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--cost-table",
        default=None,
        help=f"cost table JSON, checked strictly (default: configs/{TESTBED_COST_TABLE} if it was measured "
        "on this kind of machine, else this machine's own table, measured once and cached)",
    )
    g.add_argument(
        "--allow-table-mismatch",
        action="store_true",
        help="use a cost table profiled for another model/device (warn instead of failing)",
    )
    g.add_argument(
        "--acceptance",
        default="raw",
        choices=["raw", "calibrated"],
        help="EVICT ranks draft nodes by raw drafter probabilities, or by probabilities calibrated online "
        "from past verification outcomes (evict.truncation.AcceptanceEstimator)",
    )
    g.add_argument(
        "--acceptance-prior",
        default=None,
        help="JSON prior to warm-start the calibrated estimator (evict-bench writes acceptance_prior.json)",
    )
    g.add_argument(
        "--decision",
        default="immediate",
        choices=["immediate", "lagged"],
        help="EVICT's width from this step's draft scores, or from the previous step's (no host sync)",
    )
    g.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "triton"],
        help="EVICT's decision code: the torch rule, or the Triton kernel (on CUDA; the rule elsewhere)",
    )
    g.add_argument(
        "--per-request",
        default="off",
        choices=["off", "on"],
        help="per-request widths inside the batch: a batch-wide budget of real draft nodes, padding (root "
        "token, never accepted) in the rest of the width; needs --decision immediate",
    )
    g.add_argument(
        "--pad-cost",
        type=float,
        default=None,
        help="cost of a padded verify slot relative to a real node, in [0, 1] (default: the cost table's "
        "metadata.padding_cost, else 1)",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument(
        "--testbed",
        default=None,
        metavar="NAME|DIR",
        help=f"testbed pair: {testbed_choices()}, or a folder with target/ and drafter/",
    )
    return parser


def _encode(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer.encode(text)
    ids = enc.ids if hasattr(enc, "ids") else enc
    return [int(i) for i in ids]


def _load_pair(device: str, dtype_name: str, testbed: str | None = None):
    import torch

    try:
        from evict.models import load_testbed
    except ImportError as exc:
        raise CliError(
            f"the testbed models are not available (evict.models.load_testbed: {exc}); "
            "this checkout lacks the reference models"
        ) from exc
    try:
        return load_testbed(dtype=getattr(torch, dtype_name), device=device, name=testbed)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc


def _model_dirs(testbed: str | None = None) -> tuple[Path, Path]:
    """Checkpoint folders of the loaded pair (target, drafter): what the cost table is checked
    against and what a zero-config measurement times."""
    from evict.models import testbed_dir

    try:
        root = testbed_dir(testbed)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    return root / "target", root / "drafter"


def _policy(args: argparse.Namespace):
    from evict.engine.pricing import engine_step_samples
    from evict.kernels import make_decider
    from evict.profiler.auto import AutoGrid, resolve_cost_table
    from evict.profiler.table import CostTableError, resolve_widths
    from evict.profiler.torch_backend import ProfileError
    from evict.truncation import TruncationPolicy

    target_dir, drafter_dir = _model_dirs(args.testbed)
    try:
        choice = resolve_cost_table(
            step_sampler=engine_step_samples,
            explicit=args.cost_table,
            model_dir=target_dir,
            drafter_dir=drafter_dir if (drafter_dir / "config.json").is_file() else None,
            device=args.device,
            dtype=args.dtype,
            allow_mismatch=args.allow_table_mismatch,
            grid=AutoGrid.covering((1,), max_width=args.num_draft_tokens, draft_tree=(args.steps, args.topk)),
            log=lambda line: print(f"[evict] {line}"),
        )
        widths = resolve_widths(args.num_draft_tokens, table_widths=choice.table.widths)
    except (CostTableError, ProfileError) as exc:
        raise CliError(str(exc)) from exc
    pad_cost = args.pad_cost
    if pad_cost is None:
        pad_cost = float((getattr(choice.table, "metadata", None) or {}).get("padding_cost", 1.0))
    policy = TruncationPolicy(
        choice.table,
        widths=widths,
        decision=args.decision,
        decider=make_decider(args.backend),
        per_request=args.per_request == "on",
        pad_cost=pad_cost,
    )
    return policy, choice.path


def _estimator(args: argparse.Namespace):
    """The acceptance estimator for ``--acceptance calibrated`` (warm from ``--acceptance-prior``), else None."""
    if args.acceptance != "calibrated":
        return None
    from evict.truncation import AcceptanceEstimator

    est = AcceptanceEstimator(args.topk, args.steps, device=args.device)
    if args.acceptance_prior:
        try:
            est.load(args.acceptance_prior)
        except (ValueError, OSError) as exc:  # JSONDecodeError is a ValueError
            raise CliError(f"--acceptance-prior {args.acceptance_prior}: {exc}") from exc
        print(f"[evict] acceptance: calibrated, warm start from {args.acceptance_prior}")
    else:
        print("[evict] acceptance: calibrated, cold start (raw scores until outcomes arrive)")
    return est


def _max_positions(testbed: str | None = None) -> int | None:
    """The target's ``max_position_embeddings`` from its config.json (no model load), if known."""
    import json

    try:
        cfg = json.loads((_model_dirs(testbed)[0] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError, CliError):
        return None
    v = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return v if isinstance(v, int) and v > 0 else None


def _validate(args: argparse.Namespace) -> None:
    """Every argument and file checked before the models load (a bad value used to surface after)."""
    import math

    if not args.prompt:
        raise CliError("--prompt is empty; give the text to continue")
    for flag, v in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--steps", args.steps),
        ("--topk", args.topk),
    ):
        if v < 1:
            raise CliError(f"{flag} must be >= 1, got {v}")
    k = args.topk + (args.steps - 1) * args.topk * args.topk  # draft candidates of the tree, root excluded
    if args.mode != "ar" and not 1 <= args.num_draft_tokens <= k + 1:
        raise CliError(
            f"--num-draft-tokens {args.num_draft_tokens} is outside 1..{k + 1}, the tokens (root included) "
            f"that --steps {args.steps} --topk {args.topk} can draft; lower it or grow the tree"
        )
    if args.mode in ("evict", "all") and args.num_draft_tokens < 2:
        raise CliError("EVICT cuts a draft tree of at least 2 tokens; give --num-draft-tokens >= 2")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CliError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.cost_table is not None:
        check_input_file(Path(args.cost_table), "--cost-table", "cost table JSON", "evict-profile --out FILE")
    if args.pad_cost is not None and not (math.isfinite(args.pad_cost) and 0.0 <= args.pad_cost <= 1.0):
        raise CliError(f"--pad-cost must be in [0, 1], got {args.pad_cost}")
    if args.per_request == "on" and args.decision == "lagged":
        raise CliError("--per-request on needs --decision immediate (the budget uses this step's scores)")
    if args.acceptance_prior:
        if args.acceptance != "calibrated":
            raise CliError("--acceptance-prior needs --acceptance calibrated")
        check_input_file(Path(args.acceptance_prior), "--acceptance-prior", "acceptance prior JSON")
    dev = str(args.device)
    if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:")):
        raise CliError(f"--device {dev!r} is not supported; use cpu or cuda[:N]")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {dev}: torch sees no CUDA device; use --device cpu")
    limit = _max_positions(args.testbed)
    if limit is not None and args.max_new_tokens + args.num_draft_tokens >= limit:
        raise CliError(
            f"--max-new-tokens {args.max_new_tokens} plus a draft tree of {args.num_draft_tokens} tokens "
            f"exceeds the target's {limit} positions; lower --max-new-tokens"
        )


def _generate(args: argparse.Namespace) -> int:
    _validate(args)
    from evict.engine import SpecEngine

    target, drafter, tokenizer = _load_pair(args.device, args.dtype, args.testbed)
    prompt = _encode(tokenizer, args.prompt)
    if not prompt:
        raise CliError("the prompt encodes to no tokens; give a non-empty --prompt")
    limit = _max_positions(args.testbed)
    if limit is not None and len(prompt) + args.max_new_tokens + args.num_draft_tokens > limit:
        raise CliError(
            f"the prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} + a draft tree of "
            f"{args.num_draft_tokens} tokens exceed the target's {limit} positions; shorten the prompt "
            "or lower --max-new-tokens"
        )
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_token_id", None)
    modes = ["ar", "static", "evict"] if args.mode == "all" else [args.mode]
    evict_policy = None
    if "evict" in modes:  # fail before spending time on the other modes
        evict_policy, table_path = _policy(args)
        print(
            f"[evict] cost table: {table_path} (decision={evict_policy.decision}, backend={evict_policy.backend})"
        )
    outputs: dict[str, list[int]] = {}
    estimator = _estimator(args) if "evict" in modes else None
    for mode in modes:
        policy = evict_policy if mode == "evict" else None
        try:
            engine = SpecEngine(
                target,
                drafter,
                mode=mode,
                steps=args.steps,
                topk=args.topk,
                num_draft_tokens=args.num_draft_tokens,
                policy=policy,
                acceptance=estimator if mode == "evict" else None,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                eos_token_id=eos,
            )
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        try:
            res = engine.generate([prompt], args.max_new_tokens)
        except ValueError as exc:  # the engine's own input checks (e.g. token ids the model lacks)
            raise CliError(str(exc)) from exc
        toks = res.tokens[0]
        outputs[mode] = toks
        decode_s = res.wall_s - res.prefill_s
        print(f"=== mode {mode} ===")
        print(args.prompt + tokenizer.decode(toks))
        print(
            f"[{mode}] {len(toks)} tokens in {res.wall_s:.3f} s: {res.tokens_per_s:.1f} tokens/s "
            f"(decode {len(toks) / decode_s if decode_s > 0 else float('nan'):.1f} tokens/s); "
            f"mean accepted length {res.mean_accepted_length:.2f}; mean verified width {res.mean_width:.2f}; "
            f"{len(res.steps)} steps"
        )
    if len(outputs) > 1 and args.temperature == 0.0:
        same = len({tuple(v) for v in outputs.values()}) == 1
        print(f"greedy outputs identical across modes: {same}")
        if not same:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0, 1 when greedy modes disagree, 2 on bad input (one line), 130 on Ctrl-C."""

    def run() -> int:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            return _generate(args)
        return 2  # pragma: no cover - argparse enforces the subcommand

    return run_console("evict", run)


if __name__ == "__main__":
    sys.exit(main())
