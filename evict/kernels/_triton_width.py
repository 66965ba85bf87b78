"""Triton kernels for EVICT's width decision (imported only when ``triton`` is importable).

Two launches per decision, no host sync, static shapes (CUDA-graph capturable):

1. ``rank_kernel`` -- one program per request: sanitize the row exactly as
   ``evict.truncation.sanitize_scores`` does (NaN/inf/negative anywhere -> ramp over flat index;
   scores above 1 clamped), rank every candidate in the stable descending order (ties to the lower
   flat index) by pairwise comparison, and write ``B_r(m) = 1 + sum of the m-1 best`` for every
   allowed width into ``benefit [bs, W]``, the ranks into ``rank [bs, K]`` and the bad-row flag.
2. ``decide_kernel`` -- one program per request again: every program reduces the whole ``benefit``
   tile over requests (same data, same order, so every program gets bitwise the same objective and
   argmax; at bs=128, W=8 that is 1,024 loads from L2 per program), divides by ``T(m)``, takes the
   global argmax (ties to the smaller width), applies the fallback (or takes the caller's forced
   index as given), and writes its own kept row. Program 0 also writes the [W] objective, the
   step's own choice (what lagged mode carries to the next step), the used index and the width.

``rank_kernel`` with ``KEEP_ONLY`` fuses ranking and kept rows for a width that is already known.

Why ranks and not a sort: the kept set of width m is ``{i : rank_i < m-1}`` and its ascending list
is a prefix count over flat index, so no sorted copy is needed. Pairwise ranking is O(K^2) but
only a few vector ops per tile (K=64: one 64x64 tile), while ``tl.sort``'s bitonic network is
about a hundred times slower in Triton's CPU interpreter, which CI runs.

Rounding follows the torch rule on CPU: ``B = 1 + the top-(m-1) sum`` runs in float64 and is
rounded to float32 once (the rule's CPU ``torch.cumsum`` of float32 accumulates in double); the division by ``T(m)`` uses
IEEE round-to-nearest (``div_rn``). The cross-request sum runs in float64, which is exact here
(every B is a float32 >= 1, so all terms are multiples of 2^-23 and the sum fits 53 bits for any
bs below 4 million) and independent of reduction order; torch sums float32, so objectives may
differ by an ulp and only an exact near-tie between widths could pick a different, equally good,
width.
"""

import triton
import triton.language as tl
from triton import knobs


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


# Kernels are module-level (triton.jit resolves helpers through the module globals). This module
# is imported lazily, on the first kernel call, so TRITON_INTERPRET set before that call is honoured.
INTERPRETED = interpreting()


@triton.jit
def _clean(scores_ptr, rows, stride, offs, mask, bad, K):
    """Sanitized scores of ``rows`` at columns ``offs`` (as ``sanitize_scores``), -1 off the rows."""
    s = tl.load(scores_ptr + rows[:, None] * stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    kf = tl.zeros(offs.shape, dtype=tl.float32) + K
    ramp = tl.math.div_rn(kf - offs.to(tl.float32), kf + 1.0)  # (K - i) / (K + 1), correctly rounded
    clean = tl.where(bad[:, None], ramp[None, :], tl.minimum(s, 1.0))
    return tl.where(mask, clean, -1.0)


@triton.jit
def _store_kept(kept_ptr, rows, rank, mask, n, K, BLOCK_K: tl.constexpr):
    """Write each row's flat indices with ``rank < n`` ascending, then -1 padding, to ``kept[row]``."""
    offs = tl.arange(0, BLOCK_K)
    keep = mask & (rank < n)
    pos = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # slot of a kept index among the kept ones
    idx = tl.zeros(rank.shape, dtype=tl.int64) + offs[None, :]
    tl.store(kept_ptr + rows[:, None] * K + pos, idx, mask=keep)
    tl.store(
        kept_ptr + rows[:, None] * K + offs[None, :],
        tl.full(rank.shape, -1, tl.int64),
        mask=mask & (offs[None, :] >= n),
    )


@triton.jit
def rank_kernel(
    scores_ptr,
    stride,
    widths_ptr,
    width_ptr,
    benefit_ptr,
    rank_ptr,
    bad_ptr,
    kept_ptr,
    BS,
    K,
    W,
    KEEP_ONLY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Per-row ranking; then ``B_r(m)`` per width, or (``KEEP_ONLY``) the kept rows for a given width.

    ``rank[i]`` is i's position in the stable descending order (0 = best): the number of j with a
    larger score, or an equal score and a lower flat index, counted over [R, K, J] tiles.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < BS
    offs = tl.arange(0, BLOCK_K)
    mask = rmask[:, None] & (offs[None, :] < K)
    s = tl.load(scores_ptr + rows[:, None] * stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    ok = (s >= 0.0) & (s < float("inf"))  # False for NaN, +-inf and negatives
    bad = tl.sum(tl.where(mask & (~ok), 1, 0), axis=1) > 0  # [R]
    clean = _clean(scores_ptr, rows, stride, offs, mask, bad, K)
    rank = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for j0 in range(0, K, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        clean_j = _clean(scores_ptr, rows, stride, offs_j, rmask[:, None] & (offs_j[None, :] < K), bad, K)
        cj = clean_j[:, None, :]
        ci = clean[:, :, None]
        before = (cj > ci) | ((cj == ci) & (offs_j[None, None, :] < offs[None, :, None]))
        rank += tl.sum(before.to(tl.int32), axis=2)
    if KEEP_ONLY:
        width = tl.load(width_ptr).to(tl.int32)
        _store_kept(kept_ptr, rows, rank, mask, tl.maximum(tl.minimum(width, K + 1) - 1, 0), K, BLOCK_K)
    else:
        wo = tl.arange(0, BLOCK_W)
        wmask = wo < W
        n = tl.minimum(tl.load(widths_ptr + wo, mask=wmask, other=1), K + 1) - 1  # kept per width
        sel = (rank[:, None, :] < n[None, :, None]) & mask[:, None, :]  # [R, W, K]
        top = tl.sum(tl.where(sel, clean[:, None, :], 0.0).to(tl.float64), axis=2)  # sum of the n best
        benefit = (1.0 + top).to(tl.float32)  # as the rule: a float64 running sum from 1, rounded once
        tl.store(benefit_ptr + rows[:, None] * W + wo[None, :], benefit, mask=rmask[:, None] & wmask[None, :])
        tl.store(rank_ptr + rows[:, None] * K + offs[None, :], rank, mask=mask)
        tl.store(bad_ptr + rows, bad.to(tl.int8), mask=rmask)


@triton.jit
def decide_kernel(
    benefit_ptr,
    bad_ptr,
    cost_ptr,
    widths_ptr,
    rank_ptr,
    index_ptr,
    objective_ptr,
    best_ptr,
    chosen_ptr,
    width_ptr,
    expected_ptr,
    kept_ptr,
    BS,
    K,
    W,
    HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Objective, global argmax and fallback (redundantly in every program), then own kept rows."""
    pid = tl.program_id(0)
    wo = tl.arange(0, BLOCK_W)
    wmask = wo < W
    acc = tl.zeros([BLOCK_W], dtype=tl.float64)
    nbad = tl.zeros([BLOCK_B], dtype=tl.int32)
    for start in range(0, BS, BLOCK_B):
        rb = start + tl.arange(0, BLOCK_B)
        rbm = rb < BS
        tile = tl.load(
            benefit_ptr + rb[:, None] * W + wo[None, :], mask=rbm[:, None] & wmask[None, :], other=0.0
        )
        acc += tl.sum(tile.to(tl.float64), axis=0)  # exact: see the module docstring
        nbad += tl.load(bad_ptr + rb, mask=rbm, other=0).to(tl.int32)
    any_bad = tl.sum(nbad, axis=0) > 0
    cost = tl.load(cost_ptr + wo, mask=wmask, other=1.0).to(tl.float32)
    objective = tl.math.div_rn(acc.to(tl.float32), cost)
    masked = tl.where(wmask, objective, float("-inf"))
    top = tl.max(masked, axis=0)
    best = tl.min(tl.where(masked == top, wo, BLOCK_W), axis=0)  # first max = smaller width
    own = tl.where(any_bad, W - 1, best)  # this step's choice: any bad request -> largest width
    if HAS_INDEX:  # the caller fixed the width (lagged / off): used as given, bad rows on their ramp
        index = tl.load(index_ptr).to(tl.int32)
        index = tl.minimum(tl.maximum(index, 0), W - 1)
    else:
        index = own
    width = tl.minimum(tl.load(widths_ptr + index), K + 1)
    if pid == 0:  # one program publishes the batch-level results (all programs computed them)
        tl.store(objective_ptr + wo, objective, mask=wmask)
        tl.store(best_ptr, own.to(tl.int64))
        tl.store(chosen_ptr, index.to(tl.int64))
        tl.store(width_ptr, width.to(tl.int64))
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < BS
    offs = tl.arange(0, BLOCK_K)
    mask = rmask[:, None] & (offs[None, :] < K)
    tl.store(expected_ptr + rows, tl.load(benefit_ptr + rows * W + index, mask=rmask, other=0.0), mask=rmask)
    rank = tl.load(rank_ptr + rows[:, None] * K + offs[None, :], mask=mask, other=2147483647)
    _store_kept(kept_ptr, rows, rank, mask, width - 1, K, BLOCK_K)
