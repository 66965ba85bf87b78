"""The engine's tree layout, verify tree and greedy acceptance against SGLang 0.5.23's own code.

Runs only where sglang is installed (``-m sglang`` environment); SGLang's Triton tree kernels run
on CPU tensors through the Triton interpreter. Compared on random drafts, several batches:

- ``select_top_k_tokens`` (scores, tokens, parents_list) vs ``expand_first`` / ``expand_next``;
- ``organize_draft_results``' kept indices vs ``evict.truncation.keep_top``;
- ``build_tree_kernel_efficient`` (positions, QLEN_ONLY tree mask, retrieve next token/sibling)
  vs ``select_verify_tree``;
- ``verify_tree_greedy`` (accept index, accept count, predicts) vs ``greedy_accept``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before sglang decorates its Triton kernels
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # select_top_k_tokens is torch.compile'd

pytestmark = pytest.mark.sglang

spec_utils = pytest.importorskip("sglang.srt.speculative.spec_utils")
eagle_utils = pytest.importorskip("sglang.srt.speculative.eagle_utils")
spec_tree = pytest.importorskip("sglang.kernels.ops.speculative.spec_tree")

from evict.engine.acceptance import greedy_accept  # noqa: E402
from evict.engine.tree_layout import (  # noqa: E402
    DraftTree,
    expand_first,
    expand_next,
    select_verify_tree,
    sglang_parents,
)
from evict.truncation import keep_top  # noqa: E402


def sglang_and_ours(bs: int, steps: int, topk: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    score_list, token_list, parents_list = [], [], []
    scores = None
    hidden = torch.zeros(bs, 4)
    ours = []
    e = None
    for i in range(steps):
        rows = 1 if i == 0 else topk
        q = torch.softmax(torch.randn(bs * rows, vocab, generator=g) * 2, -1)
        tp, ti = torch.topk(q, topk, -1)
        _, hidden, scores, info = spec_utils.select_top_k_tokens(i, tp, ti, hidden, scores, topk)
        score_list.append(info[0])
        token_list.append(info[1])
        parents_list.append(info[2])
        if i == 0:
            e = expand_first(tp, ti)
        else:
            e = expand_next(
                i, e.frontier_scores, e.frontier_flat, tp.view(bs, topk, topk), ti.view(bs, topk, topk)
            )
        ours.append(e)
    tree = DraftTree(
        torch.cat([x.scores for x in ours], 1),
        torch.cat([x.tokens for x in ours], 1),
        torch.cat([x.parents for x in ours], 1),
    )
    return (score_list, token_list, parents_list), tree


def _interpret_or_skip(fn, *args, **kw):
    """Run one of SGLang's Triton kernels on CPU tensors through the interpreter.

    Skips only when it cannot run at all (no interpreter and no GPU, decided before the call); an
    exception from the kernel itself is a failure, not a skip: a wrong argument or shape must not
    pass the suite silently.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1: SGLang's Triton tree kernels cannot run on CPU tensors")
    pytest.importorskip("triton")
    fn(*args, **kw)


CASES = [(2, 3, 2, 6), (3, 4, 4, 16), (1, 1, 4, 5), (2, 5, 1, 6), (4, 4, 3, 20)]


@pytest.mark.parametrize("bs,steps,topk,n", CASES)
def test_layout_selection_tree_and_greedy_match_sglang(bs, steps, topk, n):
    (score_list, token_list, parents_list), tree = sglang_and_ours(bs, steps, topk, 50, steps * 7 + topk)
    k_total = tree.scores.shape[1]
    # 1. the flat layout
    assert torch.equal(torch.cat(score_list, 1).flatten(1), tree.scores)
    assert torch.equal(torch.cat(token_list, 1), tree.tokens)
    assert torch.equal(sglang_parents(parents_list, topk, k_total), tree.parents)
    # 2. organize_draft_results' selection is keep_top
    parent_list, top_idx, draft_tokens = eagle_utils.organize_draft_results(
        score_list, token_list, parents_list, n
    )
    kept = keep_top(tree.scores, n)
    assert torch.equal(top_idx, kept)
    # 3. build_tree_kernel_efficient
    seq_lens = torch.arange(bs) * 3 + 5
    mask = torch.full((n * bs * n,), True)
    positions = torch.empty(bs * n, dtype=torch.long)
    retrieve = torch.full((3, bs, n), -1, dtype=torch.long)
    _interpret_or_skip(
        spec_tree.sgl_build_tree_kernel_triton,
        parent_list.long(),
        top_idx,
        seq_lens,
        mask,
        positions,
        retrieve[0],
        retrieve[1],
        retrieve[2],
        topk,
        steps,
        n,
        spec_tree.TreeMaskMode.QLEN_ONLY,
    )
    root = torch.arange(bs) + 1
    vt = select_verify_tree(tree, kept, root)
    assert torch.equal(positions.view(bs, n), seq_lens.view(bs, 1) + vt.depth)
    assert torch.equal(mask.view(bs, n, n), vt.ancestors)
    assert torch.equal(vt.tokens[:, 1:], draft_tokens)
    next_token = torch.full((bs, n), -1, dtype=torch.long)
    next_sibling = torch.full((bs, n), -1, dtype=torch.long)
    for b in range(bs):
        for j in range(n):
            kids = [c for c in range(n) if int(vt.parent[b, c]) == j]
            if kids:
                next_token[b, j] = kids[0]
            for a, c in zip(kids, kids[1:]):
                next_sibling[b, a] = c
    assert torch.equal(retrieve[1], next_token)
    assert torch.equal(retrieve[2], next_sibling)
    # 4. verify_tree_greedy on targets that follow the tree part of the way
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        pred = torch.randint(0, 50, (bs, n), generator=g)
        follow = torch.rand(bs, n, generator=g) < 0.7
        for b in range(bs):
            for j in range(n):
                kids = [c for c in range(n) if int(vt.parent[b, c]) == j]
                if kids and follow[b, j]:
                    pred[b, j] = vt.tokens[b, kids[int(torch.randint(len(kids), (1,), generator=g))]]
        predicts = torch.full((bs * n,), -1, dtype=torch.int32)
        accept_index = torch.full((bs, steps + 1), -1, dtype=torch.int32)
        accept_num = torch.zeros(bs, dtype=torch.int32)
        _interpret_or_skip(
            spec_tree.verify_tree_greedy_triton,
            predicts,
            accept_index,
            accept_num,
            vt.tokens,
            retrieve[0],
            retrieve[1],
            retrieve[2],
            pred,
        )
        res = greedy_accept(vt.tokens, vt.parent, pred)
        assert accept_num.long().tolist() == res.num_accepted.tolist()
        offs = (torch.arange(bs) * n).view(bs, 1)
        ours = torch.where(res.path >= 0, res.path + offs, torch.full_like(res.path, -1))[:, : steps + 1]
        assert torch.equal(accept_index.long(), ours)
        # SGLang writes the emitted tokens at the accepted nodes' slots
        for b in range(bs):
            slots = [int(x) for x in accept_index[b] if int(x) >= 0]
            assert [int(predicts[s]) for s in slots] == res.emitted[b, : len(slots)].tolist()
