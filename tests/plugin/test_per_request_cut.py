"""Per-request widths in the plugin (issue 14): the pure tensor pieces of ``evict.plugin.tree_cut``.

``padded_frame`` (the width-m tree a per-request cut is verified in), ``fill_padding_tokens`` and
``unlink_padding`` (the padded nodes spliced out of SGLang's first-child / next-sibling lists),
each checked against a brute-force Python version on random SGLang-layout draft trees, with the
budgets of the shared rule ``choose_widths_batch_budget``.  Pure torch: runs without sglang.
"""

from __future__ import annotations

import pytest
import torch

from evict.plugin.tree_cut import fill_padding_tokens, padded_frame, unlink_padding
from evict.truncation import choose_widths_batch_budget, is_ancestor_closed, keep_top


def random_draft(bs: int, topk: int, steps: int, seed: int, tie: bool = False):
    """Cumulative scores ``[bs, K]`` and flat parents ``[bs, K]`` (-1 = root) in SGLang's layout.

    Depth 1 holds ``topk`` nodes, each later depth ``topk*topk``: the children of the previous
    level's ``topk`` best nodes (as SGLang's ``select_top_k_tokens`` expands them).  Parents always
    precede their children.
    """
    g = torch.Generator().manual_seed(seed)
    k = topk + (steps - 1) * topk * topk
    parents = torch.full((bs, k), -1, dtype=torch.long)
    scores = torch.zeros(bs, k)
    for b in range(bs):
        level = list(range(topk))  # depth-1 nodes
        p = torch.softmax(torch.randn(topk, generator=g) * 2, 0)
        scores[b, :topk] = torch.full((topk,), 1.0 / (topk + 1)) if tie else p
        start = topk
        for _ in range(steps - 1):
            # the topk best of the previous level are expanded (as SGLang's select_top_k_tokens)
            prev = sorted(level, key=lambda j: (-float(scores[b, j]), j))[:topk]
            level = []
            for q, par in enumerate(prev):
                cond = torch.softmax(torch.randn(topk, generator=g) * 2, 0)
                if tie:
                    cond = torch.full((topk,), 1.0 / (topk + 1))
                for c in range(topk):
                    j = start + q * topk + c
                    parents[b, j] = par
                    scores[b, j] = scores[b, par] * cond[c]
                    level.append(j)
            start += topk * topk
    return scores, parents


def sglang_links(parents_v: list[int]) -> tuple[list[int], list[int]]:
    """First-child / next-sibling lists of a verify tree as SGLang's tree kernel builds them:
    children ascending, so each parent's first child is its lowest-index child."""
    m = len(parents_v)
    nxt, sib = [-1] * m, [-1] * m
    for i in range(m - 1, 0, -1):
        p = parents_v[i]
        if p < 0:
            continue
        if nxt[p] != -1:
            sib[i] = nxt[p]
        nxt[p] = i
    return nxt, sib


def verify_parents(frame_row: list[int], flat_parents_row: list[int]) -> list[int]:
    """Verify-local parent of each node of the cut tree (root = -1)."""
    pos = {f: i + 1 for i, f in enumerate(frame_row)}
    return [-1] + [pos[flat_parents_row[f]] if flat_parents_row[f] >= 0 else 0 for f in frame_row]


def reachable(nxt: list[int], sib: list[int]) -> dict[int, int]:
    """Every node the acceptance walks can reach from the root, with the node it was reached from."""
    seen, stack = {}, [0]
    while stack:
        cur = stack.pop()
        c = nxt[cur]
        while c != -1:
            assert c not in seen, "a node is linked twice"
            seen[c] = cur
            stack.append(c)
            c = sib[c]
    return seen


CASES = [(1, 2, 2), (3, 4, 3), (4, 4, 5), (2, 8, 4), (5, 3, 4)]


@pytest.mark.parametrize(("bs", "topk", "steps"), CASES)
@pytest.mark.parametrize("tie", [False, True])
def test_padded_cut_frame_links_and_tokens_match_brute_force(bs, topk, steps, tie):
    checked_padding = 0
    for seed in range(6):
        scores, parents = random_draft(bs, topk, steps, seed, tie)
        k = scores.shape[1]
        widths = [w for w in (2, 3, 4, 6, 8, 12, 16, 32) if w <= k + 1]
        cost = torch.linspace(1.0, 2.0 + seed, len(widths))
        for pad_cost in (0.0, 0.3):
            d = choose_widths_batch_budget(scores, cost, torch.tensor(widths), pad_cost=pad_cost)
            m = d.width
            if m < 2:
                continue
            frame, real = padded_frame(scores, d.kept)
            assert frame.shape == real.shape == (bs, m - 1)
            # the frame is the request's top-(m-1) by score, ancestor-closed, and holds its real set
            assert torch.equal(frame, keep_top(scores, m))
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, frame, True)
            assert bool(is_ancestor_closed(parents, mask).all())
            assert torch.equal(real.sum(1), d.kept_counts)
            roots = torch.randint(0, 100, (bs,))
            tokens = torch.randint(100, 200, (bs, m - 1))
            filled = fill_padding_tokens(tokens, real, roots)
            for b in range(bs):
                real_set = {int(x) for x in d.kept[b] if x >= 0}
                assert {int(frame[b, i]) for i in range(m - 1) if real[b, i]} == real_set
                for i in range(m - 1):
                    want = int(tokens[b, i]) if real[b, i] else int(roots[b])
                    assert int(filled[b, i]) == want
            # the links: SGLang's lists for the frame tree, then the padding spliced out
            nxt = torch.full((bs, m), -1, dtype=torch.long)
            sib = torch.full((bs, m), -1, dtype=torch.long)
            vpar = []
            for b in range(bs):
                vp = verify_parents(frame[b].tolist(), parents[b].tolist())
                n_, s_ = sglang_links(vp)
                nxt[b], sib[b] = torch.tensor(n_), torch.tensor(s_)
                vpar.append(vp)
            got_n, got_s = unlink_padding(nxt, sib, real, topk)
            for b in range(bs):
                keep = [True] + real[b].tolist()
                # brute force: the tree of the real nodes only, linked as SGLang links any tree
                sub = [vpar[b][i] if keep[i] else -1 for i in range(m)]
                want_n, want_s = sglang_links(sub)
                for i in range(m):
                    if not keep[i]:
                        want_n[i] = want_s[i] = -1
                assert got_n[b].tolist() == want_n, (b, frame[b].tolist(), real[b].tolist())
                assert got_s[b].tolist() == want_s
                seen = reachable(got_n[b].tolist(), got_s[b].tolist())
                assert set(seen) == {i for i in range(1, m) if keep[i]}  # every real node, no padding
                assert all(vpar[b][c] == p for c, p in seen.items())
            checked_padding += int((~real).sum())
    if not tie and bs > 1:  # one request alone never pads (its budget is its width)
        assert checked_padding > 0, "the budget rule never padded: the test checked nothing"


def test_a_node_whose_children_are_all_padded_loses_them_all():
    # root -> 1, 2, 3 (topk 3); 1 -> 4, 5, 6; real: 1, 2 only
    vp = [-1, 0, 0, 0, 1, 1, 1]
    n_, s_ = sglang_links(vp)
    real = torch.tensor([[True, True, False, False, False, False]])
    got_n, got_s = unlink_padding(torch.tensor([n_]), torch.tensor([s_]), real, 3)
    assert got_n.tolist() == [[1, -1, -1, -1, -1, -1, -1]]
    assert got_s.tolist() == [[-1, 2, -1, -1, -1, -1, -1]]
    # a padded first child is skipped: real 2 and 3 under the root, 1 padded
    real = torch.tensor([[False, True, True, False, False, False]])
    got_n, got_s = unlink_padding(torch.tensor([n_]), torch.tensor([s_]), real, 3)
    assert got_n[0, 0] == 2 and got_s[0, 2] == 3 and got_s[0, 3] == -1
    assert got_n[0, 1] == -1 and got_s[0, 1] == -1  # the padded node's own links are cleared


def test_without_padding_nothing_changes():
    scores, parents = random_draft(3, 4, 3, seed=0)
    frame, real = padded_frame(scores, keep_top(scores, 8))
    assert torch.equal(frame, keep_top(scores, 8)) and bool(real.all())
    n_, s_ = sglang_links(verify_parents(frame[0].tolist(), parents[0].tolist()))
    nxt, sib = torch.tensor([n_]), torch.tensor([s_])
    got_n, got_s = unlink_padding(nxt, sib, real[:1], 4)
    assert torch.equal(got_n, nxt) and torch.equal(got_s, sib)


def test_the_metrics_line_shows_real_nodes_and_padded_steps_only_when_asked():
    from evict.plugin.metrics import RealNodeCounter, format_stats

    stats = {
        "steps": 3,
        "mean_width": 8.0,
        "mean_predicted_accepted": 2.0,
        "mean_realized_accepted": 2.5,
        "fallbacks": 0,
        "decision": "immediate",
        "backend": "torch",
    }
    counter = RealNodeCounter()
    counter.add_full(2, 8)  # 2 requests x 7 real nodes
    counter.add_counts(torch.tensor([3, 0, 1]))  # a padded step
    assert counter.summary() == (pytest.approx(18 / 5), 1)
    line = format_stats(stats, 1, {8: 2}, counter.summary())
    assert line.endswith("widths=8:2 real_nodes_per_req=3.60 padded_steps=1")
    assert "real_nodes" not in format_stats(stats, 1, {8: 2})
