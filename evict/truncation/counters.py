"""``DecisionCounters``: what a ``TruncationPolicy`` counts, kept apart from how it decides.

Why a class of its own: the counters are read by the metrics line, the bench and the tests, and
their one subtlety -- per-step device tensors reduced in bulk so that counting costs no device op
and no host sync per step -- has nothing to do with choosing a width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .rule import WidthDecision

__all__ = ["DecisionCounters"]

logger = logging.getLogger("evict")


class DecisionCounters:
    """Steps, requests, widths, predicted vs realized accepted lengths, fallbacks and errors."""

    _FLUSH_EVERY = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.steps = 0
        self.requests = 0
        self.width_sum = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device, read by stats()
        self.errors = 0
        self.realized_sum = 0.0
        self.realized_count = 0
        self.unpriced = 0  # requests of steps that took no decision (record_unpriced)

    def record(self, d: WidthDecision) -> None:
        """Count one step's decision: its tensors are kept and reduced in bulk later (no sync now)."""
        self.steps += 1
        self.requests += int(d.fallback.shape[0])
        self.width_sum += d.width
        self._pending.append((d.fallback, d.expected_accepted))
        if len(self._pending) >= self._FLUSH_EVERY:
            self._flush()

    def record_unpriced(self, batch_size: int, width: int) -> None:
        """Count a step that verified ``width`` without a decision (the kill switch): host ints only."""
        self.steps += 1
        self.requests += int(batch_size)
        self.unpriced += int(batch_size)
        self.width_sum += int(width)

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

    def record_error(self, exc: BaseException, what: str = "the width decision failed") -> None:
        """Count a failure that a caller recovered from; log the first and every 1000th with its traceback."""
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            logger.error("evict: %s (%d so far): %r", what, self.errors, exc, exc_info=exc)

    def stats(self) -> dict[str, float | int]:
        """Mean width, mean predicted vs realized accepted length per request-step, fallbacks, errors.

        Reads the device totals back: the one sync of the counters, paid only when asked.
        """
        self._flush()
        fallbacks = sum(int(fb) for fb, _ in self._totals.values())
        predicted = sum(float(ex) for _, ex in self._totals.values())
        priced = self.requests - self.unpriced
        return {
            "steps": self.steps,
            "requests": self.requests,
            "mean_width": self.width_sum / self.steps if self.steps else float("nan"),
            "mean_predicted_accepted": predicted / priced if priced else float("nan"),
            "mean_realized_accepted": (
                self.realized_sum / self.realized_count if self.realized_count else float("nan")
            ),
            "realized_count": self.realized_count,
            "fallbacks": fallbacks,
            "errors": self.errors,
        }
