"""One width for every tensor-parallel rank (pure torch; no sglang import).

With TP > 1 every rank drafts, decides and verifies.  Ranks that verify different widths run
collectives of different sizes and NCCL hangs, so a rank's own choice is never used alone: the
ranks agree on the **largest** width index any of them chose (one ``all_reduce(MAX)`` of one
int64).  The maximum is also the collective form of every fallback: a rank whose decision failed
proposes the full tree, and then every rank verifies the full tree.  Normally all ranks compute
bitwise-identical scores and the reduction changes nothing; it is what makes identity *provable*.

Cost: one tiny all-reduce and one host read per decode step.  Immediate mode reads its index on
the host anyway; lagged mode gives up its sync-free step under TP > 1 (documented in
``docs/serving.md``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WidthAgreement"]


class WidthAgreement:
    """``agree(index)`` -> the maximum width index over the ranks of ``group`` (identical on all)."""

    def __init__(self, group: Any, device: torch.device | str) -> None:
        self.group = group
        self.device = torch.device(device)
        self._buf = torch.zeros(1, dtype=torch.long, device=self.device)
        self.calls = 0
        self.changed = 0  # steps where this rank's own choice was overruled

    def agree(self, index: int) -> int:
        """All ranks must call this once per decode step, in the same order (it is a collective)."""
        self._buf.fill_(int(index))
        dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group)
        agreed = int(self._buf.item())
        self.calls += 1
        if agreed != index:
            self.changed += 1
        return agreed
