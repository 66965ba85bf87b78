"""Stand-in ``sgl_kernel`` for serving SGLang 0.5.23 on CUDA without the sgl-kernel wheel.

``evict/testing/cuda_shim`` is first on ``PYTHONPATH`` in the launcher and every process SGLang
spawns, so ``import sgl_kernel`` finds this package. The operators the served configuration calls
resolve to ``evict.testing.cuda_ops``; the other names SGLang imports unconditionally resolve to
placeholders that raise ``NotImplementedError`` when called (see ``_stub``). Submodules:
``kvcacheio``, ``quantization``, ``elementwise``, ``mamba``, ``speculative``, ``utils``,
``version``. ``scalar_type`` and ``flash_attn`` are deliberately absent: SGLang falls back to its
own mock scalar types, and treats FlashAttention as unavailable.
"""

from __future__ import annotations

from sgl_kernel._stub import make_getattr
from sgl_kernel.version import __version__  # noqa: F401

EVICT_CUDA_SHIM = True

# name -> evict.testing.cuda_ops attribute
ROUTED = {
    "rmsnorm": "rmsnorm",
    "fused_add_rmsnorm": "fused_add_rmsnorm",
    "gemma_rmsnorm": "gemma_rmsnorm",
    "gemma_fused_add_rmsnorm": "gemma_fused_add_rmsnorm",
    "silu_and_mul": "silu_and_mul",
    "gelu_and_mul": "gelu_and_mul",
    "gelu_tanh_and_mul": "gelu_tanh_and_mul",
    "moe_align_block_size": "moe_align_block_size",
    "moe_sum_reduce": "moe_sum_reduce",
    "topk_softmax": "topk_softmax",
    "top_k_renorm_prob": "top_k_renorm_prob",
    "top_p_renorm_prob": "top_p_renorm_prob",
    "build_tree_kernel_efficient": "build_tree_kernel_efficient",
    "verify_tree_greedy": "verify_tree_greedy",
    "rotary_embedding": "rotary_embedding",
    "tree_speculative_sampling_target_only": "tree_speculative_sampling_target_only",
}

# imported at module level somewhere in sglang 0.5.23 (outside try/except), never called on the
# served path; `from sgl_kernel import X` must succeed for these
IMPORT_ONLY = frozenset(
    {
        "apply_token_bitmask_inplace_cuda",
        "assign_draft_cache_locs_contiguous_cpu",
        "assign_extend_cache_locs_cpu",
        "assign_req_to_token_pool_cpu",
        "biased_topk",
        "build_draft_decode_metadata_cpu",
        "build_tree_kernel_efficient_cpu",
        "compress_norm_rope_store",
        "concat_mla_k",
        "copy_all_layer_kv_cache_cpu",
        "cutlass_w4a8_moe_mm",
        "es_fp8_blockwise_scaled_grouped_mm",
        "es_sm100_mxfp8_blockscaled_grouped_mm",
        "es_sm100_mxfp8_blockscaled_grouped_quant",
        "fast_topk_transform_fused",
        "fast_topk_transform_ragged_fused",
        "fast_topk_v2",
        "fill_accept_out_cache_loc_cpu",
        "fill_bonus_tokens_cpu",
        "flash_compress128_decode",
        "flash_compress128_prefill",
        "flash_compress4_decode",
        "flash_compress4_prefill",
        "flash_mla_decode",
        "flash_mla_decode_get_workspace_size",
        "flash_mla_get_workspace_size",
        "flash_mla_prefill",
        "flash_mla_prefill_get_workspace_size",
        "flash_mla_sparse_fwd",
        "flash_mla_with_kvcache",
        "fp8_blockwise_scaled_grouped_mm",
        "fp8_mqa_logits",
        "fp8_paged_mqa_logits",
        "fp8_paged_mqa_logits_triton",
        "fused_experts",
        "fused_hc_head",
        "fused_inplace_qknorm_rope",
        "fused_k_norm_rope_flashmla",
        "fused_q_indexer_rope_hadamard_quant",
        "fused_q_norm_rope",
        "gdn_attention",
        "gelu_quick",
        "get_cutlass_w4a8_moe_mm_data",
        "hadamard_transform",
        "hash_topk",
        "hc_post",
        "hc_split_sinkhorn",
        "infllmv2_attn_stage1",
        "int8_scaled_mm",
        "load_cache_to_device_buffer_dsv4_mla",
        "load_cache_to_device_buffer_mla",
        "max_pooling_1d_varlen",
        "merge_state_v2",
        "mhc_fused_post_pre",
        "mhc_pre",
        "min_p_sampling_from_probs",
        "minimax_decode_topk",
        "moe_fused_gate",
        "moe_sum",
        "plan_compress_decode",
        "plan_compress_decode_legacy",
        "plan_compress_prefill",
        "plan_compress_prefill_legacy",
        "rotate_input_ids_cpu",
        "sgl_per_tensor_quant_fp8",
        "sgl_per_token_quant_fp8",
        "shuffle_rows",
        "silu_and_mul_clamp",
        "spatial",
        "store_cache_xpu",
        "top_k",
        "top_k_top_p_sampling_from_probs",
        "topk_sigmoid",
        "verify_tree_greedy_cpu",
        "weak_ref_tensor",
    }
)

__getattr__ = make_getattr("sgl_kernel", ROUTED, IMPORT_ONLY)
