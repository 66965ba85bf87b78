"""``evict`` console script. Subcommand ``generate``: run the reference engine on the shipped pair.

Example::

    evict generate --prompt "def main(" --mode all --max-new-tokens 64

prints, per mode, the generated text, tokens/s, mean accepted length and mean verified width.
EVICT mode needs a cost table: ``--cost-table PATH``, else the shipped
``configs/testbed_cpu_cost_table.json`` (made with ``evict-profile``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evict.paths import TESTBED_COST_TABLE, shipped_config

__all__ = ["main", "build_parser", "default_cost_table"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def default_cost_table() -> Path | None:
    """The shipped testbed cost table, if this install has it."""
    return shipped_config(TESTBED_COST_TABLE)


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
        "--cost-table", default=None, help=f"cost table JSON (default: configs/{TESTBED_COST_TABLE})"
    )
    g.add_argument(
        "--allow-table-mismatch",
        action="store_true",
        help="use a cost table profiled for another model/device (warn instead of failing)",
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
        from evict.engine.models import load_testbed
    except ImportError as exc:
        raise CliError(
            f"the testbed models are not available (evict.engine.models.load_testbed: {exc}); "
            "this checkout lacks the reference models"
        ) from exc
    try:
        return load_testbed(dtype=getattr(torch, dtype_name), device=device)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from exc


def _model_config(target: Any) -> Any:
    """The config to hash for the cost-table check: the testbed's config.json when it is the model.

    The profiler hashes the checkpoint's config.json; transformers 5 renames some fields in
    ``config.to_dict()`` (``num_experts`` -> ``num_local_experts``), so hashing the loaded config
    object would not match a table made from the same checkpoint.
    """
    import json

    try:
        from evict.engine.models import TESTBED_DIR
    except ImportError:
        return target.config
    path = TESTBED_DIR / "target" / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        keys = ("hidden_size", "num_hidden_layers", "vocab_size")
        if all(cfg.get(k) == getattr(target.config, k, None) for k in keys):
            return cfg
    return target.config


def _policy(args: argparse.Namespace, target: Any):
    from evict.profiler.table import CostTable, CostTableError, model_config_hash
    from evict.truncation import TruncationPolicy

    path = Path(args.cost_table) if args.cost_table else default_cost_table()
    if path is None:
        raise CliError(
            f"EVICT mode needs a cost table and configs/{TESTBED_COST_TABLE} is not shipped here; "
            "make one with `evict-profile` (see docs) and pass --cost-table PATH"
        )
    if not path.is_file():
        raise CliError(f"cost table {path} does not exist; make one with `evict-profile` or fix --cost-table")
    try:
        table = CostTable.load(path)
        # tables without a config hash (hand-made) cannot be checked against the model
        has_hash = bool(table.metadata.get("model_config_hash"))
        table.check_compatible(
            config_hash=model_config_hash(_model_config(target)) if has_hash else None,
            allow_mismatch=args.allow_table_mismatch,
        )
    except CostTableError as exc:
        raise CliError(str(exc)) from exc
    widths = [w for w in table.widths if w <= args.num_draft_tokens]
    if args.num_draft_tokens not in widths:
        widths.append(args.num_draft_tokens)  # the full static tree is always an option
    policy = TruncationPolicy(table, widths=sorted(widths), mode=args.decision, backend=args.backend)
    return policy, path


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
        evict_policy, table_path = _policy(args, target)
        print(
            f"[evict] cost table: {table_path} (decision={evict_policy.mode}, backend={evict_policy.backend})"
        )
    outputs: dict[str, list[int]] = {}
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
