"""EAGLE-3 drafter in SGLang's ``LlamaForCausalLMEagle3`` checkpoint layout, in pure PyTorch.

Why this layout: the same drafter file must be served by SGLang 0.5.23 on a GPU and by the reference
engine here. The forward reproduces ``sglang/srt/models/llama_eagle3.py`` (one Llama decoder layer
whose attention input is concat(input_layernorm(embeds), hidden_norm(hidden)); residual = the
projected hidden; the hidden passed to the next draft step is the pre-norm residual sum).

Checkpoint names (``SGLANG_EAGLE3_WEIGHT_NAMES``): ``fc.weight`` [H, 3*H_target], ``midlayer.*``
(SGLang maps "midlayer" -> "model.layers.0"), ``norm.weight``, ``lm_head.weight`` [Vd, H],
``d2t`` [Vd] int64 (target_id = draft_id + d2t[draft_id]) and ``t2d`` [V] bool. The token embedding
is not stored: it is shared with the target, as SGLang does for EAGLE-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .common import RMSNorm, apply_rope, load_safetensors_dir, masked_attention, rope_cos_sin, write_slots
from .qwen3_moe import Qwen3MoeTarget, _at, _prepare, rope_theta_of

__all__ = ["Eagle3Drafter", "SGLANG_EAGLE3_WEIGHT_NAMES", "eagle3_config", "sglang_param_name"]

# Every tensor name SGLang's LlamaForCausalLMEagle3.load_weights consumes for a 1-layer drafter
# without fc_norm / norm_before_fc (read from sglang 0.5.23 python/sglang/srt/models/llama_eagle3.py).
SGLANG_EAGLE3_WEIGHT_NAMES = (
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
)


def sglang_param_name(ckpt_name: str) -> str | None:
    """The SGLang module parameter a checkpoint tensor lands in (None for d2t/t2d, which it consumes).

    Mirrors ``LlamaForCausalLMEagle3.load_weights``: legacy "midlayer" -> "layers.0"; q/k/v_proj ->
    qkv_proj and gate/up_proj -> gate_up_proj; names not at the top level get a "model." prefix
    (only lm_head is top level).
    """
    if "d2t" in ckpt_name or "t2d" in ckpt_name:
        return None
    name = ckpt_name.replace("midlayer", "layers.0")
    for new, old in ((".qkv_proj", ".q_proj"), (".qkv_proj", ".k_proj"), (".qkv_proj", ".v_proj")):
        name = name.replace(old, new)
    for new, old in ((".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj")):
        name = name.replace(old, new)
    return name if name.startswith("lm_head.") else f"model.{name}"


def eagle3_config(
    target_config,
    draft_vocab_size: int,
    aux_layer_ids: tuple[int, int, int] | list[int],
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
) -> dict:
    """The drafter's config.json (a LlamaConfig dict plus the EAGLE-3 keys SGLang reads)."""
    h = target_config.hidden_size
    nh = num_attention_heads or target_config.num_attention_heads
    hd = head_dim or getattr(target_config, "head_dim", None) or h // nh
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "target_hidden_size": h,
        "intermediate_size": intermediate_size or 4 * h,
        "num_hidden_layers": 1,
        "num_attention_heads": nh,
        "num_key_value_heads": num_key_value_heads or target_config.num_key_value_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "rms_norm_eps": target_config.rms_norm_eps,
        "max_position_embeddings": target_config.max_position_embeddings,
        "rope_theta": rope_theta_of(target_config),
        "rope_scaling": None,
        "vocab_size": target_config.vocab_size,
        "draft_vocab_size": int(draft_vocab_size),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "pad_token_id": getattr(target_config, "pad_token_id", None),
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_layer_ids],
            "use_aux_hidden_state": True,
        },
    }


class _MidLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h = cfg["hidden_size"]
        self.n_heads, self.n_kv, self.head_dim = (
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
        )
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        attn = nn.Module()
        attn.q_proj = nn.Linear(2 * h, self.n_heads * self.head_dim, bias=False)
        attn.k_proj = nn.Linear(2 * h, self.n_kv * self.head_dim, bias=False)
        attn.v_proj = nn.Linear(2 * h, self.n_kv * self.head_dim, bias=False)
        attn.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.self_attn = attn
        mlp = nn.Module()
        mlp.gate_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        mlp.up_proj = nn.Linear(h, cfg["intermediate_size"], bias=False)
        mlp.down_proj = nn.Linear(cfg["intermediate_size"], h, bias=False)
        self.mlp = mlp


class Eagle3Drafter(nn.Module):
    """One-layer EAGLE-3 drafter; shares the target's token embedding (not part of its state dict)."""

    def __init__(self, cfg: dict, target: Qwen3MoeTarget) -> None:
        super().__init__()
        missing = [
            k
            for k in ("hidden_size", "num_attention_heads", "draft_vocab_size", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"drafter config lacks {missing}; build it with eagle3_config(...)")
        if cfg["hidden_size"] != target.config.hidden_size or cfg["vocab_size"] != target.config.vocab_size:
            raise ValueError(
                f"drafter (hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}) does not fit the target "
                f"(hidden {target.config.hidden_size}, vocab {target.config.vocab_size})"
            )
        cfg = dict(cfg)
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        self.config = cfg
        h, th = cfg["hidden_size"], cfg.get("target_hidden_size", cfg["hidden_size"])
        n_aux = len(cfg.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids") or [0, 0, 0])
        self.fc = nn.Linear(n_aux * th, h, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = RMSNorm(h, cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        self.register_buffer("d2t", torch.zeros(cfg["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg["vocab_size"], dtype=torch.bool))
        self._target = (target,)  # a tuple: shared, not registered as a submodule
        self.rope_theta = float(cfg.get("rope_theta", 10000.0))
        ids = cfg.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
        if ids:
            if len(ids) != 3 or max(ids) >= target.config.num_hidden_layers:
                raise ValueError(
                    f"eagle_aux_hidden_state_layer_ids {ids} do not fit a {target.num_layers}-layer target"
                )
            target.aux_layer_ids = tuple(int(i) for i in ids)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._target[0].model.embed_tokens

    # ------------------------------------------------------------------ construction / io

    @classmethod
    def from_config(
        cls, cfg: dict, target: Qwen3MoeTarget, seed: int | None = None, dtype=torch.float32, device="cpu"
    ) -> Eagle3Drafter:
        """Random init (std 0.02, norms at 1, identity-like d2t = 0) for tests and as training start."""
        if seed is not None:
            torch.manual_seed(seed)
        m = cls(cfg, target)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)
        vd = cfg["draft_vocab_size"]
        m.set_vocab_map(torch.arange(vd))
        return m.to(dtype=dtype, device=device).eval()

    def set_vocab_map(self, draft_to_target_ids: torch.Tensor) -> None:
        """Set d2t/t2d from the (sorted) target ids of the draft vocabulary."""
        ids = torch.as_tensor(draft_to_target_ids).long().cpu()
        if ids.numel() != self.d2t.numel() or ids.unique().numel() != ids.numel():
            raise ValueError(f"draft vocabulary must list {self.d2t.numel()} distinct target ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.t2d.numel():
            raise ValueError("draft vocabulary ids out of the target vocabulary range")
        t2d = torch.zeros(self.t2d.numel(), dtype=torch.bool)
        t2d[ids] = True
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.copy_(t2d)

    @classmethod
    def from_pretrained(
        cls, path, target: Qwen3MoeTarget, dtype=torch.float32, device="cpu"
    ) -> Eagle3Drafter:
        """Load a drafter saved in SGLang's EAGLE-3 layout; binds it to ``target`` (shared embedding)."""

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}/config.json not found: pass an EAGLE-3 drafter directory (scripts/train_testbed.py)"
            )
        cfg = json.loads((path / "config.json").read_text())
        sd = load_safetensors_dir(path)
        m = cls(cfg, target)
        m.load_sglang_state_dict(sd)
        return m.to(dtype=dtype, device=device).eval()

    def load_sglang_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load checkpoint tensors (names as in SGLANG_EAGLE3_WEIGHT_NAMES; legacy 'layers.0' accepted)."""
        sd = {k.replace("model.", "", 1) if k.startswith("model.") else k: v for k, v in sd.items()}
        sd = {k.replace("layers.0.", "midlayer."): v for k, v in sd.items()}
        sd.pop("embed_tokens.weight", None)  # shared with the target
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"drafter checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, t in own.items():
                if sd[k].shape != t.shape:
                    raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} != config {tuple(t.shape)}")
                t.copy_(sd[k].to(t.dtype))

    def save_pretrained(self, path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write config.json + model.safetensors in SGLang's LlamaForCausalLMEagle3 layout."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.config)
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        sd = {}
        for k, t in self.state_dict().items():
            t = t.detach()
            sd[k] = (t if k in ("d2t", "t2d") else t.to(dtype)).contiguous()
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})

    # ------------------------------------------------------------------ inference

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A one-layer KV cache for the drafter."""
        p = self.lm_head.weight
        ml = self.midlayer
        return KVCache(1, batch_size, ml.n_kv, ml.head_dim, max_len, dtype=p.dtype, device=p.device)

    def project(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """fc over the concatenated target aux hidden states: [bs, T, 3H] -> [bs, T, H]."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids (target_id = draft_id + d2t[draft_id])."""
        return draft_ids + self.d2t[draft_ids]

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        write_offset: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter pass over T tokens -> (draft_logits [bs, T, Vd] fp32, hidden_out [bs, T, H]).

        hidden: [bs, T, H] (already projected, or the raw [bs, T, 3H] aux states, projected here as
        SGLang does). input_ids[t] is the token *following* the position whose hidden state is
        hidden[t]. Cache semantics, attn_mask and logits_at (draft logits [bs, 1, Vd] at one position
        per request: a prefill or a draft extend drafts on from its last entry only) as in
        ``Qwen3MoeTarget.forward``.
        """
        if hidden.shape[-1] != self.config["hidden_size"]:
            hidden = self.project(hidden)
        bs, t = input_ids.shape
        ml = self.midlayer
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        slots, s, mask = _prepare(cache, bs, t, attn_mask, write_offset, input_ids.device)
        residual = hidden
        x = torch.cat([ml.input_layernorm(embeds), ml.hidden_norm(hidden)], dim=-1)
        a = ml.self_attn
        q = a.q_proj(x).view(bs, t, ml.n_heads, ml.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(bs, t, ml.n_kv, ml.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(bs, t, ml.n_kv, ml.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, ml.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            write_slots(cache.k[0], k, slots)
            write_slots(cache.v[0], v, slots)
            k, v = cache.k[0][:, :, :s], cache.v[0][:, :, :s]
        att = masked_attention(q, k, v, mask, ml.head_dim**-0.5)
        att = a.o_proj(att.transpose(1, 2).reshape(bs, t, -1))
        residual = residual + att
        m = ml.mlp
        hn = ml.post_attention_layernorm(residual)
        out = m.down_proj(F.silu(m.gate_proj(hn)) * m.up_proj(hn))
        hidden_out = residual + out
        logits = self.lm_head(self.norm(_at(hidden_out, logits_at))).float()
        return logits, hidden_out
