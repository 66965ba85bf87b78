"""Write a *modeled* H100 cost table for Qwen3-30B-A3B (``configs/modeled_h100_qwen3_30b_a3b_cost_table.json``).

Why modeled: the benchmark's "modeled-GPU" column charges each step of the CPU runs from a
GPU-shaped cost curve, and EVICT decides from the same table.  No published per-(batch size, tree
width) verify timing of Qwen3-30B-A3B on H100 was found; what is published is the fused-MoE kernel
time per token count (vLLM ``benchmark_moe.py``, used below only as a cross-check), so the table
is derived from a stated bandwidth model, the same expert-union model EVICT is built on:

- a verify forward over ``n = bs * m`` tokens reads, per layer, the attention weights once, each
  request's KV prefix once, and the weights of the union of experts the tokens route to,
  ``U(n) = E * (1 - (1 - k/E)^n)`` (independent uniform routing; real tree tokens are correlated,
  so the real union is smaller and wide trees cheaper than modeled);
- plus the LM head once per step, at the H100 SXM's HBM3 bandwidth times an efficiency, with a
  fixed launch/overhead per layer, and never faster than the FLOPs at the stated peak;
- ``fixed_ms`` is the EAGLE-3 drafter: (steps) one-layer forwards (attention + dense MLP + the
  draft LM head) at the same bandwidth.

Run: ``python scripts/model_gpu_cost_table.py`` (deterministic; no GPU needed).
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B)
LAYERS, HIDDEN, MOE_INTER, EXPERTS, TOP_K = 48, 2048, 768, 128, 8
Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 4, 128, 151936
BYTES = 2  # bf16
# H100 SXM5 80GB: 3.35 TB/s HBM3, ~989 TFLOP/s dense bf16; achieved fractions are assumptions
BANDWIDTH, BW_EFF = 3.35e12, 0.75
FLOPS, FLOPS_EFF = 989e12, 0.5
LAYER_OVERHEAD_S = 8e-6  # kernel launches per layer under CUDA graphs (router, topk, norms, ...)
CONTEXT = 1024  # tokens of KV prefix per request
DRAFT_STEPS, DRAFT_TOPK, DRAFT_VOCAB, DRAFT_INTER = 5, 4, 32000, 6144

BATCH_SIZES = [1, 4, 16, 32, 64]
WIDTHS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


def union(n: float) -> float:
    """Expected distinct experts per layer for n tokens routed top-k of E uniformly."""
    return EXPERTS * (1.0 - (1.0 - TOP_K / EXPERTS) ** n)


def mem_s(nbytes: float) -> float:
    return nbytes / (BANDWIDTH * BW_EFF)


def verify_s(bs: int, m: int) -> tuple[float, float]:
    """(seconds, expert union) of one verify forward over bs requests of m tokens."""
    n = bs * m
    attn_w = (HIDDEN * Q_HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2) * BYTES
    kv = bs * CONTEXT * KV_HEADS * HEAD_DIM * 2 * BYTES
    expert = 3 * HIDDEN * MOE_INTER * BYTES
    u = union(n)
    layer_bytes = attn_w + kv + u * expert
    layer_flops = 2 * n * (attn_w / BYTES + TOP_K * expert / BYTES)
    layer = max(mem_s(layer_bytes), layer_flops / (FLOPS * FLOPS_EFF)) + LAYER_OVERHEAD_S
    head = max(mem_s(VOCAB * HIDDEN * BYTES), 2 * n * VOCAB * HIDDEN / (FLOPS * FLOPS_EFF))
    return LAYERS * layer + head, u


def draft_s(bs: int, depth: int = DRAFT_STEPS) -> float:
    """EAGLE-3 drafting to ``depth`` steps: one-layer forwards + draft LM head, weight-read bound
    (so the same for a chain and a tree). Depth 0 still runs the draft extend (one forward), as
    SGLang's steps=0 path does; depth d runs the extend and d - 1 tree forwards."""
    w = (
        HIDDEN * Q_HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + 3 * HIDDEN * DRAFT_INTER
    ) * BYTES
    w += DRAFT_VOCAB * HIDDEN * BYTES + 3 * HIDDEN * HIDDEN * BYTES  # draft head + fc over 3 aux states
    return max(depth, 1) * (mem_s(w) + 20 * LAYER_OVERHEAD_S)


def build() -> dict:
    lat = [[round(1000 * verify_s(b, m)[0], 4) for m in WIDTHS] for b in BATCH_SIZES]
    uni = [[round(verify_s(b, m)[1], 4) for m in WIDTHS] for b in BATCH_SIZES]
    return {
        "schema_version": 1,
        "metadata": {
            "model_id": "Qwen/Qwen3-30B-A3B",
            "model_type": "qwen3_moe",
            "device": "modeled:NVIDIA H100 SXM5 80GB",
            "dtype": "bfloat16",
            "tp_size": 1,
            "ep_size": 1,
            "backend": "modeled",
            "modeled": True,
            "implementation": "scripts/model_gpu_cost_table.py (bandwidth model, not a measurement)",
            "model": (
                "per layer: attention weights + KV prefix + U(n) experts' weights, "
                "U(n) = E(1-(1-k/E)^n), n = bs*m tokens, at HBM bandwidth x efficiency, max with "
                "FLOPs at peak x efficiency, + a per-layer overhead; + LM head once per step"
            ),
            "assumptions": {
                "layers": LAYERS,
                "hidden": HIDDEN,
                "moe_intermediate": MOE_INTER,
                "experts": EXPERTS,
                "top_k": TOP_K,
                "bandwidth_Bps": BANDWIDTH,
                "bandwidth_efficiency": BW_EFF,
                "peak_flops": FLOPS,
                "flops_efficiency": FLOPS_EFF,
                "layer_overhead_s": LAYER_OVERHEAD_S,
                "context_len": CONTEXT,
                "routing": "independent uniform (real tree tokens are correlated: smaller unions)",
            },
            "sources": [
                "Qwen/Qwen3-30B-A3B config.json (48 layers, hidden 2048, 128 experts top-8, moe_intermediate 768)",
                "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16",
                "cross-check only (not used): vLLM PR #24700, benchmark_moe.py --model Qwen/Qwen3-30B-A3B "
                "-tp 1 --dtype fp8_w8a8, fused-MoE kernel time 40-44 us at 1 token, 165-185 us at 16, "
                "248-274 us at 128 (device not stated in the excerpt); the model gives 23 us, 163 us and "
                "248 us per layer at FP8 byte counts",
            ],
            "padding_cost": 0.0,
            "padding_note": (
                "a padded verify slot holds the root token: it routes to experts the batch already "
                "reads, so in this weight-read model it costs nothing"
            ),
            "context_len": CONTEXT,
            "draft_steps": DRAFT_STEPS,
            "draft_topk": DRAFT_TOPK,
            "fixed_ms": f"modeled EAGLE-3 drafter, {DRAFT_STEPS} one-layer forwards (top-{DRAFT_TOPK})",
            "command": "python scripts/model_gpu_cost_table.py",
        },
        "batch_sizes": BATCH_SIZES,
        "widths": WIDTHS,
        "latency_ms": {"median": lat, "p10": lat, "p90": lat},
        "fixed_ms": [round(1000 * draft_s(b), 4) for b in BATCH_SIZES],
        "expert_union": uni,
        # per depth 0..DRAFT_STEPS, for the tree and for a chain (the whole-step decision's prices)
        "draft_ms": {
            str(k): [[round(1000 * draft_s(b, d), 4) for d in range(DRAFT_STEPS + 1)] for b in BATCH_SIZES]
            for k in (DRAFT_TOPK, 1)
        },
    }


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "configs" / "modeled_h100_qwen3_30b_a3b_cost_table.json"
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
