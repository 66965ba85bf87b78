"""Attention masks for batched forwards over a KV cache (the models take explicit boolean masks).

Why here: the model contract (docs/ARCHITECTURE.md) makes the caller responsible for masking
padding slots of shorter requests; every forward of the engine (prefill, draft steps, verify,
draft extend) builds its mask with :func:`window_mask`.

Slot layout of request b in a cache with committed length ``L_b``: slots ``0 .. L_b-1`` hold the
committed prefix; the forward's new tokens (and, while drafting, earlier draft steps) occupy the
window of slots ``L_b .. L_b + Wn - 1``; columns up to ``S`` (the longest request) are padding.
"""

from __future__ import annotations

import torch

__all__ = ["window_mask", "causal_window"]


def window_mask(prefix_lens: torch.Tensor, window: torch.Tensor, num_cols: int) -> torch.Tensor:
    """BoolTensor [bs, T, S]: attend to the committed prefix and to the allowed window slots.

    prefix_lens: [bs] committed lengths L_b; window: [bs, T, Wn] bool, window[b, t, w] = query t may
    attend slot L_b + w; num_cols: S >= max(L_b) + Wn. True = attend.
    """
    bs, t, wn = window.shape
    device = window.device
    cols = torch.arange(num_cols, device=device)  # [S]
    lens = prefix_lens.to(device).long().view(bs, 1)
    prefix = (cols.view(1, -1) < lens).unsqueeze(1)  # [bs, 1, S]
    rel = cols.view(1, -1) - lens  # [bs, S] slot relative to the window start
    in_win = (rel >= 0) & (rel < wn)
    gathered = window.gather(2, rel.clamp(0, max(wn - 1, 0)).unsqueeze(1).expand(bs, t, num_cols))
    return prefix | (gathered & in_win.unsqueeze(1))


def causal_window(bs: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """BoolTensor [bs, T, T]: lower-triangular window (plain causal attention over new tokens)."""
    return torch.ones((t, t), dtype=torch.bool, device=device).tril().expand(bs, t, t)
