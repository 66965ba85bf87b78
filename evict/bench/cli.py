"""``evict-bench``: autoregressive vs static EAGLE-3 trees vs EVICT on the shipped testbed pair.

Examples::

    evict-bench --quick                     # < 3 min on CPU: bs 1 and 4, few prompts, one seed
    evict-bench                             # full run: bs 1, 4, 16, 3 seeds, sweep, ablations
    evict-bench --moe-spec-budget 8         # also the LOSSY MoE-Spec peer with 8 experts per layer

Exit status: 0 on success, 3 when the lossless check fails (a lossless mode's greedy output differs
from autoregressive decoding), 2 on bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from evict.boundary import (
    BoundaryError,
    OneLineArgumentParser,
    check_input_file,
    check_output_dir,
    check_unique,
    run_console,
    write_folder_atomically,
)
from evict.kernels import BACKENDS
from evict.machine import cpu_model
from evict.models.testbeds import DEFAULT_TESTBED, testbed_choices, testbed_dir
from evict.paths import PACKAGE_DIR
from evict.truncation import USER_DECISIONS

from .modes import (
    SGLANG_LLAMA_DEFAULT,
    SGLANG_QWEN3_MOE_DEFAULT,
    ModeSpec,
    num_candidates,
    parse_tree,
    static_mode,
    sweep_grid,
)
from .prompts import build_ood_prompts, build_prompts
from .runner import Bench, BenchData, ablation_names
from .stats import LosslessError, check_lossless

__all__ = ["main", "build_parser", "build_modes", "run_bench"]


REPO = PACKAGE_DIR.parent  # the checkout (or site-packages): report paths relative to it
EXIT_LOSSLESS = 3
EXIT_BAD_INPUT = 2


def _tree_arg(text: str) -> tuple[int, int, int]:
    """argparse type for 'steps,topk,N' that shows the reason of a bad tree."""
    try:
        return parse_tree(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="evict-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small run (< 3 min on CPU): bs 1,4, 4 prompts, 1 seed"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 4 16 (quick: 1 4)")
    p.add_argument("--seeds", type=int, nargs="+", help="repeats; default 0 1 2 (quick: 0)")
    p.add_argument("--num-prompts", type=int, help="prompts per domain (code, prose); default 8 (quick: 2)")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt; default 64 (quick: 48)")
    p.add_argument("--max-new-tokens", type=int, help="default 64 (quick: 32)")
    p.add_argument(
        "--cost-table",
        type=Path,
        help="EVICT's cost table, checked strictly against this machine (default: the shipped testbed "
        "table if it was measured on this kind of machine, else this machine's own, measured once and cached)",
    )
    p.add_argument(
        "--extra-cost-table",
        type=Path,
        action="append",
        default=[],
        help="another device's table for the mismatch ablation (repeatable; default: tables of the "
        "same model and another device next to --cost-table)",
    )
    p.add_argument(
        "--allow-table-mismatch", action="store_true", help="use a table profiled for another setup"
    )
    p.add_argument(
        "--evict-tree",
        type=_tree_arg,
        default=None,
        help="EVICT's draft tree 'steps,topk,N' (default: the tree the cost table's fixed_ms profiled, else 5,4,32)",
    )
    p.add_argument(
        "--static-trees",
        type=_tree_arg,
        nargs="+",
        default=None,
        help="static trees besides the chain and SGLang's default (default: 5,4,8 6,8,32)",
    )
    p.add_argument(
        "--chain-steps",
        type=int,
        default=None,
        help="length of the static chain baseline (default 5; quick: 3, i.e. SGLang's default chain only)",
    )
    p.add_argument(
        "--no-sweep", action="store_true", help="skip the static sweep (best static = best listed)"
    )
    p.add_argument(
        "--sweep-grid",
        choices=["quick", "full"],
        default=None,
        help="static configurations the sweep tries (default: full; quick with --quick)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=0,
        help="at most this many prompt batches per batch size (0 = all prompts at every batch size)",
    )
    p.add_argument("--no-ablation", action="store_true", help="skip the profile-mismatch ablation")
    p.add_argument(
        "--moe-spec-budget",
        type=int,
        default=0,
        metavar="B",
        help="add the LOSSY MoE-Spec peer keeping B experts per layer during verification (off by default)",
    )
    p.add_argument(
        "--moe-spec-tree",
        type=_tree_arg,
        default=None,
        help="the MoE-Spec peer's static tree (default: EVICT's)",
    )
    p.add_argument(
        "--testbed",
        default=None,
        metavar="NAME|DIR",
        help=f"testbed pair: {testbed_choices()}, or a folder with target/ and drafter/",
    )
    p.add_argument(
        "--decision",
        choices=list(USER_DECISIONS),
        default="immediate",
        help="EVICT's width from this step's draft scores (immediate) or the previous step's (lagged)",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="torch",
        help="EVICT's decision code: the torch rule, or the Triton kernel (on CUDA; the rule elsewhere)",
    )
    p.add_argument(
        "--acceptance",
        choices=["raw", "calibrated", "both"],
        default="both",
        help="EVICT's node scores: raw drafter probabilities, calibrated by the online acceptance "
        "estimator, or both side by side (default; the calibrated row is 'evict+cal')",
    )
    p.add_argument(
        "--acceptance-prior",
        type=Path,
        default=None,
        help="warm-start the acceptance estimator from this JSON prior (a bench run writes acceptance_prior.json)",
    )
    p.add_argument(
        "--no-oracle", action="store_true", help="skip the oracle-cut row (the ceiling of any cut)"
    )
    p.add_argument(
        "--no-whole-step",
        action="store_true",
        help="skip the 'evict-step' row (EVICT deciding depth, chain or tree, and width; needs a table "
        "with per-depth drafting costs)",
    )
    p.add_argument(
        "--no-adaptive",
        action="store_true",
        help="skip the 'sglang-adaptive' row (SGLang's --speculative-adaptive controller, read from the "
        "installed sglang; skipped with a note when sglang is not installed)",
    )
    p.add_argument(
        "--per-request",
        choices=["off", "on", "both"],
        default="off",
        help="per-request widths inside a batch (a batch-wide budget of real nodes, padding in the rest of "
        "the width): off (default), on (EVICT's rows use them) or both (adds '+pr' rows next to EVICT's)",
    )
    p.add_argument(
        "--pad-cost",
        type=float,
        default=None,
        help="cost of a padded verify slot relative to a real node, in [0, 1], for per-request widths "
        "(default: the cost table's metadata.padding_cost, else 1 = padding costs a token)",
    )
    p.add_argument(
        "--modeled-gpu-table",
        type=Path,
        default=None,
        help="a modeled GPU cost table (e.g. configs/modeled_h100_qwen3_30b_a3b_cost_table.json): adds a "
        "MODELED column charging every step from it, and '@gpu' EVICT rows deciding from it",
    )
    p.add_argument(
        "--ood-prompts",
        type=int,
        default=None,
        help="out-of-domain prompts per domain from installed third-party packages, next to the held-out "
        "stdlib ones (default: as many as --num-prompts; 0 = none)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time generate calls by wall clock (default) or by this process's CPU time (robust to other "
        "tenants on a shared machine; use with --threads 1 and OMP_NUM_THREADS=1)",
    )
    p.add_argument(
        "--nice", type=int, default=0, help="raise the process niceness by this much (shared machines)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.md/json and PNGs (default runs/bench, or runs/bench-quick with --quick)",
    )
    p.add_argument("--note", default="", help="a note for the report, e.g. that the machine was shared")
    return p


def _default(value: Any, default: Any) -> Any:
    """``default`` only when the option was not given: an explicit 0 is checked, never replaced."""
    return default if value is None else value


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    args.batch_sizes = _default(args.batch_sizes, [1, 4] if q else [1, 4, 16])
    args.seeds = _default(args.seeds, [0] if q else [0, 1, 2])
    args.num_prompts = _default(args.num_prompts, 2 if q else 8)
    args.ood_prompts = args.num_prompts if args.ood_prompts is None else args.ood_prompts
    if args.ood_prompts < 0:
        raise ValueError("--ood-prompts must be >= 0")
    args.prompt_tokens = _default(args.prompt_tokens, 48 if q else 64)
    args.max_new_tokens = _default(args.max_new_tokens, 32 if q else 64)
    args.chain_steps = _default(args.chain_steps, 3 if q else 5)
    if args.chain_steps < 1:
        raise ValueError("--chain-steps must be >= 1")
    if args.prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    if args.static_trees is None:
        args.static_trees = [SGLANG_LLAMA_DEFAULT] if q else [SGLANG_LLAMA_DEFAULT, (6, 8, 32)]
    for name in ("batch_sizes", "seeds"):
        if not getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} needs at least one value")
    if min(args.batch_sizes) < 1 or args.num_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError(
            f"batch sizes, --num-prompts and --max-new-tokens must be >= 1, got {args.batch_sizes}, "
            f"{args.num_prompts}, {args.max_new_tokens}"
        )
    # a repeated seed would merge two repeats into one measurement but report two; a repeated
    # batch size would run (and report) the same rows twice
    check_unique(args.seeds, "--seeds")
    check_unique(args.batch_sizes, "--batch-sizes")
    n = 2 * args.num_prompts + 2 * args.ood_prompts
    if max(args.batch_sizes) > n:
        raise ValueError(
            f"batch size {max(args.batch_sizes)} needs at least that many prompts but there are {n} "
            f"(2 domains x (--num-prompts {args.num_prompts} + --ood-prompts {args.ood_prompts})); "
            "raise --num-prompts"
        )
    if args.max_batches < 0:
        raise ValueError("--max-batches must be >= 0 (0 = all prompt batches)")
    if args.moe_spec_budget < 0:
        raise ValueError("--moe-spec-budget must be >= 1 experts (0 = off)")
    if args.moe_spec_tree is not None and not args.moe_spec_budget:
        raise ValueError("--moe-spec-tree has no effect without --moe-spec-budget B; add it or drop the tree")
    if args.no_sweep and args.sweep_grid is not None:
        raise ValueError("--sweep-grid and --no-sweep contradict each other; drop one")
    if args.pad_cost is not None and not 0.0 <= args.pad_cost <= 1.0:
        raise ValueError(f"--pad-cost must be in [0, 1], got {args.pad_cost}")
    if args.per_request != "off" and args.decision == "lagged":
        raise ValueError("--per-request needs --decision immediate (the budget uses this step's scores)")
    if args.acceptance_prior is not None and args.acceptance == "raw":
        raise ValueError(
            "--acceptance-prior warms the calibrated estimator; use --acceptance calibrated or both"
        )
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.nice < 0:
        raise ValueError(f"--nice {args.nice}: lowering the niceness needs root; give 0 or more")
    if args.out is None:  # never overwrite the committed docs/results by accident
        args.out = Path("runs/bench-quick" if args.quick else "runs/bench")
    return args


def _check_inputs(args: argparse.Namespace) -> None:
    """Every file and limit checked before the models load (a bad --out used to fail after the run)."""
    check_output_dir(args.out, "--out", "results.json")
    if args.cost_table is not None:
        check_input_file(args.cost_table, "--cost-table", "cost table JSON", "evict-profile --out FILE")
    for p in args.extra_cost_table:
        check_input_file(p, "--extra-cost-table", "cost table JSON", "evict-profile --out FILE")
    if args.acceptance_prior is not None:
        check_input_file(args.acceptance_prior, "--acceptance-prior", "acceptance prior JSON")
        try:  # read when the calibrated engine is built, mid-run: a broken file must fail now
            prior = json.loads(args.acceptance_prior.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BoundaryError(
                f"--acceptance-prior {args.acceptance_prior} is not valid JSON ({exc})"
            ) from None
        if not isinstance(prior, dict):
            raise BoundaryError(
                f"--acceptance-prior {args.acceptance_prior} is not an acceptance prior (a JSON object written "
                "by evict-bench as acceptance_prior.json)"
            )
    device = str(args.device)
    if not (device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:")):
        raise BoundaryError(f"--device {device!r} is not supported; use cpu, cuda[:N] or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BoundaryError(f"--device {device}: torch sees no CUDA device; use --device cpu (or auto)")
    try:
        tb = testbed_dir(args.testbed)
    except (ValueError, FileNotFoundError) as exc:
        raise BoundaryError(f"--testbed: {exc}") from None
    try:
        cfg = json.loads((tb / "target" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BoundaryError(f"--testbed {tb}: target/config.json is not valid JSON ({exc})") from None
    max_pos = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    trees = [t for t in (args.evict_tree, args.moe_spec_tree, *args.static_trees) if t]
    widest = max([t[2] for t in trees] + [num_candidates(5, 4) + 1])
    need = args.prompt_tokens + args.max_new_tokens + widest
    if isinstance(max_pos, int) and need > max_pos:
        raise BoundaryError(
            f"--prompt-tokens {args.prompt_tokens} + --max-new-tokens {args.max_new_tokens} + a draft tree of "
            f"{widest} tokens = {need} positions, beyond the target's max_position_embeddings {max_pos}; "
            "lower --max-new-tokens or --prompt-tokens"
        )


def build_modes(
    args: argparse.Namespace,
    best_static: tuple[int, int, int] | None,
    with_ablation: list[str],
    with_evict: bool = True,
) -> list[ModeSpec]:
    """The modes of one batch size, in report order."""
    modes = [ModeSpec(name="ar", kind="ar", role="baseline")]
    seen: dict[tuple[int, int, int], int] = {}

    def add_static(tree: tuple[int, int, int], role: str, name: str | None = None) -> None:
        if tree in seen:
            m = modes[seen[tree]]
            if role in ("best-static", "sglang-default") and m.role in ("static", "chain"):
                modes[seen[tree]] = replace(m, role=role)
            return
        seen[tree] = len(modes)
        modes.append(static_mode(tree, role, name))

    c = args.chain_steps
    add_static(SGLANG_QWEN3_MOE_DEFAULT, "sglang-default")
    add_static((c, 1, c + 1), "chain", f"chain({c})" if (c, 1, c + 1) != SGLANG_QWEN3_MOE_DEFAULT else None)
    for t in args.static_trees:
        add_static(tuple(t), "static")
    add_static(tuple(args.evict_tree), "evict-off", f"static{tuple(args.evict_tree)}".replace(" ", ""))
    if best_static is not None:
        add_static(best_static, "best-static")
    s, k, n = args.evict_tree
    acceptance = getattr(args, "acceptance", "raw")
    if with_evict:
        main = "calibrated" if acceptance == "calibrated" else "raw"
        modes.append(
            ModeSpec(name="evict", kind="evict", steps=s, topk=k, num_draft=n, role="evict", acceptance=main)
        )
        if acceptance == "both":
            modes.append(
                ModeSpec(
                    name="evict+cal",
                    kind="evict",
                    steps=s,
                    topk=k,
                    num_draft=n,
                    role="evict-cal",
                    acceptance="calibrated",
                )
            )
    if with_evict and getattr(args, "whole_step", False):
        modes.append(
            ModeSpec(
                name="evict-step",
                kind="evict",
                steps=s,
                topk=k,
                num_draft=n,
                role="evict-step",
                acceptance="calibrated" if acceptance in ("calibrated", "both") else "raw",
                whole_step=True,
            )
        )
    if getattr(args, "adaptive_steps", None):
        top = max(args.adaptive_steps)
        modes.append(
            ModeSpec(
                name="sglang-adaptive",
                kind="adaptive",
                steps=top,
                topk=1,
                num_draft=top + 1,
                role="sglang-adaptive",
            )
        )
    per_request = getattr(args, "per_request", "off")
    if with_evict and per_request == "on":
        modes = [replace(m, per_request=True) if m.kind == "evict" else m for m in modes]
    base = [m for m in modes if m.kind == "evict"]
    if with_evict and per_request == "both":
        role = {"evict": "evict-pr", "evict-cal": "evict-cal-pr"}
        modes += [replace(m, name=m.name + "+pr", per_request=True, role=role[m.role]) for m in base]
        base = [m for m in modes if m.kind == "evict"]
    if with_evict and getattr(args, "modeled_gpu_table", None) is not None:
        modes += [replace(m, name=m.name + "@gpu", cost="modeled", role="evict-gpu") for m in base]
    if not getattr(args, "no_oracle", True):
        modes.append(ModeSpec(name="oracle-cut", kind="oracle", steps=s, topk=k, num_draft=n, role="oracle"))
    for a in with_ablation if with_evict else []:
        kind, _, arg = a.partition(":")
        variant = {"decision": arg} if kind == "decision" else {"cost": a}
        modes.append(
            ModeSpec(
                name=f"evict[{a}]", kind="evict", steps=s, topk=k, num_draft=n, role="ablation", **variant
            )
        )
    if args.moe_spec_budget:
        t = args.moe_spec_tree or tuple(args.evict_tree)
        modes.append(
            ModeSpec(
                name=f"moe-spec(B={args.moe_spec_budget})",
                kind="moe-spec",
                steps=t[0],
                topk=t[1],
                num_draft=t[2],
                budget=args.moe_spec_budget,
                role="lossy",
            )
        )
    return modes


def machine_description(device: str) -> str:
    """CPU model, cores, torch version (and GPU name) in one line."""
    desc = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc + f", device {device}"


def _engine_factory(target: Any, drafter: Any, device: str, acceptance_prior: Path | None = None):
    """Build reference engines (``evict.engine.SpecEngine``) for the modes.

    A calibrated EVICT mode gets its own ``AcceptanceEstimator`` (cold, or warm from
    ``acceptance_prior``); the engine is cached by the bench, so the estimator keeps learning over
    the whole run, prompts and batch sizes in the order they are decoded, as a server's would.
    """
    from evict.engine import SpecEngine  # noqa: PLC0415 (heavy; only for real runs)
    from evict.truncation import AcceptanceEstimator  # noqa: PLC0415

    def factory(mode: ModeSpec, policy: Any) -> Any:
        kind = "static" if mode.kind in ("moe-spec", "adaptive") else mode.kind
        kw: dict[str, Any] = {}
        if kind != "ar":
            kw.update(steps=mode.steps, topk=mode.topk, num_draft_tokens=mode.num_draft)
        if kind == "evict" and mode.acceptance == "calibrated":
            est = AcceptanceEstimator(mode.topk, mode.steps, device=device)
            if acceptance_prior is not None:
                est.load(acceptance_prior)
            kw["acceptance"] = est
        if mode.whole_step:
            kw["depth"] = whole_step_controller(
                policy, mode.steps, mode.topk, measured=mode.cost != "modeled"
            )
        if mode.kind == "adaptive":
            kw["adaptive"] = sglang_adaptive_params()
        return SpecEngine(target, drafter, mode=kind, policy=policy, **kw)

    return factory


def whole_step_controller(policy: Any, steps: int, topk: int, *, measured: bool = True) -> Any:
    """EVICT's whole-step decision for the bench: plain decoding, the tree's depths 1..steps and, when
    the table prices it, a chain (topk 1) of up to ``steps``, priced by the policy's table.

    ``measured=False`` (the modeled-GPU modes): prices are not corrected by this machine's step
    times, which time the CPU, not the modeled GPU (the correction would price every shape at its
    CPU / GPU ratio)."""
    from evict.truncation.depth import DepthController, shape_grid  # noqa: PLC0415

    families = {topk: steps}
    if topk != 1 and policy.draft_shapes.get(1, 0) >= 1:
        families[1] = min(steps, policy.draft_shapes[1])
    shapes = shape_grid(families)
    corrected = {} if measured else {"cost_window": 0}
    return DepthController(
        shapes, policy.widths.tolist(), lambda bs: policy.shape_costs(bs, shapes), **corrected
    )


def sglang_adaptive_params() -> Any:
    """SGLang 0.5.23's own adaptive-steps controller with its default configuration
    (``sglang/srt/speculative/adaptive_spec_params.py``: ``AdaptiveSpeculativeParams``, candidate
    steps [1, 3, 5, 7] at bs 1, [0, 1, 3] at bs 8, [0, 1] at bs 32, [0] at bs 64), started at 3 steps
    like its default chain. Imported from the installed package, not copied."""
    from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams  # noqa: PLC0415

    return AdaptiveSpeculativeParams(initial_steps=3)


def sglang_adaptive_steps() -> list[int] | None:
    """Every chain length SGLang's adaptive controller may pick (None when sglang is not installed)."""
    try:
        from sglang.srt.speculative.adaptive_spec_params import (  # noqa: PLC0415
            resolve_candidate_steps_from_config,
        )
    except Exception:  # not installed, or its import fails on this machine: the row is skipped
        return None
    return list(resolve_candidate_steps_from_config(None))


def evict_tree_for(table: Any, fallback: tuple[int, int] = (5, 4)) -> tuple[int, int, int]:
    """EVICT's draft tree: the (steps, topk) whose drafting cost the table's ``fixed_ms`` measured.

    The table records that shape as ``metadata.draft_steps`` / ``draft_topk`` (``evict-profile
    --draft-model`` and the zero-config measurement write them); without them ``fallback``. N is the
    whole tree, capped at the table's largest width so that every width EVICT may pick was measured.
    """
    shape = getattr(table, "draft_tree", None) if table is not None else None
    steps, topk = shape or fallback
    n = num_candidates(steps, topk) + 1
    if table is not None:
        n = min(n, max(table.widths))
    if topk == 1:
        n = min(n, steps + 1)
    return steps, topk, max(n, 2)


def run_bench(
    args: argparse.Namespace, bench: Bench, tokenizer: Any, log=print
) -> tuple[BenchData, str | None]:
    """Sweep, instrumented pass, timed seeds and the lossless check. Returns (data, lossless error)."""
    t_start = time.time()
    if args.evict_tree is None:
        args.evict_tree = evict_tree_for(bench.table)
        log(f"EVICT draft tree (steps, topk, N) = {args.evict_tree}")
    priced = dict(getattr(bench.table, "draft_shapes", None) or {}) if bench.table is not None else {}
    args.whole_step = (
        not getattr(args, "no_whole_step", True) and priced.get(args.evict_tree[1], 0) >= args.evict_tree[0]
    )
    if not getattr(args, "no_whole_step", True) and not args.whole_step and bench.table is not None:
        log(
            "no evict-step row: the cost table does not price drafting per depth for EVICT's tree "
            "(draft_ms); measure one with evict-profile --draft-model, or drop --cost-table"
        )
    args.adaptive_steps = None if getattr(args, "no_adaptive", True) else sglang_adaptive_steps()
    if not getattr(args, "no_adaptive", True) and args.adaptive_steps is None:
        log("no sglang-adaptive row: sglang 0.5.23 is not importable here (pip install -e '.[sglang]')")
    prompts = build_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    ood = getattr(args, "ood_prompts", 0)
    if ood:
        try:
            prompts += build_ood_prompts(tokenizer, ood, args.prompt_tokens)
        except RuntimeError as exc:
            log(f"no out-of-domain prompts: {exc}")
            ood = 0
    prompt_ids = [list(p.ids) for p in prompts]
    data = BenchData()
    data.meta.update(
        testbed=str(getattr(args, "testbed", None) or DEFAULT_TESTBED),
        num_prompts=len(prompts),
        domains=f"{args.num_prompts} code + {args.num_prompts} prose"
        + (f" held-out stdlib, {ood} code + {ood} prose out-of-domain (third-party packages)" if ood else ""),
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        seeds=list(args.seeds),
        python=platform.python_version(),
        prompt_sources=[f"{p.domain}:{p.source}" for p in prompts],
        prompt_domains=[p.domain for p in prompts],
        max_batches=args.max_batches or None,
    )
    ablations = (
        [] if args.no_ablation or bench.table is None else ablation_names(bench.table, bench.other_tables)
    )
    if args.quick and ablations:
        ablations = ["shifted:+"]
    elif ablations:  # what deciding from the other step's scores costs or saves, on this machine
        ablations.append(f"decision:{next(d for d in USER_DECISIONS if d != args.decision)}")
    calib = None
    if not args.no_sweep:
        n_cal = 2 if args.quick else 4
        calib = [
            list(p.ids) for p in build_prompts(tokenizer, n_cal, args.prompt_tokens, skip=args.num_prompts)
        ]
    for bs in args.batch_sizes:
        best = None
        if calib is not None:
            cal = calib * max(1, -(-bs // len(calib)))  # repeat calibration prompts to fill a batch
            cal = cal[: max(bs, len(calib))]
            cal = cal[: (len(cal) // bs) * bs]
            t0 = time.time()
            grid = sweep_grid((args.sweep_grid or ("quick" if args.quick else "full")) == "quick")
            res = bench.sweep(grid, cal, bs, max(8, args.max_new_tokens // 2))
            data.sweep[bs] = res
            best = res[0][0]
            log(
                f"[bs {bs}] sweep of {len(res)} static trees in {time.time() - t0:.0f}s: best {best} {res[0][1]:.1f} tok/s"
            )
        data.modes[bs] = build_modes(args, best, ablations, with_evict=bench.table is not None)
    for bs in args.batch_sizes:  # untimed instrumented pass = warm-up, expert counts, outputs
        t0 = time.time()
        data.instrumented += bench.run_batches(
            data.modes[bs],
            prompt_ids,
            bs,
            0,
            args.max_new_tokens,
            instrument=True,
            max_batches=args.max_batches,
        )
        log(f"[bs {bs}] instrumented pass ({len(data.modes[bs])} modes) in {time.time() - t0:.0f}s")
    for seed in args.seeds:
        for bs in args.batch_sizes:
            t0 = time.time()
            data.records += bench.run_batches(
                data.modes[bs], prompt_ids, bs, seed, args.max_new_tokens, max_batches=args.max_batches
            )
            log(f"[seed {seed} bs {bs}] timed pass in {time.time() - t0:.0f}s")
    data.meta["elapsed_s"] = time.time() - t_start
    if hasattr(bench, "acceptance_reports"):
        data.meta["acceptance_reliability"], data.acceptance_priors = bench.acceptance_reports()
    if hasattr(bench, "depth_reports"):
        data.meta["draft_shapes"] = bench.depth_reports()
    outputs = {}
    for r in data.instrumented + data.records:
        for p, o in zip(r.prompt_ids, r.outputs):
            outputs[(r.mode, r.batch_size, r.seed, p)] = o
    lossy = [m.name for ms in data.modes.values() for m in ms if m.lossy]
    try:
        n = check_lossless(outputs, "ar", lossy)
        data.meta["lossless"] = f"passed: {n} greedy outputs of lossless modes identical to autoregressive"
        err = None
    except LosslessError as exc:
        err = str(exc)
        data.meta["lossless"] = "FAILED (see the log): " + err.splitlines()[0]
    return data, err


def _load(args: argparse.Namespace, device: str, log=print):
    from evict.engine.pricing import engine_step_samples
    from evict.models import load_testbed  # noqa: PLC0415
    from evict.profiler.auto import AutoGrid, resolve_cost_table  # noqa: PLC0415
    from evict.profiler.table import CostTable  # noqa: PLC0415

    dtype = getattr(torch, args.dtype)
    tb = testbed_dir(args.testbed)
    target, drafter, tokenizer = load_testbed(dtype=dtype, device=device, name=tb)
    tree = args.evict_tree
    choice = resolve_cost_table(
        step_sampler=engine_step_samples,
        explicit=args.cost_table,
        model_dir=tb / "target",
        drafter_dir=tb / "drafter",
        device=device,
        dtype=args.dtype,
        allow_mismatch=args.allow_table_mismatch,
        grid=AutoGrid.covering(
            args.batch_sizes,
            max_width=tree[2] if tree else None,
            draft_tree=tree[:2] if tree else None,
            context_len=args.prompt_tokens + args.max_new_tokens // 2,  # the decode steps' mean context
        ),
        clock="cpu" if args.clock == "cpu" and torch.get_num_threads() == 1 else "wall",
        log=log,
    )
    table, path = choice.table, choice.path
    log(f"cost table: {path} ({choice.how})")
    others = [CostTable.load(p) for p in args.extra_cost_table]
    if not args.extra_cost_table and choice.how in ("explicit", "shipped"):
        others = _other_device_tables(table, path, log)
    return target, drafter, tokenizer, table, others, path


def _other_device_tables(table: Any, path: Path, log=print) -> list[Any]:
    """Tables next to the main one for the same model but another device (for the ablation)."""
    from evict.profiler.table import CostTable, CostTableError  # noqa: PLC0415

    found = []
    for p in sorted(Path(path).parent.glob("*cost_table*.json")):
        if p.resolve() == Path(path).resolve():
            continue
        try:
            t = CostTable.load(p)
        except CostTableError:
            continue
        same_model = t.metadata.get("model_config_hash") == table.metadata.get("model_config_hash")
        if same_model and t.metadata.get("device") != table.metadata.get("device"):
            log(f"other-device ablation: {p.name} ({t.metadata.get('device')})")
            found.append(t)
    return found


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit 0, 2 on bad input (one line), 3 on a lossless failure, 130 on Ctrl-C.

    The results folder is written as a unit: an interrupt leaves the previous results intact.
    ``evict-bench --served ...`` runs the served benchmark instead (``evict.bench.served``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--served" in args:
        from .served import main as served_main  # noqa: PLC0415  (imports nothing of torch's engine path)

        return served_main([a for a in args if a != "--served"])
    return run_console(
        "evict-bench", lambda: _main(argv), on_interrupt="no results written (a previous --out is unchanged)"
    )


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _defaults(args)
        _check_inputs(args)
    except ValueError as exc:  # BoundaryError is a ValueError
        parser.error(str(exc))
    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from evict.profiler.table import CostTable, CostTableError  # noqa: PLC0415
    from evict.profiler.torch_backend import ProfileError  # noqa: PLC0415

    try:
        target, drafter, tokenizer, table, others, table_path = _load(args, device)
    except (CostTableError, ProfileError, FileNotFoundError, ValueError) as exc:
        print(f"evict-bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    modeled = None
    if args.modeled_gpu_table is not None:
        try:  # a model of another model on another device: loaded as is, never checked against this one
            modeled = CostTable.load(args.modeled_gpu_table)
        except (CostTableError, OSError) as exc:
            print(f"evict-bench: error: --modeled-gpu-table {args.modeled_gpu_table}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    cfg = target.config
    bench = Bench(
        _engine_factory(target, drafter, device, args.acceptance_prior),
        target,
        num_experts=int(getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0)),
        table=table,
        other_tables=others,
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", True)),
        clock=args.clock,
        decision=args.decision,
        backend=args.backend,
        pad_cost=_pad_cost(args, table),
        modeled_table=modeled,
    )
    data, err = run_bench(args, bench, tokenizer)
    cmd = "evict-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data.meta.update(
        command=cmd.strip(),
        machine=machine_description(device),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        cost_table=_rel(table_path),
        noisy_note=args.note,
        clock=args.clock,
        decision=args.decision,
        backend=args.backend,
        per_request=args.per_request,
        pad_cost=_pad_cost(args, table),
        modeled_gpu_table=_rel(args.modeled_gpu_table),
    )
    from .report import render_markdown, save_plots, summarize  # noqa: PLC0415

    summary = summarize(data)
    md = render_markdown(summary)
    print(md)
    # the whole folder is written aside and swapped in: never half a result, never two runs mixed
    with write_folder_atomically(args.out) as tmp:
        (tmp / "results.md").write_text(md)
        (tmp / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        files = save_plots(summary, tmp)
        for name, prior in data.acceptance_priors.items():  # the learned state: a warm-start prior
            (tmp / "acceptance_prior.json").write_text(json.dumps(prior) + "\n")
            print(
                f"wrote {args.out / 'acceptance_prior.json'} (learned by {name}; --acceptance-prior to reuse)"
            )
            break
    print(f"wrote {args.out / 'results.md'}, results.json and {', '.join(f.name for f in files)}")
    if err:
        print("\n" + err, file=sys.stderr)
        return EXIT_LOSSLESS
    return 0


def _pad_cost(args: argparse.Namespace, table: Any) -> float:
    """--pad-cost, else the table's ``metadata.padding_cost``, else 1 (padding costs a token)."""
    if args.pad_cost is not None:
        return float(args.pad_cost)
    meta = getattr(table, "metadata", None) or {}
    return float(meta.get("padding_cost", 1.0))


def _rel(p: Path | None) -> str | None:
    if p is None:
        return None
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return Path(p).name


if __name__ == "__main__":
    raise SystemExit(main())
