"""Router hooks for the benchmark: expert counting and the lossy MoE-Spec expert budget.

Why here and not in the model: both only *observe or override* routing through the target's
``router_hook(layer_idx, router_logits [N, E], topk_ids [N, k])`` (docs/ARCHITECTURE.md). The
model stays untouched and lossless; the bench decides which forwards the hooks see (verify steps
only, never the prefill) with :func:`verify_router_hook`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from evict.profiler.experts import layer_union

__all__ = ["ExpertUnionCounter", "MoESpecBudget", "chain_hooks", "verify_router_hook", "is_prefill"]

RouterHook = Callable[[int, torch.Tensor, torch.Tensor], Any]


class ExpertUnionCounter:
    """Counts, per verify forward, the mean over MoE layers of the number of distinct experts used.

    A forward ends when a layer index repeats, when :meth:`end_forward` is called
    (``verify_router_hook`` does) or at :meth:`take`. Returns ``None`` from the hook: routing is unchanged.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = int(num_experts)
        self._layers: list[int] = []
        self._seen: set[int] = set()
        self.union_sum = 0.0
        self.forwards = 0

    def __call__(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> None:
        if layer_idx in self._seen:  # a layer seen again: a new forward began
            self.end_forward()
        self._seen.add(layer_idx)
        self._layers.append(layer_union(topk_ids, self.num_experts))
        return None

    def end_forward(self) -> None:
        """Close one forward: add its mean per-layer union to the sum."""
        if self._layers:
            self.union_sum += sum(self._layers) / len(self._layers)
            self.forwards += 1
        self._layers, self._seen = [], set()

    def take(self) -> tuple[float, int]:
        """Close the current forward, then return and reset ``(union_sum, forwards)``."""
        self.end_forward()
        out = (self.union_sum, self.forwards)
        self.union_sum, self.forwards = 0.0, 0
        return out


class MoESpecBudget:
    """MoE-Spec-style verification-time expert budget (lossy): keep B experts per layer.

    For each MoE layer of a verify forward, the total routing weight of every expert over all
    verified tokens of the batch is summed; only the ``budget`` experts with the largest totals
    stay. Each token keeps those of its top-k experts that survived, with their weights
    renormalized to the token's original top-k weight sum (1 with ``norm_topk_prob``). A token
    whose experts were all dropped goes to the surviving expert its router scores highest, with
    its whole weight. Dropped slots are filled with a surviving id of the same token at weight 0,
    so shapes stay ``[N, k]`` and no dropped expert is ever read.
    """

    def __init__(self, budget: int, norm_topk_prob: bool = True) -> None:
        if isinstance(budget, bool) or int(budget) != budget or budget < 1:
            raise ValueError(f"MoE-Spec budget must be an int >= 1 experts per layer, got {budget!r}")
        self.budget = int(budget)
        self.norm_topk_prob = bool(norm_topk_prob)

    def __call__(
        self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
        n, e = probs.shape
        ids = topk_ids.long()
        w = probs.gather(1, ids)  # [N, k]
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        wsum = w.sum(dim=-1, keepdim=True)
        totals = torch.zeros(e, dtype=w.dtype, device=w.device).scatter_add_(
            0, ids.reshape(-1), w.reshape(-1)
        )
        used = int((totals > 0).sum())
        b = min(self.budget, e)
        if used <= b:  # within budget: routing unchanged
            return None
        keep = torch.zeros(e, dtype=torch.bool, device=w.device)
        keep[torch.topk(totals, b).indices] = True
        survive = keep[ids]  # [N, k]
        kw = torch.where(survive, w, torch.zeros_like(w))
        # tokens with no surviving expert: their best-scored kept expert takes the whole weight
        none_left = ~survive.any(dim=-1)
        best_kept = probs.masked_fill(~keep, -1.0).argmax(dim=-1)  # [N]
        ids_out = torch.where(survive, ids, torch.full_like(ids, -1))
        ids_out[none_left, 0] = best_kept[none_left]
        kw[none_left, 0] = 1.0
        survive = survive.clone()
        survive[none_left, 0] = True
        # fill dropped slots with the token's first surviving id at weight 0
        first_slot = survive.float().argmax(dim=-1)
        fill = ids_out.gather(1, first_slot[:, None]).expand_as(ids_out)
        ids_out = torch.where(survive, ids_out, fill)
        kw = kw / kw.sum(dim=-1, keepdim=True).clamp_min(1e-20) * wsum
        return ids_out, kw


def chain_hooks(*hooks: RouterHook | None) -> RouterHook | None:
    """Compose router hooks: each sees the routing the previous one returned.

    A hook returning ``None`` leaves routing as is; one returning ``(topk_ids, topk_weights)``
    replaces it for the later hooks and for the model. ``None`` hooks are skipped.
    """
    hs = [h for h in hooks if h is not None]
    if not hs:
        return None
    if len(hs) == 1:
        return hs[0]

    def chained(layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor):
        result = None
        ids = topk_ids
        for h in hs:
            r = h(layer_idx, router_logits, ids)
            if r is not None:
                result = r
                ids = r[0]
        return result

    return chained


def is_prefill(cache: Any, num_new: int) -> bool:
    """A forward is a prefill when no request has committed tokens yet (a fresh cache)."""
    lengths = getattr(cache, "lengths", None)
    if lengths is None:
        return False
    return int(lengths.max()) == 0 if lengths.numel() else True


@contextlib.contextmanager
def verify_router_hook(
    target: torch.nn.Module,
    hook: RouterHook | None,
    counter: ExpertUnionCounter | None = None,
    prefill_fn: Callable[[Any, int], bool] = is_prefill,
) -> Iterator[None]:
    """Install ``hook`` (and ``counter``) on every non-prefill forward of ``target`` for the block.

    The target's ``forward(input_ids, positions, cache, attn_mask=None, router_hook=None)`` is
    wrapped on the instance (restored on exit); a hook the engine passes itself runs first. Prefill
    forwards (``prefill_fn``) get only the engine's hook: the expert budget and the expert count
    concern verification.
    """
    original = target.forward
    mine = chain_hooks(hook, counter)

    def forward(input_ids, positions, cache, attn_mask=None, router_hook=None, **kw):
        if mine is None or prefill_fn(cache, input_ids.shape[-1]):
            return original(input_ids, positions, cache, attn_mask=attn_mask, router_hook=router_hook, **kw)
        out = original(
            input_ids, positions, cache, attn_mask=attn_mask, router_hook=chain_hooks(router_hook, mine), **kw
        )
        if counter is not None:
            counter.end_forward()
        return out

    target.forward = forward  # instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del target.forward
        if target.forward != original:  # pragma: no cover - defensive
            target.forward = original
