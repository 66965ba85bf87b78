"""The CUDA-path stand-ins (``evict.testing.cuda_ops``) and their shim (``evict/testing/cuda_shim``).

Each stand-in runs on CPU tensors against SGLang 0.5.23's own reference semantics: the layers'
``forward_native`` (RMSNorm, SiluAndMul, RotaryEmbedding), a loop transcription of the CUDA
``moe_align_block_size``, and direct torch computations. JIT stand-ins are also driven through
SGLang's own Python wrappers with the patched factory, as the server does. The ``sgl_kernel``
stub and the ``sitecustomize`` hooks are loaded in subprocesses (they would shadow this process's
sgl_kernel). Delegations to SGLang's Triton kernels (CUDA tensors only) are covered by the gpu
test at the end (``selftest("cuda")`` and a CUDA-graph capture of the MoE align).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evict.testing import cpu_ops, cuda_ops

SHIM_DIR = Path(cuda_ops.__file__).resolve().parent / "cuda_shim"
REPO = Path(cuda_ops.__file__).resolve().parents[2]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Without sglang: the stand-ins against direct torch computations
# --------------------------------------------------------------------------------------------


def test_selftest_cpu_all_ok():
    results = cuda_ops.selftest("cpu")
    assert results and all(v == "ok" for v in results.values()), results


def _moe_align_reference(
    topk_ids: torch.Tensor, buckets: int, block_size: int, max_padded: int, max_blocks: int
):
    """The CUDA kernel's contract, as a loop (moe_align_kernel.cu, ``+1`` bucket convention)."""
    ids = [int(x) + 1 for x in topk_ids.flatten().tolist()]
    numel = len(ids)
    counts = [ids.count(b) for b in range(buckets)]
    padded = [(c + block_size - 1) // block_size * block_size for c in counts]
    starts = [sum(padded[:b]) for b in range(buckets)]
    total = sum(padded)
    sorted_ids = [numel] * max_padded
    fill = list(starts)
    for i, b in enumerate(ids):  # ascending slot order within a bucket
        sorted_ids[fill[b]] = i
        fill[b] += 1
    experts = [-1] * max_blocks
    for b in range(buckets):
        for row in range(starts[b], starts[b] + padded[b], block_size):
            experts[row // block_size] = b - 1
    return sorted_ids, experts, total


@pytest.mark.parametrize(
    "tokens,topk,experts,block_size,filtered",
    [
        (1, 4, 32, 16, False),
        (7, 4, 32, 16, True),
        (64, 8, 128, 64, False),
        (300, 8, 128, 16, True),
        (2, 2, 3, 4, False),
    ],
)
def test_moe_align_block_size_matches_cuda_contract(tokens, topk, experts, block_size, filtered):
    g = _gen(tokens)
    topk_ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).to(
        torch.int32
    )
    if filtered:  # EP-filtered slots are -1 (bucket 0)
        topk_ids[torch.rand(topk_ids.shape, generator=g) < 0.2] = -1
    # sizes as srt/layers/moe/moe_runner/triton_utils/moe_align_block_size.py allocates them
    if topk_ids.numel() < experts + 1:
        max_padded = topk_ids.numel() * block_size
    else:
        max_padded = topk_ids.numel() + (experts + 1) * (block_size - 1)
    max_padded = (max_padded + 3) // 4 * 4
    max_blocks = -(-max_padded // block_size)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32)
    post = torch.empty(1, dtype=torch.int32)
    cumsum = torch.empty(experts + 2, dtype=torch.int32)
    cuda_ops.moe_align_block_size(
        topk_ids, experts + 1, block_size, sorted_ids, expert_ids, post, cumsum, True
    )
    want_sorted, want_experts, want_total = _moe_align_reference(
        topk_ids, experts + 1, block_size, max_padded, max_blocks
    )
    assert int(post) == want_total
    assert sorted_ids.tolist() == want_sorted
    assert expert_ids.tolist() == want_experts


def test_moe_align_block_size_refuses_ignore_invalid_expert():
    with pytest.raises(NotImplementedError, match="ignore_invalid_expert"):
        z = torch.zeros(4, dtype=torch.int32)
        cuda_ops.moe_align_block_size(z.view(2, 2), 3, 4, z, z, z[:1], z, True, True)


def test_moe_sum_reduce_cpu():
    x = torch.randn(5, 4, 32, generator=_gen(1), dtype=torch.float32)
    out = torch.empty(5, 32)
    cuda_ops.moe_sum_reduce(x, out, 2.5)
    torch.testing.assert_close(out, x.sum(1) * 2.5)


def test_topk_softmax_matches_torch():
    logits = torch.randn(6, 16, generator=_gen(2))
    w = torch.empty(6, 4)
    ids = torch.empty(6, 4, dtype=torch.int32)
    cuda_ops.topk_softmax(w, ids, logits, renormalize=True)
    probs = torch.softmax(logits, -1)
    ref_w, ref_ids = torch.topk(probs, 4, dim=-1)
    assert ids.tolist() == ref_ids.to(torch.int32).tolist()
    torch.testing.assert_close(w, ref_w / ref_w.sum(-1, keepdim=True))


def test_store_cache_and_clamp_position():
    k, v = torch.randn(3, 64, generator=_gen(3)), torch.randn(3, 64, generator=_gen(4))
    kc, vc = torch.zeros(10, 64), torch.zeros(10, 64)
    cuda_ops.store_cache(k, v, kc, vc, torch.tensor([9, 0, 4]), 10, 0)
    assert torch.equal(kc[[9, 0, 4]], k) and torch.equal(vc[[9, 0, 4]], v)
    assert kc[[1, 2, 3]].abs().sum() == 0
    seq = torch.tensor([0, 1, 5], dtype=torch.int64)
    dst = torch.empty_like(seq)
    cuda_ops.clamp_position(dst, seq)
    assert dst.tolist() == [0, 0, 4]


def test_activation_module_variants():
    x = torch.randn(6, 2 * 24, generator=_gen(5))
    mod = cuda_ops.JIT_FACTORIES["sglang.kernels.ops.activation.activation"]["activation_module"](
        torch.float32
    )
    ref = F.silu(x[:, :24]) * x[:, 24:]
    for call in (
        lambda o: mod.run_activation(x, o, "silu"),
        lambda o: mod.run_activation_filtered(x, o, torch.zeros(6, dtype=torch.int32), 1, "silu"),
        lambda o: mod.run_activation_sorted_filtered(
            x, o, torch.zeros(1, dtype=torch.int32), 16, torch.arange(6), torch.tensor([6]), 6, "silu"
        ),
        lambda o: mod.run_activation_with_rounding(x, o, "silu", 0.0),
    ):
        out = torch.empty(6, 24)
        call(out)
        torch.testing.assert_close(out, ref)
    out = torch.empty(6, 48)
    mod.run_unary_activation(x, out, "relu2")
    torch.testing.assert_close(out, torch.relu(x) ** 2)
    with pytest.raises(NotImplementedError, match="no stand-in"):
        _ = mod.some_new_export


def test_jit_stand_in_factories_are_cached_and_named():
    f = cuda_ops.JIT_FACTORIES["sglang.kernels.ops.attention.rope"]["_jit_fused_rope_module"]
    assert f(True, 32, torch.bfloat16, torch.bfloat16) is f(True, 32, torch.bfloat16, torch.bfloat16)
    assert "fused_rope" in repr(f(False, 64, torch.float16, torch.float16))


# --------------------------------------------------------------------------------------------
# Against SGLang's own reference semantics
# --------------------------------------------------------------------------------------------


@pytest.mark.sglang
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_forward_native(dtype, tol):
    pytest.importorskip("sglang")
    from sglang.srt.layers.layernorm import RMSNorm

    norm = RMSNorm(192, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(192, generator=_gen(6)).to(dtype))
    x = torch.randn(7, 192, generator=_gen(7)).to(dtype)
    r = torch.randn(7, 192, generator=_gen(8)).to(dtype)
    torch.testing.assert_close(
        cuda_ops.rmsnorm(x, norm.weight.data, 1e-6), norm.forward_native(x), atol=tol, rtol=tol
    )
    ref_x, ref_r = norm.forward_native(x.clone(), r.clone())
    x2, r2 = x.clone(), r.clone()
    cuda_ops.fused_add_rmsnorm(x2, r2, norm.weight.data, 1e-6)
    torch.testing.assert_close(x2, ref_x, atol=tol, rtol=tol)
    torch.testing.assert_close(r2, ref_r, atol=0, rtol=0)


@pytest.mark.sglang
def test_silu_and_mul_matches_forward_native():
    pytest.importorskip("sglang")
    from sglang.srt.layers.activation import SiluAndMul

    x = torch.randn(5, 2 * 96, generator=_gen(9))
    out = torch.empty(5, 96)
    cuda_ops.silu_and_mul(x, out)
    torch.testing.assert_close(out, SiluAndMul().forward_native(x), atol=1e-6, rtol=1e-6)


@pytest.mark.sglang
@pytest.mark.parametrize(
    "head_size,rotary_dim,is_neox", [(32, 32, True), (128, 128, True), (64, 64, False), (64, 32, True)]
)
def test_rope_matches_forward_native(head_size, rotary_dim, is_neox, monkeypatch):
    """``rotary_embedding`` (head sizes SGLang sends to the fallback kernel) and ``run_rope`` /
    ``run_rope_store`` (the fused kernel) against ``RotaryEmbedding.forward_native``."""
    pytest.importorskip("sglang")
    # off CUDA, RotaryEmbedding.__init__ imports vLLM's kernel for its (unused here) fallback
    vllm, custom_ops = type(sys)("vllm"), type(sys)("vllm._custom_ops")
    custom_ops.rotary_embedding = cuda_ops.rotary_embedding
    vllm._custom_ops = custom_ops
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", custom_ops)
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    rope = RotaryEmbedding(head_size, rotary_dim, 512, 10000, is_neox, torch.float32)
    t, hq, hk = 5, 6, 2
    pos = torch.tensor([0, 3, 17, 100, 511])
    q = torch.randn(t, hq * head_size, generator=_gen(10))
    k = torch.randn(t, hk * head_size, generator=_gen(11))
    ref_q, ref_k = rope.forward_native(pos, q.clone(), k.clone())
    cache = rope.cos_sin_cache.float()

    q1, k1 = q.clone(), k.clone()
    cuda_ops.rotary_embedding(pos, q1, k1, head_size, cache, is_neox)
    torch.testing.assert_close(q1, ref_q.view_as(q1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k1, ref_k.view_as(k1), atol=1e-5, rtol=1e-5)

    # the fused path, as forward_cuda calls it: [T, H, D] views sliced to rotary_dim
    q2, k2 = q.clone().view(t, hq, head_size), k.clone().view(t, hk, head_size)
    fused = cuda_ops.JIT_FACTORIES["sglang.kernels.ops.attention.rope"]["_jit_fused_rope_module"](
        is_neox, rotary_dim, torch.float32, torch.float32
    )
    fused.run_rope(q2[..., :rotary_dim], k2[..., :rotary_dim], cache, pos)
    torch.testing.assert_close(q2.view_as(q), ref_q.view_as(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k2.view_as(k), ref_k.view_as(k), atol=1e-5, rtol=1e-5)

    if rotary_dim == head_size:
        q3, k3 = q.clone().view(t, hq, head_size), k.clone().view(t, hk, head_size)
        v = torch.randn(t, hk, head_size, generator=_gen(12))
        kc, vc = torch.zeros(32, hk * head_size), torch.zeros(32, hk * head_size)
        loc = torch.tensor([3, 9, 1, 30, 2])
        fused.run_rope_store(q3, k3, v, kc, vc, cache, pos, loc)
        torch.testing.assert_close(kc[loc], ref_k.view(t, -1), atol=1e-5, rtol=1e-5)
        assert torch.equal(vc[loc], v.view(t, -1))


@pytest.mark.sglang
def test_jit_wrappers_run_on_stand_ins(monkeypatch):
    """SGLang's own Python wrappers, with the factories replaced as the shim does."""
    pytest.importorskip("sglang")
    import importlib

    for module_name, factories in cuda_ops.JIT_FACTORIES.items():
        module = importlib.import_module(module_name)
        for name, factory in factories.items():
            assert callable(getattr(module, name)), f"{module_name}.{name} missing"
            monkeypatch.setattr(module, name, factory)

    # (SGLang registers its register_custom_op wrappers for CUDA only, so on CPU the plain ones)
    from sglang.kernels.ops.attention.clamp_position import clamp_position_cuda
    from sglang.kernels.ops.speculative import tree

    assert clamp_position_cuda(torch.tensor([0, 4], dtype=torch.int32)).tolist() == [0, 3]

    # the tree build through SGLang's wrapper, against the CPU port on the same inputs
    parent_list = torch.tensor([[-1, 0, 1], [-1, 1, 0]])
    selected = torch.tensor([[0, 1, 2], [1, 0, 3]])
    seq = torch.tensor([4, 9])
    outs = []
    for build in (tree.build_tree_kernel_efficient, cpu_ops.build_tree_kernel_efficient_cpu):
        bufs = (
            torch.ones(2 * 16, dtype=torch.bool),
            torch.empty(8, dtype=torch.int64),
            torch.empty(2, 4, dtype=torch.int64),
            torch.full((2, 4), -1, dtype=torch.int64),
            torch.full((2, 4), -1, dtype=torch.int64),
        )
        build(parent_list, selected, seq, *bufs, 2, 2, 4, 1)
        outs.append(bufs)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="topk\\*\\(depth-1\\)\\+1"):
        tree.build_tree_kernel_efficient(parent_list, selected, seq, *outs[0], 2, 3, 4, 1)


# --------------------------------------------------------------------------------------------
# The shim, loaded as the server loads it
# --------------------------------------------------------------------------------------------


def _run_shim(code: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["EVICT_CUDA_SHIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_sgl_kernel_stub_routes_and_refuses_clearly():
    proc = _run_shim(
        """
        import sgl_kernel
        from evict.testing import cuda_ops
        assert sgl_kernel.EVICT_CUDA_SHIM and sgl_kernel.__version__ == "0.4.10"
        from sgl_kernel import rmsnorm, moe_align_block_size, moe_sum_reduce, silu_and_mul
        assert rmsnorm is cuda_ops.rmsnorm and moe_align_block_size is cuda_ops.moe_align_block_size
        from sgl_kernel import int8_scaled_mm                      # import-only: imports fine
        try:
            int8_scaled_mm(1, 2)
        except NotImplementedError as e:
            assert "sgl_kernel.int8_scaled_mm" in str(e) and "evict cuda shim" in str(e), e
        else:
            raise AssertionError("placeholder did not raise")
        try:
            from sgl_kernel import awq_dequantize                  # a probe: must look absent
        except ImportError:
            pass
        else:
            raise AssertionError("unknown name imported")
        for absent in ("sgl_kernel.scalar_type", "sgl_kernel.flash_attn"):
            try:
                __import__(absent)
            except ImportError:
                pass
            else:
                raise AssertionError(absent + " imported")
        from sgl_kernel.kvcacheio import transfer_kv_per_layer
        from sgl_kernel.speculative import reconstruct_indices_from_tree_mask
        assert reconstruct_indices_from_tree_mask is cuda_ops.reconstruct_indices_from_tree_mask
        from sgl_kernel.utils import is_arch_support_pdl
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_sitecustomize_tvm_ffi_fallback_only_when_absent():
    proc = _run_shim(
        """
        import importlib.machinery, sys
        real = importlib.machinery.PathFinder.find_spec("tvm_ffi")
        import tvm_ffi
        stand_in = getattr(tvm_ffi, "EVICT_CUDA_SHIM", False)
        assert stand_in == (real is None), (real, stand_in)
        if stand_in:
            class C(tvm_ffi.Object): pass
            assert tvm_ffi.register_object("x")(C) is C
            try:
                from tvm_ffi import register_error
            except ImportError:
                pass
            else:
                raise AssertionError("stand-in exported register_error")
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_sitecustomize_inactive_without_env():
    count = "import sys; print(sum(type(f).__name__ == 'PatchingFinder' for f in sys.meta_path))"
    proc = _run_shim(count, {"EVICT_CUDA_SHIM": "0"})
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr[-3000:]
    proc = _run_shim(count, {"EVICT_CUDA_SHIM": "1"})  # and installed once with it
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-3000:]


@pytest.mark.sglang
def test_sitecustomize_patches_sglang_modules():
    pytest.importorskip("sglang")
    proc = _run_shim(
        """
        import torch
        from evict.testing import cuda_ops
        from sglang.kernels.ops.attention import rope
        from sglang.kernels.ops.speculative import tree, sampling
        from sglang.kernels.ops.kvcache import kvcache
        from sglang.kernels.ops.sampling import renorm
        from sglang.kernels.jit.utils import load_jit
        assert isinstance(rope._jit_fused_rope_module(True, 32, torch.bfloat16, torch.bfloat16), cuda_ops.JitStandIn)
        assert isinstance(tree._jit_tree_module(), cuda_ops.JitStandIn)
        assert isinstance(sampling._jit_sampling_module(4, True), cuda_ops.JitStandIn)
        assert kvcache.can_use_store_cache(128)
        assert renorm.top_k_renorm_prob is cuda_ops.top_k_renorm_prob
        try:
            load_jit("qknorm")
        except RuntimeError as e:
            assert "qknorm" in str(e) and "evict cuda shim" in str(e)
        else:
            raise AssertionError("load_jit not blocked")
        from sglang.kernels.ops.layernorm.norm import can_use_fused_inplace_qknorm
        assert not can_use_fused_inplace_qknorm(128, torch.bfloat16)   # SGLang falls back
        import sglang.srt.models.qwen3_moe as q
        assert hasattr(q.Qwen3MoeAttention.__init__, "__wrapped__")
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_qwen3_moe_patch_turns_off_fused_kv_write_for_fallback_rope():
    import importlib.util

    # loaded under its own name: the process may already have a sitecustomize of its own
    spec = importlib.util.spec_from_file_location("evict_cuda_sitecustomize", SHIM_DIR / "sitecustomize.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)

    class Rope:
        def __init__(self, fallback):
            self.use_fallback_kernel = fallback

    class Qwen3MoeAttention:
        def __init__(self, fallback):
            self.rotary_emb = Rope(fallback)
            self.compatible_with_fused_kv_buffer = True

    fake = type(sys)("sglang.srt.models.qwen3_moe")
    fake.Qwen3MoeAttention = Qwen3MoeAttention
    shim._patch_qwen3_moe(fake)
    assert Qwen3MoeAttention(True).compatible_with_fused_kv_buffer is False
    assert Qwen3MoeAttention(False).compatible_with_fused_kv_buffer is True
    with pytest.raises(RuntimeError, match="sglang 0.5.23"):
        shim._patch_qwen3_moe(type(sys)("sglang.srt.models.qwen3_moe"))


# --------------------------------------------------------------------------------------------
# GPU: the Triton delegations and graph capture
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.sglang
def test_selftest_cuda_and_moe_align_graph_capture():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("sglang")
    results = cuda_ops.selftest("cuda")
    assert all(v == "ok" for v in results.values()), results

    dev = torch.device("cuda")
    topk_ids = torch.randint(0, 32, (8, 4), device=dev, dtype=torch.int32)
    e, bs = 32, 16
    max_padded = (topk_ids.numel() + (e + 1) * (bs - 1) + 3) // 4 * 4
    out = (
        torch.empty(max_padded, dtype=torch.int32, device=dev),
        torch.empty(-(-max_padded // bs), dtype=torch.int32, device=dev),
        torch.empty(1, dtype=torch.int32, device=dev),
        torch.empty(e + 2, dtype=torch.int32, device=dev),
    )
    cuda_ops.moe_align_block_size(topk_ids, e + 1, bs, *out, True)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.moe_align_block_size(topk_ids, e + 1, bs, *out, True)
    topk_ids.copy_(torch.randint(0, 32, (8, 4), device=dev, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want_sorted, want_experts, want_total = _moe_align_reference(
        topk_ids.cpu(), e + 1, bs, out[0].numel(), out[1].numel()
    )
    assert int(out[2]) == want_total and out[0].tolist() == want_sorted and out[1].tolist() == want_experts
