"""One captured runtime state per verify width, switched by pointer (pure Python, no sglang import).

CUDA graphs are captured for one number of tokens per request, so EVICT captures a small set of
widths at start-up (as SGLang's ``AdaptiveController`` does for draft steps, see
``sglang/srt/speculative/adaptive_runtime_state.py``) and, each step, points the worker at the
state of the chosen width before building the verify input.  This class holds the states, applies
a switch only when the width changes, refuses widths that were not captured, and keeps the memory
each state cost for the start-up report.  The ``apply`` callback does the actual pointer swaps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["WidthStateSet"]

S = TypeVar("S")


class WidthStateSet(Generic[S]):
    """Captured states keyed by width; ``activate(m)`` swaps to width ``m`` if it is not active."""

    def __init__(self, apply: Callable[[int, S], None]) -> None:
        self._apply = apply
        self._states: dict[int, S] = {}
        self._memory_gb: dict[int, float] = {}
        self._seconds: dict[int, float] = {}
        self.active_width: int | None = None
        self.switches = 0

    def register(self, width: int, state: S, memory_gb: float = 0.0, seconds: float = 0.0) -> None:
        """Add the state captured for ``width`` and what it cost (GB of device memory, capture seconds)."""
        if isinstance(width, bool) or int(width) != width or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        if width in self._states:
            raise ValueError(f"a state for width {width} is already registered")
        self._states[int(width)] = state
        self._memory_gb[int(width)] = float(memory_gb)
        self._seconds[int(width)] = float(seconds)

    def reset(self, states: dict[int, S], active: int) -> None:
        """Replace every state (a recapture): widths not in ``states`` are dropped, ``active`` applied.

        Costs of the widths kept stay as measured at start-up.
        """
        if active not in states:
            raise KeyError(f"active width {active} is not among the new states {sorted(states)}")
        self._states = {int(w): st for w, st in states.items()}
        self._memory_gb = {w: self._memory_gb.get(w, 0.0) for w in self._states}
        self._seconds = {w: self._seconds.get(w, 0.0) for w in self._states}
        self.active_width = None
        self.activate(active)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self._states))

    def state(self, width: int) -> S:
        """The state of ``width``; ``KeyError`` naming the captured widths otherwise."""
        try:
            return self._states[width]
        except KeyError:
            raise KeyError(
                f"EVICT has no captured state for width {width}; captured widths: {list(self.widths)}"
            ) from None

    def activate(self, width: int) -> bool:
        """Point the worker at ``width``'s state; returns True if a swap happened."""
        if width == self.active_width:
            return False
        state = self.state(width)
        self._apply(width, state)
        self.active_width = width
        self.switches += 1
        return True

    def memory_report(self) -> str:
        """One line per width with its capture cost (memory and time), for the start-up log."""
        lines = [
            f"  width {w:>3}: {self._memory_gb[w]:7.3f} GB {self._seconds[w]:7.1f} s" for w in self.widths
        ]
        total, seconds = sum(self._memory_gb.values()), sum(self._seconds.values())
        return "\n".join([*lines, f"  total      {total:7.3f} GB {seconds:7.1f} s"])
