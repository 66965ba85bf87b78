"""Zero-config costs for the reference engine: the shipped table if it fits, else this machine's own.

Why: a cost table describes one machine (CPU model or GPU, threads, dtype, model). The shipped
testbed table was measured on one VM, so on any other machine a strict check refuses it and a lax
one picks widths from someone else's costs. When the user names no table, EVICT therefore measures
this machine's table with a short grid (a few seconds to half a minute for the testbed on 2 cores),
caches it in the user's cache folder keyed by everything it was measured for, and reuses it next
time. A table the user names (``--cost-table``) keeps the strict check: it is a claim to verify,
not a default to replace.

Route (:func:`resolve_cost_table`): explicit table -> shipped table if it fits -> cached table if it
fits -> measure, save to the cache, use. A cache file that cannot be read or no longer fits is
ignored with a warning and measured again. A measurement whose repeats spread widely (other jobs
held the cores) is used for the run but not cached, with a warning, so a busy moment is not
frozen into every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evict.paths import TESTBED_COST_TABLE, TESTBED_COST_TABLES, cache_dir, shipped_config
from evict.profiler.table import CostTable, CostTableError, checkpoint_config_hash

__all__ = [
    "AUTO_BATCH_SIZES",
    "AUTO_WIDTHS",
    "DEFAULT_DRAFT_TREE",
    "AutoGrid",
    "TableChoice",
    "cache_key",
    "cached_table_path",
    "measure_table",
    "price_whole_step",
    "resolve_cost_table",
    "shipped_table_for",
    "table_spread",
]

logger = logging.getLogger("evict")

# The short grid: enough points for the staircase the rule needs at the batch sizes the bench runs;
# 5 repeats after 2 warm-ups keep a testbed measurement well under a minute on 2 cores.
AUTO_BATCH_SIZES: tuple[int, ...] = (1, 4, 16)
AUTO_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
AUTO_REPEATS = 5
AUTO_WARMUP = 2
AUTO_CONTEXT_LEN = 256
DEFAULT_DRAFT_TREE: tuple[int, int] = (5, 4)  # (steps, topk) of the bench's EVICT tree
# Median p90/p10 ratio over the grid above which a measurement is called noisy. On a quiet 2-core
# machine the testbed's points spread by 1.0-1.3x; with other jobs competing for the cores they
# spread by 10x and more and whole rows are inflated, which prices widths wrongly.
NOISY_SPREAD = 1.5
CACHE_SUBDIR = "cost_tables"
# The reference engine's whole decode step is timed at this width (the largest grid width up to it
# that the draft tree holds) to price what a step costs beyond its verify forward.
OVERHEAD_WIDTH = 8


@dataclass(frozen=True)
class AutoGrid:
    """What a zero-config measurement covers; every field is part of the cache key."""

    batch_sizes: tuple[int, ...] = AUTO_BATCH_SIZES
    widths: tuple[int, ...] = AUTO_WIDTHS
    repeats: int = AUTO_REPEATS
    warmup: int = AUTO_WARMUP
    context_len: int = AUTO_CONTEXT_LEN
    draft_steps: int = DEFAULT_DRAFT_TREE[0]
    draft_topk: int = DEFAULT_DRAFT_TREE[1]
    engine_overhead: bool = True  # price whole steps (price_whole_step, with a step_sampler)

    @classmethod
    def covering(
        cls,
        batch_sizes: Sequence[int] = (),
        max_width: int | None = None,
        draft_tree: tuple[int, int] | None = None,
        context_len: int | None = None,
    ) -> AutoGrid:
        """The default grid, widened to the batch sizes and the tree size N a run will use, timed
        at the run's context length (``context_len``, rounded to a multiple of 32; default
        ``AUTO_CONTEXT_LEN``).

        Why the context: under load attention over the context is a large, width-independent part
        of a step, so a table timed at 256 tokens priced the bench's plain step (context 64-88) at
        twice its cost at bs 64 and flattened the price of every extra verified token.
        """
        bss = tuple(sorted(set(AUTO_BATCH_SIZES) | {int(b) for b in batch_sizes}))
        ws = set(AUTO_WIDTHS)
        if max_width is not None:
            ws.add(int(max_width))
        steps, topk = draft_tree or DEFAULT_DRAFT_TREE
        return cls(
            batch_sizes=bss,
            widths=tuple(sorted(ws)),
            repeats=AUTO_REPEATS,
            warmup=AUTO_WARMUP,
            draft_steps=int(steps),
            draft_topk=int(topk),
            context_len=AUTO_CONTEXT_LEN if context_len is None else max(32, 32 * round(context_len / 32)),
        )


@dataclass
class TableChoice:
    """The table a run uses, where it came from (``explicit``, ``shipped``, ``cached``, ``measured``)
    and its file (for the report)."""

    table: CostTable
    path: Path
    how: str


def _evict_version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("evict")
    except Exception:
        return "unknown"


def cache_key(
    *,
    config_hash: str | None,
    drafter_hash: str | None,
    device: str,
    dtype: str,
    num_threads: int,
    grid: AutoGrid,
    clock: str = "wall",
) -> str:
    """16 hex chars naming everything a measured table depends on (model, drafter, device, threads,
    dtype, grid, clock, torch and evict versions); a change in any of them measures a new table."""
    fields = {
        "model_config_hash": config_hash,
        "drafter_config_hash": drafter_hash,
        "device": device,
        "dtype": dtype,
        "num_threads": int(num_threads),
        "grid": [list(grid.batch_sizes), list(grid.widths), grid.repeats, grid.warmup, grid.context_len],
        "draft_tree": [grid.draft_steps, grid.draft_topk],
        "draft_depths": 1,  # tables price drafting per depth (draft_ms) since this field exists
        "engine_overhead": grid.engine_overhead,
        "clock": clock,
        "torch": torch.__version__,
        "evict": _evict_version(),
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cached_table_path(model_id: str, key: str, folder: Path | None = None) -> Path:
    """``<cache>/cost_tables/<model>-<key>.json``; the model part is only for people listing the folder."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_") or "model"
    return (folder or cache_dir()) / CACHE_SUBDIR / f"{slug}-{key}.json"


def measure_table(
    model_dir: Path,
    drafter_dir: Path | None,
    *,
    device: str,
    dtype: str,
    grid: AutoGrid,
    clock: str = "wall",
    progress: bool = True,
    source: str = "<measured>",
    step_sampler: StepSampler | None = None,
) -> CostTable:
    """Time this machine's verify grid (and the drafting cost when a drafter is given) with the
    profiler's torch backend, exactly as ``evict-profile`` does, and return the table.

    ``step_sampler`` times whole decode steps (``grid.engine_overhead``: :func:`price_whole_step`);
    without one ``fixed_ms`` is the drafting cost alone."""
    from evict.profiler.torch_backend import (  # noqa: PLC0415 (heavy)
        ProfileSpec,
        add_draft_costs,
        profile,
        result_to_table,
    )

    spec = ProfileSpec(
        model_path=Path(model_dir),
        batch_sizes=list(grid.batch_sizes),
        widths=list(grid.widths),
        context_len=grid.context_len,
        repeats=grid.repeats,
        warmup=grid.warmup,
        device=device,
        dtype=dtype,
        clock=clock,
        progress=progress,
    )
    result = profile(spec)
    if drafter_dir is not None:
        add_draft_costs(result, spec, Path(drafter_dir), grid.draft_steps, grid.draft_topk)
        if grid.engine_overhead and step_sampler is not None:
            width = overhead_width(grid)
            samples = step_sampler(
                Path(model_dir), Path(drafter_dir), device=device, dtype=dtype, grid=grid, width=width
            )
            price_whole_step(result, samples, width)
    result.meta["command"] = "measured automatically (no cost table given; see docs/profiling.md)"
    return result_to_table(result, source=source)


def overhead_width(grid: AutoGrid) -> int:
    """The grid width at which the engine's whole step is timed: the largest up to
    ``OVERHEAD_WIDTH`` that the draft tree can verify (else the smallest grid width)."""
    tree_n = grid.draft_topk + (grid.draft_steps - 1) * grid.draft_topk**2 + 1
    cap = min(OVERHEAD_WIDTH, tree_n)
    return max((w for w in grid.widths if w <= cap), default=min(grid.widths))


# (model_dir, drafter_dir, *, device, dtype, grid, width) -> {batch size: per-repeat median step ms}
StepSampler = Callable[..., dict[int, list[float]]]


def price_whole_step(result: Any, step_ms: dict[int, list[float]], width: int) -> None:
    """Raise ``fixed_ms`` to what a decode step costs beyond its verify forward.

    Why: the rule weighs the tokens a wider verify buys against the whole step. The profiled
    forwards leave out what the engine does around them (tree masks, the acceptance walk, the KV
    commit, host work: 3-4 ms of a 14 ms step at bs 1 on a 2-core EPYC), so a forward-only table
    overprices width and EVICT verifies too little (``python -m evict.bench.oracle_gap``: 5-7%
    slower than deciding from measured whole steps). ``fixed_ms[bs]`` becomes the larger of the
    drafting cost and (step at width w) - (verify forward at w); the spread of the repeats is
    recorded for :func:`table_spread`. Pure: the step times come from whoever can run a whole step
    (the reference engine's :func:`evict.engine.pricing.engine_step_samples`), so the profiler
    never imports an engine.
    """
    spread = 1.0
    for bs, samples in step_ms.items():
        verify_ms = result.point(bs, width).median_ms
        result.fixed_ms[bs] = max(result.fixed_ms[bs], statistics.median(samples) - verify_ms)
        spread = max(spread, max(samples) / min(samples) if min(samples) > 0 else math.inf)
    result.meta["step_overhead_spread"] = round(spread, 3)
    result.meta["fixed_ms"] += (
        f"; raised to the reference engine's whole decode step at width {width} minus its verify "
        "forward (masks, acceptance walk, KV commit and host work included)"
    )


def shipped_table_for(config_hash: str) -> Path | None:
    """The shipped testbed table made for the model with ``config_hash`` (each ``--testbed`` pair
    has its own); the first pair's table when none is, so a mismatch is reported against it."""
    for name in TESTBED_COST_TABLES:
        path = shipped_config(name)
        if path is None:
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(meta, dict) and meta.get("model_config_hash") == config_hash:
            return path
    return shipped_config(TESTBED_COST_TABLE)


def resolve_cost_table(
    *,
    explicit: str | Path | None,
    model_dir: Path,
    drafter_dir: Path | None,
    device: str,
    dtype: str,
    allow_mismatch: bool = False,
    grid: AutoGrid | None = None,
    clock: str = "wall",
    shipped: Path | None | bool = True,
    log: Callable[[str], Any] = print,
    measure: Callable[..., CostTable] = measure_table,
    progress: bool = True,
    step_sampler: StepSampler | None = None,
) -> TableChoice:
    """The cost table for this run: explicit, else shipped if it fits, else cached, else measured.

    ``explicit`` is opened with the strict check (``allow_mismatch`` turns a mismatch into a
    warning). Without it, the shipped table (``shipped=True``: ``configs/testbed_cpu_cost_table.json``;
    a path; or ``False`` for none) is used only when it was measured for this model, device, dtype
    and thread count; otherwise the table cached for exactly this setup is reused, and failing that
    this machine's table is measured (``measure``, injectable for tests), saved to the cache and
    used. ``log`` receives one line per decision. Raises :class:`CostTableError` for an explicit
    table that does not fit.
    """
    from evict.profiler.torch_backend import device_name  # noqa: PLC0415

    config_hash = checkpoint_config_hash(model_dir)
    dev_name = device_name(torch.device(device))
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else None
    if explicit is not None:
        path = Path(explicit)
        table = CostTable.open(
            path, config_hash=config_hash, device=dev_name, dtype=dtype, allow_mismatch=allow_mismatch
        )
        return TableChoice(table, path, "explicit")

    shipped_path = shipped_table_for(config_hash) if shipped is True else (shipped or None)
    why_not = "no shipped table"
    if shipped_path is not None:
        try:
            table = CostTable.open(
                shipped_path, config_hash=config_hash, device=dev_name, dtype=dtype, num_threads=threads
            )
            return TableChoice(table, Path(shipped_path), "shipped")
        except CostTableError as exc:
            if allow_mismatch:  # the user asked for the shipped table whatever it was made for
                logger.warning("evict: %s", exc)
                return TableChoice(CostTable.load(shipped_path), Path(shipped_path), "shipped")
            why_not = _mismatch_summary(exc, shipped_path)

    grid = grid or AutoGrid()
    drafter_hash = checkpoint_config_hash(drafter_dir) if drafter_dir is not None else None
    key = cache_key(
        config_hash=config_hash,
        drafter_hash=drafter_hash,
        device=dev_name,
        dtype=dtype,
        num_threads=threads or 0,
        grid=grid,
        clock=clock,
    )
    from evict.profiler.torch_backend import model_id_for, read_model_config  # noqa: PLC0415

    model_id = model_id_for(Path(model_dir), read_model_config(Path(model_dir)))
    path = cached_table_path(model_id, key)
    if path.exists():
        try:
            table = CostTable.open(
                path, config_hash=config_hash, device=dev_name, dtype=dtype, num_threads=threads
            )
            log(
                f"cost table: reusing this machine's table {path} (measured {table.metadata.get('date', '?')})"
            )
            return TableChoice(table, path, "cached")
        except CostTableError as exc:
            msg = f"ignoring the cached cost table {path} ({exc}); measuring it again"
            logger.warning("evict: %s", msg)
            log(f"warning: {msg}")

    threads_note = f", {threads} thread(s)" if threads else ""
    log(
        f"cost table: {why_not}; measuring this machine's ({dev_name}, {dtype}{threads_note}): "
        f"batch sizes {list(grid.batch_sizes)} x widths {list(grid.widths)}, {grid.repeats} repeats"
        f"{' + drafting cost' if drafter_dir is not None else ''} (once; cached as {path})"
    )
    t0 = time.perf_counter()
    table = measure(
        model_dir,
        drafter_dir,
        device=device,
        dtype=dtype,
        grid=grid,
        clock=clock,
        progress=progress,
        source=str(path),
        **({"step_sampler": step_sampler} if step_sampler is not None else {}),
    )
    table.source = str(path)
    elapsed = time.perf_counter() - t0
    spread = table_spread(table)
    if spread > NOISY_SPREAD:
        # A table measured while other jobs held the cores would misprice widths on every later run
        # too; use it for this run (the run is timed under the same load) but do not keep it.
        msg = (
            f"the machine was busy while measuring (repeats spread {spread:.1f}x, p90/p10, against about 1.1x "
            "when quiet), so the table may misprice widths; it is used for this run but not cached and the "
            "next run measures again (or measure on a quiet machine with `evict-profile` and pass --cost-table)"
        )
        logger.warning("evict: %s", msg)
        log(f"warning: cost table measured in {elapsed:.0f} s, but {msg}")
        return TableChoice(table, path, "measured, not cached")
    try:
        table.save(path)
        log(f"cost table: measured in {elapsed:.0f} s, saved to {path}")
    except OSError as exc:  # a read-only cache must not stop the run; next time measures again
        logger.warning("evict: could not cache the measured cost table at %s (%s)", path, exc)
        log(f"warning: could not cache the measured cost table at {path} ({exc}); set EVICT_CACHE_DIR")
    return TableChoice(table, path, "measured")


def table_spread(table: CostTable) -> float:
    """Median over the grid of p90 / p10: about 1 for a steady measurement, far above on a busy machine.

    The engine's whole-step timing counts too (``metadata.step_overhead_spread``, max / min of its
    repeats at any batch size): it prices every step, so a disturbed one must not be cached either.
    """
    ratios = sorted(hi / lo for r10, r90 in zip(table.p10, table.p90) for lo, hi in zip(r10, r90) if lo > 0)
    grid = ratios[len(ratios) // 2] if ratios else 1.0
    step = (table.metadata or {}).get("step_overhead_spread", 1.0)
    return max(grid, float(step) if isinstance(step, (int, float)) else 1.0)


def _mismatch_summary(exc: CostTableError, path: Path) -> str:
    """One short clause on why the shipped table does not fit (the full error is in the log)."""
    text = str(exc)
    m = re.search(r"profiled for another setup: (.*?)\. Re-profile", text)
    return f"the shipped table {Path(path).name} was measured for another setup ({m.group(1) if m else text})"
