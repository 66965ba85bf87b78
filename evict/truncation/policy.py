"""``TruncationPolicy``: the one object the SGLang plugin, the reference engine and the benchmark hold.

It owns the allowed widths, the step-cost source (a cost table, a callable or a fixed array), the
mode and the counters, so that every caller truncates the draft tree the same way and reports the
same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .rule import (
    WidthDecision,
    _decide_from_index,
    _own_index,
    _Ranked,
    _WidthPlan,
    choose_widths_batch_budget,
    validate_step_cost,
    validate_widths,
)

__all__ = ["TruncationPolicy", "HeldIndex", "MODES", "DECISIONS", "BACKENDS"]

logger = logging.getLogger("evict")

MODES = ("immediate", "lagged", "off")
DECISIONS = MODES[:2]  # what a user picks; "off" is the kill switch (EVICT_DISABLE)
BACKENDS = ("torch", "triton")

CostSource = Any  # CostTable | Callable[[int, Tensor], Tensor] | Sequence[float] | Tensor


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


class TruncationPolicy:
    """Chooses the verify width each decode step and keeps calibration counters.

    Args:
        cost: a ``CostTable`` (anything with ``step_cost(batch_size, widths)``), a callable
            ``(batch_size, widths LongTensor [W]) -> [W]`` step times, or a fixed ``[W]`` array of
            step times (independent of batch size).
        widths: allowed (captured) widths, strictly ascending; defaults to the table's widths.
        mode: ``"immediate"`` (width from this step's scores; needs one host sync of the chosen
            index), ``"lagged"`` (width from the previous call's scores, read from pinned host
            memory, so the host never waits for this step's drafter; kept nodes are still the
            top-(m-1) of this step's scores, and a fallback caused by this step's scores widens the
            next step) or ``"off"`` (kill switch: always the largest width = full tree, for A/B
            runs). Lagged and off steps make no host sync at all.
        backend: ``"torch"`` or ``"triton"`` (``evict.kernels.choose_width_triton`` in every mode,
            which itself runs the torch rule on devices where Triton cannot run; if the module or
            triton is missing, the torch rule is used and the log says so once).
        per_request: per-request widths inside the batch (``choose_widths_batch_budget``): the
            batch verifies one width, but a batch-wide budget of real nodes goes to the requests
            with the best scores and the rest of the slots are padding. Torch rule only (the
            Triton kernel implements the one-width rule); not with ``"lagged"`` (the budget needs
            this step's scores, so the decision would sync the host anyway).
        pad_cost: what a padded slot costs relative to a real node, in [0, 1] (1: padding is
            computed like a token, as on a CPU, and per-request widths reduce to one width; 0: it
            only routes to experts the batch already reads). Used only with ``per_request``.
    """

    def __init__(
        self,
        cost: CostSource,
        widths: torch.Tensor | Sequence[int] | None = None,
        mode: str = "immediate",
        backend: str = "torch",
        per_request: bool = False,
        pad_cost: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if per_request and mode == "lagged":
            raise ValueError("per_request widths need this step's scores: use mode 'immediate' (or 'off')")
        if isinstance(pad_cost, bool) or not isinstance(pad_cost, (int, float)) or not 0.0 <= pad_cost <= 1.0:
            raise ValueError(f"pad_cost must be a number in [0, 1], got {pad_cost!r}")
        self.per_request = bool(per_request)
        self.pad_cost = float(pad_cost)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if widths is None:
            table_widths = getattr(cost, "widths", None)
            if table_widths is None:
                raise ValueError("widths is required unless cost is a CostTable (which carries its widths)")
            widths = table_widths
        self.widths = validate_widths(widths).cpu()
        self.mode = mode
        self._cost_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self._fixed_cost: torch.Tensor | None = None
        if hasattr(cost, "step_cost"):
            self._cost_fn = cost.step_cost
        elif callable(cost):
            self._cost_fn = cost
        else:
            self._fixed_cost = validate_step_cost(cost, self.widths.numel()).cpu()
        self._cost_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._widths_on: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple[int, str], _WidthPlan] = {}
        self._triton = None
        self.backend = "torch"
        if backend == "triton" and not per_request:
            try:
                from evict.kernels import (  # noqa: PLC0415 (optional, imports triton lazily)
                    choose_width_triton,
                    triton_available,
                )

                if not triton_available():
                    raise ImportError("the triton package is not installed")
                self._triton = choose_width_triton
                self.backend = "triton"
            except Exception as exc:  # ImportError or a broken triton install
                logger.warning("evict: Triton width kernel unavailable (%s); using the torch rule", exc)
        self._held = HeldIndex()
        self.reset_stats()

    # -- costs ------------------------------------------------------------------------------
    def step_cost(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Validated float32 ``[W]`` step times for ``batch_size``, cached per (batch size, device)."""
        key = (int(batch_size), str(device))
        c = self._cost_cache.get(key)
        if c is None:
            if self._fixed_cost is not None:
                c = self._fixed_cost
            else:
                c = validate_step_cost(self._cost_fn(int(batch_size), self.widths), self.widths.numel())
            c = c.to(device)
            self._cost_cache[key] = c
        return c

    def _widths_for(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        w = self._widths_on.get(key)
        if w is None:
            w = self._widths_on[key] = self.widths.to(device)
        return w

    def _plan(self, widths: torch.Tensor, k: int) -> _WidthPlan:
        key = (k, str(widths.device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _WidthPlan(widths, k, widths.device)
        return plan

    # -- the decision -----------------------------------------------------------------------
    def decide(self, scores: torch.Tensor) -> WidthDecision:
        """Choose the width and kept nodes for one step of ``scores [bs, K]``."""
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ValueError("scores must be a 2-D tensor [bs, K] of cumulative draft probabilities")
        device = scores.device
        cost = self.step_cost(scores.shape[0], device)
        widths = self._widths_for(device)
        plan = self._plan(widths, scores.shape[1])
        # The host-known index (lagged: the previous step's own choice; off: the largest width), or
        # None when this step's scores decide (immediate, and the first lagged step).
        index: int | None = None
        if self.mode == "off":
            index = widths.numel() - 1
        elif self.mode == "lagged":
            index = self._held.read()
        if self.per_request:
            decision = choose_widths_batch_budget(
                scores, cost, widths, pad_cost=self.pad_cost, index=index, check=False
            )
            self._record(decision)
            return decision
        dev = self._device_decision(scores, cost, widths, index) if self._triton is not None else None
        if dev is not None:
            own = dev.best_index
            if index is None:
                decision = dev.to_width_decision()
            else:
                decision = dev.to_width_decision(index, plan.eff_list[index])
        else:
            ranked = _Ranked(scores, widths, plan)
            objective = ranked.benefit.sum(dim=0) / cost
            own = _own_index(ranked, objective) if index is None or self.mode == "lagged" else None
            decision = _decide_from_index(ranked, objective, own if index is None else index)
        if self.mode == "lagged":
            self._held.write(own)  # queued copy: read by the next call, not waited for now
        self._record(decision)
        return decision

    def _device_decision(self, scores, cost, widths, index):  # noqa: ANN001, ANN202 (kernels optional)
        """The Triton kernel's decision, or None after switching to the torch rule for good.

        Why: the kernel compiles on its first call on a new GPU; a compile or launch failure there
        must cost one log line and the torch rule, not the server.
        """
        try:
            return self._triton(scores, cost, widths, index=index, check=False, backend="auto")
        except Exception as exc:
            self._triton, self.backend = None, "torch"
            self.record_error(exc, "the Triton width kernel failed; using the torch rule from now on")
            return None

    def record_error(self, exc: BaseException, what: str = "the width decision failed") -> None:
        """Count a failure that a caller recovered from; log the first and every 1000th with its traceback."""
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            logger.error("evict: %s (%d so far): %r", what, self.errors, exc, exc_info=exc)

    # -- counters ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters (the lagged state is kept)."""
        self.steps = 0
        self.requests = 0
        self.width_sum = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, read by stats()
        self.errors = 0
        self.realized_sum = 0.0
        self.realized_count = 0

    _FLUSH_EVERY = 256

    def _record(self, d: WidthDecision) -> None:
        # Keep this step's tensors and reduce them in bulk later: no device op, no sync per step.
        self.steps += 1
        self.requests += int(d.fallback.shape[0])
        self.width_sum += d.width
        self._pending.append((d.fallback, d.expected_accepted))
        if len(self._pending) >= self._FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Fold the pending steps into per-device totals: device ops only, read back by ``stats``."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        one_device = len({f.device for f, _ in pending}) == 1
        move = (lambda t: t) if one_device else (lambda t: t.cpu())
        fallback = torch.cat([move(f.reshape(-1)) for f, _ in pending]).sum()
        expected = torch.cat([move(e.reshape(-1)) for _, e in pending]).sum(dtype=torch.float64)
        key = str(fallback.device)
        if key in self._totals:
            fb, ex = self._totals[key]
            fallback, expected = fb + fallback, ex + expected
        self._totals[key] = (fallback, expected)

    def record_accepted(self, accepted_lengths: torch.Tensor | Sequence[int]) -> None:
        """Accumulate realized accepted lengths ``[bs]`` (tokens emitted per request this step)."""
        a = torch.as_tensor(accepted_lengths, dtype=torch.float64).detach().cpu().reshape(-1)
        self.realized_sum += float(a.sum())
        self.realized_count += int(a.numel())

    def stats(self) -> dict[str, float | int | str]:
        """Mean width, mean predicted vs realized accepted length per request-step, fallbacks."""
        self._flush()
        fallbacks = sum(int(fb) for fb, _ in self._totals.values())
        predicted = sum(float(ex) for _, ex in self._totals.values())
        return {
            "mode": self.mode,
            "backend": self.backend,
            "steps": self.steps,
            "requests": self.requests,
            "mean_width": self.width_sum / self.steps if self.steps else float("nan"),
            "mean_predicted_accepted": predicted / self.requests if self.requests else float("nan"),
            "mean_realized_accepted": (
                self.realized_sum / self.realized_count if self.realized_count else float("nan")
            ),
            "realized_count": self.realized_count,
            "fallbacks": fallbacks,
            "errors": self.errors,
        }
