"""Draft-tree helpers shared by tests, the reference engine and the plugin.

Trees use SGLang's flat layout: ``parents[r, i]`` is the flat index of node i's parent among the
K candidates, or -1 when the parent is the root (the last verified token, not a candidate).
Parents always have a lower flat index than their children.
"""

from __future__ import annotations

import torch

__all__ = ["is_ancestor_closed", "validate_parents"]


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
