"""Start-up calibration: the server measures its own cost table from its captured graphs.

Why: a table from a separate profiler does not time what the server runs (its attention backend,
CUDA-graph replay per width, TP collectives, dtype), and it misses drafting and draft-extend time,
which grows with the width and so biases the choice toward narrow trees. The server captures one
state per verify width anyway; replaying those graphs a few times at a few batch sizes gives the
exact costs: ``T(bs, m) = draft(bs) + verify(m, bs) + draft_extend(m, bs)`` from medians.

This module is the pure part, importable and testable without sglang: the worker passes callables
that replay its graphs (:class:`GraphReplay`), a timer (:func:`cuda_event_timer` in production, a
fake clock in tests) and, with TP > 1, a reduction (:func:`tp_max_reduce`) so every rank ends with
the identical table (ranks that chose different widths would run collectives of different sizes
and hang). Tables are cached in the user's cache folder (:func:`evict.paths.cache_dir`) keyed by
model, GPU, TP size, dtype, widths, batch sizes, draft tree and EVICT version; ``EVICT_RECALIBRATE=1``
measures again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evict.paths import cache_dir
from evict.profiler.table import SCHEMA_VERSION, CostTable, CostTableError
from evict.profiler.timing import cuda_event_timer, percentile

__all__ = [
    "CALIBRATION_SUBDIR",
    "CalibrationKey",
    "GraphReplay",
    "Timer",
    "calibrate",
    "calibrate_or_load",
    "calibration_key",
    "cuda_event_timer",
    "default_batch_sizes",
    "evict_version",
    "fill_realistic_inputs",
    "load_cached",
    "realistic_graph_replay",
    "tp_max_reduce",
]

logger = logging.getLogger(__name__)

CALIBRATION_SUBDIR = "calibration"
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 2
STATS = ("p10", "median", "p90")

Timer = Callable[[Callable[[], Any]], float]
"""Runs the callable once and returns its duration in milliseconds."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Takes a float64 tensor of this rank's timings and returns the element-wise max over TP ranks."""


@dataclass(frozen=True)
class GraphReplay:
    """Callables that replay the server's captured graphs once (no timing, no sync needed).

    ``draft(bs)``: the draft-decode graph (the tree drafting of one step, independent of the
    width); ``verify(width, bs)``: the target-verify graph of ``width``; ``draft_extend(width, bs)``:
    the draft-extend graph of ``width``. Each must leave the server's state usable (replaying a
    captured graph on its static buffers does).
    """

    draft: Callable[[int], Any]
    verify: Callable[[int, int], Any]
    draft_extend: Callable[[int, int], Any]


def evict_version() -> str:
    """The installed EVICT version (part of the cache key: a new EVICT may time differently)."""
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("evict")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class CalibrationKey:
    """Everything a calibrated table depends on; its digest names the cache file."""

    model_id: str
    config_hash: str | None
    device: str  # GPU name, e.g. "NVIDIA H100 80GB HBM3"
    tp_size: int
    dtype: str
    widths: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    draft_steps: int
    draft_topk: int
    evict_version: str

    def digest(self) -> str:
        """16 hex chars of sha256 over the canonical JSON of every field."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def table_metadata(self) -> dict[str, Any]:
        """The metadata a table measured under this key carries (the start-up calibration's and the
        live costs' alike); callers add what only they know (versions, clock)."""
        return {
            "model_id": self.model_id,
            "device": self.device,
            "dtype": self.dtype,
            "tp_size": self.tp_size,
            "draft_steps": self.draft_steps,
            "draft_topk": self.draft_topk,
            "calibration_key": self.digest(),
        }

    def path(self, folder: Path | None = None) -> Path:
        """``<cache>/calibration/<model>-tp<N>-<digest>.json`` (the readable part is for people)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_id).strip("_")[-60:] or "model"
        return (folder or cache_dir()) / CALIBRATION_SUBDIR / f"{slug}-tp{self.tp_size}-{self.digest()}.json"


def calibration_key(
    *,
    model_path: str,
    revision: str | None,
    gpu_name: str,
    tp_size: int,
    dtype: str,
    widths: Sequence[int],
    batch_sizes: Sequence[int],
    draft_steps: int,
    draft_topk: int,
) -> CalibrationKey:
    """The key of a server's calibration, from what the worker knows after capturing its graphs.

    The model is named by :func:`evict.profiler.table.checkpoint_config_hash` (the same hash an
    ``EVICT_COST_TABLE`` is checked with) plus its path or hub id for people reading the folder;
    ``dtype`` may be given as ``torch.bfloat16`` or ``bfloat16``.
    """
    from evict.profiler.table import checkpoint_config_hash  # noqa: PLC0415

    path = str(model_path).rstrip("/")
    model_id = path if not Path(path).is_absolute() else Path(path).name
    return CalibrationKey(
        model_id=model_id or "model",
        config_hash=checkpoint_config_hash(model_path, revision=revision),
        device=str(gpu_name),
        tp_size=int(tp_size),
        dtype=str(dtype).replace("torch.", ""),
        widths=tuple(sorted({int(w) for w in widths})),
        batch_sizes=tuple(sorted({int(b) for b in batch_sizes})),
        draft_steps=int(draft_steps),
        draft_topk=int(draft_topk),
        evict_version=evict_version(),
    )


def default_batch_sizes(captured: Sequence[int], count: int = 6) -> tuple[int, ...]:
    """Up to ``count`` of the captured batch sizes, spread geometrically from the smallest to the
    largest (the staircase between them is interpolated; replaying every captured size would cost
    seconds per width for little gain)."""
    caps = sorted({int(b) for b in captured if int(b) >= 1})
    if not caps:
        raise ValueError("no captured batch sizes to calibrate at; capture CUDA graphs first")
    if len(caps) <= count:
        return tuple(caps)
    lo, hi = caps[0], caps[-1]
    picks = {lo, hi}
    for i in range(1, count - 1):
        want = lo * (hi / lo) ** (i / (count - 1))
        picks.add(min(caps, key=lambda b: abs(b - want)))
    return tuple(sorted(picks))


def tp_max_reduce(group: Any, all_reduce: Callable[..., Any] | None = None) -> Reduce:
    """A :data:`Reduce` that takes the element-wise maximum over the ranks of ``group``.

    The max, not the mean: a TP step waits for its slowest rank. ``all_reduce`` defaults to
    ``torch.distributed.all_reduce``; tests pass a fake. The tensor is reduced on the device the
    group communicates on (CUDA for NCCL), then returned on the CPU.
    """
    import torch.distributed as dist  # noqa: PLC0415

    reduce_fn = all_reduce or dist.all_reduce

    def reduce(t: torch.Tensor) -> torch.Tensor:
        device = getattr(group, "device", None)
        if device is None and dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        buf = t.to(device or "cpu").clone()
        reduce_fn(buf, op=dist.ReduceOp.MAX, group=group)
        return buf.cpu()

    return reduce


def _stats(samples: Sequence[float]) -> tuple[float, float, float]:
    return percentile(samples, 10), float(statistics.median(samples)), percentile(samples, 90)


def calibrate(
    replay: GraphReplay,
    *,
    widths: Sequence[int],
    batch_sizes: Sequence[int],
    metadata: dict[str, Any],
    timer: Timer = cuda_event_timer,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    reduce: Reduce | None = None,
    source: str = "<calibration>",
) -> CostTable:
    """Replay and time every (batch size, width) and return the step-cost table.

    Per batch size: ``draft`` once per repeat; per width: ``verify`` and ``draft_extend``, with
    repeats interleaved across widths so a drift in load shifts every width alike. The table's
    ``fixed_ms`` is the draft median, its latency the verify + draft-extend medians (p10 and p90
    likewise), so ``step_cost = draft + verify(m) + draft_extend(m)``; the parts are kept under
    ``calibration`` in the JSON. With ``reduce`` the statistics are max-reduced over TP ranks before
    the table is built, so every rank builds the same table. ``metadata`` must hold the table's
    required fields (model_id, device, dtype, tp_size).
    """
    ws = sorted({int(w) for w in widths})
    bss = sorted({int(b) for b in batch_sizes})
    if not ws or not bss or ws[0] < 1 or bss[0] < 1:
        raise ValueError(f"calibration needs widths and batch sizes >= 1, got {widths!r} and {batch_sizes!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    nb, nw = len(bss), len(ws)
    # stats[kind, stat, b, w]: kind 0 draft (same for every w), 1 verify, 2 draft-extend; stat p10/med/p90
    stats = torch.zeros(3, 3, nb, nw, dtype=torch.float64)
    for i, bs in enumerate(bss):
        for _ in range(warmup):
            replay.draft(bs)
            for w in ws:
                replay.verify(w, bs)
                replay.draft_extend(w, bs)
        draft: list[float] = []
        verify: dict[int, list[float]] = {w: [] for w in ws}
        extend: dict[int, list[float]] = {w: [] for w in ws}
        for _ in range(repeats):
            draft.append(timer(lambda bs=bs: replay.draft(bs)))
            for w in ws:
                verify[w].append(timer(lambda w=w, bs=bs: replay.verify(w, bs)))
                extend[w].append(timer(lambda w=w, bs=bs: replay.draft_extend(w, bs)))
        stats[0, :, i, :] = torch.tensor(_stats(draft), dtype=torch.float64).unsqueeze(-1)
        for j, w in enumerate(ws):
            stats[1, :, i, j] = torch.tensor(_stats(verify[w]), dtype=torch.float64)
            stats[2, :, i, j] = torch.tensor(_stats(extend[w]), dtype=torch.float64)
    if reduce is not None:
        stats = reduce(stats).to(torch.float64)

    def rnd(x: Any) -> float:
        return round(float(x), 4)

    def grid(kind: int, stat: int) -> list[list[float]]:
        return [[rnd(stats[kind, stat, i, j]) for j in range(nw)] for i in range(nb)]

    step = stats[1] + stats[2]  # verify + draft-extend, per stat
    meta = {
        "backend": "sglang-calibration",
        "clock": "cuda events (graph replay)" if timer is cuda_event_timer else "injected timer",
        "repeats": repeats,
        "warmup": warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": "step time = draft (fixed_ms) + verify(m) + draft-extend(m), medians of graph replays",
        **metadata,
    }
    d = {
        "schema_version": SCHEMA_VERSION,
        "metadata": meta,
        "batch_sizes": bss,
        "widths": ws,
        "latency_ms": {
            "median": [[max(rnd(step[1, i, j]), 1e-4) for j in range(nw)] for i in range(nb)],
            "p10": [[max(rnd(step[0, i, j]), 1e-4) for j in range(nw)] for i in range(nb)],
            "p90": [[max(rnd(step[2, i, j]), 1e-4) for j in range(nw)] for i in range(nb)],
        },
        "fixed_ms": [rnd(stats[0, 1, i, 0]) for i in range(nb)],
        "calibration": {
            "draft_ms": {k: [rnd(stats[0, s, i, 0]) for i in range(nb)] for s, k in enumerate(STATS)},
            "verify_ms": {k: grid(1, s) for s, k in enumerate(STATS)},
            "draft_extend_ms": {k: grid(2, s) for s, k in enumerate(STATS)},
        },
    }
    # p10 <= median <= p90 survives rounding only if enforced after it
    for i in range(nb):
        for j in range(nw):
            lat = d["latency_ms"]
            lat["p10"][i][j] = min(lat["p10"][i][j], lat["median"][i][j])
            lat["p90"][i][j] = max(lat["p90"][i][j], lat["median"][i][j])
    return CostTable.from_dict(d, source=source)


DEFAULT_CONTEXT_LEN = 256  # positions of the calibration tokens: a typical served context, not 0


def fill_realistic_inputs(
    runner: Any,
    bs: int,
    tokens_per_req: int,
    *,
    vocab_size: int,
    generator: torch.Generator,
    context_len: int = DEFAULT_CONTEXT_LEN,
    topk_vocab_size: int | None = None,
) -> bool:
    """Write varied token ids and traffic-like positions into a graph runner's static inputs.

    Why: a captured graph replayed bare runs on its capture-time buffers, where SGLang 0.5.23 leaves
    ``input_ids`` and ``positions`` zero. Every verified token is then the same token, a MoE routes
    all ``bs x m`` of them to the same experts, and verify(m) comes out nearly flat in m: exactly
    the cost EVICT exists to see goes missing. Distinct random ids route like traffic does (to many
    experts), and positions after ``context_len`` give RoPE real values. ``topk_index`` (the draft
    runner's input tokens) gets ids below ``topk_vocab_size``. The attention plan (``seq_lens``,
    KV indices) is left as captured: refilling it needs the backend's own replay preparation, so the
    context length's share of the cost is what the live correction
    (:mod:`evict.plugin.live_costs`) measures. Returns False when the runner has no buffers.
    """
    buffers = getattr(runner, "buffers", None)
    ids = getattr(buffers, "input_ids", None)
    if buffers is None or ids is None:
        return False
    n = min(int(bs) * int(tokens_per_req), ids.shape[0])
    ids[:n].copy_(torch.randint(0, int(vocab_size), (n,), generator=generator).to(ids.device, ids.dtype))
    positions = getattr(buffers, "positions", None)
    if positions is not None and positions.dim() == 1:
        pos = int(context_len) + torch.arange(n) % max(int(tokens_per_req), 1)
        positions[:n].copy_(pos.to(positions.device, positions.dtype))
    topk_index = getattr(buffers, "topk_index", None)
    if topk_index is not None and topk_vocab_size:
        rows = min(int(bs), topk_index.shape[0])
        fresh = torch.randint(0, int(topk_vocab_size), (rows, *topk_index.shape[1:]), generator=generator)
        topk_index[:rows].copy_(fresh.to(topk_index.device, topk_index.dtype))
    return True


def realistic_graph_replay(
    replay_one: Callable[[Any, int], Any],
    *,
    draft_runner: Any,
    verify_runners: dict[int, Any],
    extend_runners: dict[int, Any],
    vocab_size: int,
    draft_vocab_size: int | None = None,
    draft_tokens_per_req: int = 1,
    context_len: int = DEFAULT_CONTEXT_LEN,
    seed: int = 0,
) -> GraphReplay:
    """A :class:`GraphReplay` whose every replay first loads fresh varied inputs (see
    :func:`fill_realistic_inputs`), then replays through ``replay_one(runner, bs)`` (the worker's
    graph replay, inside the runner's own model context and replay session).

    ``verify_runners[m]`` verifies ``m`` tokens per request, ``extend_runners[m]`` (None: no graph)
    extends the draft by ``m`` per request. New ids on every replay: a repeated identical batch
    would also be unlike traffic (caches warm on exactly the same experts).
    """
    gen = torch.Generator().manual_seed(int(seed))

    def run(runner: Any, bs: int, per_req: int) -> Any:
        fill_realistic_inputs(
            runner,
            bs,
            per_req,
            vocab_size=vocab_size,
            generator=gen,
            context_len=context_len,
            topk_vocab_size=draft_vocab_size or vocab_size,
        )
        return replay_one(runner, bs)

    def extend(width: int, bs: int) -> None:
        runner = extend_runners.get(width)
        if runner is not None:
            run(runner, bs, width)

    return GraphReplay(
        draft=lambda bs: run(draft_runner, bs, draft_tokens_per_req),
        verify=lambda width, bs: run(verify_runners[width], bs, width),
        draft_extend=extend,
    )


def load_cached(key: CalibrationKey, cache_folder: Path | None = None) -> CostTable | None:
    """The cached table for ``key``, or None (missing, unreadable or made for another key: warned).

    Shared by the start-up calibration and the live step costs (:mod:`evict.plugin.live_costs`),
    which write the same cache under the same key scheme.
    """
    path = key.path(cache_folder)
    if not path.exists():
        return None
    try:
        table = CostTable.open(
            path, config_hash=key.config_hash, device=key.device, tp_size=key.tp_size, dtype=key.dtype
        )
        if table.widths != list(key.widths) or table.batch_sizes != list(key.batch_sizes):
            raise CostTableError(
                f"cost table {path}: widths {table.widths} x batch sizes {table.batch_sizes} "
                f"are not the captured {list(key.widths)} x {list(key.batch_sizes)}"
            )
        if table.metadata.get("calibration_key") != key.digest():
            raise CostTableError(f"cost table {path}: made for another calibration key")
    except CostTableError as exc:
        logger.warning("EVICT: ignoring the cached calibration %s (%s); calibrating again", path, exc)
        return None
    return table


def calibrate_or_load(
    replay: GraphReplay,
    *,
    key: CalibrationKey,
    recalibrate: bool = False,
    timer: Timer = cuda_event_timer,
    reduce: Reduce | None = None,
    write_cache: bool = True,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    cache_folder: Path | None = None,
    log: Callable[[str], Any] = logger.info,
) -> CostTable:
    """The cached table for ``key`` if there is a valid one (and ``recalibrate`` is off), else
    :func:`calibrate` and cache the result.

    A cache file that cannot be read or does not match ``key`` is ignored with a warning. With
    ``reduce`` the choice "cached or calibrate" is itself max-reduced, so if any TP rank lacks a
    valid cache every rank calibrates (replays run collectives, so all ranks must replay together).
    ``write_cache`` lets only one rank (TP rank 0) write the file. ``log`` gets one line saying what
    happened and how long calibration took.
    """
    path = key.path(cache_folder)
    table = None if recalibrate else load_cached(key, cache_folder)
    need = torch.tensor([0.0 if table is not None else 1.0], dtype=torch.float64)
    if reduce is not None:
        need = reduce(need)
    if float(need[0]) == 0.0 and table is not None:
        log(
            f"EVICT: cost table from the start-up calibration cached at {path} (EVICT_RECALIBRATE=1 re-measures)"
        )
        return table

    tic = time.perf_counter()
    metadata = {
        **key.table_metadata(),
        "model_config_hash": key.config_hash,
        "versions": {"evict": key.evict_version, "torch": torch.__version__},
    }
    if key.config_hash is None:
        metadata.pop("model_config_hash")
    table = calibrate(
        replay,
        widths=key.widths,
        batch_sizes=key.batch_sizes,
        metadata=metadata,
        timer=timer,
        repeats=repeats,
        warmup=warmup,
        reduce=reduce,
        source=str(path),
    )
    elapsed = time.perf_counter() - tic
    table.metadata["calibration_s"] = round(elapsed, 3)
    cached = ""
    if write_cache:
        try:
            table.save(path)
            cached = f"; cached at {path}"
        except OSError as exc:  # a read-only cache must not stop the server
            logger.warning(
                "EVICT: could not cache the calibrated table at %s (%s); set EVICT_CACHE_DIR", path, exc
            )
    log(
        f"EVICT: calibrated {len(key.widths)} widths x {len(key.batch_sizes)} batch sizes "
        f"({repeats} replays each of draft, verify and draft-extend) in {elapsed:.1f} s{cached}"
    )
    return table
