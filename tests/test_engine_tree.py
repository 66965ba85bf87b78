"""Draft-tree layout (SGLang's EAGLE layout), verify-tree cut and attention masks of the engine."""

from __future__ import annotations

import pytest
import torch

from evict.engine.masks import causal_window, window_mask
from evict.engine.tree_layout import (
    DraftTree,
    expand_first,
    expand_next,
    num_candidates,
    select_verify_tree,
    sglang_parents,
)
from evict.truncation import is_ancestor_closed, keep_top


def build(bs: int, steps: int, topk: int, vd: int, seed: int):
    """Random drafter distributions -> flat tree, plus SGLang's parents_list and per-node probs."""
    g = torch.Generator().manual_seed(seed)
    q0 = torch.softmax(torch.randn(bs, vd, generator=g) * 2, -1)
    p, i = torch.topk(q0, topk, -1)
    e = expand_first(p, i)
    scores, tokens, parents, own = [e.scores], [e.tokens], [e.parents], [p]
    plist = [torch.arange(-1, topk).expand(bs, topk + 1)]
    frontiers = [e.frontier_flat]
    for step in range(1, steps):
        q = torch.softmax(torch.randn(bs, topk, vd, generator=g) * 2, -1)
        tp, ti = torch.topk(q, topk, -1)
        prev = e
        e = expand_next(step, e.frontier_scores, e.frontier_flat, tp, ti)
        scores.append(e.scores)
        tokens.append(e.tokens)
        parents.append(e.parents)
        own.append(tp.reshape(bs, -1))
        plist.append(e.frontier_flat)
        frontiers.append(e.frontier_flat)
        # the new frontier is the top-k of this step's k*k candidates by cumulative score
        assert torch.equal(e.frontier_scores, torch.topk(e.scores, topk, -1).values), (
            "frontier must be the top-k by cumulative score"
        )
        base = topk + (step - 1) * topk * topk
        # each new frontier node descends from the previous frontier row frontier_src
        assert torch.equal(
            e.parents.gather(1, e.frontier_flat - base), prev.frontier_flat.gather(1, e.frontier_src)
        )
    tree = DraftTree(torch.cat(scores, 1), torch.cat(tokens, 1), torch.cat(parents, 1))
    return tree, plist, torch.cat(own, 1)


@pytest.mark.parametrize("steps,topk", [(1, 1), (1, 4), (3, 1), (3, 2), (4, 3)])
def test_flat_layout_matches_sglang(steps, topk):
    bs = 3
    tree, plist, own = build(bs, steps, topk, 20, steps * 10 + topk)
    k_total = num_candidates(steps, topk)
    assert tree.scores.shape == (bs, k_total) == tree.parents.shape == tree.tokens.shape
    # parents precede children; explicit parents equal SGLang's parents_list convention
    idx = torch.arange(k_total)
    assert bool(((tree.parents >= -1) & (tree.parents < idx)).all())
    assert torch.equal(tree.parents, sglang_parents(plist, topk, k_total))
    # scores are the cumulative product of the drafter probabilities along the path
    for b in range(bs):
        for f in range(k_total):
            prod, node = 1.0, f
            while node >= 0:
                prod *= float(own[b, node])
                node = int(tree.parents[b, node])
            assert abs(prod - float(tree.scores[b, f])) < 1e-6
    # only frontier nodes have children, and scores never increase from parent to child
    par = tree.parents.clamp(min=0)
    has_par = tree.parents >= 0
    assert bool((tree.scores <= tree.scores.gather(1, par) + 1e-7)[has_par].all())


def test_keep_top_is_organize_draft_results_and_ancestor_closed():
    tree, _, _ = build(4, 4, 3, 30, 1)
    for n in (2, 5, 8, 16, tree.scores.shape[1] + 1):
        kept = keep_top(tree.scores, n)
        organize = torch.sort(torch.topk(tree.scores, n - 1, dim=-1).indices).values
        assert torch.equal(kept, organize)
        mask = torch.zeros_like(tree.parents, dtype=torch.bool).scatter(1, kept, True)
        assert bool(is_ancestor_closed(tree.parents, mask).all())


def test_verify_tree_parents_depth_and_ancestors():
    tree, _, _ = build(2, 4, 2, 25, 3)
    root = torch.tensor([5, 6])
    kept = keep_top(tree.scores, 9)
    vt = select_verify_tree(tree, kept, root)
    assert vt.width == 9 and vt.tokens[:, 0].tolist() == [5, 6]
    for b in range(2):
        for j in range(1, 9):
            f = int(kept[b, j - 1])
            assert int(vt.tokens[b, j]) == int(tree.tokens[b, f])
            pf = int(tree.parents[b, f])
            p = int(vt.parent[b, j])
            assert p < j
            assert (pf == -1 and p == 0) or int(kept[b, p - 1]) == pf
            # ancestors: walk up explicitly
            chain, node = {j}, j
            while node > 0:
                node = int(vt.parent[b, node])
                chain.add(node)
            assert set(vt.ancestors[b, j].nonzero().view(-1).tolist()) == chain
            assert int(vt.depth[b, j]) == len(chain) - 1


def test_verify_tree_width_one_and_orphan_error():
    tree, _, _ = build(2, 3, 2, 25, 4)
    vt = select_verify_tree(tree, keep_top(tree.scores, 1), torch.tensor([1, 2]))
    assert vt.width == 1 and vt.ancestors.shape == (2, 1, 1)
    child_only = tree.parents.argmax(dim=1, keepdim=True)  # some node whose parent is a candidate
    assert bool((tree.parents.gather(1, child_only) >= 0).all())
    with pytest.raises(ValueError, match="ancestor-closed"):
        select_verify_tree(tree, child_only, torch.tensor([1, 2]))


def test_window_mask_prefix_window_and_padding():
    lens = torch.tensor([3, 1])
    win = torch.tensor([[True, False], [True, True]]).expand(2, 2, 2)
    m = window_mask(lens, win, 6)
    assert m.shape == (2, 2, 6)
    # request 0: prefix 0..2, window slots 3..4, slot 5 padding
    assert m[0, 0].tolist() == [True, True, True, True, False, False]
    assert m[0, 1].tolist() == [True, True, True, True, True, False]
    # request 1: prefix 0, window slots 1..2, slots 3..5 padding
    assert m[1, 0].tolist() == [True, True, False, False, False, False]
    assert m[1, 1].tolist() == [True, True, True, False, False, False]
    c = causal_window(2, 3)
    assert torch.equal(c[0], torch.ones(3, 3, dtype=torch.bool).tril())
