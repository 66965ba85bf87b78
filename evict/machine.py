"""What machine this is, in the words tables and reports record (no torch import).

One reader of ``/proc/cpuinfo``: cost tables are checked against the CPU model they were measured
on, and the benchmarks print it, so all of them must name a machine the same way.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

__all__ = ["cpu_model"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of the processor."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip() or platform.processor() or platform.machine()
    return platform.processor() or platform.machine()
