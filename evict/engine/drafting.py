"""EAGLE-3 tree drafting with the drafter's KV cache (SGLang's ``draft_forward`` in pure torch).

Why the cache trick: the model contract writes a forward's K/V at ``cache.lengths[b] + t`` and
commits nothing. Each draft step must see the earlier steps' K/V, so after each step the
committed lengths are advanced past the step's slots, and restored at the end: the draft K/V
beyond the committed prefix is garbage again and the draft extend overwrites it.

Attention: each frontier node attends to the committed prefix (whose last entry is the root's
drafter entry) and to its own ancestors among the earlier draft steps -- the true tree mask, as in
EAGLE's ``topK_genrate``. (SGLang's FlashInfer draft backend lets branch j attend to the slots of
branch j at earlier steps, which coincides with the true ancestors only for topk == 1; the
scores and the flat layout, which are what the truncation rule sees, are SGLang's.)

Positions: EAGLE-3 feeds the drafter (token j+1, target hidden state at j) at position j, so the
root's entry (the last committed one) sits at position ``L - 1`` (L = committed drafter length)
and a draft node at depth d is fed at position ``L - 1 + d``.
"""

from __future__ import annotations

from typing import Any

import torch

from .masks import window_mask
from .tree_layout import DraftTree, expand_first, expand_next

__all__ = ["draft_tree"]


def draft_tree(
    drafter: Any,
    cache: Any,
    root_logits: torch.Tensor,
    root_hidden: torch.Tensor,
    steps: int,
    topk: int,
) -> DraftTree:
    """Draft one SGLang-layout tree per request.

    root_logits: [bs, Vd] drafter logits for the token after the root (from the draft extend);
    root_hidden: [bs, H] drafter hidden state at the root's entry; steps, topk: EAGLE's
    ``speculative_num_steps`` / ``speculative_eagle_topk``. Runs ``steps - 1`` drafter forwards of
    ``topk`` tokens per request. Returns a DraftTree with K = topk + (steps-1)*topk*topk
    candidates whose tokens are target-vocabulary ids.
    """
    bs, hdim = root_hidden.shape
    k = topk
    device = root_hidden.device
    probs = torch.softmax(root_logits.float(), dim=-1)  # [bs, Vd]
    p0, i0 = torch.topk(probs, k, dim=-1)  # [bs, k]
    e = expand_first(p0, i0)
    scores, tokens, parents = [e.scores], [e.tokens], [e.parents]
    committed = cache.lengths.clone()  # [bs], includes the root's entry
    hidden = root_hidden.unsqueeze(1).expand(bs, k, hdim)  # [bs, k, H]
    window = torch.zeros((bs, k, 0), dtype=torch.bool, device=device)  # ancestors among draft slots
    eye = torch.eye(k, dtype=torch.bool, device=device).expand(bs, k, k)
    try:
        for step in range(1, steps):
            n_tmp = window.shape[2]
            win = torch.cat([window, eye], dim=2)  # [bs, k, n_tmp + k]: ancestors + self
            positions = (committed - 1 + step).view(bs, 1).expand(bs, k)
            mask = window_mask(committed, win, int(committed.max()) + n_tmp + k)
            input_ids = drafter.draft_to_target(e.frontier_tokens)  # [bs, k] target ids
            logits, hid = drafter(input_ids, hidden, positions, cache, attn_mask=mask)
            cache.lengths += k  # keep this step's K/V visible to the next step
            tp, ti = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)  # [bs, k, k]
            e = expand_next(step, e.frontier_scores, e.frontier_flat, tp, ti)
            scores.append(e.scores)
            tokens.append(e.tokens)
            parents.append(e.parents)
            src = e.frontier_src.unsqueeze(2)  # [bs, k, 1]
            hidden = hid.gather(1, src.expand(bs, k, hid.shape[2]))
            window = win.gather(1, src.expand(bs, k, win.shape[2]))
    finally:
        cache.lengths.copy_(committed)
    draft_ids = torch.cat(tokens, dim=1)
    return DraftTree(
        scores=torch.cat(scores, dim=1),
        tokens=drafter.draft_to_target(draft_ids).long(),
        parents=torch.cat(parents, dim=1),
    )
