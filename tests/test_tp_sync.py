"""``WidthAgreement`` over a real ``torch.distributed`` group (gloo, two CPU processes).

Defect 3 of issue 12: ranks that verify different widths hang in NCCL.  Here two ranks propose
different widths (and one of them a fallback) and must leave every step with the same one.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evict.plugin.tp_sync import WidthAgreement, policy_fingerprint
from evict.truncation import TruncationPolicy

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# rank -> proposals per step: rank 1 falls back to the full tree (index 5) at step 2
_PROPOSALS = {0: [1, 3, 2, 0, 4], 1: [2, 3, 5, 0, 1]}


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        agreement = WidthAgreement(dist.group.WORLD, "cpu")
        out[rank] = ([agreement.agree(i) for i in _PROPOSALS[rank]], agreement.changed)
        # start-up: the same policy everywhere, then rank 1's calibration fell back to the full tree
        same = TruncationPolicy([1.0, 2.0, 4.0], widths=[2, 4, 8])
        fallback = TruncationPolicy([1.0], widths=[8], decision="off")
        mine = same if rank == 0 else fallback
        out[f"policy{rank}"] = (
            agreement.same_everywhere(policy_fingerprint(same, (1, 4))),
            agreement.same_everywhere(policy_fingerprint(mine, (1, 4))),
        )
    finally:
        dist.destroy_process_group()


def test_every_rank_leaves_each_step_with_the_widest_proposal():
    with tempfile.TemporaryDirectory() as d:
        manager = mp.Manager()
        out = manager.dict()
        mp.spawn(_worker, args=(2, os.path.join(d, "store"), out), nprocs=2, join=True)
        got = dict(out)
    want = [max(a, b) for a, b in zip(_PROPOSALS[0], _PROPOSALS[1])]
    assert got[0][0] == got[1][0] == want == [2, 3, 5, 0, 4]
    assert (got[0][1], got[1][1]) == (2, 1)  # steps where each rank was overruled
    assert got["policy0"] == got["policy1"] == (True, False)  # every rank sees the mismatch alike


def test_a_single_process_group_returns_the_proposal_unchanged(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        a = WidthAgreement(dist.group.WORLD, torch.device("cpu"))
        assert [a.agree(i) for i in (3, 0, 7)] == [3, 0, 7] and a.calls == 3 and a.changed == 0
    finally:
        dist.destroy_process_group()
