"""Cutting SGLang's EAGLE draft tree to width m (pure torch; no sglang import).

SGLang's ``organize_draft_results(score_list, token_list, parents_list, N)`` keeps the ``N-1``
candidates with the highest cumulative draft probability and returns their flat indices sorted
ascending (``top_scores_index [bs, N-1]``) with their tokens (``draft_tokens [bs, N-1]``); the
scores themselves are dropped.  EVICT needs those scores, so the worker taps them
(:func:`gather_candidate_scores`, written into a :class:`ScoreSink` that CUDA-graph replay also
fills), lets ``TruncationPolicy.decide`` pick the width ``m`` and the ``m-1`` kept positions among
the ``N-1`` (ascending), and :func:`cut_draft_tree` selects them.  Because the kept positions are
the top ``m-1`` scores and ascending, the result is exactly what ``organize_draft_results(..., m)``
would have returned, and it is ancestor-closed (a child's cumulative score never exceeds its
parent's); ``tests/plugin`` checks both on SGLang's own function.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "ACTIVE_SCORE_SINK",
    "ScoreSink",
    "cut_draft_tree",
    "fill_padding_tokens",
    "gather_candidate_scores",
    "padded_frame",
    "ramp_kept",
    "unlink_padding",
    "verify_spec_steps",
]


def gather_candidate_scores(
    score_list: Sequence[torch.Tensor], top_scores_index: torch.Tensor
) -> torch.Tensor:
    """Cumulative scores ``[bs, N-1]`` of the candidates ``organize_draft_results`` kept.

    ``score_list`` is the draft loop's list (``[bs, 1, topk]`` then ``[bs, topk, topk]`` per
    step), flattened exactly as ``organize_draft_results`` flattens it.
    """
    flat = torch.cat(list(score_list), dim=1).flatten(1)
    return torch.gather(flat, 1, top_scores_index)


def cut_draft_tree(
    top_scores_index: torch.Tensor, draft_tokens: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep columns ``kept [bs, m-1]`` (ascending positions among the ``N-1``) of both tensors.

    ``parent_list`` needs no change: it is indexed by flat candidate index, which is preserved.
    """
    kept = kept.to(device=top_scores_index.device, dtype=torch.long)
    return torch.gather(top_scores_index, 1, kept), torch.gather(draft_tokens, 1, kept)


def ramp_kept(bs: int, width: int, device: torch.device | str) -> torch.Tensor:
    """Kept positions ``[bs, width-1]`` = the first ``width-1`` of the ``N-1`` candidates.

    The fallback cut when a width was agreed but this rank has no decision of its own (its decision
    failed while the other TP ranks chose ``width``).  Positions are ascending flat indices and
    every parent precedes its child, so the prefix is ancestor-closed: verification stays lossless.
    """
    return torch.arange(max(int(width) - 1, 0), device=device).expand(int(bs), -1)


def padded_frame(scores: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The width-m tree a per-request cut is verified in, and which of its nodes are real.

    Per-request widths (``choose_widths_batch_budget``): ``kept [bs, m-1]`` holds each request's
    real positions among the ``N-1`` candidates (ascending) followed by ``-1`` padding.  SGLang's
    tree builder needs ``m-1`` distinct candidates per request, so each row is completed with the
    request's best-scored other candidates: the result is its top-``(m-1)`` by ``scores [bs, N-1]``
    (ties: lower position first), because the real set is a prefix of that order, and always
    contains the real set.  It is ancestor-closed (a completing node's parent scores at least as
    high and sits at a lower position, so it ranks first) and the padded nodes' descendants in it
    are padded too (the real set is ancestor-closed).

    Returns ``(frame [bs, m-1]`` ascending positions, ``real [bs, m-1]`` bool).  Device ops only.
    """
    bs, cols = scores.shape
    width_m1 = kept.shape[1]
    kept = kept.to(device=scores.device, dtype=torch.long)
    is_real = torch.zeros((bs, cols + 1), dtype=torch.bool, device=scores.device)
    is_real.scatter_(1, torch.where(kept < 0, torch.full_like(kept, cols), kept), True)
    is_real = is_real[:, :cols]
    # real first, then by score (descending, stable: ties keep the lower position first)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    real_sorted = is_real.gather(1, order)
    order = order.gather(
        1, torch.sort(real_sorted.to(torch.int8), dim=1, descending=True, stable=True).indices
    )
    frame = order[:, :width_m1].sort(dim=1).values
    return frame, is_real.gather(1, frame)


def fill_padding_tokens(draft_tokens: torch.Tensor, real: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``draft_tokens [bs, m-1]`` with each padded slot holding its request's root token ``root [bs]``.

    Why a fixed token: a padded slot is still computed (the width-m graph has its place), and its
    token must be a valid id; the root is one the request already holds.  It is not free: only
    the first layer's router sees the root token's embedding (experts the batch already reads);
    after the first attention layer the slot's hidden state depends on its position and on its
    (padded) ancestors, so later layers may route it to experts of its own.  Hence a padded slot's
    default cost is a node's (``pad_cost`` 1) unless a table measured less.
    """
    return torch.where(real, draft_tokens, root.view(-1, 1).to(draft_tokens.dtype).expand_as(draft_tokens))


def unlink_padding(
    next_token: torch.Tensor, next_sibling: torch.Tensor, real: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Splice the padded nodes out of SGLang's first-child / next-sibling lists.

    ``next_token``/``next_sibling [bs, m]`` are ``build_eagle_verify_input``'s
    ``retrieve_next_token``/``retrieve_next_sibling`` (verify-local indices, -1 = none) for the
    width-m tree of :func:`padded_frame`; ``real [bs, m-1]`` marks its real candidates (node
    ``j >= 1`` is candidate ``j-1``; the root is real).  Every link is moved past padded nodes along
    the sibling chain, so the acceptance walks (``verify_tree_greedy``,
    ``tree_speculative_sampling_target_only``) and the grammar tree never reach a padded node, and
    the padded nodes' own links are cleared.  A padded node's descendants are padded too, so a real
    node is never lost.  A node has at most ``topk`` children, so ``topk`` hops reach the first real
    sibling or the end of the chain.  Device ops only, no host sync.
    """
    bs, m = next_token.shape
    pad = torch.cat([torch.zeros((bs, 1), dtype=torch.bool, device=real.device), ~real], dim=1)
    sib = next_sibling

    def skip(link: torch.Tensor) -> torch.Tensor:
        for _ in range(max(int(topk), 1)):
            safe = link.clamp(min=0)
            hop = (link >= 0) & pad.gather(1, safe)
            link = torch.where(hop, sib.gather(1, safe), link)
        return link

    none = torch.full_like(next_token, -1)
    return torch.where(pad, none, skip(next_token)), torch.where(pad, none, skip(next_sibling))


def verify_spec_steps(num_steps: int, width: int) -> int:
    """Depth bound for a width-``width`` verify tree: ``min(num_steps, width - 1)``.

    Only ``EagleVerifyInput.spec_steps`` takes this value, after the tree is built: SGLang sizes
    ``accept_index`` as ``spec_steps + 1`` columns and ``_compact_accept_to_front`` packs them into
    each request's ``width`` slots, so a tree narrower than ``num_steps + 1`` must declare its
    smaller depth.  The tree itself is always built with the real ``num_steps``: the CUDA tree
    kernel takes ``topk * (num_steps - 1) + 1`` as the row stride of ``parent_list`` and refuses any
    other depth (``tree.cuh``).
    """
    return max(0, min(int(num_steps), int(width) - 1))


class ScoreSink:
    """Persistent ``[rows, cols]`` buffer that receives the kept candidates' scores each draft.

    The draft CUDA graph captures the copy into this buffer, so replay refreshes it without any
    change to the graph's outputs (the draft graph runner unpacks a fixed 4-tuple).  It must be
    allocated before graph capture; eager batches larger than ``rows`` grow it (never during a
    capture, where the batch is bounded by the captured sizes).
    """

    def __init__(self, rows: int, cols: int, device: torch.device | str) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"ScoreSink needs rows >= 1 and cols >= 1, got {rows} x {cols}")
        self.cols = int(cols)
        # Never reallocated: captured graphs hold its address.
        self.buffer = torch.zeros((int(rows), self.cols), dtype=torch.float32, device=device)
        self._overflow: torch.Tensor | None = None  # eager batches larger than ``rows``

    @property
    def rows(self) -> int:
        return self.buffer.shape[0]

    def write(self, scores: torch.Tensor) -> bool:
        """Copy ``scores [bs, c]`` in, ``c <= cols`` (a shallower draft keeps fewer candidates: they
        fill the first ``c`` columns); returns False (and ignores them) when ``c > cols``."""
        if scores.dim() != 2 or scores.shape[1] > self.cols:
            return False
        bs, c = scores.shape
        if bs <= self.rows:
            self.buffer[:bs, :c].copy_(scores)
        else:
            if _is_capturing(self.buffer.device):
                raise RuntimeError(
                    f"EVICT ScoreSink: batch {bs} > {self.rows} rows during CUDA graph capture; "
                    "allocate it for the largest captured batch before capture"
                )
            self._overflow = scores.detach().to(torch.float32).clone()
        return True

    def read(self, bs: int, cols: int | None = None) -> torch.Tensor:
        """Scores of the last draft of batch size ``bs`` (a view, valid until the next draft):
        its first ``cols`` columns (default all), the candidates that draft kept. The reader names
        the width because a replayed graph runs no Python that could record it."""
        c = self.cols if cols is None else int(cols)
        if bs <= self.rows:
            return self.buffer[:bs, :c]
        if self._overflow is None or self._overflow.shape[0] != bs:
            raise RuntimeError(f"EVICT ScoreSink: no scores recorded for an eager batch of {bs} requests")
        return self._overflow[:, :c]

    @contextlib.contextmanager
    def active(self) -> Iterator[ScoreSink]:
        """Make this sink the target of the ``organize_draft_results`` tap while drafting."""
        token = ACTIVE_SCORE_SINK.set(self)
        try:
            yield self
        finally:
            ACTIVE_SCORE_SINK.reset(token)


ACTIVE_SCORE_SINK: contextvars.ContextVar[ScoreSink | None] = contextvars.ContextVar(
    "evict_active_score_sink", default=None
)


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
