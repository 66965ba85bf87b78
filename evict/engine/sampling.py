"""Target sampling distribution (temperature, top-p) and inverse-CDF sampling with given coins.

Why explicit coins: the acceptance rule and autoregressive sampling consume uniform numbers
drawn by the engine from a seeded generator, so runs are reproducible and the exact-probability
tests can enumerate coin values instead of sampling.
"""

from __future__ import annotations

import torch

__all__ = ["target_probs", "sample_from_probs", "validate_sampling"]


def validate_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError naming the bad sampling parameter."""
    if not (temperature >= 0.0) or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution [..., V] (fp32): softmax(logits / T), then top-p renormalization.

    Top-p keeps, in descending probability order, every token whose preceding mass is < top_p
    (the smallest prefix with mass >= top_p), as SGLang's ``top_p_renorm_prob``; ties keep the
    lower token id first. Requires temperature > 0 (greedy uses argmax, not this).
    """
    if temperature <= 0:
        raise ValueError("target_probs needs temperature > 0; greedy decoding uses argmax")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each sorted token
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample LongTensor [N] from ``probs [N, V]`` (unnormalized ok) with ``coins [N]``.

    Picks the first token whose cumulative mass exceeds ``coin * total`` (SGLang's
    ``DeviceSamplingFromProb`` rule). Rounding past the end picks the last token with mass; an
    all-zero row picks token 0 -- measure-zero cases that must never crash a step.
    """
    cdf = probs.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]
    u = coins.view(-1, 1).to(cdf.dtype) * total
    idx = (cdf <= u).sum(dim=-1)  # first index with cdf > u
    v = probs.shape[-1]
    positive = probs > 0
    last_pos = torch.where(
        positive.any(dim=-1),
        v - 1 - positive.flip(-1).float().argmax(dim=-1),
        torch.zeros_like(idx),
    )
    return torch.where(idx >= v, last_pos, idx).long()
