"""Target-side forwards of a decode step: tree verification and the KV commit of the accepted path.

Why a module: the verify forward is the one whose cost EVICT trades against accepted tokens, so it
is kept minimal and identical across modes (autoregressive decoding is verification of the root
alone, width 1).
"""

from __future__ import annotations

from typing import Any

import torch

from .acceptance import AcceptResult
from .masks import window_mask
from .tree_layout import VerifyTree

__all__ = ["verify_forward", "commit_path"]


def verify_forward(target: Any, cache: Any, tree: VerifyTree, router_hook: Any = None) -> Any:
    """Run the target over the verify tree; returns the model's TargetOutput.

    Node j of request b is written at slot ``L_b + j`` (L = committed length, the root is not yet
    in the cache), sits at position ``L_b + depth_j`` and attends to the committed prefix plus its
    ancestors in the tree. logits: [bs, m, V]; aux_hidden: [bs, m, 3H].
    """
    lengths = cache.lengths.clone()  # [bs]
    bs, m = tree.tokens.shape
    positions = lengths.view(bs, 1) + tree.depth  # [bs, m]
    mask = window_mask(lengths, tree.ancestors, int(lengths.max()) + m)  # [bs, m, S]
    return target(tree.tokens, positions, cache, attn_mask=mask, router_hook=router_hook)


def commit_path(cache: Any, base: torch.Tensor, result: AcceptResult) -> None:
    """Commit the root and the accepted nodes' K/V (slots ``base + path``).

    base: [bs] the committed lengths before the verify forward.
    """
    src = base.view(-1, 1) + result.path.clamp(min=0)  # [bs, m] absolute slots
    cache.commit(src, result.num_accepted + 1)
