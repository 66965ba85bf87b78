"""EAGLE-3 draft-tree layout, exactly as SGLang builds it, and the verify tree cut from it.

Why a separate module: the truncation rule, the plugin and this engine must agree on which flat
index is which node, so the layout math is kept pure (no model calls) and tested on its own.

SGLang's layout (``eagle_utils.select_top_k_tokens`` + ``organize_draft_results``), per request:

- step 0: the drafter's top-k of the root distribution; ``k`` candidates, flat ``0 .. k-1``,
  scores = their probabilities, all children of the root; all ``k`` form the frontier.
- step i >= 1: every frontier node gets its top-k children; the ``k*k`` children get flat indices
  ``k + (i-1)*k*k + j*k + c`` (child ``c`` of frontier node ``j``) and scores
  ``score(frontier j) * p(c)``; the new frontier is the top-k of these ``k*k`` by score.
- ``K = k + (steps-1)*k*k`` candidates; a parent always has a lower flat index than its child.

Shapes: ``bs`` batch, ``k`` topk, ``K`` candidates, ``m`` verify width (root included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evict.truncation.tree import flat_parents, num_candidates

__all__ = [
    "PAD_PARENT",
    "DraftTree",
    "ExpandResult",
    "VerifyTree",
    "expand_first",
    "expand_next",
    "flat_parents",
    "num_candidates",
    "select_verify_tree",
    "sglang_parents",
]


PAD_PARENT = -2  # parent of a padded verify slot: equals no node index, so it is never accepted


@dataclass
class DraftTree:
    """The drafted candidates of one step in SGLang's flat layout."""

    scores: torch.Tensor  # [bs, K] float, cumulative drafter probabilities
    tokens: torch.Tensor  # [bs, K] long, target-vocabulary token ids
    parents: torch.Tensor  # [bs, K] long, flat index of the parent, -1 = root


@dataclass
class ExpandResult:
    """One drafting step's contribution to the flat layout and the next frontier."""

    scores: torch.Tensor  # [bs, n] scores of the new candidates (n = k or k*k)
    tokens: torch.Tensor  # [bs, n] draft-vocabulary ids of the new candidates
    parents: torch.Tensor  # [bs, n] flat parent index of each new candidate (-1 = root)
    frontier_scores: torch.Tensor  # [bs, k] cumulative scores of the next frontier
    frontier_flat: torch.Tensor  # [bs, k] flat indices of the next frontier
    frontier_tokens: torch.Tensor  # [bs, k] draft-vocabulary ids of the next frontier
    frontier_src: torch.Tensor  # [bs, k] row of the previous frontier each new one descends from


def expand_first(topk_p: torch.Tensor, topk_index: torch.Tensor) -> ExpandResult:
    """Step 0 (``select_top_k_tokens`` with i == 0): the root's top-k children.

    topk_p, topk_index: [bs, k] the drafter's top-k probabilities / ids for the root.
    """
    bs, k = topk_p.shape
    flat = torch.arange(k, device=topk_p.device).expand(bs, k)
    return ExpandResult(
        scores=topk_p,
        tokens=topk_index,
        parents=torch.full((bs, k), -1, dtype=torch.long, device=topk_p.device),
        frontier_scores=topk_p,
        frontier_flat=flat,
        frontier_tokens=topk_index,
        frontier_src=torch.zeros((bs, k), dtype=torch.long, device=topk_p.device),
    )


def expand_next(
    step: int,
    frontier_scores: torch.Tensor,
    frontier_flat: torch.Tensor,
    topk_p: torch.Tensor,
    topk_index: torch.Tensor,
) -> ExpandResult:
    """Step ``step >= 1`` (``select_top_k_tokens`` with i > 0).

    frontier_scores, frontier_flat: [bs, k]; topk_p, topk_index: [bs, k, k] the drafter's top-k
    for each frontier node (row j = children of frontier node j).
    """
    bs, k = frontier_scores.shape
    expand = frontier_scores.unsqueeze(2) * topk_p  # [bs, k, k]
    flat_scores = expand.flatten(1)  # [bs, k*k]
    flat_tokens = topk_index.reshape(bs, k * k)
    parents = frontier_flat.unsqueeze(2).expand(bs, k, k).reshape(bs, k * k)
    cs_p, cs_idx = torch.topk(flat_scores, k, dim=-1)  # [bs, k]
    base = k + (step - 1) * k * k
    return ExpandResult(
        scores=flat_scores,
        tokens=flat_tokens,
        parents=parents,
        frontier_scores=cs_p,
        frontier_flat=cs_idx + base,
        frontier_tokens=flat_tokens.gather(1, cs_idx),
        frontier_src=cs_idx // k,
    )


def sglang_parents(parents_list: list[torch.Tensor], topk: int, num_cand: int) -> torch.Tensor:
    """Flat parent index of every candidate from SGLang's ``parents_list`` convention.

    SGLang keeps ``parents_list[0] = arange(-1, k)`` and ``parents_list[i] = frontier flat
    indices``; ``build_tree_kernel_efficient`` finds candidate f's parent as
    ``cat(parents_list[:-1])[f // k]``. Used to check that :func:`expand_next`'s explicit parents
    are the same tree. Returns [bs, K].
    """
    parent_list = torch.cat(parents_list[:-1], dim=1) if len(parents_list) > 1 else parents_list[0][:, :1]
    return flat_parents(parent_list, topk, num_cand)


@dataclass
class VerifyTree:
    """The tree that the target verifies: root at position 0, kept candidates after it.

    Nodes are in SGLang's verify order (root, then kept candidates by ascending flat index), so a
    parent always comes before its children and children of one node are tried in ascending order.
    """

    tokens: torch.Tensor  # [bs, m] long target ids (column 0 = root)
    parent: torch.Tensor  # [bs, m] long verify index of the parent (-1 for the root)
    depth: torch.Tensor  # [bs, m] long, root = 0
    ancestors: torch.Tensor  # [bs, m, m] bool, ancestors[b, i, j]: j is i or an ancestor of i

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])


def select_verify_tree(tree: DraftTree | None, kept: torch.Tensor | None, root: torch.Tensor) -> VerifyTree:
    """Cut the verify tree: the root plus the kept candidates (ascending flat indices).

    tree: DraftTree with [bs, K] fields (None for width 1); kept: [bs, m-1] ascending flat indices
    (None or empty for width 1), optionally followed by -1 *padding* (per-request widths: a row
    that keeps fewer nodes than the batch width).  A padded slot holds the root token (so it
    routes to experts the batch already reads), has parent ``PAD_PARENT`` (never a node index, so
    no acceptance walk reaches it), depth 0 and only itself as ancestor (no other node attends to
    it).  root: [bs] the last verified token. Raises ValueError when a kept node's parent is not
    kept (the set must be ancestor-closed).
    """
    bs = root.shape[0]
    device = root.device
    if tree is None or kept is None or kept.numel() == 0:
        return VerifyTree(
            tokens=root.view(bs, 1).long(),
            parent=torch.full((bs, 1), -1, dtype=torch.long, device=device),
            depth=torch.zeros((bs, 1), dtype=torch.long, device=device),
            ancestors=torch.ones((bs, 1, 1), dtype=torch.bool, device=device),
        )
    kept = kept.long()
    m = kept.shape[1] + 1
    big_k = tree.parents.shape[1]
    pad = kept < 0  # [bs, m-1]
    safe = kept.clamp(min=0)
    root_col = root.view(bs, 1).long()
    cand_tokens = torch.where(pad, root_col.expand(bs, m - 1), tree.tokens.gather(1, safe))
    tokens = torch.cat([root_col, cand_tokens], dim=1)  # [bs, m]
    parent_flat = tree.parents.gather(1, safe)  # [bs, m-1]
    # position in verify order of each flat index (+1 shift: slot 0 = the root, flat -1; the last
    # column collects the padding so it never overwrites a real entry)
    pos_of = torch.full((bs, big_k + 2), -1, dtype=torch.long, device=device)
    pos_of[:, 0] = 0
    slot = torch.where(pad, torch.full_like(kept, big_k + 1), kept + 1)
    pos_of.scatter_(1, slot, torch.arange(1, m, device=device).expand(bs, m - 1))
    parent_pos = pos_of.gather(1, parent_flat + 1)  # [bs, m-1]
    if bool(((parent_pos < 0) & ~pad).any()):
        raise ValueError("kept candidates are not ancestor-closed: a kept node's parent was dropped")
    parent_pos = torch.where(pad, torch.full_like(parent_pos, PAD_PARENT), parent_pos)
    parent = torch.cat([torch.full((bs, 1), -1, dtype=torch.long, device=device), parent_pos], dim=1)
    # ancestor sets grow one level per round (depth + 1 batched gathers, not a loop over m)
    eye = torch.eye(m, dtype=torch.bool, device=device).expand(bs, m, m)
    has_parent = (parent >= 0).view(bs, m, 1)
    par = parent.clamp(min=0).view(bs, m, 1).expand(bs, m, m)
    anc = eye.clone()
    for _ in range(m):  # converges after depth + 1 rounds
        nxt = eye | (has_parent & anc.gather(1, par))
        if torch.equal(nxt, anc):
            break
        anc = nxt
    depth = anc.sum(dim=-1) - 1  # [bs, m]: number of proper ancestors
    return VerifyTree(tokens=tokens, parent=parent, depth=depth, ancestors=anc)
