"""Draft-tree helpers shared by the rule, the reference engine, the plugin and the tests.

Why here: the plugin must not import the reference engine, and the rule's depth decision needs the
layout (which flat index sits at which depth), so the layout math lives with the rule.

Trees use SGLang's flat layout: ``parents[r, i]`` is the flat index of node i's parent among the
K candidates, or -1 when the parent is the root (the last verified token, not a candidate).
Parents always have a lower flat index than their children.
"""

from __future__ import annotations

import torch

__all__ = [
    "depth_counts",
    "flat_parents",
    "is_ancestor_closed",
    "layout_depth_rank",
    "num_candidates",
    "validate_parents",
]


def validate_parents(parents: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``parents`` is a ``[bs, K]`` integer tensor in SGLang layout."""
    if not isinstance(parents, torch.Tensor) or parents.dim() != 2:
        raise ValueError("parents must be a 2-D integer tensor [bs, K] (parent flat index, -1 = root)")
    if parents.is_floating_point() or parents.dtype == torch.bool:
        raise ValueError(f"parents must be integers, got dtype {parents.dtype}")
    k = parents.shape[-1]
    own = torch.arange(k, device=parents.device)
    if not bool(((parents >= -1) & (parents < own)).all()):
        raise ValueError("each parent index must be -1 (root) or a lower flat index than its child")


def is_ancestor_closed(parents: torch.Tensor, kept_mask: torch.Tensor) -> torch.Tensor:
    """``BoolTensor [bs]``: True where every kept node's parent is kept too (or is the root).

    Checking one level suffices: if every kept node has a kept parent, every ancestor is kept.
    The root is always implicitly kept (it is not a candidate).
    """
    if parents.shape != kept_mask.shape:
        raise ValueError(
            f"parents {tuple(parents.shape)} and kept_mask {tuple(kept_mask.shape)} must have the same shape"
        )
    kept = kept_mask.to(torch.bool)
    parents = parents.long()
    parent_kept = kept.gather(1, parents.clamp(min=0)) | (parents < 0)
    return (~kept | parent_kept).all(dim=-1)


def num_candidates(steps: int, topk: int) -> int:
    """K = topk + (steps-1)*topk*topk, SGLang's flat candidate count (0 for ``steps = 0``: no draft)."""
    if steps <= 0:
        return 0
    return topk + (steps - 1) * topk * topk


def depth_counts(steps: int, topk: int) -> list[int]:
    """Candidates of a ``(steps, topk)`` tree drafted only to depth d, for d = 0..steps.

    A tree drafted to depth d is the first ``num_candidates(d, topk)`` flat indices of the deeper
    one (each drafting step appends its nodes, and never changes the earlier ones), which is why one
    tree's scores price every shallower depth.
    """
    return [num_candidates(d, topk) for d in range(steps + 1)]


def flat_parents(parent_list: torch.Tensor, topk: int, num_cand: int) -> torch.Tensor:
    """``[bs, K]`` flat parent of every candidate from ``organize_draft_results``' ``parent_list``
    (``cat(parents_list[:-1])``): candidate f's parent is ``parent_list[:, f // topk]``, -1 = root.
    """
    idx = torch.arange(num_cand, device=parent_list.device) // topk
    return parent_list.index_select(1, idx).long()


def layout_depth_rank(num_candidates: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth (1 = child of the root) and sibling rank of every flat index in SGLang's layout.

    Why from the layout and not from ``parents``: both are fixed by ``(K, topk)``: step 0 puts the
    root's top-k at flat ``0..k-1`` (rank = index), step i >= 1 puts child c of frontier node j at
    ``k + (i-1)k^2 + jk + c`` in descending drafter probability (rank = c).  Precomputing them once
    costs nothing per step.
    """
    k = int(topk)
    if k < 1 or num_candidates < k or (num_candidates - k) % (k * k):
        raise ValueError(
            f"K = {num_candidates} candidates is not an SGLang tree with topk = {k} (K = k + (steps-1)k^2)"
        )
    i = torch.arange(num_candidates)
    later = (i - k).clamp(min=0)
    depth = torch.where(i < k, torch.ones_like(i), 2 + later // (k * k))
    rank = torch.where(i < k, i, later % k)
    return depth, rank
