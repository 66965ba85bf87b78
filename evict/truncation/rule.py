"""EVICT's truncation rule: choose how much of the draft tree to verify.

Every function here is batched and vectorized (no Python loop over requests or nodes) so the
same code runs inside SGLang's decode step on GPU, in the reference engine on CPU, and in the
benchmark.  Layout follows ``docs/ARCHITECTURE.md``: ``scores`` is ``[bs, K]`` cumulative drafter
probabilities of the K candidate nodes (root excluded), parents always have a lower flat index
than their children, and a *width* ``m`` counts the root, so width ``m`` keeps ``m - 1``
candidates.

Why top-(m-1) is the right subtree: scores are non-increasing from parent to child, so the m-1
highest-scored nodes -- with ties broken toward the lower flat index, i.e. toward the parent --
are ancestor-closed, and no other ancestor-closed subtree of that size has a larger score sum.
The expected number of tokens emitted per step is then ``B(m) = 1 + sum of the m-1 largest
scores`` and the rule maximizes the batch throughput ``sum_r B_r(m) / T(bs, m)`` over the allowed
(captured) widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "Decider",
    "TORCH_RULE",
    "WidthDecision",
    "sanitize_scores",
    "sort_candidates",
    "expected_accepted_lengths",
    "choose_width",
    "choose_widths_per_request",
    "choose_widths_batch_budget",
    "keep_top",
    "validate_scores",
    "validate_widths",
    "validate_step_cost",
]


@dataclass
class WidthDecision:
    """Result of :func:`choose_width` for one decode step.

    ``width`` is the effective width (root included): ``kept.shape[1] == width - 1`` always.  It
    equals ``widths[width_index]`` unless that allowed width exceeds ``K + 1``, in which case it is
    clamped to ``K + 1`` (the whole draft tree).
    """

    width: int  # m*, the chosen width (root included)
    width_index: int  # index of m* in the widths tensor
    kept: torch.Tensor  # LongTensor [bs, m*-1], kept candidate flat indices, ascending
    objective: torch.Tensor  # [W] sum_r B_r(m) / T(bs, m) for each allowed width
    expected_accepted: torch.Tensor  # [bs] B_r(m*) predicted tokens per step per request
    fallback: torch.Tensor  # [bs] bool, requests whose scores were NaN/inf/negative
    # per-request widths (choose_widths_batch_budget): real kept nodes per request; kept is then
    # -1 padded after each row's ascending real indices. None: every request keeps width - 1.
    kept_counts: torch.Tensor | None = None
    budget_index: int | None = None  # per-request widths: index of the budget width m_j <= m*
    best_index: torch.Tensor | None = None  # this step's own choice, when already known: see own_index

    def own_index(self) -> torch.Tensor:
        """This step's own choice as a 0-d long tensor on the scores' device, never read on the host.

        The argmax of ``objective``, or the largest width when a row fell back, even when the
        caller fixed ``width_index``: what a lagged decision carries to the next step.  Derived
        on first use (an off decision never needs it) unless the decider already knew it.
        """
        if self.best_index is None:
            last = self.objective.numel() - 1
            self.best_index = self.objective.argmax().masked_fill(self.fallback.any(), last)
        return self.best_index


# ---------------------------------------------------------------------------------------------
# Input validation (configuration errors raise; per-step data problems never do)
# ---------------------------------------------------------------------------------------------


def validate_widths(widths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Return ``widths`` as a 1-D LongTensor, raising ``ValueError`` on a bad configuration.

    Widths must be non-empty, integers >= 1 and strictly ascending (so that ``argmax``'s
    first-occurrence rule breaks objective ties toward the smaller width).
    """
    try:
        w = widths if isinstance(widths, torch.Tensor) else torch.as_tensor(widths)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"widths must be a 1-D sequence of ints, got {widths!r}") from exc
    if w.dtype == torch.bool or w.is_complex():
        raise ValueError(f"widths must be integers, got dtype {w.dtype}")
    if w.dim() != 1:
        raise ValueError(f"widths must be 1-D [W], got shape {tuple(w.shape)}")
    vals = w.tolist()  # a handful of numbers: checking them in Python is cheaper than torch ops
    if not vals:
        raise ValueError(
            "widths is empty: give at least one allowed (captured) width, e.g. [1, 2, 4, 8, 16, 32, 64]"
        )
    if any(v != int(v) for v in vals):
        raise ValueError(f"widths must be integers, got {vals}")
    if any(v < 1 for v in vals):
        raise ValueError(f"widths must be >= 1 (width counts the root; 1 = plain decoding), got {vals}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"widths must be strictly ascending without duplicates, got {vals}")
    return w if w.dtype == torch.long else w.long()


def validate_step_cost(step_cost: torch.Tensor | Sequence[float], num_widths: int) -> torch.Tensor:
    """Return ``step_cost`` as a 1-D float32 tensor of length ``num_widths``; raise on bad config."""
    c = step_cost if isinstance(step_cost, torch.Tensor) else torch.as_tensor(step_cost)
    if c.dim() != 1:
        raise ValueError(f"step_cost must be 1-D [W] (one step time per width), got shape {tuple(c.shape)}")
    if c.numel() != num_widths:
        raise ValueError(
            f"step_cost has {c.numel()} entries but there are {num_widths} widths; "
            "give one step time per allowed width (CostTable.step_cost(bs, widths) does this)"
        )
    vals = c.tolist()
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(
            f"step_cost must be positive and finite, got {vals}; "
            "check the cost table (regenerate it with `evict-profile --model PATH --out FILE`)"
        )
    return c if c.dtype == torch.float32 else c.to(torch.float32)


def validate_scores(scores: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``scores`` is a 2-D floating-point tensor ``[bs, K]`` (values are not read)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor [bs, K], got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [bs, K], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point probabilities, got dtype {scores.dtype}")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def sanitize_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make scores safe to rank, without ever raising on the values.

    Returns ``(clean [bs, K] float32, bad [bs] bool)``.  A request is *bad* when any of its scores
    is NaN, +-inf or negative: its row is replaced by a strictly decreasing ramp over flat index
    (so its top-j set is the first j nodes, which is ancestor-closed because parents precede
    children) and callers fall back to the full tree.  Scores above 1 (numerical noise in a
    product of probabilities) are clamped to 1, which keeps parent >= child.
    """
    validate_scores(scores)
    clean, good = _sanitize(scores)
    return clean, ~good


_RAMPS: dict[tuple[int, str], torch.Tensor] = {}


def _ramp(k: int, device: torch.device) -> torch.Tensor:
    """Strictly decreasing scores in (0, 1) over flat index, cached per (K, device)."""
    key = (k, str(device))
    r = _RAMPS.get(key)
    if r is None:
        r = _RAMPS[key] = torch.arange(k, 0, -1, device=device, dtype=torch.float32) / (k + 1)
    return r


def _sanitize(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, good [bs])``; few ops because it runs every decode step.

    ``sqrt`` maps negatives, -inf and NaN to NaN and keeps +inf, so the row sum of the square roots
    is finite exactly when every score is finite and >= 0 (square roots of finite float32 values
    are below 2e19, so the sum cannot overflow).
    """
    s = scores if scores.dtype == torch.float32 else scores.to(torch.float32)
    good = s.sqrt().sum(dim=-1) < math.inf  # False for NaN and +inf (cheaper than isfinite)
    clean = torch.where(good.unsqueeze(-1), s.clamp(max=1.0), _ramp(s.shape[-1], s.device))
    return clean, good


def sort_candidates(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort of each request's candidates: ``(sorted_scores, order)``.

    Stability sends ties to the lower flat index -- the parent in SGLang's layout -- so every
    prefix of ``order`` is ancestor-closed even when a parent and child share a score (e.g. 1.0).
    Expects sanitized scores.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True)


class _WidthPlan:
    """Constants for one (widths, K, device): built once per configuration, not per step."""

    __slots__ = ("widths", "eff_widths", "sel", "k", "last", "prefix", "ones", "_eff_list", "_arange")

    def __init__(self, widths: torch.Tensor, k: int, device: torch.device) -> None:
        self.widths = widths
        self.k = k
        self.eff_widths = widths.to(device=device, dtype=torch.long).clamp(max=k + 1)
        self.sel = self.eff_widths - 1  # column of the prefix-sum table for each width
        self.last = torch.tensor(widths.numel() - 1, device=device)  # index of the largest width
        # prefix[i, j] = 1 if sorted position i is among the m_j - 1 kept: B = 1 + sorted @ prefix
        # (one small matmul instead of pad + cumsum + gather, the hot path of every step)
        pos = torch.arange(k, device=device).unsqueeze(1)
        self.prefix = (pos < self.sel.unsqueeze(0)).to(torch.float32)  # [K, W]
        self.ones = torch.ones(widths.numel(), device=device)
        self._eff_list: list[int] | None = None
        self._arange: torch.Tensor | None = None

    @property
    def eff_list(self) -> list[int]:
        if self._eff_list is None:
            self._eff_list = [int(v) for v in self.eff_widths.tolist()]
        return self._eff_list

    def arange(self) -> torch.Tensor:
        if self._arange is None:
            self._arange = torch.arange(self.k, device=self.eff_widths.device)
        return self._arange


_PLANS: dict[tuple[tuple[int, ...], int, str], _WidthPlan] = {}
_MAX_PLANS = 256


def _get_plan(widths: torch.Tensor | Sequence[int], k: int, device: torch.device) -> _WidthPlan:
    """Cached :class:`_WidthPlan` per (widths, K, device): the one plan cache, bounded.

    Keyed by the widths' values, so host widths (a tuple, or a CPU tensor) cost no device read:
    ``TruncationPolicy`` passes a tuple and its steps read nothing on the host here.
    """
    if isinstance(widths, tuple):  # the policy's host ints: the key as given
        values = widths
    else:
        values = tuple(int(v) for v in (widths.tolist() if isinstance(widths, torch.Tensor) else widths))
    key = (values, k, str(device))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        w = torch.as_tensor(key[0], dtype=torch.long, device=device)
        plan = _PLANS[key] = _WidthPlan(w, k, device)
    return plan


def _kept_indices(order: torch.Tensor, n: int, plan: _WidthPlan | None = None) -> torch.Tensor:
    """First ``n`` entries of each row of ``order``, sorted ascending (SGLang's kept order)."""
    bs, k = order.shape
    if n <= 0:
        return order[:, :0]
    if n >= k:  # the whole tree: no sort needed
        ar = plan.arange() if plan is not None else torch.arange(k, device=order.device)
        return ar.expand(bs, k).contiguous()
    return order[:, :n].sort(dim=-1).values


def _benefit_cumsum(sorted_scores: torch.Tensor, plan: _WidthPlan) -> torch.Tensor:
    """``B[r, j] = 1 + sum of the m_j - 1 largest scores``: running sum, read at each width."""
    csum = torch.nn.functional.pad(sorted_scores, (1, 0), value=1.0).cumsum(dim=-1)
    return csum.index_select(1, plan.sel)


def _benefit(sorted_scores: torch.Tensor, plan: _WidthPlan) -> torch.Tensor:
    """``B_r(m)`` for every request and width.

    On CPU one small ``addmm`` against the cached 0/1 ``prefix`` matrix replaces pad + cumsum +
    gather (op overhead dominates there).  Elsewhere the running sum is used: a GPU matmul may run
    in TF32 (SGLang can enable it), which would round the benefits.
    """
    if sorted_scores.device.type == "cpu":
        return torch.addmm(plan.ones, sorted_scores, plan.prefix)
    return _benefit_cumsum(sorted_scores, plan)


class _Ranked:
    """Shared intermediate results of one step: sanitized and sorted scores, ``B_r(m)`` per width."""

    __slots__ = ("good", "order", "benefit", "plan", "k", "_bad")

    def __init__(self, scores: torch.Tensor, plan: _WidthPlan) -> None:
        clean, self.good = _sanitize(scores)
        sorted_scores, self.order = sort_candidates(clean)
        self.k = clean.shape[-1]
        self.plan = plan
        self.benefit = _benefit(sorted_scores, self.plan)  # [bs, W]
        self._bad: torch.Tensor | None = None

    @property
    def bad(self) -> torch.Tensor:
        if self._bad is None:
            self._bad = ~self.good
        return self._bad

    @property
    def eff_widths(self) -> torch.Tensor:
        return self.plan.eff_widths


def expected_accepted_lengths(
    scores: torch.Tensor, widths: torch.Tensor | Sequence[int], *, check: bool = True
) -> torch.Tensor:
    """``B_r(m) = 1 + sum of the m-1 largest scores`` for every request and allowed width.

    Returns float32 ``[bs, W]``.  Widths above ``K + 1`` are clamped to ``K + 1``.  Bad rows (see
    :func:`sanitize_scores`) are computed on their replacement ramp.
    """
    validate_scores(scores)
    w = validate_widths(widths) if check else widths
    return _Ranked(scores, _get_plan(w, scores.shape[-1], scores.device)).benefit


def keep_top(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Kept candidate flat indices for width ``m``: ``LongTensor [bs, min(m, K+1) - 1]``, ascending."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"width m must be an int >= 1 (it counts the root), got {m!r}")
    validate_scores(scores)
    clean, _ = _sanitize(scores)
    _, order = sort_candidates(clean)
    return _kept_indices(order, min(int(m), clean.shape[-1] + 1) - 1)


def _prepare(
    scores: torch.Tensor,
    step_cost: torch.Tensor | Sequence[float],
    widths: torch.Tensor | Sequence[int],
    check: bool,
) -> tuple[_WidthPlan, torch.Tensor]:
    """The cached plan of ``widths`` for these scores, and ``step_cost`` as float32 on their device."""
    validate_scores(scores)
    if check:
        widths = validate_widths(widths)
        c = validate_step_cost(step_cost, widths.numel())
    else:
        c = torch.as_tensor(step_cost, dtype=torch.float32)
    return _get_plan(widths, scores.shape[-1], scores.device), c.to(scores.device)


def _check_index(index: int, num_widths: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_widths:
        raise ValueError(f"index must be an int in [0, {num_widths}) (a position in widths), got {index!r}")


def choose_width(
    scores: torch.Tensor,
    step_cost: torch.Tensor | Sequence[float],
    widths: torch.Tensor | Sequence[int],
    *,
    index: int | None = None,
    check: bool = True,
) -> WidthDecision:
    """EVICT's rule: one width for the whole batch, the global argmax of throughput.

    ``m* = argmax_m sum_r B_r(m) / T(m)`` over all allowed widths (a global argmax, not the first
    local maximum: real cost curves are staircases).  Exact ties go to the smaller width.  If any
    request has NaN/inf/negative scores the step falls back to the largest allowed width (the full
    tree) and ``fallback`` flags those requests.  ``check=False`` skips the configuration checks
    on ``step_cost``/``widths``/``index`` (callers that validated them once, e.g.
    ``TruncationPolicy``).

    ``index`` fixes the width index instead (a width the host chose before this step's scores
    existed: lagged and off decisions).  It is used as given: a bad row is then cut on its ramp
    (its first flat indices, ancestor-closed, so verification stays lossless) and flagged in
    ``fallback``.  Either way :meth:`WidthDecision.own_index` is this step's own choice, fallback
    included, for the next lagged step.  Reading this step's own index is the one host sync (the kept tensor's shape
    depends on the width); with ``index`` and host ``widths`` (e.g. a tuple) nothing is read.
    This is the torch :class:`Decider`; the Triton kernel (``evict.kernels``) implements the same.
    """
    plan, c = _prepare(scores, step_cost, widths, check)
    ranked = _Ranked(scores, plan)
    objective = ranked.benefit.sum(dim=0) / c
    best = None
    if index is None:
        best = torch.where(ranked.good.all(), objective.argmax(), plan.last)
        index = int(best)
    elif check:
        _check_index(index, plan.widths.numel())
    width = plan.eff_list[index]
    return WidthDecision(
        width=width,
        width_index=index,
        kept=_kept_indices(ranked.order, width - 1, plan),
        objective=objective,
        expected_accepted=ranked.benefit[:, index],
        fallback=ranked.bad,
        best_index=best,
    )


class Decider(Protocol):
    """The width decision of one step: the contract between the policy and its implementations.

    Why a contract: the torch rule (:data:`TORCH_RULE`, i.e. :func:`choose_width`) and the Triton
    kernel (``evict.kernels.TritonDecider``) must be interchangeable step by step, and the policy
    must pick one when it is built without importing the kernels.  An implementation takes
    :func:`choose_width`'s arguments, returns its :class:`WidthDecision`, and
    raises ``NotImplementedError`` when it cannot run on these inputs (device, shape): the policy
    then uses :data:`TORCH_RULE` from that step on.
    """

    backend: str  # the name reported by TruncationPolicy.stats() and the start-up logs

    def __call__(
        self,
        scores: torch.Tensor,
        step_cost: torch.Tensor | Sequence[float],
        widths: torch.Tensor | Sequence[int],
        *,
        index: int | None = None,
        check: bool = True,
    ) -> WidthDecision: ...


class _TorchRule:
    """:func:`choose_width` as a :class:`Decider`."""

    backend = "torch"

    def __call__(
        self,
        scores: torch.Tensor,
        step_cost: torch.Tensor | Sequence[float],
        widths: torch.Tensor | Sequence[int],
        *,
        index: int | None = None,
        check: bool = True,
    ) -> WidthDecision:
        return choose_width(scores, step_cost, widths, index=index, check=check)


TORCH_RULE: Decider = _TorchRule()  # the policy's default, and what it falls back to


def choose_widths_per_request(
    scores: torch.Tensor,
    step_cost: torch.Tensor | Sequence[float],
    widths: torch.Tensor | Sequence[int],
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request refinement: each request r gets ``m_r = argmax_m B_r(m) / T(m)``.

    Returns ``(widths_r LongTensor [bs], kept_mask BoolTensor [bs, K])``; ``kept_mask[r]`` marks the
    top ``m_r - 1`` candidates (ancestor-closed).  Ties go to the smaller width; bad requests get the
    largest allowed width.  No host sync.
    """
    plan, c = _prepare(scores, step_cost, widths, check)
    ranked = _Ranked(scores, plan)
    ratio = ranked.benefit / c  # [bs, W]
    idx = torch.where(ranked.good, ratio.argmax(dim=-1), ranked.plan.last)
    widths_r = ranked.eff_widths[idx]
    bs, k = ranked.order.shape
    rank = torch.empty_like(ranked.order)
    rank.scatter_(1, ranked.order, ranked.plan.arange().expand(bs, k))
    kept_mask = rank < (widths_r - 1).unsqueeze(-1)
    return widths_r, kept_mask


def choose_widths_batch_budget(
    scores: torch.Tensor,
    step_cost: torch.Tensor | Sequence[float],
    widths: torch.Tensor | Sequence[int],
    *,
    pad_cost: float = 1.0,
    index: int | None = None,
    check: bool = True,
) -> WidthDecision:
    """Per-request widths inside one batch: a batch-wide token budget within the verified width.

    Why: one width for the batch spends the same number of slots on a request whose draft the
    target will likely reject as on one whose draft it will likely accept.  Here the batch still
    verifies one width ``m_i`` (the captured graph), but only ``t_j = bs * (m_j - 1)`` of its
    ``bs * (m_i - 1)`` candidate slots hold real nodes (``m_j <= m_i``): the ``t_j`` highest
    scores across the whole batch (a global top-K, as D-Cut / DSpark do for chains), each request
    capped at ``m_i - 1``.  The other slots are padding, which the engine fills with the root token
    and never links into the tree.

    Each request's kept nodes are a prefix of its own descending order (ties: lower rank first,
    then lower flat index), so every kept set is ancestor-closed.  The step cost of ``(i, j)`` is
    ``T(m_j) + pad_cost * (T(m_i) - T(m_j))``: ``pad_cost`` is what a padded slot costs relative to
    a real one (1 where padding is computed like any token, e.g. a CPU; 0 where it only routes to
    experts the batch already reads and the step is bound by expert weight reads).  With
    ``pad_cost = 1`` the best budget is always the full one and this is :func:`choose_width`.

    ``index`` fixes the verified width index (lagged / off decisions); only the budget is chosen.
    Bad requests (non-finite or negative scores) force the largest width with the full budget.
    Returns a :class:`WidthDecision` whose ``kept`` is ``[bs, m-1]``, each row its ascending real
    flat indices then -1 padding, and whose ``kept_counts`` ``[bs]`` counts the real ones.  The only
    host sync is reading the chosen width (the kept tensor's shape), as in :func:`choose_width`.
    """
    plan, c = _prepare(scores, step_cost, widths, check)
    if check and not (isinstance(pad_cost, (int, float)) and 0.0 <= float(pad_cost) <= 1.0):
        raise ValueError(f"pad_cost must be a number in [0, 1], got {pad_cost!r}")
    clean, good = _sanitize(scores)
    sorted_s, order = sort_candidates(clean)
    bs, k = clean.shape
    nw = plan.widths.numel()
    caps = plan.sel  # [W] m_i - 1, clamped to K
    rank = plan.arange()  # [K]
    # capped[i, r, q]: request r's q-th best score if q < m_i - 1, else -1 (never selected)
    capped = torch.where(rank.view(1, 1, k) < caps.view(nw, 1, 1), sorted_s.unsqueeze(0), -1.0)
    # rank-major flattening + stable sort: equal scores go to the lower rank, so within a request
    # the selection is always a prefix of its own order
    flat = capped.transpose(1, 2).reshape(nw, k * bs)
    gsorted, gidx = torch.sort(flat, dim=1, descending=True, stable=True)
    csum = torch.nn.functional.pad(gsorted.clamp(min=0.0), (1, 0)).cumsum(dim=1)  # [W, K*bs + 1]
    budgets = bs * caps  # [W] real candidate slots of budget j
    benefit = bs + csum.index_select(1, budgets)  # [W (i: width), W (j: budget)]
    cost = c.view(1, nw) + pad_cost * (c.view(nw, 1) - c.view(1, nw))
    objective = benefit / cost
    grid = torch.arange(nw, device=clean.device)
    valid = grid.view(1, nw) <= grid.view(nw, 1)  # a budget never exceeds its width
    if index is not None:
        valid = valid & (grid.view(nw, 1) == int(index))
    objective = torch.where(valid, objective, torch.full_like(objective, -math.inf))
    last = nw * nw - 1
    best = torch.where(good.all(), objective.flatten().argmax(), torch.tensor(last, device=clean.device))
    if index is not None:  # a fallback under a fixed width keeps that width, with the full budget
        best = torch.where(good.all(), best, torch.tensor(int(index) * nw + int(index), device=clean.device))
    bi = int(best)  # the one host sync: the kept tensor's shape depends on the width
    i, j = divmod(bi, nw)
    width = plan.eff_list[i]
    grank = torch.empty_like(gidx[i])
    grank.scatter_(0, gidx[i], torch.arange(k * bs, device=clean.device))
    sel_sorted = (grank < budgets[j]).view(k, bs).t()  # [bs, K] in each request's sorted order
    kept_mask = torch.zeros_like(sel_sorted).scatter_(1, order, sel_sorted)  # [bs, K] flat order
    flat_idx = torch.where(kept_mask, rank.expand(bs, k), torch.full_like(order, k))
    kept = flat_idx.sort(dim=1).values[:, : width - 1]
    kept = torch.where(kept == k, torch.full_like(kept, -1), kept)
    return WidthDecision(
        width=width,
        width_index=i,
        kept=kept,
        objective=objective.max(dim=1).values,
        expected_accepted=1.0 + (sorted_s * sel_sorted).sum(dim=1),
        fallback=~good,
        kept_counts=sel_sorted.sum(dim=1),
        budget_index=j,
    )
