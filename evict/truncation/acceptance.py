"""Online acceptance estimator: calibrated draft scores from past verification outcomes.

Why: the rule ranks nodes by the drafter's cumulative probability and predicts
``B(m) = 1 + sum of kept scores``.  That probability is miscalibrated (the drafter is not the
target), and it ignores what the last steps showed.  After every verification the engine knows, for
each verified node whose parent was accepted (a *trial*), whether the node was accepted.  This module
learns ``P(node accepted | parent accepted)`` from those outcomes and replaces each node's score by
the product of calibrated conditionals along its path.  Because each calibrated conditional is in
``(0, 1]``, the calibrated path probability never grows from parent to child, so the top-(m-1) set
stays ancestor-closed and :mod:`evict.truncation.rule` is used unchanged.

Model (chosen for being exact, deterministic and O(1) per node; see docs/benchmark.md for the
measurement): two levels of binned *calibration ratios*, each a Gamma-prior rate estimate

    p_coarse = q * (A_c + s) / (E_c + s)         cell c = (depth, bin of q)
    p        = p_coarse * (A_f + s) / (F_f + s)  cell f = (c, sibling rank, bin of recent acceptance)

where ``q`` is the node's local (conditional) drafter probability, ``A`` the (decayed) number of
accepted trials in the cell, ``E`` the sum of ``q`` over those trials, ``F`` the sum of
``p_coarse`` over them and ``s`` the prior strength.  With no evidence both ratios are 1: the cold
start is exactly the raw scores.  The fine level only corrects what the coarse level gets wrong for
a sibling rank or a request's recent acceptance, so sparse fine cells fall back to the coarse
estimate instead of to a guess.  Within a cell the ratio keeps the drafter's own ordering.

Lossless: the estimator only reads outcomes of *past* steps, so the tree is fixed before the
verifier's coins are drawn (README, "Lossless by construction").

Device and determinism: every per-step operation is a tensor op on the scores' device with no host
read (no ``.item()``, no boolean indexing).  Per-step increments are accumulated as int64 (counts,
and sums in fixed point, 2^-20 resolution) with ``scatter_add_``, whose integer result does not
depend on the order of the atomic adds, then folded into the float state with elementwise ops: the
same inputs give bit-identical state on every TP rank.  Memory is fixed by the bins.  Old evidence
decays by a factor ``0.5 ** (trials / half_life)`` per update, so the estimator follows a change of
domain after about ``half_life`` trials at any batch size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tree import layout_depth_rank

__all__ = [
    "ACCEPTANCE_CHOICES",
    "AcceptanceEstimator",
    "AcceptanceFeatures",
    "flat_outcomes",
    "layout_depth_rank",
]

ACCEPTANCE_CHOICES = ("raw", "calibrated")  # what `--acceptance` offers: raw scores or the estimator

PRIOR_FORMAT = "evict-acceptance-prior"
PRIOR_VERSION = 1
_FIXED = float(1 << 20)  # fixed-point scale of the per-step float sums (deterministic int64 adds)
_EPS = 1e-6  # calibrated conditionals stay in [_EPS, 1]: strictly positive, never above the parent

DEFAULT_Q_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_RECENT_EDGES = (0.25, 0.5, 0.75)


@dataclass
class AcceptanceFeatures:
    """What :meth:`AcceptanceEstimator.calibrate` saw for one step, consumed by ``update``."""

    parents: torch.Tensor  # [bs, K] long flat parent index (-1 = root)
    q: torch.Tensor  # [bs, K] float32 local drafter probability
    p_coarse: torch.Tensor  # [bs, K] float32 coarse calibrated conditional
    p: torch.Tensor  # [bs, K] float32 calibrated conditional
    cell_coarse: torch.Tensor  # [bs, K] long
    cell_fine: torch.Tensor  # [bs, K] long
    depth: torch.Tensor  # [K] long (1-based)
    rank0: torch.Tensor  # [K] bool, the drafter's top child of its parent


def flat_outcomes(
    kept: torch.Tensor, path: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(verified [bs, K], accepted [bs, K])`` bool masks over flat indices from one verify step.

    kept: [bs, m-1] kept flat indices in verify order (verify index j >= 1 is ``kept[:, j-1]``);
    path: [bs, m] accepted verify indices (column 0 = root, -1 = padding), as ``AcceptResult.path``.
    No host sync.
    """
    bs = path.shape[0]
    device = path.device
    kept = kept.long()
    verified = torch.zeros((bs, num_candidates + 1), dtype=torch.bool, device=device)
    verified.scatter_(1, kept + 1, True)
    vf = torch.cat([torch.full((bs, 1), -1, dtype=torch.long, device=device), kept], dim=1)  # [bs, m]
    on_path = path[:, 1:]  # [bs, m-1] accepted candidates (root column dropped)
    flat = torch.where(on_path > 0, vf.gather(1, on_path.clamp(min=0)), torch.full_like(on_path, -1))
    accepted = torch.zeros((bs, num_candidates + 1), dtype=torch.bool, device=device)
    accepted.scatter_(1, flat + 1, True)  # slot 0 collects the padding
    return verified[:, 1:], accepted[:, 1:]


class AcceptanceEstimator:
    """Learns ``P(accepted | parent accepted)`` online and turns draft scores into calibrated ones.

    Args:
        topk, max_depth: the draft tree's ``speculative_eagle_topk`` and ``speculative_num_steps``.
        prior_strength: ``s``, pseudo-trials behind the prior ratio 1 (raw scores) in every cell.
        half_life: trials after which a piece of evidence weighs half (domain shift); ``None`` or
            ``inf`` never forgets.
        recent_decay: per-step weight of a request's old recent-acceptance value (EMA).
        q_edges, recent_edges: inner bin edges of the local probability and of the recent
            acceptance.
        enabled: ``False`` is the switch: ``calibrate`` returns the raw scores and ``update`` learns
            nothing (same call sites, A/B runs).
        device: where the state lives (moved to the scores' device on first use).
    """

    def __init__(
        self,
        topk: int,
        max_depth: int,
        *,
        prior_strength: float = 8.0,
        half_life: float | None = 4096.0,
        recent_decay: float = 0.7,
        q_edges: Sequence[float] = DEFAULT_Q_EDGES,
        recent_edges: Sequence[float] = DEFAULT_RECENT_EDGES,
        enabled: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(topk, bool) or int(topk) != topk or topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        if isinstance(max_depth, bool) or int(max_depth) != max_depth or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1 (speculative_num_steps), got {max_depth!r}")
        if not (prior_strength > 0 and math.isfinite(prior_strength)):
            raise ValueError(f"prior_strength must be positive and finite, got {prior_strength!r}")
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life must be > 0 trials (or None = never forget), got {half_life!r}")
        if not 0.0 <= recent_decay < 1.0:
            raise ValueError(f"recent_decay must be in [0, 1), got {recent_decay!r}")
        for name, edges in (("q_edges", q_edges), ("recent_edges", recent_edges)):
            e = list(edges)
            if any(not 0.0 < x < 1.0 for x in e) or any(b <= a for a, b in zip(e, e[1:])):
                raise ValueError(f"{name} must be strictly ascending values in (0, 1), got {e}")
        self.topk, self.max_depth = int(topk), int(max_depth)
        self.prior_strength = float(prior_strength)
        self.half_life = None if half_life is None or math.isinf(half_life) else float(half_life)
        self.recent_decay = float(recent_decay)
        self.q_edges = tuple(float(x) for x in q_edges)
        self.recent_edges = tuple(float(x) for x in recent_edges)
        self.enabled = bool(enabled)
        self.n_q = len(self.q_edges) + 1
        self.n_rank = 3  # top child, second, the rest
        self.n_recent = len(self.recent_edges) + 1
        self.n_coarse = self.max_depth * self.n_q
        self.n_fine = self.n_coarse * self.n_rank * self.n_recent
        self._device = torch.device(device)
        self._layout: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._edges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all evidence (cold start: calibrated scores equal the raw ones)."""
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=self._device)  # noqa: E731
        # decayed state; float64 so that decay + fixed-point increments stay exact enough forever
        self.coarse_accepted, self.coarse_expected = z(self.n_coarse), z(self.n_coarse)
        self.fine_accepted, self.fine_expected = z(self.n_fine), z(self.n_fine)
        self.recent_init = torch.full((), 0.5, dtype=torch.float32, device=self._device)
        self.reset_diagnostics()

    def reset_diagnostics(self) -> None:
        """Zero the reliability counters (undecayed, per depth): trials, sum q, sum p, accepted."""
        self._diag = torch.zeros((self.max_depth, 4), dtype=torch.int64, device=self._device)

    def to(self, device: torch.device | str) -> AcceptanceEstimator:
        """Move the state to ``device`` (in place; returns self)."""
        device = torch.device(device)
        if device != self._device:
            for name in (
                "coarse_accepted",
                "coarse_expected",
                "fine_accepted",
                "fine_expected",
                "recent_init",
                "_diag",
            ):
                setattr(self, name, getattr(self, name).to(device))
            self._device = device
        return self

    def _statics(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (k, str(device))
        got = self._layout.get(key)
        if got is None:
            depth, rank = layout_depth_rank(k, self.topk)
            if int(depth.max()) > self.max_depth:
                raise ValueError(
                    f"a tree of {k} candidates with topk {self.topk} is {int(depth.max())} deep, but the "
                    f"estimator was built for max_depth {self.max_depth}"
                )
            got = self._layout[key] = (depth.to(device), rank.to(device))
        return got

    def _edge_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        got = self._edges.get(key)
        if got is None:
            got = self._edges[key] = (
                torch.tensor(self.q_edges, dtype=torch.float32, device=device),
                torch.tensor(self.recent_edges, dtype=torch.float32, device=device),
            )
        return got

    def initial_recent(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Recent-acceptance state ``[batch_size]`` for new requests (the running mean of top-child acceptance)."""
        dev = self._device if device is None else torch.device(device)
        return self.recent_init.to(dev).expand(batch_size).clone()

    # -- per step -------------------------------------------------------------------------------
    def calibrate(
        self, scores: torch.Tensor, parents: torch.Tensor, recent: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AcceptanceFeatures | None]:
        """``(calibrated [bs, K], features)`` for one step's draft tree.

        scores: [bs, K] cumulative drafter probabilities; parents: [bs, K] flat parent indices
        (-1 = root), SGLang layout; recent: [bs] each request's recent acceptance (``None``: the
        running mean).  A row with a NaN, infinite or negative score is returned unchanged so that
        the rule still falls back to the full tree for it.  Disabled: ``(scores, None)``.
        """
        if not self.enabled:
            return scores, None
        device = scores.device
        if device != self._device:
            self.to(device)
        bs, k = scores.shape
        depth, rank = self._statics(k, device)
        q_edges, r_edges = self._edge_tensors(device)
        s = scores.to(torch.float32)
        good = s.sqrt().sum(dim=-1) < math.inf  # [bs]: every score finite and >= 0 (as the rule's)
        parents = parents.long()
        has_parent = parents >= 0
        pidx = parents.clamp(min=0)
        parent_score = torch.where(has_parent, s.gather(1, pidx), torch.ones_like(s))
        q = torch.where(parent_score > 0, s / parent_score, torch.zeros_like(s)).clamp(0.0, 1.0)
        q = torch.nan_to_num(q, nan=0.0)
        qb = torch.bucketize(q, q_edges)
        cell_c = (depth - 1).view(1, k) * self.n_q + qb  # [bs, K]
        if recent is None:
            recent = self.recent_init.expand(bs)
        rb = torch.bucketize(
            recent.to(device=device, dtype=torch.float32).reshape(bs, 1).contiguous(), r_edges
        )
        cell_f = (cell_c * self.n_rank + rank.clamp(max=self.n_rank - 1).view(1, k)) * self.n_recent + rb
        sp = self.prior_strength
        ratio_c = (self.coarse_accepted + sp) / (self.coarse_expected + sp)
        ratio_f = (self.fine_accepted + sp) / (self.fine_expected + sp)
        p_c = (q * ratio_c.to(torch.float32)[cell_c]).clamp(max=1.0)
        p = (p_c * ratio_f.to(torch.float32)[cell_f]).clamp(_EPS, 1.0)
        # path products root -> leaf, one tree level per round: a child is its parent's value times
        # p <= 1, so it can never exceed its parent (ancestor-closed top sets, rule unchanged)
        cal = p
        for _ in range(self.max_depth - 1):
            cal = torch.where(has_parent, cal.gather(1, pidx) * p, p)
        cal = torch.where(good.view(bs, 1), cal, scores.to(torch.float32))
        feats = AcceptanceFeatures(
            parents=parents, q=q, p_coarse=p_c, p=p, cell_coarse=cell_c, cell_fine=cell_f,
            depth=depth, rank0=rank == 0,
        )  # fmt: skip
        return cal, feats

    def update(
        self,
        feats: AcceptanceFeatures | None,
        verified: torch.Tensor,
        accepted: torch.Tensor,
        recent: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Learn from one verification; returns the requests' new recent acceptance ``[bs]``.

        verified, accepted: [bs, K] bool over flat indices (:func:`flat_outcomes`).  A node is a
        trial when it was verified and its parent was accepted (or is the root).  Deterministic,
        no host sync.
        """
        if feats is None or not self.enabled:
            return recent
        device = verified.device
        bs, k = verified.shape
        parents = feats.parents
        parent_acc = accepted.gather(1, parents.clamp(min=0)) | (parents < 0)
        trial = verified & parent_acc
        t = trial.to(torch.int64)
        a = (trial & accepted).to(torch.int64)
        fx = lambda x: torch.round(x.to(torch.float64) * _FIXED).to(torch.int64) * t  # noqa: E731
        inc_c = torch.zeros((3, self.n_coarse), dtype=torch.int64, device=device)
        inc_f = torch.zeros((2, self.n_fine), dtype=torch.int64, device=device)
        cc, cf = feats.cell_coarse.reshape(-1), feats.cell_fine.reshape(-1)
        inc_c[0].scatter_add_(0, cc, a.reshape(-1))
        inc_c[1].scatter_add_(0, cc, fx(feats.q).reshape(-1))
        inc_c[2].scatter_add_(0, cc, t.reshape(-1))
        inc_f[0].scatter_add_(0, cf, a.reshape(-1))
        inc_f[1].scatter_add_(0, cf, fx(feats.p_coarse).reshape(-1))
        if self.half_life is not None:
            decay = torch.pow(
                torch.tensor(0.5, dtype=torch.float64, device=device), inc_c[2].sum() / self.half_life
            )
        else:
            decay = torch.ones((), dtype=torch.float64, device=device)
        self.coarse_accepted = self.coarse_accepted * decay + inc_c[0]
        self.coarse_expected = self.coarse_expected * decay + inc_c[1] / _FIXED
        self.fine_accepted = self.fine_accepted * decay + inc_f[0]
        self.fine_expected = self.fine_expected * decay + inc_f[1] / _FIXED
        # reliability per depth (undecayed): trials, sum q, sum p, accepted
        d = (feats.depth - 1).view(1, k).expand(bs, k).reshape(-1)
        diag = torch.zeros((4, self.max_depth), dtype=torch.int64, device=device)
        diag[0].scatter_add_(0, d, t.reshape(-1))
        diag[1].scatter_add_(0, d, fx(feats.q).reshape(-1))
        diag[2].scatter_add_(0, d, fx(feats.p).reshape(-1))
        diag[3].scatter_add_(0, d, a.reshape(-1))
        self._diag += diag.T
        # recent acceptance: the share of the drafter's top children (of accepted parents) accepted
        top = trial & feats.rank0.view(1, k)
        n_top = top.sum(dim=1)
        rate = (top & accepted).sum(dim=1).to(torch.float32) / n_top.clamp(min=1).to(torch.float32)
        all_top = top.sum().to(torch.float32)
        mean_rate = (top & accepted).sum().to(torch.float32) / all_top.clamp(min=1.0)
        self.recent_init = torch.where(
            all_top > 0,
            self.recent_decay * self.recent_init + (1 - self.recent_decay) * mean_rate,
            self.recent_init,
        )
        if recent is None:
            return None
        recent = recent.to(device=device, dtype=torch.float32)
        return torch.where(n_top > 0, self.recent_decay * recent + (1 - self.recent_decay) * rate, recent)

    # -- diagnostics ----------------------------------------------------------------------------
    def reliability(self) -> list[dict[str, float]]:
        """Per depth: trials, mean raw conditional q, mean calibrated p and the realized rate (reads the device)."""
        diag = self._diag.cpu().tolist()
        out = []
        for depth, (n, sq, sp, a) in enumerate(diag, start=1):
            if n == 0:
                continue
            out.append(
                {
                    "depth": depth,
                    "trials": int(n),
                    "raw": sq / _FIXED / n,
                    "calibrated": sp / _FIXED / n,
                    "realized": a / n,
                }
            )
        return out

    # -- warm start -----------------------------------------------------------------------------
    def config(self) -> dict[str, object]:
        """The settings that a saved prior must match to be loaded."""
        return {
            "topk": self.topk,
            "max_depth": self.max_depth,
            "q_edges": list(self.q_edges),
            "recent_edges": list(self.recent_edges),
            "n_rank": self.n_rank,
        }

    def state_dict(self) -> dict[str, object]:
        """JSON-ready learned state (a prior for a warm start; plain numbers, never pickle)."""
        return {
            "format": PRIOR_FORMAT,
            "version": PRIOR_VERSION,
            "config": self.config(),
            "prior_strength": self.prior_strength,
            "half_life": self.half_life,
            "coarse_accepted": self.coarse_accepted.cpu().tolist(),
            "coarse_expected": self.coarse_expected.cpu().tolist(),
            "fine_accepted": self.fine_accepted.cpu().tolist(),
            "fine_expected": self.fine_expected.cpu().tolist(),
            "recent_init": float(self.recent_init),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Warm start from :meth:`state_dict`'s output; raises ``ValueError`` on another configuration."""
        if not isinstance(state, dict) or state.get("format") != PRIOR_FORMAT:
            raise ValueError(f"not an acceptance prior (expected format {PRIOR_FORMAT!r})")
        if state.get("version") != PRIOR_VERSION:
            raise ValueError(
                f"acceptance prior version {state.get('version')!r}, this EVICT reads {PRIOR_VERSION}"
            )
        if state.get("config") != self.config():
            raise ValueError(
                f"acceptance prior made for {state.get('config')}, but this estimator is {self.config()}: "
                "use a prior saved with the same draft tree (topk, steps)"
            )
        tensors = {}
        for name, n in (
            ("coarse_accepted", self.n_coarse),
            ("coarse_expected", self.n_coarse),
            ("fine_accepted", self.n_fine),
            ("fine_expected", self.n_fine),
        ):
            t = torch.tensor(state.get(name, []), dtype=torch.float64)
            if t.shape != (n,) or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"acceptance prior field {name!r} must be {n} finite non-negative numbers")
            tensors[name] = t.to(self._device)
        recent = float(state.get("recent_init", 0.5))
        if not 0.0 <= recent <= 1.0:
            raise ValueError(f"acceptance prior recent_init must be in [0, 1], got {recent}")
        for name, t in tensors.items():
            setattr(self, name, t)
        self.recent_init = torch.tensor(recent, dtype=torch.float32, device=self._device)

    def save(self, path: str | Path) -> None:
        """Write the learned state as JSON (the warm-start prior)."""
        Path(path).write_text(json.dumps(self.state_dict()) + "\n")

    def load(self, path: str | Path) -> AcceptanceEstimator:
        """Read a JSON prior written by :meth:`save` (returns self)."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read acceptance prior {path}: {exc}") from exc
        self.load_state_dict(state)
        return self
