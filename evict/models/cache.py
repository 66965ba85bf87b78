"""Static KV cache with explicit commit, shared by the target and the drafter.

Why static slots + commit: speculative verification writes K/V for every candidate of a draft tree,
then keeps only the accepted path. ``commit`` moves the accepted slots (anywhere in the window the
last forward wrote) to the end of the committed prefix, so no cache is ever copied or re-allocated.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Per-layer K/V buffers [bs, n_kv_heads, max_len, head_dim] and committed lengths [bs].

    ``k[i]`` / ``v[i]`` are views into one tensor per kind ([n_layers, bs, ...]), so ``commit`` moves
    a slot in every layer with a single indexing operation.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(n_layers, batch_size, n_kv_heads, head_dim, max_len) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive, got n_layers={n_layers}, batch_size={batch_size}, "
                f"n_kv_heads={n_kv_heads}, head_dim={head_dim}, max_len={max_len}"
            )
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k = list(self.k_all.unbind(0))
        self.v = list(self.v_all.unbind(0))
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.n_layers, self.batch_size, self.max_len = n_layers, batch_size, max_len

    @property
    def device(self) -> torch.device:
        return self.k_all.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k_all.dtype

    def reset(self) -> None:
        """Forget everything (lengths back to 0); buffers are left as garbage."""
        self.lengths.zero_()

    def check_room(self, base: torch.Tensor, t: int) -> int:
        """Return S = max(base) + t, raising a clear error if the forward would run past max_len."""
        s = int(base.max()) + t
        if s > self.max_len:
            raise ValueError(
                f"KV cache overflow: a forward of {t} tokens needs {s} slots but max_len={self.max_len}; "
                "create the cache with a larger max_len (new_cache(batch_size, max_len))"
            )
        return s

    def commit(self, src_slots: torch.Tensor, num: torch.Tensor) -> None:
        """Copy slots src_slots[b, :num[b]] to lengths[b] .. lengths[b]+num[b]-1, then lengths += num.

        src_slots: LongTensor [bs, A] (absolute slot indices written by the last forward);
        num: LongTensor [bs] with 0 <= num[b] <= A. Entries beyond num[b] are ignored. Slots past the
        new lengths are garbage afterwards.
        """
        src_slots = torch.as_tensor(src_slots, device=self.device).long()
        num = torch.as_tensor(num, device=self.device).long()
        if src_slots.dim() != 2 or src_slots.shape[0] != self.batch_size or num.shape != (self.batch_size,):
            raise ValueError(
                f"commit expects src_slots [bs={self.batch_size}, A] and num [bs], got "
                f"{tuple(src_slots.shape)} and {tuple(num.shape)}"
            )
        a = src_slots.shape[1]
        if bool((num < 0).any()) or bool((num > a).any()):
            raise ValueError(f"commit: num must be in [0, {a}], got {num.tolist()}")
        if bool((self.lengths + num > self.max_len).any()):
            raise ValueError(f"commit: lengths + num exceeds max_len={self.max_len}; use a larger cache")
        for b, n in enumerate(num.tolist()):
            if n == 0:
                continue
            src = src_slots[b, :n]
            if bool((src < 0).any()) or bool((src >= self.max_len).any()):
                raise ValueError(f"commit: slot index out of range [0, {self.max_len}) for request {b}")
            start = int(self.lengths[b])
            dst = torch.arange(start, start + n, device=self.device)
            if torch.equal(src, dst):
                continue
            # gather first (src and dst may overlap), then write
            for buf in (self.k_all[:, b], self.v_all[:, b]):  # views [n_layers, n_kv, max_len, hd]
                buf[:, :, start : start + n] = buf[:, :, src].clone()
        self.lengths += num
