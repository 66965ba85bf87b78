"""Periodic EVICT metrics for SGLang's log (pure Python; reads the policy's counters).

Every ``log_interval`` decode steps the worker logs the mean verified width, the predicted
(``B(m)`` from the drafter's scores) and realized accepted length per request-step, the number of
fallbacks to the full tree and of width switches.  Realized lengths arrive through SGLang's
``on_verify_complete_cpu`` hook, after the scheduler already copied them to the host, so
recording them adds no device synchronisation; the policy's device-side counters are read only
when a line is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["EvictMetrics", "format_stats"]

logger = logging.getLogger(__name__)


def format_stats(stats: dict[str, Any], switches: int = 0, width_counts: dict[int, int] | None = None) -> str:
    """One log line from ``TruncationPolicy.stats()`` (and how often each width was verified)."""

    def f(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    return (
        f"EVICT: steps={stats['steps']} mean_width={f(stats['mean_width'])} "
        f"accept_len predicted={f(stats['mean_predicted_accepted'])} "
        f"realized={f(stats['mean_realized_accepted'])} fallbacks={stats['fallbacks']} "
        f"errors={stats.get('errors', 0)} "
        f"width_switches={switches} mode={stats['mode']} backend={stats['backend']}"
        + (f" widths={','.join(f'{w}:{n}' for w, n in sorted(width_counts.items()))}" if width_counts else "")
    )


class EvictMetrics:
    """Counts decode steps and logs the policy's statistics every ``log_interval`` steps."""

    def __init__(
        self,
        policy: Any,
        log_interval: int,
        log_fn: Callable[[str], None] | None = None,
        switches_fn: Callable[[], int] | None = None,
        logging_rank: bool = True,
        width_counts_fn: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self.policy = policy
        self.log_interval = int(log_interval)
        # Only one rank (TP rank 0) logs: reading the counters moves device tensors to the host, a
        # sync every other rank would pay for a line it never prints.
        self.logging_rank = bool(logging_rank)
        self._log = log_fn if log_fn is not None else logger.info
        self._switches = switches_fn if switches_fn is not None else (lambda: 0)
        self._width_counts = width_counts_fn if width_counts_fn is not None else dict
        self.steps = 0

    def on_decode_step(self) -> None:
        """Call once per verified decode step; logs on every ``log_interval``-th."""
        self.steps += 1
        if self.logging_rank and self.log_interval > 0 and self.steps % self.log_interval == 0:
            self.log_now()

    def record_num_correct_drafts(self, num_correct_drafts_per_req: Sequence[int]) -> None:
        """Realized accepted length per request = correct drafts + the bonus token."""
        if len(num_correct_drafts_per_req):
            self.policy.record_accepted([int(n) + 1 for n in num_correct_drafts_per_req])

    def log_now(self) -> str:
        line = format_stats(self.policy.stats(), self._switches(), self._width_counts())
        self._log(line)
        return line
