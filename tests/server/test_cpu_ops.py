"""The CPU stand-ins for sgl-kernel's operators (``evict.testing.cpu_ops``) against SGLang's own kernels.

Every speculative-decoding stand-in is replayed against the Triton kernel that SGLang 0.5.23 runs
on GPUs, executed by Triton's CPU interpreter on the same inputs; outputs must be identical. The
attention stand-ins are checked against a direct torch computation (softmax attention over the
full sequence with an explicit mask), since SGLang's Triton attention kernels need a GPU-sized
launch that the interpreter runs too slowly. The shim (``evict/testing/shim``) is checked in a
subprocess, as the server loads it. Needs sglang==0.5.23 (skipped without it); fast.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
from sglang.kernels.ops.kvcache import cache_move  # noqa: E402
from sglang.kernels.ops.sampling import murmur_hash, renorm_triton  # noqa: E402
from sglang.kernels.ops.speculative import cache_locs, eagle, multi_layer_eagle, spec_tree  # noqa: E402
from sglang.srt.mem_cache import allocation  # noqa: E402
from sglang.srt.speculative import spec_utils  # noqa: E402
from sglang.srt.speculative.eagle_utils import organize_draft_results  # noqa: E402
from sglang.srt.utils import next_power_of_2  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from evict.testing import cpu_ops  # noqa: E402
from evict.testing.cpu_server import cpu_env  # noqa: E402

pytestmark = pytest.mark.sglang

cpu_ops.register()  # torch.ops.sgl_kernel.<name> in this process too (the server gets them from the shim)


def interpreted(kernel):
    """A Triton kernel run by the CPU interpreter, whatever TRITON_INTERPRET said at import."""
    return InterpretedFunction(kernel.fn)


_select_first = spec_utils._select_top_k_tokens_first
_select_later = getattr(
    spec_utils._select_top_k_tokens_later,
    "_torchdynamo_orig_callable",
    getattr(spec_utils._select_top_k_tokens_later, "__wrapped__", spec_utils._select_top_k_tokens_later),
)


def draft_tree(bs: int, topk: int, steps: int, n: int, seed: int):
    """parent_list, selected index and draft tokens exactly as SGLang's EAGLE drafter builds them."""
    g = torch.Generator().manual_seed(seed)
    vocab = 50

    def step(rows: int):
        probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 2.5, dim=-1)
        return probs.topk(topk, dim=-1)

    topk_p, topk_index = step(bs)
    hidden = torch.zeros(bs, 2)
    scores = None
    lists: tuple[list, list, list] = ([], [], [])
    for i in range(steps):
        if i == 0:
            _, hidden, scores, info = _select_first(topk_p, topk_index, hidden, topk)
        else:
            _, hidden, scores, info = _select_later(i, topk_p, topk_index, hidden, scores, topk)
        for dst, x in zip(lists, info[:3], strict=True):
            dst.append(x)
        if i < steps - 1:
            topk_p, topk_index = step(bs * topk)
    return organize_draft_results(*lists, n)


def build_tree_outputs(bs: int, n: int, seq_lens: torch.Tensor, mode: int):
    if mode == spec_tree.TreeMaskMode.FULL_MASK:
        mask = torch.ones(int(seq_lens.sum()) * n + n * n * bs, dtype=torch.bool)
    else:
        mask = torch.ones(n * n * bs, dtype=torch.bool)
    return mask, torch.zeros(bs * n, dtype=torch.long), torch.full((3, bs, n), -1, dtype=torch.long)


TREE_CONFIGS = [(1, 2, 2, 4), (3, 4, 3, 8), (2, 4, 3, 5), (2, 8, 4, 16), (4, 2, 5, 10)]


@pytest.mark.parametrize(("bs", "topk", "steps", "n"), TREE_CONFIGS)
@pytest.mark.parametrize("mode", [spec_tree.TreeMaskMode.FULL_MASK, spec_tree.TreeMaskMode.QLEN_ONLY])
def test_build_tree_equals_sglang_triton_kernel(bs, topk, steps, n, mode):
    for seed in range(3):
        parent_list, selected, _ = draft_tree(bs, topk, steps, n, seed)
        seq_lens = torch.randint(1, 30, (bs,), generator=torch.Generator().manual_seed(seed))
        ref_mask, ref_pos, ref_ret = build_tree_outputs(bs, n, seq_lens, mode)
        interpreted(spec_tree.sgl_build_tree_kernel_efficient_triton)[(bs,)](
            parent_list,
            selected,
            seq_lens,
            torch.cumsum(seq_lens, 0) - seq_lens,
            ref_mask,
            ref_pos,
            ref_ret[0],
            ref_ret[1],
            ref_ret[2],
            topk=topk,
            depth=steps,
            draft_token_num=n,
            tree_mask_mode=int(mode),
            batch_size=bs,
            parent_list_stride=parent_list.stride(0),
            selected_index_stride=selected.stride(0),
        )
        mask, pos, ret = build_tree_outputs(bs, n, seq_lens, mode)
        torch.ops.sgl_kernel.build_tree_kernel_efficient_cpu(
            parent_list, selected, seq_lens, mask, pos, ret[0], ret[1], ret[2], topk, steps, n, int(mode)
        )
        assert torch.equal(pos, ref_pos), seed
        assert torch.equal(ret, ref_ret), seed
        assert torch.equal(mask, ref_mask), seed
        # the tree is real: some node sits below depth 1 and some parent has several children
        assert int((pos - seq_lens.repeat_interleave(n)).max()) >= 2
        assert bool((ret[2] >= 0).any())


def test_build_tree_refuses_what_the_cuda_kernel_refuses():
    """tree.cuh: depth > 0, and depth == 1 or parent_list width == topk*(depth-1)+1."""
    bs, topk, steps, n = 2, 4, 3, 8
    parent_list, selected, _ = draft_tree(bs, topk, steps, n, 0)
    seq_lens = torch.tensor([5, 7])

    def call(parents, sel, depth, width):
        mask, pos, ret = build_tree_outputs(bs, width, seq_lens, 1)
        cpu_ops.build_tree_kernel_efficient_cpu(
            parents, sel, seq_lens, mask, pos, ret[0], ret[1], ret[2], topk, depth, width, 1
        )
        return pos

    call(parent_list, selected, steps, n)  # the real depth is accepted
    with pytest.raises(RuntimeError, match=r"topk\*\(depth-1\)\+1"):
        # a lowered depth with the full-depth parent_list (issue 12, defect 2)
        call(parent_list, selected, steps - 1, n)
    with pytest.raises(RuntimeError, match="depth > 0"):
        call(parent_list, selected, 0, n)
    # one drafting step: organize_draft_results gives an empty parent_list, which depth 1 accepts
    parents1, selected1, _ = draft_tree(bs, topk, 1, topk + 1, 0)
    assert parents1.shape == (bs, 0)
    assert torch.equal(
        call(parents1, selected1, 1, topk + 1) - seq_lens.repeat_interleave(topk + 1),
        torch.tensor([0, 1, 1, 1, 1] * bs),
    )


@pytest.mark.parametrize(("bs", "topk", "steps", "n"), TREE_CONFIGS)
def test_verify_tree_greedy_equals_sglang_triton_kernel(bs, topk, steps, n):
    longest = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        parent_list, selected, tokens = draft_tree(bs, topk, steps, n, seed)
        seq_lens = torch.full((bs,), 9)
        mask, pos, ret = build_tree_outputs(bs, n, seq_lens, 1)
        cpu_ops.build_tree_kernel_efficient_cpu(
            parent_list, selected, seq_lens, mask, pos, ret[0], ret[1], ret[2], topk, steps, n, 1
        )
        candidates = torch.cat([torch.randint(0, 50, (bs, 1), generator=g), tokens], dim=1)
        # the target agrees with the draft on a random subset of nodes, so paths of every length occur
        target = torch.randint(0, 50, (bs, n), generator=g)
        nxt = ret[1]
        for b in range(bs):
            for i in range(n):
                child = int(nxt[b, i])
                if child >= 0 and torch.rand((), generator=g) < 0.7:
                    target[b, i] = candidates[b, child]
        outs = []
        for fn in ("ref", "cpu"):
            predicts = torch.full((bs * n,), -7, dtype=torch.int32)
            accept_index = torch.full((bs, steps + 1), -1, dtype=torch.int32)
            accept_num = torch.zeros(bs, dtype=torch.int32)
            args = (predicts, accept_index, accept_num, candidates, ret[0], ret[1], ret[2], target)
            if fn == "ref":
                interpreted(spec_tree.verify_tree_greedy_kernel_triton)[(bs,)](
                    *args, batch_size=bs, num_speculative_tokens=steps + 1, num_draft_tokens=n
                )
            else:
                torch.ops.sgl_kernel.verify_tree_greedy_cpu(*args)
            outs.append((predicts, accept_index, accept_num))
        for ref, got in zip(*outs, strict=True):
            assert torch.equal(ref, got), seed
        longest = max(longest, int(outs[1][2].max()))
    assert longest >= min(2, steps)  # the walk went below the first level


def test_cache_location_ops_equal_sglang_triton_kernels():
    g = torch.Generator().manual_seed(0)
    pool_len, rows = 64, 6
    table = torch.randperm(rows * pool_len, generator=g).to(torch.int32).view(rows, pool_len)
    rpi = torch.tensor([4, 0, 2], dtype=torch.int64)
    bs = rpi.numel()
    starts = torch.tensor([3, 0, 10], dtype=torch.int64)
    ends = torch.tensor([9, 4, 11], dtype=torch.int64)
    total = int((ends - starts).sum())

    # assign_req_to_token_pool: scatter fresh slots into the table
    slots = torch.randint(0, 10_000, (total,), generator=g)
    ref, got = table.clone(), table.clone()
    interpreted(allocation.assign_req_to_token_pool)[(bs,)](
        rpi, ref, starts, ends, slots, pool_len, next_power_of_2(bs)
    )
    torch.ops.sgl_kernel.assign_req_to_token_pool_cpu(rpi, got, starts, ends, slots, pool_len)
    assert torch.equal(ref, got) and not torch.equal(got, table)

    # assign_extend_cache_locs: gather them back (output may be longer than needed)
    ref = torch.full((total + 5,), -1, dtype=torch.int64)
    got = ref.clone()
    interpreted(cache_locs.assign_extend_cache_locs)[(bs,)](
        rpi, table, starts, ends, ref, pool_len, next_power_of_2(bs)
    )
    torch.ops.sgl_kernel.assign_extend_cache_locs_cpu(rpi, table, starts, ends, got, pool_len)
    assert torch.equal(ref, got) and int((got[:total] >= 0).sum()) == total

    # assign_draft_cache_locs_contiguous: topk * steps slots from seq_lens on
    seq_lens = torch.tensor([5, 20, 0], dtype=torch.int64)
    topk, steps = 3, 4
    ref = torch.empty(bs * topk * steps, dtype=torch.int64)
    got = torch.empty_like(ref)
    interpreted(cache_locs.assign_draft_cache_locs_contiguous)[(bs,)](
        rpi, table, seq_lens, ref, pool_len, topk, steps, BS=bs
    )
    torch.ops.sgl_kernel.assign_draft_cache_locs_contiguous_cpu(
        rpi, table, seq_lens, got, pool_len, topk, steps
    )
    assert torch.equal(ref, got)


def test_build_draft_decode_metadata_lays_out_prefix_then_branch_slots():
    """Row b*topk+k: request b's prefix, then branch k's steps slots at seq_len + k*steps."""
    g = torch.Generator().manual_seed(1)
    pool_len, topk, steps = 40, 3, 4
    table = torch.randperm(5 * pool_len, generator=g).to(torch.int32).view(5, pool_len)
    rpi = torch.tensor([3, 1])
    seq_lens = torch.tensor([7, 2])
    out = torch.ops.sgl_kernel.build_draft_decode_metadata_cpu(table, rpi, seq_lens, topk, steps, pool_len)
    assert out.shape == (2 * topk, pool_len) and out.dtype == table.dtype
    for b in range(2):
        s, src = int(seq_lens[b]), table[rpi[b]]
        for k in range(topk):
            want = torch.cat([src[:s], src[s + k * steps : s + (k + 1) * steps]])
            assert torch.equal(out[b * topk + k, : s + steps], want)


def test_fill_ops_and_rotate_equal_sglang_triton_kernels():
    g = torch.Generator().manual_seed(2)
    bs, stride = 4, 5
    accept_tokens = torch.randint(0, 100, (bs, stride), generator=g, dtype=torch.int32)
    accept_lens = torch.tensor([1, 5, 3, 2], dtype=torch.int32)
    ref = torch.zeros(bs, dtype=torch.int32)
    got = torch.zeros_like(ref)
    interpreted(eagle.fill_bonus_tokens)[(bs,)](accept_tokens, accept_lens, ref, stride)
    torch.ops.sgl_kernel.fill_bonus_tokens_cpu(accept_tokens, accept_lens, got, stride)
    assert torch.equal(ref, got)

    accept_index = torch.tensor([[0, 2, -1], [3, -1, -1], [6, 7, 8]], dtype=torch.int32).flatten()
    out_cache_loc = torch.randint(0, 1000, (9,), generator=g)
    ref = torch.full((9,), -5, dtype=torch.int64)
    got = ref.clone()
    size = accept_index.numel()
    interpreted(eagle.fill_accept_out_cache_loc)[(size,)](
        accept_index, out_cache_loc, ref, next_power_of_2(size)
    )
    torch.ops.sgl_kernel.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, got)
    assert torch.equal(ref, got) and int((got != -5).sum()) == 6

    for select in (None, torch.tensor([1, 6, 9])):
        ids = torch.arange(100, 112, dtype=torch.int64)
        starts, lens = torch.tensor([0, 4, 9]), torch.tensor([4, 5, 3])
        new = torch.tensor([-1, -2, -3])
        ref, got = ids.clone(), ids.clone()
        interpreted(multi_layer_eagle.rotate_input_ids_kernel)[(3,)](
            ref, starts, lens, new, select, BLOCK_SIZE=8 if select is None else 4096
        )
        torch.ops.sgl_kernel.rotate_input_ids_cpu(got, starts, lens, new, select)
        assert torch.equal(ref, got) and not torch.equal(got, ids)


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer():
    """The Triton kernel reads raw addresses (the interpreter cannot follow them); torch says what it copies."""
    g = torch.Generator().manual_seed(3)
    buffers = [torch.randn(20, 2, 8, generator=g), torch.randn(20, 3, dtype=torch.float64, generator=g)]
    before = [b.clone() for b in buffers]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers], dtype=torch.int64)
    src = torch.tensor([3, 4, 5, 19])
    tgt = torch.tensor([4, 5, 6, 0])  # overlapping: every source is read before any target is written
    torch.ops.sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, old in zip(buffers, before, strict=True):
        want = old.clone()
        want[tgt] = old[src]
        assert torch.equal(b, want)
    assert cache_move.copy_all_layer_kv_cache_func is not None  # the call site this op serves


def test_murmur_hash_equals_sglang_triton_kernel():
    """The noise of per-request seeded sampling (sampler.multinomial_with_seed)."""
    seed = torch.tensor([0, 1, 42, 2**40 + 7, 2**63 - 1], dtype=torch.int64).to(torch.uint64)
    positions = torch.tensor([0, 5, 17, 4095, 123456], dtype=torch.int64)
    cols = torch.arange(300, dtype=torch.int64)
    ref = torch.empty((5, 300), dtype=torch.uint32)
    interpreted(murmur_hash.murmur_hash32_kernel)[(5, 1)](seed, positions, cols, ref, 5, 300, BLOCK_SIZE=512)
    got = torch.ops.sgl_kernel.murmur_hash32_cpu(seed, positions, cols)
    assert got.dtype == torch.uint32 and got.shape == (5, 300)
    assert torch.equal(got.to(torch.int64), ref.to(torch.int64))
    assert len(set(got.to(torch.int64).flatten().tolist())) > 1490  # it is a hash: no structure


def test_top_k_top_p_renorm_equal_sglang_triton_versions(monkeypatch):
    """SGLang's Triton versions (HIP) refuse CPU tensors up front; past that check they run on CPU."""
    monkeypatch.setattr(renorm_triton, "_prepare_probs", lambda p: p.float().contiguous())
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(5, 40, generator=g) * 2, dim=-1)
    probs[1, :10] = probs[1, 0]  # ties at the pivot are kept
    probs = probs / probs.sum(dim=1, keepdim=True)
    ks = torch.tensor([1, 5, 40, 3, 12])
    ps = torch.tensor([0.9, 0.5, 1.0, 0.05, 0.99])
    torch.testing.assert_close(
        cpu_ops.top_k_renorm_prob(probs, ks), renorm_triton.top_k_renorm_probs_triton(probs, ks)
    )
    torch.testing.assert_close(
        cpu_ops.top_p_renorm_prob(probs, ps), renorm_triton.top_p_renorm_probs_triton(probs, ps)
    )
    assert int((cpu_ops.top_k_renorm_prob(probs, ks)[0] > 0).sum()) == 1


def test_tree_sampling_emits_the_target_distribution():
    """Lossless: whatever the tree, the first emitted token follows the target's root distribution,
    and after accepting a child, the next token follows the target at that child (Monte Carlo)."""
    g = torch.Generator().manual_seed(7)
    rows, n, vocab = 6000, 5, 6
    # root -> (node 1: token 2, node 2: token 4); node 1 -> node 3 (token 1); node 2 -> node 4 (token 1)
    nxt = torch.tensor([1, 3, 4, -1, -1]).repeat(rows, 1)
    sib = torch.tensor([-1, 2, -1, -1, -1]).repeat(rows, 1)
    ridx = torch.arange(rows * n).view(rows, n)
    cand = torch.tensor([0, 2, 4, 1, 1]).repeat(rows, 1)
    target = torch.softmax(torch.randn(n, vocab, generator=g), dim=-1)
    target_probs = target.repeat(rows, 1, 1)
    predicts = torch.full((rows * n,), -1, dtype=torch.int32)
    accept_index = torch.full((rows, 3), -1, dtype=torch.int32)
    accepted = torch.zeros(rows, dtype=torch.int32)
    cpu_ops.tree_speculative_sampling_target_only(
        predicts, accept_index, accepted, cand, ridx, nxt, sib,
        torch.rand(rows, n, generator=g), torch.rand(rows, generator=g),
        target_probs, torch.zeros_like(target_probs),
    )  # fmt: skip
    first = predicts.view(rows, n)[:, 0].long()
    freq = torch.bincount(first, minlength=vocab).double() / rows
    assert float((freq - target[0].double()).abs().sum()) / 2 < 0.03, (freq, target[0])
    # a child token is emitted exactly when that child was accepted
    assert torch.equal(first == 2, accept_index[:, 1] == ridx[:, 1])
    after = predicts.view(rows, n)[first == 2, 1].long()  # the token emitted at node 1
    freq = torch.bincount(after, minlength=vocab).double() / after.numel()
    assert after.numel() > 300 and float((freq - target[1].double()).abs().sum()) / 2 < 0.08, (
        freq,
        target[1],
    )
    assert int(accepted.max()) == 2 and int(accepted.min()) == 0


def reference_attention(q, k, v, visible, scale):
    """Plain softmax attention, q [Lq, H, D], k/v [Lk, Hkv, D], visible [Lq, Lk]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


def test_decode_attention_writes_the_new_kv_and_attends_over_the_table():
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, pool, pool_len = 6, 2, 16, 64, 32
    k_cache = torch.randn(pool, kv_heads, dim, generator=g)
    v_cache = torch.randn(pool, kv_heads, dim, generator=g)
    table = torch.randperm(4 * pool_len, generator=g)[: 4 * pool_len].remainder(pool).to(torch.int32)
    table = table.view(4, pool_len)
    rpi = torch.tensor([2, 0, 3])
    seq_lens = torch.tensor([5, 1, 17])
    loc = table[rpi, seq_lens - 1].to(torch.int64)  # the new token's slot, already in the table
    q = torch.randn(3, heads, dim, generator=g)
    key, value = torch.randn(3, kv_heads, dim, generator=g), torch.randn(3, kv_heads, dim, generator=g)
    out = torch.empty(3, heads, dim)
    kc, vc = k_cache.clone(), v_cache.clone()
    logits = torch.empty(3, heads, 8, dim + 1)
    scale = dim**-0.5
    torch.ops.sgl_kernel.decode_attention_cpu(
        q,
        kc,
        vc,
        1.0,
        1.0,
        out,
        key,
        value,
        loc,
        logits,
        table,
        rpi,
        seq_lens,
        scale,
        0.0,
        False,
        0,
        None,
        None,
    )
    assert torch.equal(kc[loc], key) and torch.equal(vc[loc], value)
    for b in range(3):
        slots = table[rpi[b], : seq_lens[b]].long()
        want = reference_attention(
            q[b : b + 1], kc[slots], vc[slots], torch.ones(1, len(slots), dtype=torch.bool), scale
        )
        torch.testing.assert_close(out[b : b + 1].double(), want, rtol=1e-5, atol=1e-5)


def test_extend_attention_is_prefix_plus_causal_or_tree_masked():
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, pool, pool_len = 4, 2, 8, 128, 40
    k_buf = torch.randn(pool, kv_heads, dim, generator=g)
    v_buf = torch.randn(pool, kv_heads, dim, generator=g)
    table = torch.randperm(pool, generator=g)[:80].to(torch.int32).view(2, pool_len)
    rpi = torch.tensor([1, 0])
    ext = torch.tensor([3, 5])
    seq_lens = torch.tensor([10, 5])  # request 1 has no prefix
    starts = torch.tensor([0, 3])
    q = torch.randn(8, heads, dim, generator=g)
    k_new, v_new = torch.randn(8, kv_heads, dim, generator=g), torch.randn(8, kv_heads, dim, generator=g)
    for b in range(2):  # the backend writes the new K/V before calling the kernel
        slots = table[rpi[b], seq_lens[b] - ext[b] : seq_lens[b]].long()
        k_buf[slots] = k_new[starts[b] : starts[b] + ext[b]]
        v_buf[slots] = v_new[starts[b] : starts[b] + ext[b]]
    tree = torch.zeros(3 * 3 + 5 * 5, dtype=torch.bool)
    tree[:9] = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).flatten()
    tree[9:] = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
        dtype=torch.bool,
    ).flatten()
    scale = 0.3
    for mask in (None, tree):
        for use_new in (True, False):
            out = torch.empty(8, heads, dim)
            torch.ops.sgl_kernel.extend_attention_cpu(
                q, k_new if use_new else None, v_new if use_new else None, out, k_buf, v_buf, 1.0, 1.0,
                table, rpi, seq_lens, ext, starts, 5, scale, 0.0, False, 0, None, None, mask, True,
            )  # fmt: skip
            off = 0
            for b in range(2):
                e, total = int(ext[b]), int(seq_lens[b])
                slots = table[rpi[b], :total].long()
                block = torch.ones(e, e, dtype=torch.bool).tril()
                if mask is not None:
                    block = mask[off : off + e * e].view(e, e)
                    off += e * e
                visible = torch.cat([torch.ones(e, total - e, dtype=torch.bool), block], dim=1)
                s = int(starts[b])
                want = reference_attention(q[s : s + e], k_buf[slots], v_buf[slots], visible, scale)
                torch.testing.assert_close(out[s : s + e].double(), want, rtol=1e-5, atol=1e-5)


def test_register_is_idempotent_and_covers_every_operator():
    cpu_ops.register()
    assert cpu_ops.register() == []
    assert sorted(cpu_ops.registered()) == sorted(cpu_ops.OPERATORS)
    assert len(cpu_ops.OPERATORS) == 13


def test_shim_loads_sgl_kernel_and_keeps_intel_amx_on_a_cpu_without_amx():
    """In a fresh process with the launcher's environment: sgl_kernel imports (through the shim's
    common_ops), exposes the stand-ins, and the intel_amx -> torch_native swap is off."""
    probe = (
        "import sgl_kernel, torch\n"
        "from sgl_kernel import build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu\n"
        "import common_ops\n"
        "from types import SimpleNamespace as NS\n"
        "from sglang.srt.arg_groups import overrides as o\n"
        "f = o._attention_backend_platform_fallbacks\n"
        "assert f in o.POST_PROCESS_PASSES, 'patched pass not in the pass list'\n"
        "print(f(NS(attention_backend='intel_amx', device='cpu')))\n"
        "from sglang.srt.arg_groups.choices import RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND as r\n"
        "assert 'intel_amx' in r, r\n"
        "from sglang.srt.speculative import eagle_utils as e\n"
        "from evict.testing.cpu_ops import tree_speculative_sampling_target_only as t\n"
        "assert e.tree_speculative_sampling_target_only is t\n"
        "kw = dict(is_all_greedy=False, is_cpu=True, is_hip=False, is_xpu=False, use_rejection_sampling=False)\n"
        "assert not e._verify_uses_greedy(**kw), 'sampled requests still verified greedily'\n"
        "from evict.testing.cpu_ops import OPERATORS\n"
        "print(sorted(common_ops.REGISTERED) == sorted(OPERATORS) and all(hasattr(torch.ops.sgl_kernel, n) for n in OPERATORS))\n"
    )
    env = cpu_env()
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["{}", "True"], out.stdout
