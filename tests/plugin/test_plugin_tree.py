"""EVICT's cut on SGLang's real draft-tree functions (CPU, sglang==0.5.23; skipped without it).

The draft tree comes from SGLang's own ``select_top_k_tokens`` (the eager function behind its
``torch.compile`` wrapper) and ``organize_draft_results``; the verify tree from SGLang's Triton
``build_tree`` kernel run by Triton's CPU interpreter, checked against a pure-torch reference.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
from _evict_tree_reference import full_mask_layout, reference_build_tree, tree_parents  # noqa: E402
from sglang.kernels.ops.speculative import spec_tree  # noqa: E402
from sglang.srt.speculative import spec_utils  # noqa: E402
from sglang.srt.speculative.eagle_utils import organize_draft_results  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from evict.plugin.tree_cut import cut_draft_tree, gather_candidate_scores, verify_spec_steps  # noqa: E402
from evict.truncation import TruncationPolicy, is_ancestor_closed, keep_top  # noqa: E402

pytestmark = pytest.mark.sglang

_select_first = spec_utils._select_top_k_tokens_first
_select_later = getattr(
    spec_utils._select_top_k_tokens_later,
    "_torchdynamo_orig_callable",
    getattr(spec_utils._select_top_k_tokens_later, "__wrapped__", spec_utils._select_top_k_tokens_later),
)
_build_tree_kernel = InterpretedFunction(spec_tree.sgl_build_tree_kernel_efficient_triton.fn)

# (bs, topk, steps, N)
CONFIGS = [(1, 2, 2, 4), (3, 4, 3, 8), (2, 4, 5, 16), (2, 8, 4, 32)]


def draft_tree(bs: int, topk: int, steps: int, seed: int, tie: bool = False):
    """score_list, token_list, parents_list exactly as EagleDraftWorker.draft_forward builds them."""
    g = torch.Generator().manual_seed(seed)
    vocab = 64

    def step(rows: int):
        if tie:  # every node's children get the same probabilities: many equal cumulative scores
            p = torch.full((rows, topk), 1.0 / (topk + 1))
            return p, torch.randint(0, vocab, (rows, topk), generator=g)
        probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 2.5, dim=-1)
        return probs.topk(topk, dim=-1)

    topk_p, topk_index = step(bs)
    hidden = torch.zeros(bs, 2)
    scores = None
    score_list, token_list, parents_list = [], [], []
    for i in range(steps):
        if i == 0:
            _, hidden, scores, info = _select_first(topk_p, topk_index, hidden, topk)
        else:
            _, hidden, scores, info = _select_later(i, topk_p, topk_index, hidden, scores, topk)
        score_list.append(info[0])
        token_list.append(info[1])
        parents_list.append(info[2])
        if i == steps - 1:
            break
        topk_p, topk_index = step(bs * topk)
    return score_list, token_list, parents_list


def flat_parents(parent_list: torch.Tensor, total: int, topk: int) -> torch.Tensor:
    """``[bs, total]`` parent flat index of every candidate (-1 = root), SGLang's rule."""
    j = torch.arange(total)
    tb = (j // topk).expand(parent_list.shape[0], -1)
    par = parent_list.gather(1, tb.clamp(max=parent_list.shape[1] - 1))
    return torch.where(tb == 0, torch.full_like(par, -1), par)


def kernel_build_tree(parent_list, sel, seq_lens, topk, depth, n, mode):
    """SGLang's Triton build-tree kernel, run by Triton's CPU interpreter (as its wrapper calls it)."""
    bs = seq_lens.numel()
    if mode == spec_tree.TreeMaskMode.FULL_MASK:
        tree_mask = torch.ones(int(seq_lens.sum()) * n + n * n * bs, dtype=torch.bool)
    else:
        tree_mask = torch.ones(n * n * bs, dtype=torch.bool)
    positions = torch.empty(bs * n, dtype=torch.long)
    retrieve = torch.full((3, bs, n), -1, dtype=torch.long)
    _build_tree_kernel[(bs,)](
        parent_list,
        sel,
        seq_lens,
        torch.cumsum(seq_lens, 0) - seq_lens,
        tree_mask,
        positions,
        retrieve[0],
        retrieve[1],
        retrieve[2],
        topk=topk,
        depth=depth,
        draft_token_num=n,
        tree_mask_mode=int(mode),
        batch_size=bs,
        parent_list_stride=parent_list.stride(0),
        selected_index_stride=sel.stride(0),
    )
    return tree_mask, positions, retrieve


@pytest.mark.parametrize(("bs", "topk", "steps", "n"), CONFIGS)
def test_cut_equals_sglang_selection_at_every_width(bs, topk, steps, n):
    """Cutting organize_draft_results(N) to m gives exactly organize_draft_results(m)."""
    for seed in range(3):
        lists = draft_tree(bs, topk, steps, seed)
        parent_list, top_index, tokens = organize_draft_results(*lists, n)
        scores = gather_candidate_scores(lists[0], top_index)
        assert scores.shape == (bs, n - 1)
        for m in range(1, n + 1):
            idx, tok = cut_draft_tree(top_index, tokens, keep_top(scores, m))
            ref_parents, ref_idx, ref_tok = organize_draft_results(*lists, m) if m > 1 else (None, None, None)
            if m == 1:
                assert idx.shape == (bs, 0) and tok.shape == (bs, 0)
                continue
            assert torch.equal(idx, ref_idx), (seed, m)
            assert torch.equal(tok, ref_tok), (seed, m)
            assert torch.equal(parent_list, ref_parents)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(("bs", "topk", "steps", "n"), CONFIGS)
def test_policy_kept_sets_are_ancestor_closed(bs, topk, steps, n, tie):
    widths = sorted({w for w in (1, 2, 3, 4, 8, 16, n) if w <= n})
    # steep cost: small widths win; flat cost: the full tree
    for cost in ([1.0 + 3.0 * w for w in widths], [1.0] * len(widths)):
        policy = TruncationPolicy(cost, widths=widths, decision="immediate")
        for seed in range(3):
            lists = draft_tree(bs, topk, steps, seed, tie=tie)
            parent_list, top_index, _ = organize_draft_results(*lists, n)
            total = torch.cat(lists[0], dim=1).flatten(1).shape[1]
            parents = flat_parents(parent_list, total, topk)
            decision = policy.decide(gather_candidate_scores(lists[0], top_index))
            idx, _ = cut_draft_tree(top_index, top_index, decision.kept)
            kept = torch.zeros(bs, total, dtype=torch.bool).scatter_(1, idx, True)
            assert kept.sum(dim=1).eq(decision.width - 1).all()
            assert is_ancestor_closed(parents, kept).all(), (seed, decision.width)
        if cost[0] == 1.0:
            assert decision.width == n  # flat cost keeps the whole tree


@pytest.mark.parametrize("mode", [spec_tree.TreeMaskMode.QLEN_ONLY, spec_tree.TreeMaskMode.FULL_MASK])
@pytest.mark.parametrize(("bs", "topk", "steps", "n"), CONFIGS[:3])
def test_reference_matches_sglang_kernel(bs, topk, steps, n, mode):
    lists = draft_tree(bs, topk, steps, seed=11)
    parent_list, top_index, _ = organize_draft_results(*lists, n)
    scores = gather_candidate_scores(lists[0], top_index)
    seq_lens = torch.arange(5, 5 + bs, dtype=torch.long)
    for m in sorted({2, n // 2, n}):
        sel, _ = cut_draft_tree(top_index, top_index, keep_top(scores, m))
        depth = verify_spec_steps(steps, m)
        mask, positions, retrieve = kernel_build_tree(parent_list, sel, seq_lens, topk, depth, m, mode)
        ref = reference_build_tree(parent_list, sel, seq_lens, topk, depth, m)
        assert torch.equal(positions, ref["positions"])
        assert torch.equal(retrieve[0], ref["retrieve_index"])
        assert torch.equal(retrieve[1], ref["retrieve_next_token"])
        assert torch.equal(retrieve[2], ref["retrieve_next_sibling"])
        want = (
            ref["mask"].flatten()
            if mode == spec_tree.TreeMaskMode.QLEN_ONLY
            else full_mask_layout(ref["mask"], seq_lens)
        )
        assert torch.equal(mask, want)


@pytest.mark.parametrize(("bs", "topk", "steps", "n"), CONFIGS)
def test_cut_tree_is_the_kept_subtree_of_the_full_tree(bs, topk, steps, n):
    """The width-m verify tree has the same parents, depths and masks as those nodes in the full tree."""
    lists = draft_tree(bs, topk, steps, seed=5)
    parent_list, top_index, _ = organize_draft_results(*lists, n)
    scores = gather_candidate_scores(lists[0], top_index)
    seq_lens = torch.full((bs,), 9, dtype=torch.long)
    full = reference_build_tree(parent_list, top_index, seq_lens, topk, steps, n)
    full_par = tree_parents(full)
    for m in range(2, n + 1):
        sel, _ = cut_draft_tree(top_index, top_index, keep_top(scores, m))
        cut = reference_build_tree(parent_list, sel, seq_lens, topk, verify_spec_steps(steps, m), m)
        cut_par = tree_parents(cut)
        assert (cut_par[:, 1:] >= 0).all(), "every kept node hangs under a kept parent"
        for b in range(bs):
            # tree position in the full tree of each cut-tree node (root -> 0)
            where = [0] + [int((top_index[b] == s).nonzero()) + 1 for s in sel[b].tolist()]
            for i in range(1, m):
                assert where[int(cut_par[b, i])] == int(full_par[b, where[i]])
                assert int(cut["positions"][b * m + i]) == int(full["positions"][b * n + where[i]])
                assert torch.equal(cut["mask"][b, i], full["mask"][b, where[i]][where])
