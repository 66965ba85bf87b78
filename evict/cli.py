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

from evict.paths import TESTBED_COST_TABLE

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evict", description="EVICT reference engine tools")
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
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    return parser


def _encode(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer.encode(text)
    ids = enc.ids if hasattr(enc, "ids") else enc
    return [int(i) for i in ids]


def _load_pair(device: str, dtype_name: str):
    import torch

    try:
        from evict.models import load_testbed
    except ImportError as exc:
        raise CliError(
            f"the testbed models are not available (evict.models.load_testbed: {exc}); "
            "this checkout lacks the reference models"
        ) from exc
    try:
        return load_testbed(dtype=getattr(torch, dtype_name), device=device)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from exc


def _model_dirs() -> tuple[Path, Path]:
    """Checkpoint folders of the loaded pair (target, drafter): what the cost table is checked
    against and what a zero-config measurement times."""
    from evict.models import TESTBED_DIR

    return Path(TESTBED_DIR) / "target", Path(TESTBED_DIR) / "drafter"


def _policy(args: argparse.Namespace):
    from evict.profiler.auto import AutoGrid, resolve_cost_table
    from evict.profiler.table import CostTableError, resolve_widths
    from evict.profiler.torch_backend import ProfileError
    from evict.truncation import TruncationPolicy

    target_dir, drafter_dir = _model_dirs()
    try:
        choice = resolve_cost_table(
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
    policy = TruncationPolicy(choice.table, widths=widths, mode=args.decision, backend=args.backend)
    return policy, choice.path


def _estimator(args: argparse.Namespace):
    """The acceptance estimator for ``--acceptance calibrated`` (warm from ``--acceptance-prior``), else None."""
    if args.acceptance != "calibrated":
        if args.acceptance_prior:
            raise CliError("--acceptance-prior needs --acceptance calibrated")
        return None
    from evict.truncation import AcceptanceEstimator

    est = AcceptanceEstimator(args.topk, args.steps, device=args.device)
    if args.acceptance_prior:
        try:
            est.load(args.acceptance_prior)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        print(f"[evict] acceptance: calibrated, warm start from {args.acceptance_prior}")
    else:
        print("[evict] acceptance: calibrated, cold start (raw scores until outcomes arrive)")
    return est


def _generate(args: argparse.Namespace) -> int:
    from evict.engine import SpecEngine

    target, drafter, tokenizer = _load_pair(args.device, args.dtype)
    prompt = _encode(tokenizer, args.prompt)
    if not prompt:
        raise CliError("the prompt encodes to no tokens; give a non-empty --prompt")
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_token_id", None)
    modes = ["ar", "static", "evict"] if args.mode == "all" else [args.mode]
    evict_policy = None
    if "evict" in modes:  # fail before spending time on the other modes
        evict_policy, table_path = _policy(args)
        print(
            f"[evict] cost table: {table_path} (decision={evict_policy.mode}, backend={evict_policy.backend})"
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
        res = engine.generate([prompt], args.max_new_tokens)
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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except CliError as exc:
        print(f"evict: error: {exc}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse enforces the subcommand


if __name__ == "__main__":
    sys.exit(main())
