"""Building blocks shared by the target and the drafter: RMSNorm, rotary embedding, masked attention.

Why pure PyTorch: the reference engine must run the same model on CPU and GPU without SGLang, with an
explicit boolean attention mask (tree verification) and a static KV cache whose slots the engine
controls. These helpers reproduce the HF numerics (fp32 RMSNorm, half-split rotary) so the logits
match ``transformers`` exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "rope_cos_sin", "apply_rope", "masked_attention", "default_mask", "write_slots"]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF Qwen3/Llama do (weight applied after the cast)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [bs, T, head_dim] for integer positions [bs, T] (default rope, HF layout)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [bs, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [bs, heads, T, hd] by cos/sin [bs, T, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def default_mask(base: torch.Tensor, committed: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Causal mask [bs, T, S]: the committed prefix plus the new tokens up to and including each query.

    base: [bs] first slot written by this forward; committed: [bs] committed lengths (slots before
    ``committed`` are visible; slots between ``committed`` and ``base`` are not).
    """
    cols = torch.arange(s, device=base.device).view(1, 1, s)
    q_slot = (base.view(-1, 1) + torch.arange(t, device=base.device).view(1, t)).unsqueeze(-1)  # [bs,T,1]
    prefix = cols < committed.view(-1, 1, 1)
    new = (cols >= base.view(-1, 1, 1)) & (cols <= q_slot)
    return prefix | new


def write_slots(buf: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new [bs, H, T, hd] into buf [bs, H, max_len, hd] at per-request slots [bs, T] (in place)."""
    bs, h, t, hd = new.shape
    idx = slots.view(bs, 1, t, 1).expand(bs, h, t, hd)
    buf.scatter_(2, idx, new.to(buf.dtype))


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of q [bs, nH, T, hd] over k/v [bs, nKV, S, hd] with a boolean mask [bs, T, S].

    GQA is handled by SDPA (``enable_gqa``). Query rows with no visible slot (padding rows) would give
    NaN in softmax; they attend everything instead, and their (meaningless) output is finite.
    """
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        mask = mask | empty
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=gqa
    )


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of every ``*.safetensors`` shard in ``path`` (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file  # noqa: PLC0415 (keeps `import evict` light)

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd
