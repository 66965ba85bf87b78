"""Pure-PyTorch forward of an HF Qwen3-MoE checkpoint with a static KV cache and explicit masks.

Why not ``transformers``: the engine needs (a) K/V written at slots it chooses and committed later,
(b) an arbitrary boolean attention mask per request (draft trees), (c) a hook on every router to
count and budget experts, and (d) an MoE that only touches the experts the batch actually routes to
(the expert-union cost that EVICT models). The numerics follow ``Qwen3MoeForCausalLM`` exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .common import (
    RMSNorm,
    apply_rope,
    default_mask,
    load_safetensors_dir,
    masked_attention,
    rope_cos_sin,
    write_slots,
)

__all__ = ["Qwen3MoeTarget", "TargetOutput", "RouterHook", "default_aux_layer_ids", "rope_theta_of"]

# router_hook(layer_idx, router_logits [N, E], topk_ids [N, k]) -> None | (topk_ids, topk_weights)
RouterHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


@dataclass
class TargetOutput:
    """logits [bs, T, V] fp32; aux_hidden [bs, T, 3H]: outputs of the three aux layers, concatenated."""

    logits: torch.Tensor
    aux_hidden: torch.Tensor


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3 aux layers as SGLang picks them by default: outputs of layers 1, L/2-1 and L-4.

    (SGLang captures the *inputs* of layers 2, L/2, L-3, i.e. these layers' outputs; an explicit
    ``eagle_aux_hidden_state_layer_ids`` list in the drafter config is shifted by +1 the same way.)
    """
    return (min(1, num_layers - 1), max(num_layers // 2 - 1, 0), max(num_layers - 4, 0))


def rope_theta_of(config) -> float:
    """rope_theta from a config (transformers 5 keeps it in ``rope_parameters``; older ones flat)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class _Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.n_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, mask, k_buf, v_buf, slots, s):
        bs, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bs, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(bs, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bs, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k_buf is not None:
            write_slots(k_buf, k, slots)
            write_slots(v_buf, v, slots)
            k, v = k_buf[:, :, :s], v_buf[:, :, :s]
        out = masked_attention(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(bs, t, -1))


class _DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, layer_idx=None, hook=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _SparseMoe(nn.Module):
    """Top-k routed SwiGLU experts; only experts that receive tokens are computed."""

    def __init__(self, config) -> None:
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.num_experts, self.top_k = e, config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.inter = i
        self.gate = nn.Linear(h, e, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * i, h))  # [gate; up] as HF's fused layout
        self.w_down = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, layer_idx: int, hook: RouterHook | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if hook is not None:
            repl = hook(layer_idx, logits, ids)
            if repl is not None:
                ids, weights = repl
                if ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
                    raise ValueError(
                        f"router_hook for layer {layer_idx} returned topk_ids {tuple(ids.shape)} and "
                        f"topk_weights {tuple(weights.shape)}; both must be [{x.shape[0]}, k]"
                    )
        weights = weights.to(x.dtype)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok = order // k
        xs = x[tok]  # [N*k, H], grouped by expert
        ys = torch.empty_like(xs)
        i = self.inter
        start = 0
        for e, c in enumerate(counts):  # only experts that received tokens
            if c == 0:
                continue
            gu = F.linear(xs[start : start + c], self.w_gate_up[e])
            ys[start : start + c] = F.linear(F.silu(gu[:, :i]) * gu[:, i:], self.w_down[e])
            start += c
        out = torch.zeros_like(x)
        out.index_add_(0, tok, ys * weights.reshape(-1)[order, None])
        return out.view(shape)


class _Layer(nn.Module):
    def __init__(self, config, idx: int) -> None:
        super().__init__()
        self.idx = idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _Attention(config)
        sparse = (
            idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0
            and (idx + 1) % config.decoder_sparse_step == 0
        )
        self.mlp = _SparseMoe(config) if sparse else _DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, cos, sin, mask, k_buf, v_buf, slots, s, hook):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, k_buf, v_buf, slots, s)
        return h + self.mlp(self.post_attention_layernorm(h), self.idx, hook)


class _Backbone(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3MoeTarget(nn.Module):
    """Qwen3-MoE causal LM (HF checkpoint layout) with KV cache, explicit masks and a router hook."""

    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "model_type", "qwen3_moe") != "qwen3_moe":
            raise ValueError(f"Qwen3MoeTarget needs a qwen3_moe config, got model_type={config.model_type!r}")
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rope_theta = rope_theta_of(config)
        self.aux_layer_ids: tuple[int, int, int] = default_aux_layer_ids(config.num_hidden_layers)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls, config, seed: int | None = None, dtype=torch.float32, device="cpu"
    ) -> Qwen3MoeTarget:
        """Random init (normal std=initializer_range, norms at 1) -- for tests, never for profiling."""
        if seed is not None:
            torch.manual_seed(seed)
        m = cls(config)
        std = float(getattr(config, "initializer_range", 0.02))
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return m.to(dtype=dtype, device=device).eval()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> Qwen3MoeTarget:
        """Load config.json + *.safetensors of an HF Qwen3-MoE checkpoint (per-expert or fused)."""
        from transformers import Qwen3MoeConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}/config.json not found: pass the directory of an HF Qwen3-MoE checkpoint "
                "(for the testbed, run scripts/train_testbed.py)"
            )
        config = Qwen3MoeConfig.from_pretrained(str(path))
        sd = load_safetensors_dir(path)
        m = cls(config)
        m.load_hf_state_dict(sd)
        return m.to(dtype=dtype, device=device).eval()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load HF names: per-expert ``mlp.experts.{e}.gate_proj.weight`` (checkpoint layout) or the
        fused ``mlp.experts.gate_up_proj`` / ``down_proj`` of in-memory transformers 5 models."""
        own = dict(self.named_parameters())
        out: dict[str, torch.Tensor] = {}
        per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, t in sd.items():
            if ".mlp.experts." in name:
                prefix, rest = name.split(".mlp.experts.", 1)
                parts = rest.split(".")
                if parts[0].isdigit():  # e.g. "3.gate_proj.weight"
                    per_expert.setdefault((prefix, parts[1]), {})[int(parts[0])] = t
                elif parts[0] == "gate_up_proj":
                    out[f"{prefix}.mlp.w_gate_up"] = t
                elif parts[0] == "down_proj":
                    out[f"{prefix}.mlp.w_down"] = t
                else:
                    raise ValueError(f"unexpected expert weight {name!r}")
            else:
                out[name] = t
        stacked: dict[tuple[str, str], torch.Tensor] = {}
        for (prefix, kind), tensors in per_expert.items():
            n = len(tensors)
            if sorted(tensors) != list(range(n)) or kind not in ("gate_proj", "up_proj", "down_proj"):
                raise ValueError(
                    f"{prefix}: bad expert weights {kind} {sorted(tensors)} (expected 0..{n - 1})"
                )
            stacked[(prefix, kind)] = torch.stack([tensors[e] for e in range(n)])
        for (prefix, kind), t in stacked.items():
            if kind == "down_proj":
                out[f"{prefix}.mlp.w_down"] = t
            elif kind == "gate_proj":
                up = stacked.get((prefix, "up_proj"))
                if up is None:
                    raise ValueError(f"{prefix}: expert gate_proj weights without up_proj")
                out[f"{prefix}.mlp.w_gate_up"] = torch.cat([t, up], dim=1)
        if getattr(self.config, "tie_word_embeddings", False):
            out.setdefault("lm_head.weight", out.get("model.embed_tokens.weight"))
        missing = sorted(set(own) - set(out))
        unexpected = sorted(set(out) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the Qwen3-MoE config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (is this a qwen3_moe checkpoint with the same config?)"
            )
        with torch.no_grad():
            for name, p in own.items():
                src = out[name]
                if src.shape != p.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the HF checkpoint layout (per-expert names), e.g. to save a modified model."""
        out = {}
        for name, t in self.state_dict().items():
            if name.endswith(".mlp.w_gate_up"):
                prefix = name[: -len(".mlp.w_gate_up")]
                g, u = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = g[e].contiguous()
                    out[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = u[e].contiguous()
            elif name.endswith(".mlp.w_down"):
                prefix = name[: -len(".mlp.w_down")]
                for e in range(t.shape[0]):
                    out[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                out[name] = t
        return out

    def save_pretrained(self, path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write config.json + model.safetensors in the HF layout (loadable by transformers and SGLang)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg.setdefault("rope_theta", self.rope_theta)
        cfg.setdefault("num_experts", getattr(self.config, "num_experts", None))
        cfg["dtype"] = str(dtype).replace("torch.", "")
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        sd = {k: v.detach().to(dtype).contiguous() for k, v in self.hf_state_dict().items()}
        if getattr(self.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})

    # ------------------------------------------------------------------ inference

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache for this model, in its parameter dtype and device."""
        p = self.lm_head.weight
        return KVCache(
            self.num_layers,
            batch_size,
            self.config.num_key_value_heads,
            self.head_dim,
            max_len,
            dtype=p.dtype,
            device=p.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        router_hook: RouterHook | None = None,
        write_offset: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> TargetOutput:
        """Forward T new tokens per request.

        New K/V go to slots ``cache.lengths[b] + write_offset[b] + t`` (write_offset defaults to 0);
        nothing is committed. attn_mask: BoolTensor [bs, T, S] with S = max(lengths + write_offset) + T
        (True = attend); None = causal over the committed prefix and the new tokens. Without a cache the
        forward is a plain causal (or masked, S = T) forward over the T tokens.
        logits_at: [bs] one position per request: logits only there ([bs, 1, V]), as SGLang's
        logits processor prunes an extend to its last tokens (a prefill needs no others).
        """
        h = self.model.embed_tokens(input_ids)
        bs, t = input_ids.shape
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        slots, s, mask = _prepare(cache, bs, t, attn_mask, write_offset, input_ids.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, h.dtype)
        aux: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            kb = cache.k[i] if cache is not None else None
            vb = cache.v[i] if cache is not None else None
            h = layer(h, cos, sin, mask, kb, vb, slots, s, router_hook)
            if i in self.aux_layer_ids:
                aux.append(h)
        aux_hidden = torch.cat([aux[self._aux_pos(j)] for j in self.aux_layer_ids], dim=-1)
        logits = self.lm_head(self.model.norm(_at(h, logits_at))).float()
        return TargetOutput(logits=logits, aux_hidden=aux_hidden)

    def _aux_pos(self, layer_id: int) -> int:
        return sorted(set(self.aux_layer_ids)).index(layer_id)


def _at(h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """h [bs, T, H] -> h at one position per row [bs, 1, H] (all of h when index is None)."""
    if index is None:
        return h
    return h.gather(1, index.view(-1, 1, 1).expand(h.shape[0], 1, h.shape[2]))


def _prepare(cache, bs, t, attn_mask, write_offset, device):
    """Slots [bs, T], number of key columns S and the boolean mask [bs, T, S] of a forward."""
    if cache is None:
        if write_offset is not None:
            raise ValueError("write_offset needs a KV cache")
        s = t
        slots = None
        base = torch.zeros(bs, dtype=torch.long, device=device)
        committed = base
    else:
        if cache.batch_size != bs:
            raise ValueError(f"cache batch size {cache.batch_size} != input batch size {bs}")
        committed = cache.lengths
        base = committed if write_offset is None else committed + write_offset.to(committed.device).long()
        s = cache.check_room(base, t)
        slots = base.view(-1, 1) + torch.arange(t, device=device).view(1, -1)
    if attn_mask is None:
        mask = default_mask(base, committed, t, s)
    else:
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (bs, t, s):
            raise ValueError(
                f"attn_mask must be a BoolTensor [bs={bs}, T={t}, S={s}] (S = max(cache.lengths) + T), "
                f"got {attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        mask = attn_mask
    return slots, s, mask
