"""The smallest HF configs SGLang resolves server arguments for: a Qwen3-MoE target and its EAGLE-3 drafter.

Resolution and the worker rig read the architecture only, never weights, so these stand in for real
checkpoints; ``vocab`` is a parameter because the rig draws logits over it.
"""

from __future__ import annotations


def tiny_configs(vocab: int = 256) -> tuple[dict, dict]:
    """``(target config.json, drafter config.json)`` as dicts."""
    target = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
    }
    draft = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "draft_vocab_size": vocab,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
    }
    return target, draft
