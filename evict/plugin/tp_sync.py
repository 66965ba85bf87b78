"""One width and one policy for every tensor-parallel rank (pure torch; no sglang import).

With TP > 1 every rank drafts, decides and verifies.  Ranks that verify different widths run
collectives of different sizes and NCCL hangs, so a rank's own choice is never used alone: the
ranks agree on the **largest** width index any of them chose (one ``all_reduce(MAX)`` of one
int64).  The maximum is also the collective form of every fallback: a rank whose decision failed
proposes the full tree, and then every rank verifies the full tree.  Normally all ranks compute
bitwise-identical scores and the reduction changes nothing; it is what makes identity *provable*.

Where the agreement runs: over the TP group's **CPU (gloo) group**, on a host tensor.  The index it
agrees on is already a host int (immediate mode read it; lagged and off modes knew it before the
scores existed), so the collective never reads a device tensor and never waits for the GPU: it adds
no device sync to any mode.  ``off`` (``EVICT_DISABLE=1``) needs no agreement at all (every rank
verifies the full tree by construction, see :func:`policy_fingerprint`), so the plugin skips it.

Ranks can only agree on an index if they index the same widths: :func:`policy_fingerprint` and
:meth:`WidthAgreement.same_everywhere` check once, at start-up, that every rank holds the same
policy (decision, widths, step costs, per-request settings); if not, every rank falls back to the
full tree alike.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WidthAgreement", "policy_fingerprint"]

_MASK = (1 << 62) - 1  # fingerprints fit a signed int64 with room for MIN/MAX reductions


class WidthAgreement:
    """``agree(index)`` -> the maximum width index over the ranks of ``group`` (identical on all).

    ``group`` is the TP group's CPU group (gloo): the buffer lives in host memory, so reading the
    result never waits on a device.  ``device`` is the buffer's device and must be one the group's
    backend supports (``"cpu"`` for gloo, the default).
    """

    def __init__(self, group: Any, device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)
        self._buf = torch.zeros(1, dtype=torch.long, device=self.device)
        self.calls = 0
        self.changed = 0  # steps where this rank's own choice was overruled

    def agree(self, index: int) -> int:
        """All ranks must call this once per decode step, in the same order (it is a collective)."""
        self._buf.fill_(int(index))
        dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group)
        agreed = int(self._buf[0])  # a host tensor on the CPU group: no device sync
        self.calls += 1
        if agreed != index:
            self.changed += 1
        return agreed

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank passed the same int (two tiny collectives; start-up only)."""
        lo = torch.tensor([int(value) & _MASK], dtype=torch.long, device=self.device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        return int(lo[0]) == int(hi[0])


def policy_fingerprint(policy: Any, batch_sizes: Iterable[int] = (1,)) -> int:
    """A 62-bit hash of what makes two ranks' decisions index the same trees.

    Covers the decision mode, the widths, per-request settings and the step costs at
    ``batch_sizes`` (the backend is left out: the torch rule and the Triton kernel decide alike).
    """
    h = hashlib.sha256()
    h.update(str(getattr(policy, "decision", "")).encode())
    h.update(repr(tuple(int(w) for w in policy.widths.tolist())).encode())
    h.update(
        repr((bool(getattr(policy, "per_request", False)), float(getattr(policy, "pad_cost", 1.0)))).encode()
    )
    for bs in sorted({int(b) for b in batch_sizes}):
        cost = policy.step_cost(bs, "cpu").to(torch.float64).tolist()
        h.update(struct.pack(f"<q{len(cost)}d", bs, *cost))
    return int.from_bytes(h.digest()[:8], "little") & _MASK
