"""Pure-torch stand-ins for the sgl-kernel CPU operators that SGLang 0.5.23 calls when it serves
on CPU (``SGLANG_USE_CPU_ENGINE=1``, ``--attention-backend intel_amx``) with EAGLE-3 speculation.

Why: the sgl-kernel CPU library is not published as a wheel, and the installed CUDA build of
``sgl_kernel`` cannot load without a GPU driver. ``sgl_kernel/load_utils.py`` ends its search for
the library with a plain ``import common_ops``; the shim's ``common_ops.py`` calls ``register()``,
which defines each operator below in the ``sgl_kernel`` namespace with ``torch.library``, so
``torch.ops.sgl_kernel.<name>`` resolves to these functions and SGLang's own Python runs unchanged.

Each function copies the semantics of the SGLang code named in its docstring (the Triton or CUDA
kernel that GPUs run, and sgl-kernel's C++ for CPU), and is tested against SGLang's Triton kernel in
the interpreter or against a direct torch computation (``tests/server/test_cpu_ops.py``). Argument
lists follow 0.5.23's call sites (``sgl_kernel/speculative.py``, ``sgl_kernel/kvcacheio.py`` and
``srt/layers/attention/intel_amx_backend.py``), which call the operators positionally.

These are correctness stand-ins, not fast kernels: Python loops over requests and tree nodes are
fine for the testbed's batch sizes. Features the testbed does not use (sliding windows, attention
sinks, cross-attention, encoder lengths) raise ``NotImplementedError`` rather than compute
something plausible.

Importing this module does not import sglang or sgl_kernel.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = [
    "OPERATORS",
    "register",
    "registered",
    "copy_all_layer_kv_cache_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "assign_req_to_token_pool_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "fill_bonus_tokens_cpu",
    "fill_accept_out_cache_loc_cpu",
    "build_draft_decode_metadata_cpu",
    "decode_attention_cpu",
    "extend_attention_cpu",
    "rotate_input_ids_cpu",
    "murmur_hash32_cpu",
    "tree_speculative_sampling_target_only",
    "top_k_renorm_prob",
    "top_p_renorm_prob",
]

FULL_MASK = 0
QLEN_ONLY = 1


# --------------------------------------------------------------------------------------------
# KV cache and cache-location bookkeeping
# --------------------------------------------------------------------------------------------


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """Copy KV rows ``src_loc -> tgt_loc`` in every layer buffer (``MHATokenToKVPool.move_kv_cache``).

    Copies ``kernels/ops/kvcache/cache_move.py::copy_all_layer_kv_cache_tiled``: ``data_ptrs[i]`` is
    the base address of buffer i (K and V of every layer) and ``strides[i]`` its row size in bytes.
    All source rows are read before any target row is written, so overlapping moves are safe, as
    in the Triton kernel. The buffers are reached through their addresses (there is no tensor to
    index), by viewing the touched range as a uint8 tensor.
    """
    src = src_loc.to(torch.int64).flatten()
    tgt = tgt_loc.to(torch.int64).flatten()
    if src.numel() != tgt.numel():
        raise ValueError(f"copy_all_layer_kv_cache_cpu: {src.numel()} sources but {tgt.numel()} targets")
    if src.numel() == 0:
        return
    rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        nbytes = rows * int(stride)
        raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, int(stride))
        buf[tgt] = buf[src].clone()


def _packed_segments(
    name: str,
    req_pool_indices: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> list[tuple[int, int, int, int]]:
    """``(row, start, end, packed offset)`` of each non-empty request segment, in order.

    Both KV-slot operators walk the same packed layout (segment i starts where i-1 ended in
    ``out_cache_loc``); a too-short ``out_cache_loc`` is an error, as on the GPU it would be an
    out-of-bounds write.
    """
    starts, ends, rows = start_offset.tolist(), end_offset.tolist(), req_pool_indices.tolist()
    need = sum(e - s for s, e in zip(starts, ends, strict=True))
    if need > out_cache_loc.numel():
        raise ValueError(
            f"{name}: out_cache_loc has {out_cache_loc.numel()} entries but the offsets need {need}"
        )
    segments, off = [], 0
    for row, s, e in zip(rows, starts, ends, strict=True):
        if e > s:
            segments.append((row, s, e, off))
        off += max(e - s, 0)
    return segments


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Scatter new KV slots into the request-to-token map.

    Copies ``srt/mem_cache/allocation.py::assign_req_to_token_pool``:
    ``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[prefix[i]:prefix[i+1]]``
    where ``prefix`` is the exclusive prefix sum of ``end - start``.
    """
    for row, s, e, off in _packed_segments(
        "assign_req_to_token_pool_cpu", req_pool_indices, start_offset, end_offset, out_cache_loc
    ):
        req_to_token[row, s:e] = out_cache_loc[off : off + e - s].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Gather each request's slots ``[start, end)`` out of ``req_to_token``, packed.

    Copies ``kernels/ops/speculative/cache_locs.py::assign_extend_cache_locs`` (the inverse of
    ``assign_req_to_token_pool``); ``out_cache_loc`` may be longer than needed (its tail is left).
    """
    for row, s, e, off in _packed_segments(
        "assign_extend_cache_locs_cpu", req_pool_indices, start_offset, end_offset, out_cache_loc
    ):
        out_cache_loc[off : off + e - s] = req_to_token[row, s:e].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    num_steps: int,
) -> None:
    """Read back each request's ``topk * num_steps`` draft slots, which start at ``seq_lens``.

    Copies ``kernels/ops/speculative/cache_locs.py::assign_draft_cache_locs_contiguous`` (without
    the positions, which the CPU caller never asks for).
    """
    width = int(topk) * int(num_steps)
    if out_cache_loc.numel() != req_pool_indices.numel() * width:
        raise ValueError(
            f"assign_draft_cache_locs_contiguous_cpu: out_cache_loc has {out_cache_loc.numel()} "
            f"entries, expected {req_pool_indices.numel()} x {width}"
        )
    out = out_cache_loc.view(-1, width) if width else out_cache_loc
    for i, (row, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)):
        out[i] = req_to_token[row, s : s + width].to(out_cache_loc.dtype)


def build_draft_decode_metadata_cpu(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    num_steps: int,
    pool_len: int,
) -> torch.Tensor:
    """Expand ``req_to_token`` for multi-step drafting: one row per (request, top-k branch).

    Copies what ``IntelAMXMultiStepDraftBackend.init_forward_metadata``
    (``srt/layers/attention/intel_amx_backend.py``) expects, the CPU twin of the GPU backends'
    ``generate_draft_decode_kv_indices``: row ``b*topk + k`` holds request b's committed prefix
    (``seq_lens[b]`` slots) followed by branch k's ``num_steps`` draft slots, which
    ``assign_draft_cache_locs_contiguous`` laid out at ``seq_lens[b] + k*num_steps``. Entries past
    ``seq_lens[b] + num_steps`` are undefined (zero here).
    """
    rows = req_pool_indices.numel()
    out = torch.zeros((rows * int(topk), int(pool_len)), dtype=req_to_token.dtype)
    for b, (row, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)):
        src = req_to_token[row]
        for k in range(int(topk)):
            dst = out[b * int(topk) + k]
            dst[:s] = src[:s]
            start = s + k * int(num_steps)
            dst[s : s + int(num_steps)] = src[start : start + int(num_steps)]
    return out


def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor, accept_stride: int
) -> None:
    """The bonus token of request i is its last accepted token: ``accept_tokens[i, len_i - 1]``.

    Copies ``kernels/ops/speculative/eagle.py::fill_bonus_tokens`` (``accept_lens`` counts the
    bonus token).
    """
    flat = accept_tokens.reshape(-1)
    idx = torch.arange(accept_lens.numel(), dtype=torch.int64) * int(accept_stride)
    idx = idx + accept_lens.to(torch.int64) - 1
    bonus_tokens.copy_(flat[idx].to(bonus_tokens.dtype).view_as(bonus_tokens))


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor, out_cache_loc: torch.Tensor, accept_out_cache_loc: torch.Tensor
) -> None:
    """Pack the KV slots of accepted draft tokens: ``out_cache_loc[accept_index]``, skipping -1.

    Copies ``kernels/ops/speculative/eagle.py::fill_accept_out_cache_loc``: entry j of the output
    is the slot of the j-th non-negative entry of the flattened ``accept_index``; the tail of
    ``accept_out_cache_loc`` is left as it was.
    """
    idx = accept_index.reshape(-1).to(torch.int64)
    kept = idx[idx > -1]
    if kept.numel() and int(kept.max()) >= out_cache_loc.numel():
        raise IndexError(
            f"fill_accept_out_cache_loc_cpu: accept_index {int(kept.max())} is out of range "
            f"for {out_cache_loc.numel()} cache locations"
        )
    accept_out_cache_loc[: kept.numel()] = out_cache_loc.reshape(-1)[kept].to(accept_out_cache_loc.dtype)


def rotate_input_ids_cpu(
    input_ids: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    topk_index: torch.Tensor,
    select_index: torch.Tensor | None = None,
) -> None:
    """Shift each request's extend tokens left by one and write the new token at the end.

    Copies ``kernels/ops/speculative/multi_layer_eagle.py::rotate_input_ids_kernel`` (multi-layer
    EAGLE / MTP; EAGLE-3 does not call it, but sgl_kernel imports it): the new token goes to
    ``select_index[i]`` when given, else to the request's last extend position.
    """
    starts, lens = extend_start_loc.tolist(), extend_seq_lens.tolist()
    new = topk_index.reshape(-1).tolist()
    sel = select_index.reshape(-1).tolist() if select_index is not None else None
    for i, (s, n) in enumerate(zip(starts, lens, strict=True)):
        if n > 1:
            input_ids[s : s + n - 1] = input_ids[s + 1 : s + n].clone()
        if n > 0:
            input_ids[sel[i] if sel is not None else s + n - 1] = new[i]


_U32 = 0xFFFFFFFF


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _U32


def _murmur3_mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # products of two 32-bit values wrap in int64; the low 32 bits, all that is kept, are exact
    k = (k * 0xCC9E2D51) & _U32
    k = _rotl32(k, 15)
    k = (k * 0x1B873593) & _U32
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _U32


def murmur_hash32_cpu(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 (32-bit) of (seed, position, column): the per-request sampling noise.

    Copies ``kernels/ops/sampling/murmur_hash.py::murmur_hash32_kernel``, which SGLang uses for
    per-request seeded sampling (``--enable-deterministic-inference``; ``seed`` in the request):
    row i, column j hashes the blocks seed_low, seed_high, ``positions[i]`` and
    ``col_indices[j]``, then finalizes with length 16. Returns ``[n, m]`` uint32.
    """
    s = seed.reshape(-1)
    s = s.view(torch.int64) if s.dtype == torch.uint64 else s.to(torch.int64)
    pos = positions.reshape(-1).to(torch.int64) & _U32
    col = col_indices.reshape(-1).to(torch.int64) & _U32
    h = torch.zeros_like(s)
    h = _murmur3_mix(h, s & _U32)
    h = _murmur3_mix(h, (s >> 32) & _U32)
    h = _murmur3_mix(h, pos)
    h = _murmur3_mix(h.unsqueeze(1), col.unsqueeze(0))
    h = h ^ 16
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    h = h ^ (h >> 16)
    return h.to(torch.uint32)


# --------------------------------------------------------------------------------------------
# Draft tree: build and greedy verification
# --------------------------------------------------------------------------------------------


def _check_tree_build_host(parent_list: torch.Tensor, topk: int, depth: int, draft_token_num: int) -> None:
    """The host checks of the CUDA tree kernel (``kernels/jit/csrc/speculative/tree.cuh``).

    A GPU refuses these configurations before launching; the CPU stand-in refuses them too, so a
    worker that would crash on a GPU (for example one that lowers ``depth`` for a narrow verify
    width while ``parent_list`` keeps the full-depth layout) crashes on CPU as well.
    """
    if not (topk > 0 and depth > 0):
        raise RuntimeError(
            f"build_tree_kernel_efficient: requires topk > 0 and depth > 0 (got topk={topk}, "
            f"depth={depth}); the CUDA kernel's host check (tree.cuh) refuses this"
        )
    if not (0 < draft_token_num <= 1024):
        raise RuntimeError(f"build_tree_kernel_efficient: draft_token_num={draft_token_num} not in 1..1024")
    if parent_list.dim() != 2:
        raise RuntimeError(
            f"build_tree_kernel_efficient: parent_list must be 2-D, got {tuple(parent_list.shape)}"
        )
    width = parent_list.shape[1]
    if depth != 1 and width != topk * (depth - 1) + 1:
        raise RuntimeError(
            f"build_tree_kernel_efficient: parent_list has {width} columns but topk*(depth-1)+1 = "
            f"{topk * (depth - 1) + 1} (topk={topk}, depth={depth}); the CUDA kernel's host check "
            "`depth == 1 || parent_width == topk * (depth - 1) + 1` (tree.cuh) refuses this, and "
            "the kernel uses topk*(depth-1)+1 as the row stride of parent_list"
        )


def build_tree_kernel_efficient_cpu(
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
    """Build the verify tree: attention mask, positions, and first-child / next-sibling links.

    Copies ``kernels/ops/speculative/spec_tree.py::sgl_build_tree_kernel_efficient_triton`` (the
    Triton twin of the CUDA kernel ``tree.cuh`` / ``eagle.cuh``), for ``FULL_MASK`` (0: row i of
    request b spans its ``seq_len`` prefix then the N tree columns, rows packed request after
    request) and ``QLEN_ONLY`` (1: an N x N block per request; what SGLang builds on CPU). Node
    ``i >= 1`` is ``selected_index[b, i-1]``; its parent is the node whose selected index equals
    ``parent_list[b, selected_index // topk]`` (the root when that quotient is 0). Like the CUDA
    kernel, the row stride of ``parent_list`` is ``topk*(depth-1)+1`` and the host checks of
    ``tree.cuh`` are enforced. ``retrive_next_token``/``retrive_next_sibling`` must arrive
    filled with -1 (as ``build_tree_kernel_efficient`` allocates them); the mask prefix columns
    of FULL_MASK must arrive True.
    """
    _check_tree_build_host(parent_list, int(topk), int(depth), int(draft_token_num))
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY):
        raise NotImplementedError(
            f"build_tree_kernel_efficient_cpu: tree_mask_mode={tree_mask_mode} (only FULL_MASK=0 "
            "and QLEN_ONLY=1 exist on CPU)"
        )
    n = int(draft_token_num)
    bs = verified_seq_len.numel()
    parents = parent_list.tolist()
    selected = selected_index.reshape(bs, n - 1).tolist()
    seq_lens = [int(x) for x in verified_seq_len.tolist()]
    ri = retrive_index.view(bs, n)
    nxt = retrive_next_token.view(bs, n)
    sib = retrive_next_sibling.view(bs, n)
    pos = positions.view(bs, n)
    mask = tree_mask.view(-1)
    need = bs * n * n if tree_mask_mode == QLEN_ONLY else (sum(seq_lens) + bs * n) * n
    if mask.numel() < need:
        raise RuntimeError(
            f"build_tree_kernel_efficient_cpu: tree_mask has {mask.numel()} entries, needs {need}"
        )

    def node_of(b: int, token_idx: int) -> int:
        """Position (0-based among non-root nodes) whose selected index is token_idx, or -1."""
        row = selected[b]
        for p in range(n - 1):
            if row[p] == token_idx:
                return p
        return -1

    acc = 0
    for b in range(bs):
        seq_len = seq_lens[b]
        base = b * n
        pos[b, 0] = seq_len
        # links: children are visited from the last node to the first, so each parent's first
        # child ends up the lowest-index child and siblings chain in increasing order
        links_next = nxt[b].tolist()
        links_sib = sib[b].tolist()
        for i in range(n - 1, 0, -1):
            ri[b, i] = base + i
            parent_tb = selected[b][i - 1] // topk
            parent_position = 0
            if parent_tb != 0:
                found = node_of(b, parents[b][parent_tb])
                if found < 0:
                    continue  # malformed tree: the kernels skip the node (CUDA prints a warning)
                parent_position = found + 1
            if links_next[parent_position] != -1:
                links_sib[i] = links_next[parent_position]
            links_next[parent_position] = i
        ri[b, 0] = base
        nxt[b] = torch.tensor(links_next, dtype=nxt.dtype)
        sib[b] = torch.tensor(links_sib, dtype=sib.dtype)

        if tree_mask_mode == FULL_MASK:
            row0 = b * n * n + acc * n  # rows of earlier requests are (seq_len_j + n) wide
            row_width = seq_len + n
            col0 = seq_len
        else:
            row0 = b * n * n
            row_width = n
            col0 = 0
        acc += seq_len
        for t in range(n):
            start = row0 + row_width * t + col0
            mask[start] = True
            mask[start + 1 : start + n] = False
            if t == 0:
                continue
            cur, position = t - 1, 0
            for _ in range(int(depth)):
                position += 1
                mask[start + cur + 1] = True
                parent_tb = selected[b][cur] // topk
                if parent_tb == 0:
                    break
                cur = node_of(b, parents[b][parent_tb])
                if cur < 0:
                    break
            pos[b, t] = position + seq_len


def verify_tree_greedy_cpu(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy tree verification: follow the target's argmax down the draft tree.

    Copies ``kernels/ops/speculative/spec_tree.py::verify_tree_greedy_kernel_triton``: from the
    root, at each level take the first child (in sibling order) whose draft token equals the
    target's argmax at the last accepted node; record its flat index in ``accept_index[b, j]``
    and the target token in ``predicts``; stop at the first level with no match. The bonus token
    (the target's argmax at the last accepted node) is written too; ``accept_token_num`` counts
    accepted drafts without it. Rejected ``accept_index`` slots keep their prior value (-1).
    """
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    cand = candidates.tolist()
    ridx = retrive_index.tolist()
    rnext = retrive_next_token.tolist()
    rsib = retrive_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    pred = predicts.view(-1)
    for b in range(bs):
        last = ridx[b][0]
        accept_index[b, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, steps):
            cur = rnext[b][cur]
            while cur != -1:
                if cand[b][cur] == target[last]:
                    pred[last] = target[last]
                    accepted += 1
                    accept_index[b, accepted] = ridx[b][cur]
                    last = ridx[b][cur]
                    break
                cur = rsib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        pred[last] = target[last]


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    threshold_single: float = 1.0,
    threshold_acc: float = 1.0,
    deterministic: bool = True,
) -> None:
    """Sampling tree verification (SpecInfer-style, target probabilities only).

    Copies the CUDA kernel ``TreeSpeculativeSamplingTargetOnly``
    (``kernels/jit/include/sgl_kernel/speculative/sampling.cuh``) that SGLang's
    ``eagle_utils.eagle_sample`` calls for sampled requests on a GPU; SGLang has no CPU version
    (on CPU it verifies greedily), so the shim installs this one into ``eagle_utils`` when asked
    (``CPU_SERVER_SAMPLING_VERIFY=1``). Per request, level by level: walk the children of the
    last accepted node in sibling order, adding each child's target probability to a running sum;
    accept the first child whose sum exceeds the level's coin (``uniform_samples`` at the parent's
    slot; divided by ``threshold_acc``, or any child with probability >= ``threshold_single``),
    and record each rejected child's probability in ``draft_probs`` so the residual excludes it.
    The bonus token is drawn with ``uniform_samples_for_final_sampling`` from
    ``relu(target - draft)`` at the last accepted node (plain ``target`` when every level was
    accepted), by inverse CDF over the positive entries. ``draft_probs`` is scratch, as on the GPU.
    """
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    vocab = target_probs.shape[-1]
    probs = target_probs.reshape(bs * n, vocab)
    drafts = draft_probs.reshape(bs * n, vocab)
    cand = candidates.tolist()
    ridx = retrive_index.tolist()
    rnext = retrive_next_token.tolist()
    rsib = retrive_next_sibling.tolist()
    coins = uniform_samples.reshape(bs, n).tolist()
    final_coins = uniform_samples_for_final_sampling.reshape(-1).tolist()
    pred = predicts.view(-1)
    for b in range(bs):
        acc = 0.0
        row = b * n  # probability row of the last accepted node (bx * n + cur_index)
        coin = coins[b][0]
        last = ridx[b][0]
        accept_index[b, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, steps):
            cur = rnext[b][cur]
            while cur != -1:
                token = cand[b][cur]
                p = float(probs[row, token])
                acc += p
                if p > 0 and (coin < acc / threshold_acc or p >= threshold_single):
                    acc = 0.0
                    row = b * n + cur
                    coin = coins[b][cur]
                    pred[last] = token
                    accepted += 1
                    accept_index[b, accepted] = ridx[b][cur]
                    last = ridx[b][cur]
                    break
                drafts[row, token] = probs[row, token]
                cur = rsib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        q = probs[row].to(torch.float32)
        residual = q if accepted == steps - 1 else torch.clamp(q - drafts[row].to(torch.float32), min=0)
        u = final_coins[b] * float(residual.sum())
        cdf = torch.cumsum(residual, dim=0)
        hit = torch.nonzero((cdf > u) & (residual > 0))
        if hit.numel():
            token = int(hit[0, 0])
        else:
            valid = torch.nonzero(residual > 0)
            token = int(valid[-1, 0]) if valid.numel() else vocab - 1
        pred[last] = token


def _renorm_from_pivots(probs: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    kept = torch.where(probs >= pivots.unsqueeze(1), probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=1, keepdim=True)


def top_k_renorm_prob(probs: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """Keep each row's ``top_k`` largest probabilities (and ties at the pivot), renormalized.

    Copies ``kernels/ops/sampling/renorm_triton.py::top_k_renorm_probs_triton`` (FlashInfer's
    semantics), which SGLang's sampling verify calls; on CPU SGLang resolves it to None.
    """
    p = probs.float()
    ks = torch.as_tensor(top_k, dtype=torch.int64).reshape(-1).expand(p.shape[0])
    ordered = torch.sort(p, dim=-1, descending=True).values
    pivots = ordered.gather(1, (ks - 1).clamp(0, p.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return _renorm_from_pivots(p, pivots)


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Drop each row's least likely tokens whose total mass is below ``1 - top_p``, renormalized.

    Copies ``kernels/ops/sampling/renorm_triton.py::top_p_renorm_probs_triton`` (FlashInfer's
    semantics: ties at the pivot are kept); on CPU SGLang resolves it to None.
    """
    p = probs.float()
    ps = torch.as_tensor(top_p, dtype=torch.float32).reshape(-1).expand(p.shape[0])
    ordered = torch.sort(p, dim=-1).values
    cdf = torch.cumsum(ordered, dim=-1)
    cut = torch.searchsorted(cdf, (1.0 - ps).unsqueeze(1).contiguous(), right=False).squeeze(1)
    pivots = ordered.gather(1, cut.clamp(max=p.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return _renorm_from_pivots(p, pivots)


# --------------------------------------------------------------------------------------------
# Attention (the intel_amx backend's two kernels)
# --------------------------------------------------------------------------------------------


def _unsupported(op: str, is_cross_attention: bool, sliding_window: int, encoder_lens, sinks) -> None:
    if is_cross_attention:
        raise NotImplementedError(f"{op}: cross-attention is not supported by the CPU stand-in")
    if sliding_window is not None and int(sliding_window) > 0:
        raise NotImplementedError(f"{op}: sliding-window attention is not supported by the CPU stand-in")
    if encoder_lens is not None:
        raise NotImplementedError(f"{op}: encoder lengths are not supported by the CPU stand-in")
    if sinks is not None:
        raise NotImplementedError(f"{op}: attention sinks are not supported by the CPU stand-in")


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    sm_scale: float,
    logit_cap: float,
) -> torch.Tensor:
    """Softmax attention in float32 with grouped KV heads.

    q [..., Lq, H, D], k [..., Lk, Hkv, D], v [..., Lk, Hkv, Dv], visible [..., Lq, Lk] bool (None =
    all) -> [..., Lq, H, Dv].
    """
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=-2)
        v = v.repeat_interleave(group, dim=-2)
    scores = torch.einsum("...qhd,...khd->...hqk", q.float(), k.float()) * sm_scale
    if logit_cap and logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if visible is not None:
        scores = scores.masked_fill(~visible.unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows that see nothing (padding) give zeros
    return torch.einsum("...hqk,...khd->...qhd", probs, v.float())


def decode_attention_cpu(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: float,
    v_scale: float,
    output: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    loc: torch.Tensor | None,
    attn_logits: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    logit_cap: float,
    is_cross_attention: bool,
    sliding_window: int,
    encoder_lens: torch.Tensor | None,
    sinks: torch.Tensor | None,
) -> None:
    """One query token per sequence attends to its ``seq_lens[b]`` cached tokens.

    Copies the contract of ``IntelAMXAttnBackend.forward_decode``
    (``srt/layers/attention/intel_amx_backend.py``), which leaves the K/V write to the kernel:
    when ``key``/``value`` are given, they are first written to ``k_cache``/``v_cache`` at
    ``loc`` (the new token's slot, already listed in ``req_to_token``); then sequence b's query
    attends to slots ``req_to_token[req_pool_indices[b], :seq_lens[b]]`` (the draft backend passes
    an expanded table with one row per top-k branch). Cached values are scaled by
    ``k_scale``/``v_scale`` (FP8 caches); ``attn_logits`` is the GPU kernels' split-K scratch and
    is not needed here.
    """
    _unsupported("decode_attention_cpu", is_cross_attention, sliding_window, encoder_lens, sinks)
    if key is not None and value is not None:
        if loc is None:
            raise ValueError("decode_attention_cpu: key/value given without loc")
        slots = loc.reshape(-1).to(torch.int64)
        k_cache[slots] = key.reshape(slots.numel(), *k_cache.shape[1:]).to(k_cache.dtype)
        v_cache[slots] = value.reshape(slots.numel(), *v_cache.shape[1:]).to(v_cache.dtype)
    num_seqs = seq_lens.numel()
    if num_seqs == 0:
        return
    lens = seq_lens.to(torch.int64)
    max_len = int(lens.max())
    table = req_to_token[req_pool_indices.to(torch.int64), :max_len].to(torch.int64)  # [B, L]
    visible = torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
    table = torch.where(visible, table, torch.zeros_like(table))
    k = k_cache[table].float() * float(k_scale)  # [B, L, Hkv, D]
    v = v_cache[table].float() * float(v_scale)
    q = query.view(num_seqs, 1, query.shape[-2], query.shape[-1])
    out = _attend(q, k, v, visible.unsqueeze(1), float(sm_scale), float(logit_cap))  # [B, 1, H, Dv]
    output.view(num_seqs, -1, v.shape[-1]).copy_(out[:, 0].to(output.dtype))


def extend_attention_cpu(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor | None,
    v_extend: torch.Tensor | None,
    o_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    k_scale: float,
    v_scale: float,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    logit_cap: float,
    is_cross_attention: bool,
    sliding_window: int,
    encoder_lens: torch.Tensor | None,
    sinks: torch.Tensor | None,
    tree_mask: torch.Tensor | None,
    is_causal: bool,
) -> None:
    """Prefill / verify attention: new tokens attend to the cached prefix and to each other.

    Copies the contract of ``IntelAMXAttnBackend.forward_extend``
    (``srt/layers/attention/intel_amx_backend.py``; the GPU twin is
    ``srt/layers/attention/triton_ops/extend_attention.py``). Request b extends by
    ``e = extend_seq_lens[b]`` tokens (rows ``extend_start_loc[b]`` on) after a prefix of
    ``seq_lens[b] - e`` cached tokens at ``req_to_token[req_pool_indices[b]]``. Every new token
    sees the whole prefix; among the new tokens, token i sees token j if ``j <= i`` (causal), or,
    when ``tree_mask`` is given (speculative verify), if the QLEN_ONLY tree mask says so: request
    b's e x e block starts after the blocks of the requests before it. The new tokens' K/V come
    from ``k_extend``/``v_extend`` (the backend has already written them to the cache), or from
    the cache when those are None.
    """
    _unsupported("extend_attention_cpu", is_cross_attention, sliding_window, encoder_lens, sinks)
    lens = seq_lens.to(torch.int64).tolist()
    ext = extend_seq_lens.to(torch.int64).tolist()
    starts = extend_start_loc.to(torch.int64).tolist()
    rows = req_pool_indices.to(torch.int64).tolist()
    heads, v_dim = q_extend.shape[-2], v_buffer.shape[-1]
    o = o_extend.view(-1, heads, v_dim)
    mask_off = 0
    for b, (total, e, s, row) in enumerate(zip(lens, ext, starts, rows, strict=True)):
        if e <= 0:
            continue
        prefix = total - e
        if prefix < 0:
            raise ValueError(f"extend_attention_cpu: request {b} extends by {e} but seq_len is {total}")
        slots = req_to_token[row, :total].to(torch.int64)
        k_pre = k_buffer[slots[:prefix]].float() * float(k_scale)
        v_pre = v_buffer[slots[:prefix]].float() * float(v_scale)
        if k_extend is not None and v_extend is not None:
            k_new, v_new = k_extend[s : s + e].float(), v_extend[s : s + e].float()
        else:
            k_new = k_buffer[slots[prefix:]].float() * float(k_scale)
            v_new = v_buffer[slots[prefix:]].float() * float(v_scale)
        k = torch.cat([k_pre, k_new.view(e, *k_pre.shape[1:])], dim=0)
        v = torch.cat([v_pre, v_new.view(e, *v_pre.shape[1:])], dim=0)
        if tree_mask is not None:
            block = tree_mask.reshape(-1)[mask_off : mask_off + e * e].view(e, e).to(torch.bool)
            mask_off += e * e
        elif is_causal:
            block = torch.ones(e, e, dtype=torch.bool).tril()
        else:
            block = torch.ones(e, e, dtype=torch.bool)
        visible = torch.cat([torch.ones(e, prefix, dtype=torch.bool), block], dim=1)
        out = _attend(q_extend[s : s + e], k, v, visible, float(sm_scale), float(logit_cap))
        o[s : s + e] = out.to(o.dtype)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

# name -> (schema arguments, function); schemas follow 0.5.23's positional call sites.
OPERATORS: dict[str, tuple[str, object]] = {
    "copy_all_layer_kv_cache_cpu": (
        "(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()",
        copy_all_layer_kv_cache_cpu,
    ),
    "build_tree_kernel_efficient_cpu": (
        "(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, Tensor(a!) tree_mask, "
        "Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token, "
        "Tensor(e!) retrive_next_sibling, int topk, int depth, int draft_token_num, "
        "int tree_mask_mode) -> ()",
        build_tree_kernel_efficient_cpu,
    ),
    "verify_tree_greedy_cpu": (
        "(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, "
        "Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
        "Tensor retrive_next_sibling, Tensor target_predict) -> ()",
        verify_tree_greedy_cpu,
    ),
    "assign_req_to_token_pool_cpu": (
        "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, Tensor end_offset, "
        "Tensor out_cache_loc, int pool_len) -> ()",
        assign_req_to_token_pool_cpu,
    ),
    "assign_extend_cache_locs_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, Tensor end_offset, "
        "Tensor(a!) out_cache_loc, int pool_len) -> ()",
        assign_extend_cache_locs_cpu,
    ),
    "assign_draft_cache_locs_contiguous_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, Tensor(a!) out_cache_loc, "
        "int pool_len, int topk, int num_steps) -> ()",
        assign_draft_cache_locs_contiguous_cpu,
    ),
    "fill_bonus_tokens_cpu": (
        "(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, int accept_stride) -> ()",
        fill_bonus_tokens_cpu,
    ),
    "fill_accept_out_cache_loc_cpu": (
        "(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()",
        fill_accept_out_cache_loc_cpu,
    ),
    "build_draft_decode_metadata_cpu": (
        "(Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, int topk, int num_steps, "
        "int pool_len) -> Tensor",
        build_draft_decode_metadata_cpu,
    ),
    "decode_attention_cpu": (
        "(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, float k_scale, float v_scale, "
        "Tensor(c!) output, Tensor? key, Tensor? value, Tensor? loc, Tensor(d!) attn_logits, "
        "Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, float sm_scale, "
        "float logit_cap, bool is_cross_attention, int sliding_window, Tensor? encoder_lens, "
        "Tensor? sinks) -> ()",
        decode_attention_cpu,
    ),
    "extend_attention_cpu": (
        "(Tensor q_extend, Tensor? k_extend, Tensor? v_extend, Tensor(a!) o_extend, Tensor k_buffer, "
        "Tensor v_buffer, float k_scale, float v_scale, Tensor req_to_token, Tensor req_pool_indices, "
        "Tensor seq_lens, Tensor extend_seq_lens, Tensor extend_start_loc, int max_len_extend, "
        "float sm_scale, float logit_cap, bool is_cross_attention, int sliding_window, "
        "Tensor? encoder_lens, Tensor? sinks, Tensor? tree_mask, bool is_causal) -> ()",
        extend_attention_cpu,
    ),
    "rotate_input_ids_cpu": (
        "(Tensor(a!) input_ids, Tensor extend_start_loc, Tensor extend_seq_lens, Tensor topk_index, "
        "Tensor? select_index=None) -> ()",
        rotate_input_ids_cpu,
    ),
    "murmur_hash32_cpu": (
        "(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor",
        murmur_hash32_cpu,
    ),
}

_LIBRARY: torch.library.Library | None = None


def registered() -> list[str]:
    """Names of the stand-ins visible as ``torch.ops.sgl_kernel.<name>`` in this process."""
    return [name for name in OPERATORS if hasattr(torch.ops.sgl_kernel, name)]


def register() -> list[str]:
    """Define every stand-in in the ``sgl_kernel`` operator namespace (idempotent).

    An operator that some other library already defined is left alone (a real sgl-kernel CPU
    build wins). Returns the names this call defined.
    """
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("sgl_kernel", "FRAGMENT")  # noqa: TOR901 (kept alive on purpose)
    defined = []
    for name, (schema, fn) in OPERATORS.items():
        if hasattr(torch.ops.sgl_kernel, name):
            continue
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        defined.append(name)
    return defined
