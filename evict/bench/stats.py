"""The benchmark's arithmetic: per-run records, aggregation, paired speedups, spreads, checks.

Why a separate module: every number in the report comes from here, so it is tested on fake
records without running a model. Conventions:

- A *record* (:class:`RunRecord`) is one ``generate`` call: one mode, one batch size, one seed
  (repeat), one batch of prompts.
- Records of one (mode, batch size, seed) are summed into a :class:`ModeSeed` and derived
  quantities (tokens/s, accepted length, ...) are ratios of sums, not means of ratios.
- Speedups are *paired*: mode A over mode B is computed per seed from runs interleaved in the
  same repeat, then summarized over seeds as mean and min-max (:class:`Spread`).
- "Accepted length" is tokens emitted per request per step, the bonus/correction token included
  (so autoregressive decoding has exactly 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

__all__ = [
    "RunRecord",
    "ModeSeed",
    "Spread",
    "LosslessError",
    "aggregate",
    "paired_ratio",
    "target_efficiency",
    "check_lossless",
    "mismatch_rate",
    "first_divergence",
    "accepted_by_group",
    "calibration_bins",
    "slower_than_by_more_than_spread",
]


@dataclass(kw_only=True)
class _Totals:
    """The additive measurements: a record carries them, a :class:`ModeSeed` sums them."""

    new_tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    steps: int = 0
    request_steps: int = 0
    emitted: int = 0
    width_sum: int = 0
    union_sum: float = 0.0
    union_count: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    decision_s: float = 0.0
    predicted_accepted_sum: float = 0.0
    predicted_count: int = 0
    predicted_step_s_sum: float = 0.0
    predicted_step_count: int = 0
    modeled_s: float = 0.0  # decode steps charged from a modeled (GPU-shaped) cost table, not timed
    # decode steps while every request of the batch was still generating (a full batch, as a
    # continuously batched server keeps it): their emitted tokens and their step times
    full_tokens: int = 0
    full_s: float = 0.0


_SUM_FIELDS = tuple(f.name for f in fields(_Totals))


@dataclass(kw_only=True)
class RunRecord(_Totals):
    """Measurements of one ``generate`` call (one prompt batch) of one mode.

    Times are seconds. ``steps`` counts decode steps of the batch (one verify forward each);
    ``request_steps`` counts (request, step) pairs where the request was still generating and
    ``emitted`` the tokens those pairs produced, so ``emitted / request_steps`` is the accepted
    length. ``union_sum`` is the sum over verify forwards of the mean per-layer expert union.
    ``predicted_*`` are EVICT's own predictions (cost table and drafter scores), 0 for other modes.
    """

    mode: str
    batch_size: int
    seed: int
    new_tokens: int = field()  # required for a record (no inherited default): every call measures them
    wall_s: float = field()
    outputs: list[list[int]] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # indices into the prompt set
    request_emitted: list[int] = field(default_factory=list)  # per request (prompt_ids order)
    request_steps_each: list[int] = field(default_factory=list)  # steps each request was active
    calibration: list[tuple[float, int]] = field(default_factory=list)  # EVICT: (predicted B, accepted)
    shapes: dict[str, int] = field(
        default_factory=dict
    )  # decode steps per draft shape ("tree(5,4)", "plain")


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(kw_only=True)
class ModeSeed(_Totals):
    """Sum of the records of one (mode, batch size, seed), with the derived ratios as properties."""

    mode: str
    batch_size: int
    seed: int
    records: int = 0

    def add(self, r: RunRecord) -> None:
        """Accumulate one record (same mode, batch size and seed)."""
        if (r.mode, r.batch_size, r.seed) != (self.mode, self.batch_size, self.seed):
            raise ValueError(
                f"record ({r.mode}, bs={r.batch_size}, seed={r.seed}) added to "
                f"({self.mode}, bs={self.batch_size}, seed={self.seed})"
            )
        for f in _SUM_FIELDS:
            setattr(self, f, getattr(self, f) + getattr(r, f))
        self.records += 1

    @property
    def tokens_per_s(self) -> float:
        """End-to-end throughput: new tokens over the wall time of the generate calls."""
        return _div(self.new_tokens, self.wall_s)

    @property
    def modeled_tokens_per_s(self) -> float:
        """New tokens over the *modeled* decode time (each step charged from the modeled table)."""
        return _div(self.new_tokens, self.modeled_s)

    @property
    def full_batch_tokens_per_s(self) -> float:
        """Tokens over the step time of the full-batch decode steps: the steady state of a server
        that refills its batch, without the static batch's tail (requests that finish at different
        steps leave ever smaller batches behind) and without prefill."""
        return _div(self.full_tokens, self.full_s)

    @property
    def accepted_length(self) -> float:
        """Tokens emitted per request per step (bonus token included; 1 for autoregressive)."""
        return _div(self.emitted, self.request_steps)

    @property
    def mean_width(self) -> float:
        """Verified width per step, root included (1 for autoregressive)."""
        return _div(self.width_sum, self.steps)

    @property
    def mean_union(self) -> float:
        """Experts activated per verify step: mean over layers and steps of the per-layer union."""
        return _div(self.union_sum, self.union_count)

    @property
    def decode_s(self) -> float:
        """Wall time outside prefill (all of it when the engine does not report prefill)."""
        return self.wall_s - self.prefill_s

    @property
    def step_s(self) -> float:
        """Measured mean decode-step time (decode wall time over steps)."""
        return _div(self.decode_s, self.steps)

    @property
    def decision_share(self) -> float:
        """Share of the decode time spent choosing the width (EVICT's own overhead)."""
        return _div(self.decision_s, self.decode_s)

    @property
    def predicted_accepted(self) -> float:
        """EVICT's predicted accepted length B(m*) per request-step (nan for other modes)."""
        return _div(self.predicted_accepted_sum, self.predicted_count)

    @property
    def predicted_step_s(self) -> float:
        """EVICT's predicted step time T(bs, m*) from the cost table (nan for other modes)."""
        return _div(self.predicted_step_s_sum, self.predicted_step_count)


def aggregate(records: Iterable[RunRecord]) -> dict[tuple[str, int, int], ModeSeed]:
    """Sum records per (mode, batch size, seed)."""
    out: dict[tuple[str, int, int], ModeSeed] = {}
    for r in records:
        key = (r.mode, r.batch_size, r.seed)
        if key not in out:
            out[key] = ModeSeed(mode=r.mode, batch_size=r.batch_size, seed=r.seed)
        out[key].add(r)
    return out


@dataclass(frozen=True)
class Spread:
    """Mean and min-max of a quantity over seeds (repeats)."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Spread of the finite values (nan spread when there are none)."""
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(sum(vals) / len(vals), min(vals), max(vals), len(vals))

    @property
    def width(self) -> float:
        """hi - lo: the run-to-run spread (0 with one seed)."""
        return self.hi - self.lo

    def fmt(self, digits: int = 2, suffix: str = "") -> str:
        """``mean [lo-hi]`` (just ``mean`` with one seed or no spread; ``-`` when undefined)."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "-"
        m = f"{self.mean:.{digits}f}{suffix}"
        if self.n == 1 or f"{self.lo:.{digits}f}" == f"{self.hi:.{digits}f}":
            return m
        return f"{m} [{self.lo:.{digits}f}-{self.hi:.{digits}f}]"

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "min": self.lo, "max": self.hi, "n": self.n}


def _seeds(stats: Mapping[tuple[str, int, int], ModeSeed], mode: str, bs: int) -> dict[int, ModeSeed]:
    return {s: v for (m, b, s), v in stats.items() if m == mode and b == bs}


def paired_ratio(
    stats: Mapping[tuple[str, int, int], ModeSeed],
    num: str,
    den: str,
    batch_size: int,
    attr: str = "tokens_per_s",
) -> Spread:
    """Per-seed ratio attr(num) / attr(den) (tokens/s by default), over the seeds both modes ran in."""
    a, b = _seeds(stats, num, batch_size), _seeds(stats, den, batch_size)
    return Spread.of(_div(getattr(a[s], attr), getattr(b[s], attr)) for s in sorted(set(a) & set(b)))


def target_efficiency(
    stats: Mapping[tuple[str, int, int], ModeSeed], mode: str, batch_size: int, baseline: str = "ar"
) -> Spread:
    """MoESD's target efficiency: measured speedup over what acceptance alone would give.

    With free verification (and free drafting) a step that emits ``tau`` tokens per request costs
    one autoregressive step, so the ideal speedup is ``tau`` (the accepted length). The ratio
    ``speedup / tau`` is 1 for a perfect system and falls as verification (expert loading) and
    drafting cost grow; equivalently it is the autoregressive step time over the speculative one.
    """
    a, b = _seeds(stats, mode, batch_size), _seeds(stats, baseline, batch_size)
    vals = []
    for s in sorted(set(a) & set(b)):
        speedup = _div(a[s].tokens_per_s, b[s].tokens_per_s)
        vals.append(_div(speedup, a[s].accepted_length))
    return Spread.of(vals)


def slower_than_by_more_than_spread(ratio: Spread) -> bool:
    """True when mode A is slower than mode B by more than the run-to-run spread.

    ``ratio`` is the paired A/B tokens/s ratio over seeds. The slowdown ``1 - mean`` is compared
    with the spread ``max - min`` of the ratio itself; with one seed there is no spread, so any
    slowdown counts.
    """
    if ratio.n == 0:
        return False
    return (1.0 - ratio.mean) > ratio.width


class LosslessError(RuntimeError):
    """A lossless mode produced different greedy tokens than autoregressive decoding."""


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def check_lossless(
    outputs: Mapping[tuple[str, int, int, int], Sequence[int]],
    reference: str = "ar",
    lossy: Iterable[str] = (),
) -> int:
    """Raise :class:`LosslessError` unless every lossless mode's greedy output equals the reference.

    ``outputs`` maps (mode, batch size, seed, prompt index) to generated token ids. Outputs are
    compared with the reference mode's output for the same batch size, seed and prompt. Returns
    the number of comparisons made (0 would mean nothing was checked, also an error).
    """
    lossy = set(lossy)
    bad: list[str] = []
    checked = 0
    for (mode, bs, seed, p), toks in sorted(outputs.items()):
        if mode == reference or mode in lossy:
            continue
        ref = outputs.get((reference, bs, seed, p))
        if ref is None:
            raise LosslessError(
                f"no {reference!r} output for bs={bs} seed={seed} prompt={p}: "
                f"the lossless check needs the reference mode in every batch"
            )
        checked += 1
        i = _first_diff(list(ref), list(toks))
        if i >= 0:
            bad.append(
                f"  mode {mode!r} bs={bs} seed={seed} prompt={p}: first difference at token {i} "
                f"({reference}: {list(ref[i : i + 5])} vs {mode}: {list(toks[i : i + 5])}; "
                f"lengths {len(ref)} vs {len(toks)})"
            )
    if bad:
        raise LosslessError(
            f"LOSSLESS CHECK FAILED: {len(bad)} of {checked} greedy outputs differ from {reference!r}:\n"
            + "\n".join(bad[:20])
            + ("\n  ..." if len(bad) > 20 else "")
        )
    if checked == 0:
        raise LosslessError("lossless check compared nothing: no lossless mode besides the reference ran")
    return checked


def first_divergence(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Mean number of tokens ``other`` matches ``reference`` before the first difference.

    A complementary view of a lossy mode: greedy outputs usually differ everywhere after the first
    changed token, so the position of that token says more than the mismatch rate alone.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs but {len(other)} outputs to compare")
    if not reference:
        return float("nan")
    total = 0
    for ref, out in zip(reference, other):
        i = _first_diff(list(ref), list(out))
        total += len(ref) if i < 0 else i
    return total / len(reference)


def accepted_by_group(records: Iterable[RunRecord], group_of: Mapping[int, str]) -> dict[str, float]:
    """Accepted length per prompt group (e.g. domain): emitted over active steps, per request summed."""
    em: dict[str, int] = {}
    st: dict[str, int] = {}
    for r in records:
        for p, e, n in zip(r.prompt_ids, r.request_emitted, r.request_steps_each):
            g = group_of.get(p)
            if g is None:
                continue
            em[g] = em.get(g, 0) + e
            st[g] = st.get(g, 0) + n
    return {g: _div(em[g], st[g]) for g in sorted(em)}


def calibration_bins(pairs: Sequence[tuple[float, int]], bins: int = 8) -> list[dict[str, float]]:
    """Predicted vs realized accepted length, binned by prediction (equal-count bins).

    Each bin reports the mean prediction, the mean realized accepted length and its size; a
    calibrated predictor lies on the diagonal.
    """
    ordered = sorted(pairs)
    if not ordered:
        return []
    bins = max(1, min(bins, len(ordered)))
    out = []
    for i in range(bins):
        chunk = ordered[i * len(ordered) // bins : (i + 1) * len(ordered) // bins]
        if chunk:
            out.append(
                {
                    "predicted": sum(p for p, _ in chunk) / len(chunk),
                    "realized": sum(a for _, a in chunk) / len(chunk),
                    "n": len(chunk),
                }
            )
    return out


def mismatch_rate(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Fraction of reference token positions where ``other`` differs (missing tokens count as wrong).

    Used for the lossy MoE-Spec peer: position-wise comparison with autoregressive greedy output.
    Extra tokens beyond the reference length are ignored.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs but {len(other)} outputs to compare")
    total = wrong = 0
    for ref, out in zip(reference, other):
        total += len(ref)
        for i, t in enumerate(ref):
            if i >= len(out) or out[i] != t:
                wrong += 1
    return _div(wrong, total)
