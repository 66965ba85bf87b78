"""Counting the union of activated experts during a verification forward.

Why this exists: the cost of verifying a draft tree on a Mixture-of-Experts target grows with the
number of *distinct* experts the verified tokens route to (their weights must all be read), not
with the token count itself. The profiler records that union next to each latency so a cost table
can be read as "this width touched this many experts", and so profiles taken with unrealistic
tokens (random ids, dummy weights) can be spotted.

Conventions: one layer's routing is a LongTensor ``topk_ids [N, k]`` (N tokens, k experts each);
the union of a layer is the number of distinct ids in it. A forward's union is the mean over
layers of those per-layer unions (what the benchmark and the table store).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_union(topk_ids: torch.Tensor, num_experts: int) -> int:
    """Number of distinct experts in one layer's routing ``topk_ids [N, k]`` (ids in [0, E)).

    Ids outside [0, num_experts) are rejected: a silent out-of-range id would make the count wrong.
    """
    if topk_ids.numel() == 0:
        return 0
    ids = topk_ids.reshape(-1).to(torch.long)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert id out of range [0, {num_experts}): min {lo}, max {hi}")
    hit = torch.zeros(num_experts, dtype=torch.bool, device=ids.device)
    hit[ids] = True
    return int(hit.sum())


def topk_from_router_logits(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert ids chosen by a softmax-top-k router from its logits ``[N, E]`` -> ``[N, k]``.

    Softmax is monotone, so the top-k of the logits are the top-k of the probabilities (Qwen3-MoE,
    Mixtral). Routers with grouped selection or bias correction (DeepSeek-V3) choose differently;
    for those the count is an approximation, which the caller states in the table metadata.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    k = min(int(top_k), router_logits.shape[-1])
    return torch.topk(router_logits.float(), k, dim=-1).indices


def mean_union(per_layer_topk: Sequence[torch.Tensor], num_experts: int) -> float:
    """Mean over layers of the per-layer expert union (0.0 when no MoE layer reported)."""
    if len(per_layer_topk) == 0:
        return 0.0
    return sum(layer_union(t, num_experts) for t in per_layer_topk) / len(per_layer_topk)


def uniform_union(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected union E*(1-(1-k/E)^n) for n tokens routed uniformly at random (DESIGN.md section 1).

    Used as a reference line in the plot: measured unions far below it mean real routing is
    concentrated; unions near it on a trained model suggest random tokens or dummy weights.
    """
    if num_experts <= 0 or top_k <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - min(top_k, num_experts) / num_experts) ** max(num_tokens, 0))


def latency_union_correlation(latency_ms: Sequence[float], union: Sequence[float]) -> float:
    """Pearson correlation of verify latency with the expert union across widths (NaN if undefined).

    Why: the premise EVICT rests on is that verify cost follows the experts read, not the token
    count; on a weight-read-bound target this is near 1, and the profiler prints it per batch size.
    """
    n = len(latency_ms)
    if n != len(union) or n < 2:
        return float("nan")
    mx, my = sum(latency_ms) / n, sum(union) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(latency_ms, union))
    sxx = sum((x - mx) ** 2 for x in latency_ms)
    syy = sum((y - my) ** 2 for y in union)
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return sxy / (sxx * syy) ** 0.5


class ExpertRecorder:
    """Router hook that keeps each MoE layer's ``topk_ids`` of the current forward.

    Matches the reference engine's hook signature ``router_hook(layer_idx, router_logits, topk_ids)``
    and returns None (routing unchanged). Only the last ``keep_tokens`` rows of each layer can be
    kept (e.g. the verified tokens of a forward that also carries context).
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = int(num_experts)
        self.layers: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> None:
        self.layers[int(layer_idx)] = topk_ids.detach().to("cpu", torch.long)
        return None

    def reset(self) -> None:
        """Forget the recorded layers before the next forward."""
        self.layers = {}

    def per_layer(self) -> list[torch.Tensor]:
        """Recorded ``topk_ids`` in layer order."""
        return [self.layers[i] for i in sorted(self.layers)]

    def mean_union(self) -> float:
        """Mean per-layer union of the recorded forward."""
        return mean_union(self.per_layer(), self.num_experts)
