"""The whole-step decision: how deep to draft (0 = plain decoding), chain or tree, before drafting.

Why: the width rule (``rule.choose_width``) only cuts a tree that has already been drafted, so under
load EVICT still pays for drafting a deep, wide tree it then mostly throws away, and it can never
fall back to plain decoding. A step's cost is drafting + verification + host work; choosing the
draft shape (topk family and depth d) and the width together is one argmax over the same benefit
per cost, with drafting priced per depth (``CostTable.shape_cost``).

The benefit of a shape that has not been drafted yet comes from earlier steps. A tree drafted to
depth D contains every shallower tree of its family as its first ``K(d)`` flat candidates (drafting
appends a step's nodes and never changes earlier ones), so one observed tree prices every depth up
to D: the expected tokens per request of verifying the best ``m - 1`` nodes of depth <= d is
``1 + sum of the m-1 largest scores among the first K(d)`` (the rule's ``B(m)``). The controller
keeps an exponential average of those sorted scores per shape, scaled per drafted shape (and per
family, for shapes without outcomes yet) by how many of the tokens they promised were really
accepted (``record_outcome``: a confident drafter that is often wrong must not keep buying deep
drafts), relaxed toward what departed requests taught (a population factor, the drafter's word
until requests have left) as new requests replace those it was learned on (``on_requests``),
decides from the previous steps
(lagged: the host never waits for this step's drafter), and re-drafts a family's deepest shape now
and then (a probe, with back-off) so that depths it stopped drafting are not judged on stale data.

Everything here is pure torch and batched; ``choose_step`` is brute-force tested like
``choose_width``, and the engine, the plugin and the bench share :class:`DepthController`.
Lossless: any shape and any ancestor-closed cut verify under the standard acceptance rule.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

import torch

from .tree import num_candidates

__all__ = [
    "DraftShape",
    "DepthController",
    "choose_step",
    "depth_profile",
    "shape_grid",
    "shape_values",
]


@dataclass(frozen=True, order=True)
class DraftShape:
    """What one decode step drafts: ``depth`` steps (SGLang's ``speculative_num_steps``) of ``topk``
    branches; depth 0 drafts nothing and verifies the root only (plain decoding)."""

    topk: int
    depth: int

    def __post_init__(self) -> None:
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {self.topk!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {self.depth!r}")

    @property
    def candidates(self) -> int:
        """K: draft candidates of this shape (root excluded)."""
        return num_candidates(self.depth, self.topk)

    @property
    def max_width(self) -> int:
        """The widest verify this shape allows (root included)."""
        return self.candidates + 1

    def __str__(self) -> str:
        return (
            "plain"
            if self.depth == 0
            else f"{'chain' if self.topk == 1 else 'tree'}({self.depth},{self.topk})"
        )


def shape_grid(families: dict[int, int], zero_topk: int | None = None) -> list[DraftShape]:
    """Every shape the decision may pick: plain decoding, then each family's depths 1..S.

    ``families``: ``{topk: deepest depth S}`` (e.g. ``{4: 5}`` for the (5, 4) tree, ``{4: 5, 1: 5}``
    to weigh a chain too). ``zero_topk`` labels the plain shape (default: the widest family).
    """
    if not families:
        raise ValueError("families must name at least one draft topk with its deepest depth")
    for k, s in families.items():
        DraftShape(int(k), int(s))
        if s < 1:
            raise ValueError(f"family topk {k} needs a deepest depth >= 1, got {s}")
    zero = max(families) if zero_topk is None else int(zero_topk)
    out = [DraftShape(zero, 0)]
    for k in sorted(families, reverse=True):
        out += [DraftShape(int(k), d) for d in range(1, int(families[k]) + 1)]
    return out


def depth_profile(scores: torch.Tensor, topk: int, depth: int) -> torch.Tensor:
    """``[depth, K]`` float32: row ``d-1`` is the mean over requests of the descending-sorted scores
    of the first ``K(d)`` candidates (depth <= d), zero-padded to ``K = K(depth)``.

    ``scores [bs, K(depth)]``: cumulative draft probabilities in SGLang's flat layout. Non-finite
    scores count as 0 (never as a benefit). One masked sort for every depth cap (a handful of
    tensor ops per step, whatever the depth).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [bs, K], got shape {tuple(scores.shape)}")
    k_all = num_candidates(depth, topk)
    if scores.shape[1] != k_all:
        raise ValueError(
            f"a depth-{depth} topk-{topk} tree has {k_all} candidates, scores have {scores.shape[1]}"
        )
    s = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)
    caps = torch.tensor([num_candidates(d, topk) for d in range(1, depth + 1)], device=s.device)
    keep = torch.arange(k_all, device=s.device).view(1, -1) < caps.view(-1, 1)  # [depth, K]
    masked = s.unsqueeze(0) * keep.unsqueeze(1)  # [depth, bs, K]
    return masked.sort(dim=2, descending=True).values.mean(dim=1)


def shape_values(
    profile: torch.Tensor, counts: Sequence[int], cost: torch.Tensor, widths: Sequence[int]
) -> torch.Tensor:
    """``[D, W]`` expected tokens per request per ms of every (shape, width).

    ``profile [D, Kmax]``: per shape, mean sorted scores (zero-padded); ``counts [D]``: each shape's
    candidates K; ``cost [D, W]``: step ms of each shape at each width; a width beyond a shape's
    ``K + 1`` verifies the whole shape. Benefit ``1 + sum of the first min(w, K+1) - 1`` profile
    entries: the rule's ``B(m)`` on the averaged scores.
    """
    d, kmax = profile.shape
    if len(counts) != d or cost.shape != (d, len(widths)):
        raise ValueError(
            f"profile {tuple(profile.shape)}, counts {len(counts)} and cost {tuple(cost.shape)} must agree "
            f"on {d} shapes and {len(widths)} widths"
        )
    cum = torch.cat([profile.new_zeros((d, 1)), profile.double().cumsum(dim=1)], dim=1)  # [D, Kmax+1]
    w = torch.as_tensor(list(widths), dtype=torch.long, device=profile.device).view(1, -1)
    cap = torch.as_tensor(list(counts), dtype=torch.long, device=profile.device).view(-1, 1)
    eff = torch.minimum(w, cap + 1).clamp(max=kmax + 1)  # [D, W] verified tokens, root included
    benefit = 1.0 + cum.gather(1, eff - 1)
    return benefit / cost.to(benefit.device, torch.float64)


def choose_step(
    profile: torch.Tensor, counts: Sequence[int], cost: torch.Tensor, widths: Sequence[int]
) -> tuple[int, int]:
    """``(shape index, width index)`` with the most expected tokens per ms: a global argmax over
    every shape and width (ties go to the cheaper, i.e. first listed, shape and the narrower width).

    Non-finite or non-positive costs never win; if nothing is finite the last shape at its widest
    width is returned (the deepest draft: today's behaviour).
    """
    return _argmax_step(_valid_values(profile, counts, cost, widths))


def _valid_values(
    profile: torch.Tensor, counts: Sequence[int], cost: torch.Tensor, widths: Sequence[int]
) -> torch.Tensor:
    """:func:`shape_values` with every (shape, width) whose cost is not finite and positive at -inf."""
    v = shape_values(profile, counts, cost, widths)
    ok = torch.isfinite(v) & (cost.to(v.device) > 0) & torch.isfinite(cost.to(v.device))
    return torch.where(ok, v, torch.full_like(v, -math.inf))


def _argmax_step(v: torch.Tensor) -> tuple[int, int]:
    flat = int(torch.argmax(v.reshape(-1)))
    if not math.isfinite(float(v.reshape(-1)[flat])):
        return v.shape[0] - 1, v.shape[1] - 1
    return flat // v.shape[1], flat % v.shape[1]


# Weight of the departed requests' reliability in the population factor, per unit share of the
# batch that left: a batch that turns over entirely moves it a quarter of the way.
POPULATION_RATE = 0.25


def _bucket(batch_size: int) -> int:
    """The power of two at or below ``batch_size``: the rows measured step times are kept in."""
    return 1 << (max(int(batch_size), 1).bit_length() - 1)


class DepthController:
    """Chooses each step's draft shape from the previous steps' trees and the step costs.

    Args:
        shapes: the candidates (``shape_grid``): plain decoding and each family's depths.
        widths: the verify widths the width rule may pick (the policy's).
        shape_costs: ``batch_size -> [D, W]`` step ms of each shape at each width (the policy's
            ``shape_costs``, i.e. ``CostTable.shape_cost``).
        ema: weight of the newest tree in each shape's averaged scores.
        probe_every, max_probe_every: a family whose deepest depth has not been drafted for this
            many steps is drafted at that depth once (a probe). The interval doubles after a probe
            that did not change the decision, up to ``max_probe_every``, and resets when it did.
        probe_budget: a probe also waits until what it costs beyond the current decision's step is
            at most this share of the steps since the family's last deep draft (under load the
            deep tree is dear, so it is probed less often), but never past ``max_probe_every``
            steps: a price that only a probe can correct must still be re-measured. 0 disables it.
        cost_window: measured step times kept per (batch-size bucket, shape) by
            :meth:`record_step`, whose median ratio to the priced time corrects that shape's price
            (0: decide on the prices as given, e.g. where they are measured already).

    Use: ``shape = plan(bs)`` before drafting; after drafting a tree of ``shape``,
    ``observe(shape, scores)``. Both are cheap host work plus a few small device ops; ``plan`` reads
    back only a ``[D, Kmax]`` profile that ``observe`` copied to pinned host memory after the
    previous step (on CUDA: waiting on that copy's event, never on this step's drafter).
    """

    def __init__(
        self,
        shapes: Sequence[DraftShape],
        widths: Sequence[int],
        shape_costs: Callable[[int], torch.Tensor],
        *,
        ema: float = 0.25,
        probe_every: int = 8,
        max_probe_every: int = 256,
        probe_budget: float = 0.05,
        cost_window: int = 9,
    ) -> None:
        self.shapes = list(shapes)
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be a non-empty list without duplicates, got {self.shapes}")
        if sum(s.depth == 0 for s in self.shapes) > 1:
            raise ValueError("at most one plain (depth 0) shape")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema!r}")
        if not 1 <= probe_every <= max_probe_every:
            raise ValueError(
                f"need 1 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}"
            )
        if not (math.isfinite(probe_budget) and probe_budget >= 0.0):
            raise ValueError(f"probe_budget must be a finite number >= 0, got {probe_budget!r}")
        if cost_window < 0:
            raise ValueError(f"cost_window must be >= 0, got {cost_window!r}")
        self.widths = tuple(int(w) for w in widths)
        self.shape_costs = shape_costs
        self.probe_budget = float(probe_budget)
        self.cost_window = int(cost_window)
        # (batch-size bucket, shape index) -> the last measured / priced step-time ratios
        self._ratios: dict[tuple[int, int], deque[float]] = {}
        self._best_cost: list[float] | None = None  # per shape: ms at its best width, last decide
        self.ema = float(ema)
        self.base_probe = int(probe_every)
        self.max_probe = int(max_probe_every)
        self.counts = [s.candidates for s in self.shapes]
        self.kmax = max(max(self.counts), 1)
        self.families: dict[int, int] = {}
        for s in self.shapes:
            if s.depth > 0:
                self.families[s.topk] = max(self.families.get(s.topk, 0), s.depth)
        self.index = {s: i for i, s in enumerate(self.shapes)}
        # per family: (depth, row) of the depths it lists, ascending (a server may offer only some)
        self._rows: dict[int, list[tuple[int, int]]] = {
            k: sorted((s.depth, i) for i, s in enumerate(self.shapes) if s.topk == k and s.depth > 0)
            for k in self.families
        }
        self._seen_host = [s.depth == 0 for s in self.shapes]
        self._profile: torch.Tensor | None = None  # [D, Kmax] on the scores' device
        self._host: torch.Tensor | None = None  # the profile as of the last observe, on the host
        self._event = None
        self._age = {k: 0 for k in self.families}  # steps since the family's deepest was drafted
        self._step = 0  # decode steps planned
        self._row_step = [0] * len(self.shapes)  # the step each shape's averaged scores were refreshed
        self._rel_step: dict[int, int] = {}  # the step each family's reliability last moved
        self._interval = {k: self.base_probe for k in self.families}
        self._probing: tuple[int, DraftShape] | None = None  # (family, decision before the probe)
        # realized / predicted draft tokens accepted, per family (1.0 until outcomes arrive) and per
        # shape drafted (a shape without outcomes of its own takes its family's)
        self.reliability = {k: 1.0 for k in self.families}
        self.shape_reliability: dict[int, float] = {}
        self._shape_rel_step: dict[int, int] = {}
        self._request_ids: set[Hashable] = set()  # the previous step's requests (on_requests)
        # what the requests that left taught, per family and per shape: the prior a new request's
        # factors relax toward (1.0, the drafter taken at its word, until requests have left)
        self.population_reliability = {k: 1.0 for k in self.families}
        self.population_shape_reliability: dict[int, float] = {}
        self.last_decision: DraftShape | None = None
        self.counts_by_shape: dict[DraftShape, int] = {}
        self.probes = 0

    # -- per step ---------------------------------------------------------------------------------
    def plan(self, batch_size: int) -> DraftShape:
        """The shape to draft this step (host values only). Called once per decode step, plain
        ones included: the step count that ages the families (and so schedules probes) is here."""
        self._tick()
        for k, deepest in self.families.items():  # warm-up: every family drafted deep once
            if not self._seen_host[self.index[DraftShape(k, deepest)]]:
                return self._count(DraftShape(k, deepest))
        decision = self.decide(batch_size)
        if self._probing is not None:  # the step after a probe: did it change the decision?
            family, before = self._probing
            self._probing = None
            grown = decision == before
            self._interval[family] = (
                min(self._interval[family] * 2, self.max_probe) if grown else self.base_probe
            )
        for k, deepest in self.families.items():
            if decision == DraftShape(k, deepest) or self._age[k] < self._interval[k]:
                continue
            if self._age[k] < self.max_probe and not self._probe_affordable(
                DraftShape(k, deepest), decision, self._age[k]
            ):
                continue
            self._probing = (k, decision)
            self.probes += 1
            return self._count(DraftShape(k, deepest))
        return self._count(decision)

    def on_requests(self, request_ids: Collection[Hashable]) -> float:
        """This step's requests, before :meth:`plan`; returns the share of them that is new.

        Why: the reliability factors describe the requests they were learned on. One request the
        drafter fails on (an out-of-domain prompt: its promised tokens never accepted) rightly
        drives them down and the decision to plain decoding, but the requests that follow
        inherited that verdict and, decoding plainly, produced no outcome to correct it until a
        backed-off probe. So each factor relaxes, by the share of new requests, toward the
        *population* factor: what the requests that left taught, folded in by the share that left
        (``POPULATION_RATE`` of it per step). Relaxing toward 1 instead forgot the drafter's own
        overconfidence, which every request shares: each fresh batch of the reference engine
        started from promises taken at their word and drafted the deep trees on its full-batch
        steps. The probe interval shrinks by the share of new requests too: new requests need the
        deepest tree's scores of their own (served on moe128-padded, keeping the back-off made
        the decision lean on a stale deep profile and draft the depth-1 tree on 41% of steps).
        """
        ids = set(request_ids)
        old = self._request_ids
        left = len(old - ids) / len(old) if old else 0.0
        new = len(ids - old) / len(ids) if ids else 0.0
        self._request_ids = ids
        if left > 0.0:
            w = POPULATION_RATE * left
            for k, v in self.reliability.items():
                pop = self.population_reliability[k]
                self.population_reliability[k] = pop + w * (v - pop)
            for i, v in self.shape_reliability.items():
                pop = self._population(i)
                self.population_shape_reliability[i] = pop + w * (v - pop)
        if new > 0.0:
            for k, v in self.reliability.items():
                self.reliability[k] = v + new * (self.population_reliability[k] - v)
            for i, v in self.shape_reliability.items():
                self.shape_reliability[i] = v + new * (self._population(i) - v)
            for k, v in self._interval.items():
                self._interval[k] = max(self.base_probe, int(v * (1.0 - new)))
        return new

    def _population(self, i: int) -> float:
        """Shape ``i``'s population factor (its family's until requests with it have left)."""
        fam = self.population_reliability.get(self.shapes[i].topk, 1.0)
        return self.population_shape_reliability.get(i, fam)

    def decide(self, batch_size: int) -> DraftShape:
        """The best shape by the averaged scores so far (no probing, no warm-up)."""
        profile = self._read_profile()
        scale = torch.tensor(
            [
                self.shape_reliability.get(i, self.reliability.get(s.topk, 1.0))
                for i, s in enumerate(self.shapes)
            ],
            dtype=torch.float64,
        )
        profile = profile * scale.view(-1, 1)
        cost = self.priced(batch_size)
        # A shape never observed (a deeper depth than any drafted yet) is not chosen blind.
        if not all(self._seen_host):
            cost = torch.where(torch.tensor(self._seen_host).view(-1, 1), cost, math.inf)
        v = _valid_values(profile, self.counts, cost, self.widths)  # [D, W]
        i, _ = _argmax_step(v)  # choose_step, keeping the values for the probe budget
        self._best_cost = cost.gather(1, v.argmax(dim=1, keepdim=True)).view(-1).tolist()
        self.last_decision = self.shapes[i]
        return self.shapes[i]

    def priced(self, batch_size: int) -> torch.Tensor:
        """``[D, W]`` float64 host ms of each shape at each width: the cost source's prices times
        the measured correction of :meth:`cost_factors`."""
        cost = self.shape_costs(int(batch_size)).detach().to("cpu", torch.float64)
        return cost * self.cost_factors(batch_size).view(-1, 1)

    def record_step(self, shape: DraftShape, batch_size: int, priced_ms: float, measured_ms: float) -> None:
        """One decode step of ``shape`` at ``batch_size``: what the cost source priced it at (the
        uncorrected ms at the width it verified) and what it measured, draft to draft extend.

        Why: a table profiled on bare forwards at one context length misprices whole steps
        differently per shape (the engine's plain step measured 0.6x its price at bs 64 and the
        chain 0.9x), and the decision compares shapes, so each shape's price is corrected by its
        own measured ratio. Non-finite or non-positive times are ignored."""
        if shape not in self.index:
            raise ValueError(f"{shape} is not one of this controller's shapes")
        if self.cost_window == 0:
            return
        p, m = float(priced_ms), float(measured_ms)
        if not (math.isfinite(p) and math.isfinite(m)) or p <= 0.0 or m <= 0.0:
            return
        key = (_bucket(batch_size), self.index[shape])
        window = self._ratios.get(key)
        if window is None:
            window = self._ratios[key] = deque(maxlen=self.cost_window)
        window.append(min(max(m / p, 0.1), 10.0))

    def cost_factors(self, batch_size: int) -> torch.Tensor:
        """``[D]`` float64: measured / priced step time per shape at this batch size's bucket.

        A shape with its own samples takes their median; one without takes the median of every
        shape measured in the bucket (what misprices all shapes alike: the context length, the host
        work around a step); a bucket without samples takes the nearest measured bucket's; none: 1.
        """
        buckets = sorted({b for b, _ in self._ratios})
        if not buckets:
            return torch.ones(len(self.shapes), dtype=torch.float64)
        want = _bucket(batch_size)
        b = min(buckets, key=lambda x: (abs(math.log2(x) - math.log2(want)), x))
        own = {i: list(w) for (bb, i), w in self._ratios.items() if bb == b and w}
        pooled = statistics.median([r for w in own.values() for r in w])
        return torch.tensor(
            [statistics.median(own[i]) if i in own else pooled for i in range(len(self.shapes))],
            dtype=torch.float64,
        )

    def _probe_affordable(self, probe: DraftShape, decision: DraftShape, age: int) -> bool:
        """Whether a probe's extra cost over the decision's step fits ``probe_budget`` of the
        ``age`` steps it has waited (unknown prices: yes)."""
        if self.probe_budget <= 0.0 or self._best_cost is None:
            return True
        extra = self._best_cost[self.index[probe]] - self._best_cost[self.index[decision]]
        base = self._best_cost[self.index[decision]]
        if not (math.isfinite(extra) and math.isfinite(base)) or extra <= 0.0:
            return True
        return extra <= self.probe_budget * age * base

    def observe(self, shape: DraftShape, scores: torch.Tensor) -> None:
        """Fold a drafted tree of ``shape`` into every shape of its family up to its depth."""
        if shape.depth == 0:
            return
        if shape.topk not in self.families:
            raise ValueError(f"{shape} is not one of this controller's families {sorted(self.families)}")
        prof = depth_profile(scores, shape.topk, shape.depth)  # [depth, K]
        if prof.shape[1] < self.kmax:
            prof = torch.nn.functional.pad(prof, (0, self.kmax - prof.shape[1]))
        if self._profile is None or self._profile.device != prof.device:
            self._profile = torch.zeros(
                (len(self.shapes), self.kmax), dtype=torch.float32, device=prof.device
            )
        listed = [(d, i) for d, i in self._rows[shape.topk] if d <= shape.depth]
        if listed:
            new = prof[[d - 1 for d, _ in listed], : self.kmax]  # [n, Kmax]
            idx = torch.tensor([i for _, i in listed], device=prof.device)
            # a row unseen, or not refreshed for a probe interval (stale: the requests have moved
            # on), takes the new tree as it is; a recent one is averaged
            fresh = [
                not self._seen_host[i] or self._step - self._row_step[i] >= self.base_probe for _, i in listed
            ]
            if all(fresh):
                mixed = new
            else:
                mixed = self._profile.index_select(0, idx).lerp(new, self.ema)
                if any(fresh):
                    mixed = torch.where(torch.tensor(fresh, device=prof.device).view(-1, 1), new, mixed)
            self._profile.index_copy_(0, idx, mixed)
            for _, i in listed:
                self._seen_host[i] = True
                self._row_step[i] = self._step
        if shape.depth >= self.families[shape.topk]:
            self._age[shape.topk] = 0
        self._snapshot()

    def record_outcome(self, shape: DraftShape, predicted: float, realized: float) -> None:
        """One verified step of ``shape``: tokens per request the rule predicted at the chosen width
        (bonus included) and what was accepted. Updates the family's reliability factor and the
        shape's own.

        Why per shape too: the drafter's scores are calibrated differently at each depth and width
        (a depth-1 tree verified at width 2 promised more than it delivered on moe128-padded, where
        the full tree's promises held), and shapes within a few percent of each other per ms are
        told apart only when each one's promises are discounted by its own record."""
        if shape.depth == 0 or shape.topk not in self.reliability:
            return
        promised = float(predicted) - 1.0
        if not (math.isfinite(promised) and math.isfinite(float(realized))) or promised < 0.05:
            return
        ratio = min(max((float(realized) - 1.0) / promised, 0.0), 2.0)
        k, i = shape.topk, self.index.get(shape)
        family = self.reliability[k]
        self.reliability[k] = family + self._outcome_weight(self._rel_step, k) * (ratio - family)
        self._rel_step[k] = self._step
        if i is not None:
            own = self.shape_reliability.get(i, family)
            self.shape_reliability[i] = own + self._outcome_weight(self._shape_rel_step, i) * (ratio - own)
            self._shape_rel_step[i] = self._step

    def _outcome_weight(self, last: dict[int, int], key: int) -> float:
        """After a long pause (plain decoding, another shape) the old factor describes other
        requests: weigh the new outcome as much as the old factor."""
        stale = self._step - last.get(key, self._step) >= self.base_probe
        return max(0.5, self.ema) if stale else self.ema

    # -- host copy --------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        """Queue the profile's copy to the host (CUDA: pinned, non-blocking, with an event)."""
        p = self._profile
        if p.device.type == "cuda":
            if self._host is None or self._host.shape != p.shape or not self._host.is_pinned():
                self._host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                self._event = torch.cuda.Event()
            self._host.copy_(p, non_blocking=True)
            self._event.record()
        else:
            self._host, self._event = p.to("cpu", copy=True), None

    def _read_profile(self) -> torch.Tensor:
        if self._host is None:
            return torch.zeros((len(self.shapes), self.kmax), dtype=torch.float64)
        if self._event is not None:
            self._event.synchronize()
        return self._host.double()

    def force(self, shape: DraftShape) -> DraftShape:
        """Draft ``shape`` this step for a reason outside the rule (the server still timing its
        plain step, say) instead of ``plan()``: the step still ages the families, so probes stay
        on schedule, and it is counted in ``stats()``."""
        if shape not in self.index:
            raise ValueError(f"{shape} is not one of this controller's shapes")
        self._tick()
        return self._count(shape)

    def _tick(self) -> None:
        self._step += 1
        for k in self._age:
            self._age[k] += 1

    def _count(self, shape: DraftShape) -> DraftShape:
        self.counts_by_shape[shape] = self.counts_by_shape.get(shape, 0) + 1
        return shape

    def stats(self) -> dict[str, object]:
        """Steps per shape (``"tree(5,4)": n``), probes, and the last non-probe decision."""
        return {
            "shapes": {str(s): n for s, n in sorted(self.counts_by_shape.items())},
            "probes": self.probes,
            "cost_factors": {
                f"bs{b}:{self.shapes[i]}": round(statistics.median(w), 3)
                for (b, i), w in sorted(self._ratios.items())
                if w
            },
            "reliability": {str(k): round(v, 3) for k, v in sorted(self.reliability.items())},
            "shape_reliability": {
                str(self.shapes[i]): round(v, 3) for i, v in sorted(self.shape_reliability.items())
            },
            "population_reliability": {
                str(k): round(v, 3) for k, v in sorted(self.population_reliability.items())
            },
            "last_decision": str(self.last_decision) if self.last_decision is not None else None,
        }
