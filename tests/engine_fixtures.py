"""Tiny random-init model pairs for the engine's tests (fp32, CPU, a few ms per forward).

Two flavours:

- ``random_pair``: target and drafter both random. Full-strength attention, so any masking or
  KV-cache bug changes the target's logits; the drafter is uncorrelated, so trees are mostly
  rejected (acceptance still happens with a small vocabulary).
- ``oracle_pair``: a target whose attention output is scaled down (it is *nearly* a bigram model:
  the next token depends mostly on the current one) and an ``OracleDrafter`` whose logits are the
  target's own single-token prediction. Drafts are mostly right but not always, so deep accepted
  paths, rejections and intermediate EVICT widths all occur.
"""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig

from evict.models import Eagle3Drafter, Qwen3MoeTarget, eagle3_config


def tiny_config(vocab: int = 16, layers: int = 2) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        initializer_range=0.5,
        tie_word_embeddings=False,
    )


def random_pair(seed: int = 0, vocab: int = 16, draft_vocab: int = 12):
    cfg = tiny_config(vocab)
    target = Qwen3MoeTarget.from_config(cfg, seed=seed)
    drafter = Eagle3Drafter.from_config(
        eagle3_config(cfg, draft_vocab, target.aux_layer_ids), target, seed=seed + 1
    )
    # a draft vocabulary that is a strict, shifted subset of the target's: exercises d2t
    drafter.set_vocab_map(torch.arange(vocab - draft_vocab, vocab))
    with torch.no_grad():  # peakier draft distributions: a spread of scores, hence of widths
        drafter.lm_head.weight.mul_(40.0)
    return target, drafter


class OracleDrafter(Eagle3Drafter):
    """An EAGLE-3 drafter whose logits are the target's prediction from the input token alone.

    It still runs the real drafter forward (cache writes, masks, hidden states); only the returned
    logits are replaced, scaled by ``sharpness``.
    """

    sharpness: float = 1.0

    def forward(
        self, input_ids, hidden, positions, cache=None, attn_mask=None, write_offset=None, logits_at=None
    ):
        _, hidden_out = super().forward(input_ids, hidden, positions, cache, attn_mask, write_offset)
        target = self._target[0]
        bs, t = input_ids.shape
        single = target(input_ids.reshape(-1, 1), torch.zeros_like(input_ids).reshape(-1, 1), None)
        logits = single.logits.view(bs, t, -1)  # target vocabulary
        ids = torch.arange(self.d2t.numel(), device=input_ids.device)
        logits = logits[..., self.draft_to_target(ids)] * self.sharpness  # draft vocabulary
        if logits_at is not None:  # one position per request, as the real drafter's logits_at
            logits = logits[torch.arange(bs, device=logits.device), logits_at].unsqueeze(1)
        return logits, hidden_out


def oracle_pair(seed: int = 0, vocab: int = 16, attn_scale: float = 0.003, sharpness: float = 1.0):
    cfg = tiny_config(vocab)
    target = Qwen3MoeTarget.from_config(cfg, seed=seed)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_scale)
    drafter = OracleDrafter.from_config(
        eagle3_config(cfg, vocab, target.aux_layer_ids), target, seed=seed + 1
    )
    drafter.sharpness = sharpness
    return target, drafter


@torch.inference_mode()
def greedy_reference(target, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Target-only greedy decoding without a KV cache (full recompute each token)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        x = torch.tensor([ids])
        logits = target(x, torch.arange(len(ids)).view(1, -1), None).logits
        tok = int(logits[0, -1].argmax())
        ids.append(tok)
        out.append(tok)
        if eos is not None and tok == eos:
            break
    return out
