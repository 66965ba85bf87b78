"""Step costs corrected from the server's own decode steps (pure torch; no sglang import).

Why: a cost table measured anywhere but in the serving loop misses part of what a served step
costs. The issue that started this (#19) measured the served CPU step at 2-2.7x the reference
engine's: SGLang's scheduler and host work, tree masks and draft extend, differently shaped across
widths. A GPU's start-up replays run on capture-time attention plans (one cached token), not on the
traffic's context lengths. So every decode step's measured time updates the table the width rule
reads:

- :class:`StepTimer` measures each decode step, from its start to the next step's start when they
  follow each other (so the scheduler's host work between steps is part of the step, as users see
  it), else to its own end. Marks are host ``perf_counter`` readings (CPU) or CUDA events that are
  read one step late with ``query()``, never waited for (no device sync). A fake clock tests it.
- :class:`LiveCosts` keeps, per batch-size bucket and width, a window of the last measured times
  and takes their **median** (one slow step, say a GC pause, moves nothing). Cells never observed
  are the prior (the start-up calibration or ``EVICT_COST_TABLE``) scaled by the ratio measured /
  prior observed on the same row, else on the nearest observed row. Without any prior (CPU without a
  cached table), the first steps of a batch-size bucket cycle through the widths (``explore_index``:
  every width is lossless, only its speed differs) until each has been timed a few times, and the
  first fully timed row gives the other rows their shape.
- The table changes only when :meth:`LiveCosts.publish` runs, every ``sync_every`` decode steps on
  every rank alike; with TP > 1 its statistics are max-reduced first (the slowest rank sets the
  step, as in the start-up calibration) over the TP group's CPU (gloo) group: a host collective on
  host tensors, no device sync. So every rank's policy reads the identical table.
- :meth:`LiveCosts.take_interval` gives the mean predicted and measured step time since the last
  metrics line, for ``step_ms predicted=... measured=...``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evict.profiler.table import SCHEMA_VERSION, CostTable

__all__ = [
    "DEFAULT_MIN_OBS",
    "DEFAULT_SYNC_EVERY",
    "DEFAULT_WINDOW",
    "LiveCosts",
    "StepSample",
    "StepTimer",
    "bucket_sizes",
    "cuda_event_marks",
    "host_marks",
]

DEFAULT_WINDOW = 15  # samples per cell: the median of the last 15 steps (a shared machine drifts)
DEFAULT_MIN_OBS = 3  # a cell is "observed" after this many steps
DEFAULT_SYNC_EVERY = 8  # decode steps between publications (and TP reductions)

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Element-wise max over the TP ranks of a float64 host tensor (identity with TP 1)."""


def bucket_sizes(max_bs: int) -> tuple[int, ...]:
    """Batch-size buckets 1, 2, 4, ... up to ``max_bs`` (included): the live table's rows.

    Powers of two: a decode step's cost moves smoothly with the batch size, so interpolating
    between doubling rows is close, and few rows fill quickly from live traffic.
    """
    top = max(int(max_bs), 1)
    out = [1 << i for i in range(top.bit_length()) if (1 << i) <= top]
    if out[-1] != top:
        out.append(top)
    return tuple(out)


# -- step timing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSample:
    """One measured decode step: batch size, verified width, measured and predicted ms."""

    batch_size: int
    width: int
    measured_ms: float
    predicted_ms: float
    # whether the prediction is the cost timed for this width in this batch-size bucket (not a
    # prior's, a placeholder or another bucket's): only such a price can be judged by the step
    price_measured: bool = True


@dataclass(frozen=True)
class Marks:
    """How a :class:`StepTimer` reads time: ``mark()`` -> a mark, ``ready(mark)`` (non-blocking),
    ``elapsed(a, b)`` in ms (called only once ``b`` is ready, so it never waits)."""

    mark: Callable[[], Any]
    ready: Callable[[Any], bool]
    elapsed: Callable[[Any, Any], float]


def host_marks(clock: Callable[[], float] = time.perf_counter) -> Marks:
    """Host clock marks (CPU serving; ``clock`` in seconds, a fake one in tests)."""
    return Marks(mark=clock, ready=lambda m: True, elapsed=lambda a, b: (b - a) * 1000.0)


def cuda_event_marks() -> Marks:
    """CUDA events on the current stream; read once ``query()`` says they ran (one step late).

    ``query()`` never blocks, so the host never waits for the GPU on EVICT's behalf; a mark that
    has not run yet is simply read at a later step.
    """

    def mark() -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    return Marks(mark=mark, ready=lambda ev: bool(ev.query()), elapsed=lambda a, b: float(a.elapsed_time(b)))


@dataclass
class _Step:
    batch_size: int
    width: int
    predicted_ms: float
    start: Any
    price_measured: bool = True
    end: Any = None
    next_start: Any = None  # the next decode step's start, when it followed at once


class StepTimer:
    """Times decode steps; samples come out of :meth:`poll` once their marks are readable.

    Per decode step the worker calls ``begin()`` before it and ``end(bs, width, predicted_ms)``
    after; anything else the model runs in between (a prefill) calls ``interrupt()``. A step is
    measured to the next step's start when that step began within ``max_gap_ms`` of its end (the
    scheduler's host work belongs to the step), else to its own end (the server was idle).
    """

    def __init__(self, marks: Marks, max_gap_ms: float = 50.0, max_pending: int = 64) -> None:
        self.marks = marks
        self.max_gap_ms = float(max_gap_ms)
        self.max_pending = int(max_pending)
        self._open: _Step | None = None
        self._last: _Step | None = None  # ended, waiting to see whether the next step follows
        self._pending: deque[_Step] = deque()

    def begin(self) -> None:
        start = self.marks.mark()
        if self._last is not None:
            self._last.next_start = start
            self._flush_last()
        self._open = _Step(0, 0, float("nan"), start)

    def end(self, batch_size: int, width: int, predicted_ms: float, *, price_measured: bool = True) -> None:
        step, self._open = self._open, None
        if step is None:
            return
        step.batch_size, step.width, step.predicted_ms = int(batch_size), int(width), float(predicted_ms)
        step.price_measured = bool(price_measured)
        step.end = self.marks.mark()
        self._last = step

    def interrupt(self) -> None:
        """Something other than a decode step runs next: the last step ends at its own end."""
        self._open = None
        self._flush_last()

    def _flush_last(self) -> None:
        if self._last is not None:
            self._pending.append(self._last)
            self._last = None
            while len(self._pending) > self.max_pending:  # marks that never become ready
                self._pending.popleft()

    def poll(self) -> list[StepSample]:
        """The steps whose marks have run, oldest first (non-blocking)."""
        out: list[StepSample] = []
        m = self.marks
        while self._pending:
            step = self._pending[0]
            last = step.next_start if step.next_start is not None else step.end
            if not m.ready(last):
                break
            self._pending.popleft()
            span = m.elapsed(step.start, step.end)
            measured = span
            if step.next_start is not None and m.elapsed(step.end, step.next_start) <= max(
                self.max_gap_ms, 0.0
            ):
                measured = m.elapsed(step.start, step.next_start)
            if math.isfinite(measured) and measured > 0:
                out.append(
                    StepSample(step.batch_size, step.width, measured, step.predicted_ms, step.price_measured)
                )
        return out


# -- the live table ---------------------------------------------------------------------------


class LiveCosts:
    """Per (batch-size bucket, width) step costs in ms, learned from measured decode steps.

    Args:
        widths: the policy's widths (ascending).
        batch_sizes: the row buckets (ascending, see :func:`bucket_sizes`).
        prior: what the server believes before serving (``CostTable`` or anything with
            ``step_cost(bs, widths)``), or None: then rows are explored (:meth:`explore_index`).
        window, min_obs: samples kept per cell and needed before a cell counts as observed.
        sync_every: decode steps between publications.
        reduce: TP max-reduce of a float64 host tensor (all ranks call :meth:`on_step` alike).
        metadata: the table's metadata (model, device, dtype, tp_size) for :meth:`table`.
    """

    def __init__(
        self,
        widths: Sequence[int],
        batch_sizes: Sequence[int],
        prior: Any = None,
        *,
        window: int = DEFAULT_WINDOW,
        min_obs: int = DEFAULT_MIN_OBS,
        sync_every: int = DEFAULT_SYNC_EVERY,
        reduce: Reduce | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.widths = tuple(int(w) for w in widths)
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        if not self.widths or not self.batch_sizes or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(
                f"LiveCosts needs ascending widths and batch sizes, got {widths!r}, {batch_sizes!r}"
            )
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes must be ascending ints >= 1, got {batch_sizes!r}")
        if window < 1 or min_obs < 1 or sync_every < 1:
            raise ValueError("window, min_obs and sync_every must be >= 1")
        self.window, self.min_obs, self.sync_every = int(window), int(min_obs), int(sync_every)
        self.reduce = reduce
        self.metadata = dict(metadata or {})
        nb, nw = len(self.batch_sizes), len(self.widths)
        self._samples = [[deque(maxlen=self.window) for _ in range(nw)] for _ in range(nb)]
        self._seen = [[0] * nw for _ in range(nb)]  # steps observed per cell (all time)
        self.prior: list[list[float]] | None = None
        if prior is not None:
            self.prior = [
                [float(v) for v in prior.step_cost(b, torch.tensor(self.widths)).tolist()]
                for b in self.batch_sizes
            ]
        # published (what the policy reads): ms [nb][nw], observed [nb][nw]
        self.grid: list[list[float]] = (
            [row[:] for row in self.prior] if self.prior else [[1.0] * nw for _ in range(nb)]
        )
        self.observed = [[False] * nw for _ in range(nb)]
        self.steps = 0
        self.publications = 0
        self._table: CostTable | None = None
        self._interval: list[tuple[float, float]] = []  # (predicted, measured) since the last line

    # -- reading ----------------------------------------------------------------------------
    @property
    def exploring(self) -> bool:
        """No prior: rows are explored until their widths are timed."""
        return self.prior is None

    def bucket(self, batch_size: int) -> int:
        """The row a batch size is recorded in: the nearest bucket in log scale."""
        b = max(int(batch_size), 1)
        return min(range(len(self.batch_sizes)), key=lambda i: (abs(math.log(self.batch_sizes[i] / b)), i))

    def table(self) -> CostTable:
        """The published grid as a :class:`CostTable` (interpolation and clamping as any table)."""
        if self._table is None:
            meta = {
                "model_id": "unknown",
                "device": "unknown",
                "dtype": "unknown",
                "tp_size": 1,
                **self.metadata,
                "backend": "sglang-live",
                "notes": "step time measured on served decode steps (median per batch-size bucket and "
                "width); cells never observed scaled from the prior by the observed ratio",
                "observed": [[int(o) for o in row] for row in self.observed],
            }
            self._table = CostTable.from_dict(
                {
                    "schema_version": SCHEMA_VERSION,
                    "metadata": meta,
                    "batch_sizes": list(self.batch_sizes),
                    "widths": list(self.widths),
                    "latency_ms": {"median": self.grid, "p10": self.grid, "p90": self.grid},
                },
                source="<live step costs>",
            )
        return self._table

    def step_cost(self, batch_size: int, widths: Any) -> torch.Tensor:
        """``T(bs, widths)`` in ms from the published grid (any widths: interpolated as a table)."""
        return self.table().step_cost(batch_size, widths)

    def row(self, batch_size: int) -> list[float]:
        """The published costs of every width at ``batch_size``: linear between buckets, clamped.

        Plain Python on host floats: the worker calls it every step (the prediction it logs)."""
        bss, b = self.batch_sizes, float(batch_size)
        if b <= bss[0]:
            return list(self.grid[0])
        if b >= bss[-1]:
            return list(self.grid[-1])
        hi = next(i for i, v in enumerate(bss) if v >= b)
        lo = hi - 1
        t = (b - bss[lo]) / (bss[hi] - bss[lo])
        return [(1 - t) * x + t * y for x, y in zip(self.grid[lo], self.grid[hi])]

    def predict(self, batch_size: int, width: int) -> float:
        """Host float: the published cost of one (batch size, width) of the policy's widths."""
        return self.row(batch_size)[self.widths.index(int(width))]

    def measured(self, batch_size: int, width: int) -> bool:
        """Whether ``width``'s published cost in this batch size's bucket was timed there, not
        taken from the prior, a placeholder or another bucket: only such a price can be judged
        against a step's measured time."""
        return width in self.widths and self.observed[self.bucket(batch_size)][self.widths.index(width)]

    def cost_grid(self, max_bs: int) -> torch.Tensor:
        """float32 ``[max_bs, W]``: row ``b-1`` holds every width's cost at batch size ``b``.

        What the server's policy reads (one device tensor, refreshed in place by one copy per
        publication, so no per-batch-size copies and no step waits on a host-to-device copy).
        """
        grid = torch.tensor(self.grid, dtype=torch.float64)  # [nb, W]
        bss = torch.tensor(self.batch_sizes, dtype=torch.float64)
        b = torch.arange(1, max(int(max_bs), 1) + 1, dtype=torch.float64).clamp(bss[0], bss[-1])
        hi = torch.searchsorted(bss, b).clamp(max=bss.numel() - 1)
        lo = (hi - 1).clamp(min=0)
        span = bss[hi] - bss[lo]
        t = torch.where(span > 0, (b - bss[lo]) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
        return ((1 - t).unsqueeze(1) * grid[lo] + t.unsqueeze(1) * grid[hi]).to(torch.float32)

    def explore_index(self, batch_size: int) -> int | None:
        """Without a prior: the width index this step should time (least seen first), else None."""
        if self.prior is not None:
            return None
        row = self._seen[self.bucket(batch_size)]
        j = min(range(len(self.widths)), key=lambda k: (row[k], k))
        return j if row[j] < self.min_obs else None

    # -- writing ----------------------------------------------------------------------------
    def observe(self, sample: StepSample) -> None:
        """Record one measured step (non-positive or non-finite times are dropped)."""
        ms = float(sample.measured_ms)
        if not (math.isfinite(ms) and ms > 0) or int(sample.width) not in self.widths:
            return
        i, j = self.bucket(sample.batch_size), self.widths.index(int(sample.width))
        self._samples[i][j].append(ms)
        self._seen[i][j] += 1
        if math.isfinite(sample.predicted_ms) and sample.predicted_ms > 0 and len(self._interval) < 100_000:
            self._interval.append((float(sample.predicted_ms), ms))

    def on_step(self) -> bool:
        """Count one decode step (every rank); publish every ``sync_every``. True if the grid changed."""
        self.steps += 1
        if self.steps % self.sync_every:
            return False
        return self.publish()

    def take_interval(self) -> tuple[float, float, float, int]:
        """Since the last call: ``(mean predicted ms, mean measured ms, median measured/predicted, steps)``.

        The means are what throughput sees; the median ratio says how well the table predicts a
        typical step, unmoved by the odd slow one (the rule's own estimate is a median too).
        """
        pairs, self._interval = self._interval, []
        if not pairs:
            return float("nan"), float("nan"), float("nan"), 0
        n = len(pairs)
        ratio = statistics.median(m / p for p, m in pairs)
        return sum(p for p, _ in pairs) / n, sum(m for _, m in pairs) / n, ratio, n

    def publish(self) -> bool:
        """Rebuild the grid from the windows (max-reduced over TP ranks first). True if it changed."""
        nb, nw = len(self.batch_sizes), len(self.widths)
        stats = torch.full((2, nb, nw), -1.0, dtype=torch.float64)  # [median, count]
        for i in range(nb):
            for j in range(nw):
                s = self._samples[i][j]
                stats[1, i, j] = float(self._seen[i][j])
                if len(s) >= self.min_obs:
                    stats[0, i, j] = statistics.median(s)
        if self.reduce is not None:
            stats = self.reduce(stats).to(torch.float64)
        # the explored counts become the ranks' maximum too: exploration stays in step
        for i in range(nb):
            for j in range(nw):
                self._seen[i][j] = max(self._seen[i][j], int(stats[1, i, j]))
        measured = [
            [float(stats[0, i, j]) if stats[0, i, j] > 0 else None for j in range(nw)] for i in range(nb)
        ]
        grid = self._fill(measured)
        observed = [[v is not None for v in row] for row in measured]
        changed = grid != self.grid or observed != self.observed
        self.grid, self.observed = grid, observed
        self.publications += 1
        if changed:
            self._table = None
        return changed

    def _fill(self, measured: list[list[float | None]]) -> list[list[float]]:
        """Measured cells as measured; the others = prior x the ratio observed nearby."""
        nb, nw = len(self.batch_sizes), len(self.widths)
        prior = self.prior
        if prior is None:
            # the shape of the nearest fully measured row (by log batch size), else flat
            full = [i for i in range(nb) if all(v is not None for v in measured[i])]
            prior = []
            for i in range(nb):
                if full:
                    k = min(full, key=lambda r: (abs(math.log(self.batch_sizes[r] / self.batch_sizes[i])), r))
                    prior.append([float(v) for v in measured[k]])  # type: ignore[arg-type]
                else:
                    prior.append([1.0] * nw)
        row_ratio: list[float | None] = []
        for i in range(nb):
            ratios = [measured[i][j] / prior[i][j] for j in range(nw) if measured[i][j] is not None]
            row_ratio.append(statistics.median(ratios) if ratios else None)
        rows = [i for i in range(nb) if row_ratio[i] is not None]
        grid = []
        for i in range(nb):
            ratio = row_ratio[i]
            if ratio is None:
                near = min(
                    rows,
                    key=lambda r: (abs(math.log(self.batch_sizes[r] / self.batch_sizes[i])), r),
                    default=None,
                )
                ratio = row_ratio[near] if near is not None else 1.0
            grid.append(
                [
                    round(measured[i][j] if measured[i][j] is not None else prior[i][j] * float(ratio), 4)
                    for j in range(nw)
                ]
            )
        return grid

    def summary(self) -> str:
        """One log line: the published grid, observed cells marked with '*'."""
        rows = []
        for i, b in enumerate(self.batch_sizes):
            cells = " ".join(
                f"{w}:{v:.1f}{'*' if o else ''}"
                for w, v, o in zip(self.widths, self.grid[i], self.observed[i])
            )
            rows.append(f"bs {b}: {cells}")
        return "; ".join(rows)
