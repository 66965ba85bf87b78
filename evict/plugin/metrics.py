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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the metrics stay torch-free at import
    from evict.truncation import TruncationPolicy

__all__ = ["EvictMetrics", "RealNodeCounter", "format_stats"]

logger = logging.getLogger(__name__)


def format_stats(
    stats: dict[str, Any],
    switches: int = 0,
    width_counts: dict[int, int] | None = None,
    real_nodes: tuple[float, int] | None = None,
    step_ms: tuple[float, float, float, int] | None = None,
    shapes: dict[str, int] | None = None,
) -> str:
    """One log line from ``TruncationPolicy.stats()`` (and how often each width was verified).

    ``real_nodes`` (per-request widths only): the mean real (non-padding) candidates verified per
    request and step, and how many steps were padded, next to the width histogram. ``step_ms``
    (live step costs): mean predicted and measured step time since the last line, the median of
    measured / predicted and how many steps were timed: whether the table the rule reads prices
    what the server spends. ``shapes`` (EVICT_DEPTH=1): decode steps per draft shape, e.g.
    ``plain:40,tree(3,4):12``.
    """

    def f(x: Any) -> str:
        return f"{x:.2f}" if isinstance(x, float) else str(x)

    return (
        f"EVICT: steps={stats['steps']} mean_width={f(stats['mean_width'])} "
        f"accept_len predicted={f(stats['mean_predicted_accepted'])} "
        f"realized={f(stats['mean_realized_accepted'])} fallbacks={stats['fallbacks']} "
        f"errors={stats.get('errors', 0)} "
        f"width_switches={switches} decision={stats['decision']} backend={stats['backend']}"
        + (f" widths={','.join(f'{w}:{n}' for w, n in sorted(width_counts.items()))}" if width_counts else "")
        + (
            f" real_nodes_per_req={f(float(real_nodes[0]))} padded_steps={int(real_nodes[1])}"
            if real_nodes is not None
            else ""
        )
        + (
            f" step_ms predicted={step_ms[0]:.2f} measured={step_ms[1]:.2f} "
            f"measured/predicted={step_ms[2]:.3f} timed={step_ms[3]}"
            if step_ms is not None and step_ms[3] > 0
            else ""
        )
        + (f" shapes={','.join(f'{k}:{n}' for k, n in shapes.items())}" if shapes else "")
    )


class EvictMetrics:
    """Counts decode steps and logs the policy's statistics every ``log_interval`` steps."""

    def __init__(
        self,
        policy: TruncationPolicy,
        log_interval: int,
        log_fn: Callable[[str], None] | None = None,
        switches_fn: Callable[[], int] | None = None,
        logging_rank: bool = True,
        width_counts_fn: Callable[[], dict[int, int]] | None = None,
        real_nodes_fn: Callable[[], tuple[float, int] | None] | None = None,
        step_ms_fn: Callable[[], tuple[float, float, float, int] | None] | None = None,
        shapes_fn: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self.policy = policy
        self.log_interval = int(log_interval)
        # Only one rank (TP rank 0) logs: reading the counters moves device tensors to the host, a
        # sync every other rank would pay for a line it never prints.
        self.logging_rank = bool(logging_rank)
        self._log = log_fn if log_fn is not None else logger.info
        self._switches = switches_fn if switches_fn is not None else (lambda: 0)
        self._width_counts = width_counts_fn if width_counts_fn is not None else dict
        # per-request widths only: (mean real nodes per request-step, padded steps); None: not logged
        self._real_nodes = real_nodes_fn if real_nodes_fn is not None else (lambda: None)
        # live step costs only: predicted vs measured step time since the last line
        self._step_ms = step_ms_fn if step_ms_fn is not None else (lambda: None)
        self._shapes = shapes_fn if shapes_fn is not None else (lambda: None)
        self.steps = 0

    def on_decode_step(self) -> None:
        """Call once per verified decode step; logs on every ``log_interval``-th."""
        self.steps += 1
        if self.logging_rank and self.log_interval > 0 and self.steps % self.log_interval == 0:
            self.log_now()

    def record_num_correct_drafts(self, num_correct_drafts_per_req: Sequence[int]) -> None:
        """Realized accepted length per request = correct drafts + the bonus token."""
        if len(num_correct_drafts_per_req):
            self.policy.counters.record_accepted([int(n) + 1 for n in num_correct_drafts_per_req])

    def log_now(self) -> str:
        line = format_stats(
            self.policy.stats(),
            self._switches(),
            self._width_counts(),
            self._real_nodes(),
            self._step_ms(),
            self._shapes(),
        )
        self._log(line)
        return line


class RealNodeCounter:
    """Real (non-padding) candidates verified per request and step, for per-request widths.

    A padded step adds its ``kept_counts`` on the device (no host sync); other steps add
    ``width - 1`` per request on the host.  ``mean`` reads the device sum, so only the logging
    rank calls it, when it logs.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.padded_steps = 0
        self._host = 0
        self._device: Any = None

    def add_full(self, batch_size: int, width: int) -> None:
        """A step whose every request verified all ``width - 1`` candidates."""
        self.requests += int(batch_size)
        self._host += int(batch_size) * max(int(width) - 1, 0)

    def add_counts(self, kept_counts: Any) -> None:
        """A padded step: ``kept_counts [bs]`` real candidates per request (a device tensor)."""
        self.requests += int(kept_counts.numel())
        self.padded_steps += 1
        total = kept_counts.sum()
        self._device = total if self._device is None else self._device + total

    def summary(self) -> tuple[float, int]:
        """``(mean, padded_steps)`` for the metrics line."""
        return self.mean(), self.padded_steps

    def mean(self) -> float:
        if not self.requests:
            return float("nan")
        device = 0 if self._device is None else int(self._device)
        return (self._host + device) / self.requests
