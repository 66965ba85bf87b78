"""Pure-torch stand-ins for the sgl-kernel and JIT operators that SGLang 0.5.23's CUDA path calls,
so SGLang's real server runs on a GPU machine without ``sgl_kernel``, FlashInfer or tvm-ffi.

Why: on CUDA, SGLang reaches its compiled operators two ways. AOT ones come from the
``sgl_kernel`` wheel (``from sgl_kernel import rmsnorm``); JIT ones are compiled at first use by
``sglang.kernels.jit.utils.load_jit`` (nvcc + tvm-ffi) and called as ``module.<export>(...)``.
Neither exists on the target machine. ``evict/testing/cuda_shim`` supplies both:

* its ``sgl_kernel`` stub package resolves the AOT names below (``AOT_OPS``) to functions of
  this module;
* its ``sitecustomize`` replaces the ``_jit_*_module`` factory of each JIT operator on the
  served path (``JIT_FACTORIES``) with a factory returning a :class:`JitStandIn`, an object whose
  attributes are the stand-ins below under the export names SGLang's Python wrapper calls, with
  the C++ ``run`` argument lists. SGLang's Python wrappers (``register_custom_op`` and all) run
  unchanged; only the kernel underneath is replaced. Every other ``load_jit`` raises a clear
  error, which SGLang's own "try the JIT kernel, else fall back" probes turn into their fallback.

Where SGLang ships a Triton twin of the kernel (draft-tree build, greedy verify, top-k / top-p
renormalization, MoE sum-reduce), the stand-in delegates to it on CUDA tensors and to a
torch / ``evict.testing.cpu_ops`` port on CPU tensors (tests, ``selftest("cpu")``).

Graph capture: decode and target-verify forwards are captured in CUDA graphs, so every stand-in
that runs inside the model forward (norms, activations, RoPE with its KV write, KV store, MoE
align / sum, clamp_position) uses only fixed-size device ops: no ``.item()``, ``.tolist()``,
``nonzero``, boolean masking or ``bincount``. The sampling-verify port
(``tree_speculative_sampling_target_only``) is not capturable; SGLang calls it after the
verify forward, outside the graphs.

Importing this module imports neither sglang nor sgl_kernel; SGLang's Triton kernels are imported
lazily inside the functions that delegate to them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "AOT_OPS",
    "JIT_FACTORIES",
    "JitStandIn",
    "rmsnorm",
    "fused_add_rmsnorm",
    "gemma_rmsnorm",
    "gemma_fused_add_rmsnorm",
    "silu_and_mul",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "moe_align_block_size",
    "moe_sum_reduce",
    "topk_softmax",
    "top_k_renorm_prob",
    "top_p_renorm_prob",
    "is_arch_support_pdl",
    "apply_rope",
    "rotary_embedding",
    "run_rope",
    "run_rope_store",
    "store_cache",
    "clamp_position",
    "run_activation",
    "build_tree_kernel_efficient",
    "verify_tree_greedy",
    "reconstruct_indices_from_tree_mask",
    "tree_speculative_sampling_target_only",
    "selftest",
]


# --------------------------------------------------------------------------------------------
# RMSNorm (sgl_kernel.rmsnorm / fused_add_rmsnorm; srt/layers/layernorm.py RMSNorm.forward_cuda)
# --------------------------------------------------------------------------------------------


def _rms(x32: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    # x32 [T, H] float32 -> normalized [T, H] float32, scaled by weight (1 + weight for Gemma)
    w = weight.float() + 1.0 if gemma else weight.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    enable_pdl: bool | None = None,
) -> torch.Tensor:
    """``out = input / rms(input) * weight``, in float32, cast once (sgl_kernel / FlashInfer).

    input [T, H], weight [H]. Matches ``RMSNorm.forward_native`` (no residual).
    """
    return _norm_into(input, weight, eps, out, gemma=False)


def _norm_into(
    input: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None, gemma: bool
) -> torch.Tensor:
    y = _rms(input.float(), weight, float(eps), gemma=gemma).to(input.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def _fused_add_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool
) -> None:
    s = input.float() + residual.float()
    residual.copy_(s.to(residual.dtype))
    input.copy_(_rms(s, weight, float(eps), gemma=gemma).to(input.dtype))


def fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: bool | None = None,
) -> None:
    """In place: ``residual <- input + residual``; ``input <- rmsnorm(input + residual)``.

    input, residual [T, H]. The sum is formed in float32; ``residual`` stores it rounded, the norm
    reads it unrounded (FlashInfer's kernel and ``RMSNorm.forward_native`` both do so).
    """
    _fused_add_norm(input, residual, weight, eps, gemma=False)


def gemma_rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    enable_pdl: bool | None = None,
) -> torch.Tensor:
    """Gemma's RMSNorm (``weight + 1``); imported by layernorm.py, not on the Qwen3 path."""
    return _norm_into(input, weight, eps, out, gemma=True)


def gemma_fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: bool | None = None,
) -> None:
    """Gemma's fused add + RMSNorm (``weight + 1``), in place like :func:`fused_add_rmsnorm`."""
    _fused_add_norm(input, residual, weight, eps, gemma=True)


# --------------------------------------------------------------------------------------------
# Gated activations (sgl_kernel.*_and_mul; JIT "activation" module)
# --------------------------------------------------------------------------------------------

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _act_and_mul(op: str, input: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    # input [..., 2d] -> out [..., d] = act(input[..., :d]) * input[..., d:], float32 math, one cast
    if op not in _ACTS:
        raise NotImplementedError(f"evict cuda_ops: activation {op!r} has no stand-in")
    d = input.shape[-1] // 2
    x = input.float()
    y = (_ACTS[op](x[..., :d]) * x[..., d:]).to(input.dtype)
    if out is None:
        return y
    out.copy_(y.view(out.shape))
    return out


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """``silu(x[..., :d]) * x[..., d:]`` (sgl_kernel.silu_and_mul; SiluAndMul.forward_cuda)."""
    return _act_and_mul("silu", input, out)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """``gelu(x[..., :d]) * x[..., d:]`` (sgl_kernel.gelu_and_mul)."""
    return _act_and_mul("gelu", input, out)


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """``gelu_tanh(x[..., :d]) * x[..., d:]`` (sgl_kernel.gelu_tanh_and_mul)."""
    return _act_and_mul("gelu_tanh", input, out)


def run_activation(input: torch.Tensor, out: torch.Tensor, op_name: str) -> None:
    """JIT ``ActivationKernel::run_activation``: input [T, 2d], out [T, d] (kernels/ops/activation)."""
    _act_and_mul(op_name, input, out)


def _run_activation_filtered(
    input: torch.Tensor, out: torch.Tensor, expert_ids: torch.Tensor, expert_step: int, op_name: str
) -> None:
    """JIT ``run_activation_filtered``: the kernel skips rows whose expert id is -1.

    Why every row is computed here: skipping needs a data-dependent row set (a host sync or a
    boolean mask), and the skipped rows are never read (the down GEMM skips filtered experts), so
    writing them is harmless. Same for the sorted variant below.
    """
    _act_and_mul(op_name, input, out)


def _run_activation_sorted_filtered(
    input: torch.Tensor,
    out: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_step: int,
    sorted_token_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    num_valid_tokens: int,
    op_name: str,
) -> None:
    """JIT ``run_activation_sorted_filtered`` (TMA down GEMM layout): every row computed, see above."""
    _act_and_mul(op_name, input, out)


def _run_activation_with_rounding(
    input: torch.Tensor, out: torch.Tensor, op_name: str, clamp_limit: float = 0.0
) -> None:
    """JIT ``run_activation_with_rounding``: ``act(gate)`` rounded to the input dtype before the
    multiply (HF eager semantics, ``activation == "silu_rounded"``)."""
    if clamp_limit:
        raise NotImplementedError("evict cuda_ops: activation rounding with clamp_limit has no stand-in")
    d = input.shape[-1] // 2
    act = _ACTS[op_name](input[..., :d].float()).to(input.dtype)
    out.copy_((act.float() * input[..., d:].float()).to(out.dtype))


def _run_activation_with_rounding_input_inplace(input: torch.Tensor, out: torch.Tensor, op_name: str) -> None:
    """JIT ``run_activation_with_rounding_input_inplace``: ``out`` is ``input[:, :d]`` (a view)."""
    d = input.shape[-1] // 2
    act = _ACTS[op_name](input[..., :d].float()).to(input.dtype)
    out.copy_((act.float() * input[..., d:].float()).to(out.dtype))


def _run_unary_activation(input: torch.Tensor, out: torch.Tensor, op_name: str) -> None:
    """JIT ``run_unary_activation`` (only ``relu2`` exists: ``relu(x) ** 2``)."""
    if op_name != "relu2":
        raise NotImplementedError(f"evict cuda_ops: unary activation {op_name!r} has no stand-in")
    out.copy_(torch.relu(input.float()).square().to(out.dtype))


# --------------------------------------------------------------------------------------------
# Rotary embedding (JIT "fused_rope" / "rotary_embedding"; rotary_embedding/base.py forward_cuda)
# --------------------------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the first ``rot`` features of every head of ``x`` (float32 result).

    x [T, H, D] with D >= rot; cos_sin [T, rot] (already gathered at the positions; first half
    cos, second half sin, SGLang's cache layout). NeoX rotates halves ``(x[:rot/2], x[rot/2:rot])``,
    GPT-J interleaved pairs ``(x[0::2], x[1::2])``; features past ``rot`` pass through.
    """
    rot = cos_sin.shape[-1]
    half = rot // 2
    cos = cos_sin[:, None, :half].float()  # [T, 1, rot/2]
    sin = cos_sin[:, None, half:rot].float()
    xf = x.float()
    out = xf.clone()
    if is_neox:
        x1, x2 = xf[..., :half], xf[..., half:rot]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rot] = x2 * cos + x1 * sin
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
        out[..., 0:rot:2] = x1 * cos - x2 * sin
        out[..., 1:rot:2] = x2 * cos + x1 * sin
    return out


def _rope_inplace(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool
) -> None:
    # x [T, H*D] or [T, H, D] (possibly a non-contiguous view); rotated in place
    cs = cos_sin_cache.index_select(0, positions.reshape(-1).to(torch.long))
    heads = x.view(x.shape[0], -1, head_size) if x.dim() == 2 else x
    heads.copy_(apply_rope(heads, cs, is_neox).to(x.dtype))


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """JIT ``RotaryEmbeddingKernel::run`` (vLLM's ``rotary_embedding``), in place on query and key.

    SGLang takes this "fallback kernel" for head sizes outside {64, 128, 256, 512} (the testbed's
    32): positions [T], query [T, H*D] or [T, H, D], key likewise or None,
    cos_sin_cache [max_pos, rot] in the query dtype.
    """
    _rope_inplace(query, positions, cos_sin_cache, int(head_size), bool(is_neox))
    if key is not None:
        _rope_inplace(key, positions, cos_sin_cache, int(head_size), bool(is_neox))


def run_rope(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor, *, is_neox: bool
) -> None:
    """JIT ``FusedRopeKernel::run`` (``apply_rope_inplace``): q [T, Hq, rot], k [T, Hk, rot] views,
    rotated in place; cos_sin_cache [max_pos, rot] float32."""
    _rope_inplace(q, positions, cos_sin_cache, q.shape[-1], is_neox)
    _rope_inplace(k, positions, cos_sin_cache, k.shape[-1], is_neox)


def run_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    out_loc: torch.Tensor,
    *,
    is_neox: bool,
) -> None:
    """JIT ``FusedRopeKernel::run_fused`` (``apply_rope_with_cos_sin_cache_inplace`` with
    ``fused_args``): RoPE on q, k in place, then ``k_cache[out_loc] = k`` and
    ``v_cache[out_loc] = v``. q [T, Hq, D], k/v [T, Hk, D], caches [slots, Hk*D]; when q/k are
    ``[..., :rot]`` slices of wider heads the cache rows still take the whole head, so the rows
    are written from ``k``'s base layout."""
    run_rope(q, k, cos_sin_cache, positions, is_neox=is_neox)
    loc = out_loc.reshape(-1).to(torch.long)
    t = loc.numel()
    k_full = k if k.is_contiguous() else _full_heads(k)
    k_cache.index_copy_(0, loc, k_full.reshape(t, -1).to(k_cache.dtype))
    v_cache.index_copy_(0, loc, v.reshape(t, -1).to(v_cache.dtype))


def _full_heads(k: torch.Tensor) -> torch.Tensor:
    """The whole heads behind a ``[..., :rot]`` slice (partial-rotary models), as [T, Hk, D]."""
    t, heads = k.shape[0], k.shape[1]
    d = k.stride(1)
    return torch.as_strided(k, (t, heads, d), (k.stride(0), d, 1))


# --------------------------------------------------------------------------------------------
# KV-cache store (JIT "kvcache"; mem_cache/memory_pool.py _set_kv_buffer_impl) and positions
# --------------------------------------------------------------------------------------------


def store_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    size_limit: int = 0,
    reserved_skip_index: int = 0,
) -> None:
    """JIT ``StoreKVCacheKernel::run``: ``k_cache[indices] = k``, ``v_cache[indices] = v``.

    k [T, H*D], v [T, H*Dv], caches [slots, ...]. The kernel skips writes aimed at
    ``reserved_skip_index`` (the CUDA-graph padding slot 0); skipping them here would need a
    data-dependent mask, and that slot is scratch nobody reads, so they are written. SGLang's own
    non-JIT fallback (``k_cache[indices] = k``) writes it too.
    """
    idx = indices.reshape(-1).to(torch.long)
    k_cache.index_copy_(0, idx, k.reshape(idx.numel(), *k_cache.shape[1:]).to(k_cache.dtype))
    v_cache.index_copy_(0, idx, v.reshape(idx.numel(), *v_cache.shape[1:]).to(v_cache.dtype))


def clamp_position(dst: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """JIT ``ClampPosition::run``: ``dst = max(seq_lens - 1, 0)`` (decode positions; forward_batch_info)."""
    dst.copy_(torch.clamp(seq_lens - 1, min=0))


# --------------------------------------------------------------------------------------------
# MoE: block alignment, sum-reduce, routing
# --------------------------------------------------------------------------------------------


def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    experts_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    cumsum_buffer: torch.Tensor,
    pad_sorted_token_ids: bool = False,
    ignore_invalid_expert: bool = False,
) -> None:
    """sgl_kernel ``moe_align_block_size`` (kernels/jit/csrc/moe/moe_align_kernel.cu), capture-safe.

    ``num_experts`` counts buckets: real experts + 1, bucket ``id + 1`` (so expert -1, a filtered
    slot, lands in bucket 0). Each bucket's count is padded up to a multiple of ``block_size``;
    buckets are laid out in order. Outputs (all int32, preallocated by the caller):

    * ``sorted_token_ids`` [max_padded]: flat slot index ``i`` of ``topk_ids.flatten()`` at
      ``start[bucket] + rank``, every other entry ``numel`` (the sentinel) when
      ``pad_sorted_token_ids``. Within a bucket the order is ascending ``i`` here; the CUDA
      kernel's order there is unspecified (atomics) and no consumer depends on it;
    * ``experts_ids`` [max_blocks]: ``bucket - 1`` of each block of ``block_size`` rows up to the
      padded total; -1 after it (the CUDA kernel leaves those entries unwritten; the fused MoE
      kernel never reads past ``num_tokens_post_pad``);
    * ``num_tokens_post_pad`` [1]: the padded total; ``cumsum_buffer`` [buckets+1]: bucket starts.

    Why no ``bincount`` / ``nonzero`` / ``.item()``: this runs inside the captured decode and
    verify graphs; counts are a ``scatter_add`` into a fixed ``[buckets]`` tensor and ranks come from
    a stable sort, so every shape depends only on the input shapes.
    """
    if ignore_invalid_expert:
        raise NotImplementedError(
            "evict cuda_ops.moe_align_block_size: ignore_invalid_expert (EP) has no stand-in"
        )
    device = topk_ids.device
    buckets = int(num_experts)
    bs = int(block_size)
    numel = topk_ids.numel()
    ids = topk_ids.reshape(-1).to(torch.long) + 1  # [numel] bucket of each slot
    counts = torch.zeros(buckets, dtype=torch.long, device=device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))  # [buckets]
    padded = (counts + bs - 1) // bs * bs
    ends = torch.cumsum(padded, 0)
    starts = ends - padded  # [buckets] exclusive prefix of padded counts
    total = ends[-1:]  # [1]
    order = torch.sort(ids, stable=True).indices  # [numel] slots grouped by bucket, ascending i
    sorted_bucket = ids[order]
    unpadded_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - unpadded_start[sorted_bucket]
    dest = starts[sorted_bucket] + rank  # [numel] row of each slot in sorted_token_ids
    if pad_sorted_token_ids:
        sorted_token_ids.fill_(numel)
    sorted_token_ids.scatter_(0, dest, order.to(sorted_token_ids.dtype))
    # expert of block j: last bucket whose start <= j*bs (empty buckets share the next start)
    block_start = torch.arange(experts_ids.numel(), device=device, dtype=torch.long) * bs
    bucket_of_block = torch.searchsorted(starts, block_start, right=True) - 1
    experts = torch.where(block_start < total, bucket_of_block - 1, torch.full_like(bucket_of_block, -1))
    experts_ids.copy_(experts.to(experts_ids.dtype))
    num_tokens_post_pad.view(-1)[:1].copy_(total.to(num_tokens_post_pad.dtype))
    if cumsum_buffer.numel() >= buckets + 1:
        cumsum_buffer[:buckets].copy_(starts.to(cumsum_buffer.dtype))
        cumsum_buffer[buckets : buckets + 1].copy_(total.to(cumsum_buffer.dtype))


def moe_sum_reduce(input: torch.Tensor, output: torch.Tensor, routed_scaling_factor: float) -> None:
    """sgl_kernel ``moe_sum_reduce``: ``output = input.sum(1) * routed_scaling_factor``.

    input [T, topk, H], output [T, H]; float32 accumulation. On CUDA tensors it delegates to
    SGLang's Triton ``moe_sum_reduce_triton`` (kernels/ops/moe/fused_moe_triton_kernels.py), which
    SGLang itself uses on ROCm.
    """
    if input.is_cuda:
        from sglang.kernels.ops.moe.fused_moe_triton_kernels import moe_sum_reduce_triton

        moe_sum_reduce_triton(input, output, float(routed_scaling_factor))
        return
    output.copy_((input.float().sum(dim=1) * float(routed_scaling_factor)).to(output.dtype))


def topk_softmax(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gating_output: torch.Tensor,
    renormalize: bool = False,
    moe_softcapping: float = 0.0,
    correction_bias: torch.Tensor | None = None,
) -> None:
    """sgl_kernel ``topk_softmax``: softmax over experts, top-k, optional renormalization.

    Not on the CUDA path of 0.5.23 (``fused_topk`` uses the Triton router ``moe_fused_gate``); kept
    because ``sglang.kernels.ops.moe`` registers it. gating_output [T, E] -> topk_* [T, k].
    """
    logits = gating_output.float()
    if moe_softcapping:
        logits = moe_softcapping * torch.tanh(logits / moe_softcapping)
    probs = torch.softmax(logits, dim=-1)
    scores = probs + correction_bias.float() if correction_bias is not None else probs
    ids = torch.topk(scores, topk_ids.shape[-1], dim=-1).indices
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    topk_weights.copy_(w.to(topk_weights.dtype))
    topk_ids.copy_(ids.to(topk_ids.dtype))


# --------------------------------------------------------------------------------------------
# Sampling renormalization (FlashInfer on CUDA; sglang.kernels.ops.sampling.renorm)
# --------------------------------------------------------------------------------------------


def top_k_renorm_prob(probs: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """Top-k renormalization: SGLang's Triton ``top_k_renorm_probs_triton`` on CUDA (what SGLang
    uses on ROCm), ``cpu_ops.top_k_renorm_prob`` (its torch port) on CPU. probs [B, V]."""
    if probs.is_cuda:
        from sglang.kernels.ops.sampling.renorm_triton import top_k_renorm_probs_triton

        return top_k_renorm_probs_triton(probs, top_k)
    from evict.testing import cpu_ops

    return cpu_ops.top_k_renorm_prob(probs, top_k)


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Top-p renormalization: ``top_p_renorm_probs_triton`` on CUDA, the torch port on CPU."""
    if probs.is_cuda:
        from sglang.kernels.ops.sampling.renorm_triton import top_p_renorm_probs_triton

        return top_p_renorm_probs_triton(probs, top_p)
    from evict.testing import cpu_ops

    return cpu_ops.top_p_renorm_prob(probs, top_p)


def is_arch_support_pdl() -> bool:
    """``sgl_kernel.utils.is_arch_support_pdl`` (triton_backend.py): SGLang's own JIT helper."""
    from sglang.kernels.jit.utils import is_arch_support_pdl as sglang_pdl

    return bool(sglang_pdl())


# --------------------------------------------------------------------------------------------
# Speculative decoding (JIT "speculative_tree" / "speculative_sampling")
# --------------------------------------------------------------------------------------------


def build_tree_kernel_efficient(
    parent_list: torch.Tensor,
    selected_index: torch.Tensor,
    verified_seq_len: torch.Tensor,
    tree_mask: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    topk: int,
    depth: int,
    draft_token_num: int,
    tree_mask_mode: int,
) -> None:
    """JIT ``build_tree_kernel_efficient`` (tree.cuh): the EAGLE verify tree.

    Runs the CUDA kernel's host checks (``cpu_ops._check_tree_build_host``: shape-only, so
    capture-safe), then SGLang's Triton twin ``spec_tree.sgl_build_tree_kernel_triton`` on CUDA,
    ``cpu_ops.build_tree_kernel_efficient_cpu`` on CPU. The Triton twin has no
    QLEN_ONLY_BITPACKING (mode 2); it raises for it.
    """
    from evict.testing import cpu_ops

    cpu_ops._check_tree_build_host(parent_list, int(topk), int(depth), int(draft_token_num))
    args = (
        parent_list,
        selected_index,
        verified_seq_len,
        tree_mask,
        positions,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
    )
    if verified_seq_len.is_cuda:
        from sglang.kernels.ops.speculative.spec_tree import TreeMaskMode, sgl_build_tree_kernel_triton

        sgl_build_tree_kernel_triton(
            *args, int(topk), int(depth), int(draft_token_num), TreeMaskMode(int(tree_mask_mode))
        )
        return
    cpu_ops.build_tree_kernel_efficient_cpu(
        *args, int(topk), int(depth), int(draft_token_num), int(tree_mask_mode)
    )


def verify_tree_greedy(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """JIT ``verify_tree_greedy``: SGLang's Triton ``verify_tree_greedy_triton`` on CUDA (what XPU
    runs), ``cpu_ops.verify_tree_greedy_cpu`` on CPU. candidates [B, N], accept_index [B, S]."""
    args = (
        predicts,
        accept_index,
        accept_token_num,
        candidates,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        target_predict,
    )
    if candidates.is_cuda:
        from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton

        verify_tree_greedy_triton(*args)
        return
    from evict.testing import cpu_ops

    cpu_ops.verify_tree_greedy_cpu(*args)


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor,
    verified_seq_len: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
) -> None:
    """JIT ``reconstruct_indices_from_tree_mask`` (NGRAM speculation only; not on the EAGLE path):
    SGLang's Triton ``reconstruct_indices_from_tree_mask_triton``; CUDA tensors only."""
    if not tree_mask.is_cuda:
        raise NotImplementedError("evict cuda_ops.reconstruct_indices_from_tree_mask: CUDA tensors only")
    from sglang.kernels.ops.speculative.reconstruct_tree import reconstruct_indices_from_tree_mask_triton

    reconstruct_indices_from_tree_mask_triton(
        tree_mask,
        verified_seq_len,
        positions,
        retrive_index,
        retrive_next_token,
        retrive_next_sibling,
        int(batch_size),
        int(draft_token_num),
    )


def tree_speculative_sampling_target_only(*args: Any, **kwargs: Any) -> None:
    """JIT ``tree_speculative_sampling_target_only`` (sampling.cuh): ``cpu_ops``' port, same
    arguments. SGLang has no Triton twin. The port walks the tree in Python with host reads, so it
    is not graph-capturable; ``eagle_utils`` calls it after the verify forward, outside the graphs.
    """
    from evict.testing import cpu_ops

    cpu_ops.tree_speculative_sampling_target_only(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Tables the shim reads
# --------------------------------------------------------------------------------------------


class JitStandIn:
    """What a patched ``_jit_*_module`` factory returns instead of a tvm-ffi module.

    Its attributes are the stand-ins under the export names of the JIT module (``module.run_rope``,
    ``module.store_cache``, ...); an export without a stand-in raises ``NotImplementedError``
    naming the module and the export.
    """

    def __init__(self, name: str, exports: dict[str, Callable[..., Any]]) -> None:
        self._name = name
        self._exports = dict(exports)

    def __getattr__(self, export: str) -> Callable[..., Any]:
        if export.startswith("__"):
            raise AttributeError(export)
        try:
            return self._exports[export]
        except KeyError:
            raise NotImplementedError(
                f"evict cuda shim: JIT module {self._name!r} export {export!r} has no stand-in "
                "(evict/testing/cuda_ops.py)"
            ) from None

    def __repr__(self) -> str:
        return f"JitStandIn({self._name!r}, {sorted(self._exports)})"


def _with(fn: Callable[..., Any], **fixed: Any) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return fn(*args, **fixed)

    call.__name__ = getattr(fn, "__name__", "standin")
    return call


@functools.cache
def _activation_module(dtype: torch.dtype, *, fast_math: bool = True) -> JitStandIn:
    return JitStandIn(
        "activation",
        {
            "run_activation": run_activation,
            "run_activation_filtered": _run_activation_filtered,
            "run_activation_sorted_filtered": _run_activation_sorted_filtered,
            "run_activation_with_rounding": _run_activation_with_rounding,
            "run_activation_with_rounding_input_inplace": _run_activation_with_rounding_input_inplace,
            "run_unary_activation": _run_unary_activation,
        },
    )


@functools.cache
def _fused_rope_module(is_neox: bool, rope_dim: int, dtype: torch.dtype, q_dtype: torch.dtype) -> JitStandIn:
    return JitStandIn(
        "fused_rope",
        {
            "run_rope": _with(run_rope, is_neox=bool(is_neox)),
            "run_rope_store": _with(run_rope_store, is_neox=bool(is_neox)),
        },
    )


@functools.cache
def _rotary_embedding_module() -> JitStandIn:
    return JitStandIn("rotary_embedding", {"rotary_embedding": rotary_embedding})


@functools.cache
def _kvcache_module(k_row_bytes: int, v_row_bytes: int, num_threads: int) -> JitStandIn:
    return JitStandIn("kvcache", {"store_cache": store_cache})


@functools.cache
def _clamp_position_module(dtype: torch.dtype) -> JitStandIn:
    return JitStandIn("clamp_position", {"clamp_position": clamp_position})


@functools.cache
def _tree_module() -> JitStandIn:
    return JitStandIn(
        "speculative_tree",
        {
            "build_tree_kernel_efficient": build_tree_kernel_efficient,
            "verify_tree_greedy": verify_tree_greedy,
            "reconstruct_indices_from_tree_mask": reconstruct_indices_from_tree_mask,
        },
    )


@functools.cache
def _sampling_module(vec_size: int, deterministic: bool) -> JitStandIn:
    return JitStandIn(
        "speculative_sampling",
        {"sample": _with(tree_speculative_sampling_target_only, deterministic=bool(deterministic))},
    )


# sgl_kernel attribute -> stand-in (the shim's sgl_kernel package resolves these names)
AOT_OPS: dict[str, Callable[..., Any]] = {
    "rmsnorm": rmsnorm,
    "fused_add_rmsnorm": fused_add_rmsnorm,
    "gemma_rmsnorm": gemma_rmsnorm,
    "gemma_fused_add_rmsnorm": gemma_fused_add_rmsnorm,
    "silu_and_mul": silu_and_mul,
    "gelu_and_mul": gelu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "moe_align_block_size": moe_align_block_size,
    "moe_sum_reduce": moe_sum_reduce,
    "topk_softmax": topk_softmax,
    "top_k_renorm_prob": top_k_renorm_prob,
    "top_p_renorm_prob": top_p_renorm_prob,
    "build_tree_kernel_efficient": build_tree_kernel_efficient,
    "verify_tree_greedy": verify_tree_greedy,
    "tree_speculative_sampling_target_only": tree_speculative_sampling_target_only,
}

# sglang module -> {JIT factory name -> replacement factory}; the shim's sitecustomize installs them
JIT_FACTORIES: dict[str, dict[str, Callable[..., JitStandIn]]] = {
    "sglang.kernels.ops.activation.activation": {"activation_module": _activation_module},
    "sglang.kernels.ops.attention.rope": {
        "_jit_fused_rope_module": _fused_rope_module,
        "_jit_rotary_embedding_module": _rotary_embedding_module,
    },
    "sglang.kernels.ops.attention.clamp_position": {"_jit_clamp_position_module": _clamp_position_module},
    "sglang.kernels.ops.kvcache.kvcache": {"_jit_kvcache_module": _kvcache_module},
    "sglang.kernels.ops.speculative.tree": {"_jit_tree_module": _tree_module},
    "sglang.kernels.ops.speculative.sampling": {"_jit_sampling_module": _sampling_module},
}


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def _selftest_cases(device: torch.device) -> dict[str, Callable[[], None]]:
    """One small call per stand-in, each checked against a direct torch computation."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
        b = b.to(a.device)  # expected values are often written as CPU tensors
        if not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
            raise AssertionError(f"max |diff| = {(a.float() - b.float()).abs().max().item():.3g}")

    def t_rmsnorm() -> None:
        x, w = rand(5, 64), rand(64)
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        close(rmsnorm(x, w, 1e-6), ref)

    def t_fused_add_rmsnorm() -> None:
        x, r, w = rand(5, 64), rand(5, 64), rand(64)
        s = x + r
        ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        fused_add_rmsnorm(x, r, w, 1e-6)
        close(x, ref)
        close(r, s)

    def t_silu_and_mul() -> None:
        x = rand(4, 2 * 48)
        out = torch.empty(4, 48, device=device)
        silu_and_mul(x, out)
        close(out, F.silu(x[:, :48]) * x[:, 48:])

    def t_rope() -> None:
        t, hq, hk, d = 3, 4, 2, 32
        q, k = rand(t, hq * d), rand(t, hk * d)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.arange(16, dtype=torch.float32)[:, None] * inv[None]
        cache = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
        pos = torch.tensor([0, 5, 9], device=device)
        q2 = q.clone()
        rotary_embedding(pos, q2, None, d, cache, True)
        c, s = cache[pos, : d // 2][:, None], cache[pos, d // 2 :][:, None]
        qh = q.view(t, hq, d)
        ref = torch.cat(
            [qh[..., : d // 2] * c - qh[..., d // 2 :] * s, qh[..., d // 2 :] * c + qh[..., : d // 2] * s], -1
        )
        close(q2.view(t, hq, d), ref)
        k_cache, v_cache = torch.zeros(8, hk * d, device=device), torch.zeros(8, hk * d, device=device)
        q3, k3, v3 = q.view(t, hq, d).clone(), k.view(t, hk, d).clone(), rand(t, hk, d)
        run_rope_store(
            q3, k3, v3, k_cache, v_cache, cache, pos, torch.tensor([1, 4, 6], device=device), is_neox=True
        )
        close(q3, ref)
        close(k_cache[[1, 4, 6]], k3.reshape(t, -1))
        close(v_cache[[1, 4, 6]], v3.reshape(t, -1))

    def t_store_cache() -> None:
        k, v = rand(3, 16), rand(3, 16)
        kc, vc = torch.zeros(6, 16, device=device), torch.zeros(6, 16, device=device)
        store_cache(k, v, kc, vc, torch.tensor([5, 2, 3], device=device))
        close(kc[[5, 2, 3]], k)
        close(vc[[5, 2, 3]], v)

    def t_clamp_position() -> None:
        s = torch.tensor([0, 1, 7], device=device, dtype=torch.int32)
        dst = torch.empty_like(s)
        clamp_position(dst, s)
        close(dst, torch.tensor([0, 0, 6]))

    def t_moe_align() -> None:
        topk_ids = torch.tensor([[1, 2], [0, 2], [2, 3]], device=device, dtype=torch.int32)
        e, bs = 4, 4
        max_padded = (topk_ids.numel() + (e + 1) * (bs - 1) + 3) // 4 * 4
        sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
        expert_ids = torch.empty(math.ceil(max_padded / bs), dtype=torch.int32, device=device)
        post = torch.empty(1, dtype=torch.int32, device=device)
        cumsum = torch.empty(e + 2, dtype=torch.int32, device=device)
        moe_align_block_size(topk_ids, e + 1, bs, sorted_ids, expert_ids, post, cumsum, True)
        if int(post) != 16:
            raise AssertionError(f"num_tokens_post_pad {int(post)} != 16")
        want = [2, 6, 6, 6, 0, 6, 6, 6, 1, 3, 4, 6, 5, 6, 6, 6]
        if sorted_ids[:16].tolist() != want or expert_ids[:4].tolist() != [0, 1, 2, 3]:
            raise AssertionError(f"{sorted_ids[:16].tolist()} / {expert_ids[:4].tolist()}")

    def t_moe_sum_reduce() -> None:
        x = rand(3, 4, 64)
        out = torch.empty(3, 64, device=device)
        moe_sum_reduce(x, out, 0.5)
        close(out, x.sum(1) * 0.5)

    def t_renorm() -> None:
        p = torch.softmax(rand(2, 32), -1)
        pk = top_k_renorm_prob(p, torch.tensor([3, 32], device=device, dtype=torch.int32))
        if int((pk[0] > 0).sum()) != 3:
            raise AssertionError("top-k kept the wrong number of tokens")
        close(pk.sum(-1), torch.ones(2))
        pp = top_p_renorm_prob(p, torch.tensor([0.5, 1.0], device=device))
        close(pp.sum(-1), torch.ones(2))

    def t_tree() -> None:
        # 1 request, topk 2, depth 2, 4 draft tokens: root -> {a, b}; a -> {c}
        parent_list = torch.tensor([[-1, 0, 1]], device=device, dtype=torch.int64)
        selected = torch.tensor([[0, 1, 2]], device=device, dtype=torch.int64)
        seq_len = torch.tensor([5], device=device, dtype=torch.int64)
        n = 4
        mask = torch.ones(n * n, dtype=torch.bool, device=device)
        pos = torch.empty(n, dtype=torch.int64, device=device)
        ri = torch.empty(1, n, dtype=torch.int64, device=device)
        rn = torch.full((1, n), -1, dtype=torch.int64, device=device)
        rs = torch.full((1, n), -1, dtype=torch.int64, device=device)
        build_tree_kernel_efficient(parent_list, selected, seq_len, mask, pos, ri, rn, rs, 2, 2, n, 1)
        if (
            pos.tolist() != [5, 6, 6, 7]
            or rn.tolist() != [[1, 3, -1, -1]]
            or rs.tolist() != [[-1, 2, -1, -1]]
        ):
            raise AssertionError(f"positions {pos.tolist()} next {rn.tolist()} sibling {rs.tolist()}")
        cand = torch.tensor([[9, 11, 12, 13]], device=device, dtype=torch.int64)
        target = torch.tensor([[11, 13, 0, 7]], device=device, dtype=torch.int64)
        predicts = torch.full((n,), -1, dtype=torch.int32, device=device)
        acc_idx = torch.full((1, 3), -1, dtype=torch.int32, device=device)
        acc_num = torch.zeros(1, dtype=torch.int32, device=device)
        verify_tree_greedy(predicts, acc_idx, acc_num, cand, ri, rn, rs, target)
        if acc_idx.tolist() != [[0, 1, 3]] or int(acc_num) != 2 or predicts.tolist() != [11, 13, -1, 7]:
            raise AssertionError(f"accept {acc_idx.tolist()} n={int(acc_num)} predicts {predicts.tolist()}")

    def t_sampling() -> None:
        n, vocab = 2, 8
        cand = torch.tensor([[3, 5]], device=device, dtype=torch.int64)
        ri = torch.tensor([[0, 1]], device=device, dtype=torch.int64)
        rn = torch.tensor([[1, -1]], device=device, dtype=torch.int64)
        rs = torch.full((1, n), -1, device=device, dtype=torch.int64)
        probs = torch.zeros(1, n, vocab, device=device)
        probs[0, 0, 5] = 1.0
        probs[0, 1, 2] = 1.0
        predicts = torch.full((n,), -1, dtype=torch.int32, device=device)
        acc_idx = torch.full((1, n), -1, dtype=torch.int32, device=device)
        acc_num = torch.zeros(1, dtype=torch.int32, device=device)
        coins = torch.full((1, n), 0.5, device=device)
        final = torch.full((1,), 0.5, device=device)
        tree_speculative_sampling_target_only(
            predicts, acc_idx, acc_num, cand, ri, rn, rs, coins, final, probs, torch.zeros_like(probs)
        )
        if int(acc_num) != 1 or predicts.tolist() != [5, 2]:
            raise AssertionError(f"accepted {int(acc_num)} predicts {predicts.tolist()}")

    return {
        "rmsnorm": t_rmsnorm,
        "fused_add_rmsnorm": t_fused_add_rmsnorm,
        "silu_and_mul": t_silu_and_mul,
        "rotary_embedding+run_rope_store": t_rope,
        "store_cache": t_store_cache,
        "clamp_position": t_clamp_position,
        "moe_align_block_size": t_moe_align,
        "moe_sum_reduce": t_moe_sum_reduce,
        "top_k/top_p_renorm_prob": t_renorm,
        "build_tree+verify_tree_greedy": t_tree,
        "tree_speculative_sampling_target_only": t_sampling,
    }


def selftest(device: str | torch.device = "cuda") -> dict[str, str]:
    """Run every stand-in once on small inputs on ``device``: ``{name: "ok" | error}``.

    On CUDA the delegating stand-ins run SGLang's Triton kernels (sglang must be importable); the
    GPU check script calls this first, so a broken stand-in shows up before the server starts.
    """
    dev = torch.device(device)
    results: dict[str, str] = {}
    for name, case in _selftest_cases(dev).items():
        try:
            case()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 (reported, not raised: the caller wants them all)
            results[name] = f"{type(e).__name__}: {e}"
    return results
