"""``TruncationPolicy``: the one object the SGLang plugin, the reference engine and the benchmark hold.

It owns the allowed widths, the step-cost source (a cost table, a callable or a fixed array), the
decision (``immediate``, ``lagged`` or ``off``), the decider that implements the rule's step (the
torch rule, or the Triton kernel that ``evict.kernels.make_decider`` builds) and the counters, so
that every caller truncates the draft tree the same way and reports the same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .counters import DecisionCounters
from .rule import (
    TORCH_RULE,
    Decider,
    WidthDecision,
    choose_widths_batch_budget,
    validate_step_cost,
    validate_widths,
)

__all__ = ["TruncationPolicy", "HeldIndex", "DECISIONS", "USER_DECISIONS", "CostSource", "StepCostTable"]

logger = logging.getLogger("evict")

DECISIONS = ("immediate", "lagged", "off")
# what a user picks (EVICT_DECISION, --decision); "off" is the kill switch (EVICT_DISABLE)
USER_DECISIONS = ("immediate", "lagged")


class StepCostTable(Protocol):
    """A source of step times per batch size, e.g. ``evict.profiler.table.CostTable``.

    A table may also carry ``widths`` (its captured widths): the policy's default widths.
    """

    def step_cost(self, batch_size: int, widths: torch.Tensor) -> torch.Tensor: ...


# A table, a callable ``(batch_size, widths [W]) -> [W]`` step times, or fixed ``[W]`` step times.
CostSource = StepCostTable | Callable[[int, torch.Tensor], torch.Tensor] | Sequence[float] | torch.Tensor


class HeldIndex:
    """A width index carried from one decode step to the next without the host waiting on the GPU.

    ``write`` queues a copy of this step's 0-d device index into pinned host memory and records a
    CUDA event after it; ``read`` at the next step waits on that event only -- the previous step's
    decision, normally long finished -- never on work queued after it, such as this step's
    drafter.  On CPU the value is already computed when written, so reading it waits for nothing.
    """

    def __init__(self) -> None:
        self._value: int | None = None
        self._buffer: torch.Tensor | None = None  # the only tensor a lagged step reads on the host
        self._pinned: torch.Tensor | None = None
        self._event: Any = None
        self._queued = False

    def write(self, index: torch.Tensor | int) -> None:
        """Hold ``index`` (an int, or a 0-d integer tensor on any device) for the next ``read``."""
        if not isinstance(index, torch.Tensor):
            self._value, self._queued = int(index), False
            return
        index = index.reshape(())
        if index.device.type == "cuda":
            if self._pinned is None:
                self._pinned = torch.empty((), dtype=torch.long, pin_memory=True)
                self._event = torch.cuda.Event()
            self._pinned.copy_(index, non_blocking=True)
            self._event.record()
            self._buffer = self._pinned
        else:  # CPU tensors are computed eagerly; another device pays one copy here
            self._buffer = index if index.device.type == "cpu" else index.cpu()
        self._queued = True

    def read(self) -> int | None:
        """The held index (None before the first write)."""
        if self._queued:
            if self._event is not None and self._buffer is self._pinned:
                self._event.synchronize()
            self._value, self._queued = int(self._buffer), False
        return self._value


def _to_device(c: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``c`` on ``device`` without a blocking copy: a CUDA copy goes from pinned memory, queued.

    A plain host-to-device copy from pageable memory makes the host wait for the stream (drafting
    included); from pinned memory with ``non_blocking`` it is queued behind the work it follows.
    PyTorch's pinned allocator keeps the source alive until that copy has run.
    """
    device = torch.device(device)
    if device.type == "cuda" and c.device.type == "cpu":
        return c.pin_memory().to(device, non_blocking=True)
    return c.to(device)


class TruncationPolicy:
    """Chooses the verify width each decode step; holds the decider that computes it and the counters.

    Args:
        cost: a ``CostTable`` (anything with ``step_cost(batch_size, widths)``), a callable
            ``(batch_size, widths LongTensor [W]) -> [W]`` step times, or a fixed ``[W]`` array of
            step times (independent of batch size).
        widths: allowed (captured) widths, strictly ascending; defaults to the table's widths.
        decision: ``"immediate"`` (width from this step's scores; needs one host sync of the
            chosen index), ``"lagged"`` (width from the previous call's scores, read from pinned
            host memory, so the host never waits for this step's drafter; kept nodes are still the
            top-(m-1) of this step's scores, and a fallback caused by this step's scores widens the
            next step) or ``"off"`` (kill switch: always the largest width = full tree, for A/B
            runs). Lagged and off steps make no host sync at all.
        decider: what computes each step (a :class:`~evict.truncation.rule.Decider`), chosen once
            here: the torch rule (default) or ``evict.kernels.make_decider("triton")``. If it
            raises, the policy uses the torch rule from that step on: ``NotImplementedError`` (it
            cannot run on this device or shape) logs one warning, any other error counts in
            ``errors``. This is the only fallback: the kernel itself has none.
        per_request: per-request widths inside the batch (``choose_widths_batch_budget``): the
            batch verifies one width, but a batch-wide budget of real nodes goes to the requests
            with the best scores and the rest of the slots are padding. Torch rule only (the
            decider implements the one-width rule, so it is not used); not with ``"lagged"`` (the
            budget needs this step's scores, so the decision would sync the host anyway).
        pad_cost: what a padded slot costs relative to a real node, in [0, 1] (1, the default:
            padding is computed like a token and per-request widths reduce to one width; lower
            only where it was measured: a padded root token reads no new experts in the first MoE
            layer only, later layers route it by its own hidden state). Used only with
            ``per_request``.
    """

    def __init__(
        self,
        cost: CostSource,
        widths: torch.Tensor | Sequence[int] | None = None,
        decision: str = "immediate",
        decider: Decider = TORCH_RULE,
        per_request: bool = False,
        pad_cost: float = 1.0,
    ) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if per_request and decision == "lagged":
            raise ValueError("per_request widths need this step's scores: use decision immediate (or off)")
        if isinstance(pad_cost, bool) or not isinstance(pad_cost, (int, float)) or not 0.0 <= pad_cost <= 1.0:
            raise ValueError(f"pad_cost must be a number in [0, 1], got {pad_cost!r}")
        self.per_request = bool(per_request)
        self.pad_cost = float(pad_cost)
        if widths is None:
            table_widths = getattr(cost, "widths", None)
            if table_widths is None:
                raise ValueError("widths is required unless cost is a CostTable (which carries its widths)")
            widths = table_widths
        self.widths = validate_widths(widths).cpu()
        # host values: what the deciders get each step, so that nothing is read from a device
        self._widths = tuple(int(v) for v in self.widths.tolist())
        self.decision = decision
        self._cost_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self._fixed_cost: torch.Tensor | None = None
        # Whole-step pricing per draft shape (CostTable.shape_cost), for the depth decision.
        self._shape_fn: Callable[..., torch.Tensor] | None = getattr(cost, "shape_cost", None)
        # {topk: deepest priced depth} of the table's drafting costs (empty: no shape decision)
        self.draft_shapes: dict[int, int] = dict(getattr(cost, "draft_shapes", None) or {})
        if not getattr(cost, "draft_shapes", True):  # a table without draft_ms prices no shape
            self._shape_fn = None
        self._shape_cache: dict[tuple[int, str, tuple[Any, ...]], torch.Tensor] = {}
        if hasattr(cost, "step_cost"):
            self._cost_fn = cost.step_cost
        elif callable(cost):
            self._cost_fn = cost
        else:
            self._fixed_cost = validate_step_cost(cost, self.widths.numel()).cpu()
        self._cost_cache: dict[tuple[int, str], torch.Tensor] = {}
        self.decider = TORCH_RULE if self.per_request else decider
        self.counters = DecisionCounters()
        self._held = HeldIndex()

    @property
    def backend(self) -> str:
        """The decider in use: ``"torch"``, or ``"triton"`` until the kernel failed."""
        return self.decider.backend

    def step_cost(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Validated float32 ``[W]`` step times for ``batch_size``, cached per (batch size, device).

        The first call for a (batch size, CUDA device) queues its copy from pinned memory (no host
        wait); a server fills the cache for every batch size it can see before serving.
        """
        key = (int(batch_size), str(device))
        c = self._cost_cache.get(key)
        if c is None:
            if self._fixed_cost is not None:
                c = self._fixed_cost
            else:
                c = validate_step_cost(self._cost_fn(int(batch_size), self.widths), self.widths.numel())
            c = _to_device(c, device)
            self._cost_cache[key] = c
        return c

    @property
    def prices_shapes(self) -> bool:
        """True when the cost source prices drafting per depth (the whole-step decision's input)."""
        return self._shape_fn is not None

    def shape_costs(
        self, batch_size: int, shapes: Sequence[Any], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``[D, W]`` whole-step ms of each draft shape (``DraftShape``) at each width, cached.

        Why here: the depth decision and the width decision must price a step identically, so both
        read the policy's one cost source.
        """
        if self._shape_fn is None:
            raise ValueError(
                "the cost source has no per-depth drafting costs (a cost table with draft_ms); "
                "measure one with `evict-profile --model PATH --draft-model DRAFTER --out FILE`"
            )
        key = (int(batch_size), str(device), tuple(shapes))
        c = self._shape_cache.get(key)
        if c is None:
            rows = [
                validate_step_cost(
                    self._shape_fn(int(batch_size), self.widths, s.topk, s.depth), self.widths.numel()
                )
                for s in shapes
            ]
            c = _to_device(torch.stack(rows), device)
            self._shape_cache[key] = c
        return c

    def decide(self, scores: torch.Tensor, cost: torch.Tensor | None = None) -> WidthDecision:
        """Choose the width and kept nodes for one step of ``scores [bs, K]``.

        ``cost``: this step's ``[W]`` step times when they are not the table's own tree's (a step
        that drafted another shape: a row of :meth:`shape_costs`).
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ValueError("scores must be a 2-D tensor [bs, K] of cumulative draft probabilities")
        if cost is None:
            cost = self.step_cost(scores.shape[0], scores.device)
        # The host-known index (lagged: the previous step's own choice; off: the largest width), or
        # None when this step's scores decide (immediate, and the first lagged step).
        index: int | None = None
        if self.decision == "off":
            index = len(self._widths) - 1
        elif self.decision == "lagged":
            index = self._held.read()
        if self.per_request:
            d = choose_widths_batch_budget(
                scores, cost, self._widths, pad_cost=self.pad_cost, index=index, check=False
            )
        else:
            d = self._decide(scores, cost, index)
            if self.decision == "lagged":
                self._held.write(d.own_index())  # queued copy: read by the next call, not waited for now
        self.counters.record(d)
        return d

    def _decide(self, scores: torch.Tensor, cost: torch.Tensor, index: int | None) -> WidthDecision:
        """The decider's step; on its failure, the torch rule for this step and every later one.

        Why: a kernel compiles on its first call on a new GPU, and may not take every device or
        shape; that must cost one log line and the torch rule, not the server.
        """
        try:
            return self.decider(scores, cost, self._widths, index=index, check=False)
        except Exception as exc:
            if self.decider is TORCH_RULE:
                raise
            if isinstance(exc, NotImplementedError):
                logger.warning(
                    "evict: %s width decision unavailable here (%s); using the torch rule", self.backend, exc
                )
            else:
                what = f"the {self.backend} width decision failed; using the torch rule from now on"
                self.counters.record_error(exc, what)
            self.decider = TORCH_RULE
        return TORCH_RULE(scores, cost, self._widths, index=index, check=False)

    def stats(self) -> dict[str, float | int | str]:
        """The counters' statistics, with the decision and the backend that produced them."""
        return {"decision": self.decision, "backend": self.backend, **self.counters.stats()}
