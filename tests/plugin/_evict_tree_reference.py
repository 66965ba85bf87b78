"""Pure-torch reference of SGLang's ``build_tree_kernel_efficient`` (0.5.23), for CPU tests.

SGLang builds the verify tree with a CUDA kernel (a Triton twin lives in
``sglang/kernels/ops/speculative/spec_tree.py``).  This loop version follows the same rules, in
the same layout, so tests can check the kernel (the Triton twin, interpreted on CPU) and EVICT's
cut without a GPU:

- node 0 is the root (the last verified token); node ``i >= 1`` is ``top_scores_index[b, i-1]``;
- a selected candidate with flat index ``s`` hangs under the root if ``s // topk == 0``, else under
  the selected node whose flat index is ``parent_list[b, s // topk]`` (no link if that node was not
  selected);
- ``retrieve_next_token[p]`` is the smallest child of ``p``; ``retrieve_next_sibling`` chains the
  children in ascending order; ``retrieve_index[b, i] = b * n + i``;
- ``positions`` = verified length + depth (the walk up is bounded by ``spec_steps`` iterations);
- the mask row of node ``x`` allows the root, ``x`` and its ancestors (QLEN layout ``[bs, n, n]``),
  and in FULL layout also every prefix column.
"""

from __future__ import annotations

import torch


def reference_build_tree(
    parent_list: torch.Tensor,
    top_scores_index: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    spec_steps: int,
    num_verify_tokens: int,
) -> dict[str, torch.Tensor]:
    bs, n = seq_lens.numel(), num_verify_tokens
    sel = top_scores_index.tolist()
    par = parent_list.tolist()
    positions = torch.empty(bs * n, dtype=torch.long)
    retrieve_index = torch.full((bs, n), -1, dtype=torch.long)
    next_token = torch.full((bs, n), -1, dtype=torch.long)
    next_sibling = torch.full((bs, n), -1, dtype=torch.long)
    mask = torch.zeros((bs, n, n), dtype=torch.bool)

    for b in range(bs):
        seq_len = int(seq_lens[b])

        def parent_position(node: int, b: int = b) -> int | None:
            """Tree position (0 = root) of the parent of tree node ``node >= 1``; None if unlinked."""
            tb = sel[b][node - 1] // topk
            if tb == 0:
                return 0
            target = par[b][tb]
            for pp in range(n - 1):
                if sel[b][pp] == target:
                    return pp + 1
            return None

        for i in range(n):
            retrieve_index[b, i] = b * n + i
        for i in range(n - 1, 0, -1):
            p = parent_position(i)
            if p is None:
                continue
            old = int(next_token[b, p])
            next_token[b, p] = i
            if old != -1:
                next_sibling[b, i] = old
        positions[b * n] = seq_len
        mask[b, :, 0] = True
        for x in range(1, n):
            cur, depth = x, 0
            for _ in range(spec_steps):
                depth += 1
                mask[b, x, cur] = True
                p = parent_position(cur)
                if p is None or p == 0:
                    break
                cur = p
            positions[b * n + x] = seq_len + depth
    return {
        "positions": positions,
        "retrieve_index": retrieve_index,
        "retrieve_next_token": next_token,
        "retrieve_next_sibling": next_sibling,
        "mask": mask,
    }


def full_mask_layout(mask: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Flatten a QLEN ``[bs, n, n]`` mask into SGLang's FULL_MASK layout (prefix columns True)."""
    rows = []
    for b in range(mask.shape[0]):
        n = mask.shape[1]
        prefix = torch.ones((n, int(seq_lens[b])), dtype=torch.bool)
        rows.append(torch.cat([prefix, mask[b]], dim=1).flatten())
    return torch.cat(rows)


def tree_parents(result: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[bs, n]`` parent tree position of each node from the retrieve links (-1 for the root)."""
    nt, ns = result["retrieve_next_token"], result["retrieve_next_sibling"]
    bs, n = nt.shape
    parents = torch.full((bs, n), -2, dtype=torch.long)
    parents[:, 0] = -1
    for b in range(bs):
        for p in range(n):
            c = int(nt[b, p])
            while c != -1:
                parents[b, c] = p
                c = int(ns[b, c])
    return parents
