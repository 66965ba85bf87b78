"""Running the comparison: engines per mode, interleaved timed repeats, the static sweep.

Why interleaved: the machine is shared and noisy. Within each seed (repeat) and batch size, every
prompt batch is decoded by every mode back to back, in a seed-shuffled order, so a slow minute
hits all modes alike and the per-seed ratios (speedups) are measured side by side.

Timed runs carry no instrumentation. Before them, one untimed *instrumented* pass per batch size
(which doubles as warm-up) decodes every prompt batch with every mode with the expert-union
counter installed on verify forwards; its outputs join the lossless check.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evict.kernels import make_decider
from evict.profiler.table import resolve_widths
from evict.profiler.timing import CLOCKS
from evict.truncation import TruncationPolicy
from evict.truncation.depth import DraftShape

from .hooks import ExpertUnionCounter, MoESpecBudget, chain_hooks, verify_router_hook
from .modes import ModeSpec
from .stats import RunRecord, aggregate

__all__ = [
    "Bench",
    "BenchData",
    "cost_variant",
    "record_from_result",
    "ablation_names",
]

logger = logging.getLogger("evict.bench")

EngineFactory = Callable[[ModeSpec, Any], Any]  # (mode, TruncationPolicy or None) -> engine with generate()


# ------------------------------------------------------------------------- cost-table variants


def ablation_names(table: Any, other_tables: Sequence[Any] = ()) -> list[str]:
    """The profile-mismatch variants run for EVICT (see :func:`cost_variant`)."""
    names = ["scaled:2", "shifted:+", "shifted:-", "other-bs"]
    names += [f"other-device:{i}" for i in range(len(other_tables))]
    return names


def cost_variant(table: Any, name: str, other_tables: Sequence[Any] = ()) -> Any:
    """A (deliberately wrong, for ablations) cost source for EVICT.

    - ``profiled``: the table itself.
    - ``scaled:F``: every latency times F (``CostTable.scaled``). The rule's argmax is
      scale-invariant, so this is a control that should lose nothing.
    - ``shifted:+`` / ``shifted:-``: every verify latency shifted by +/- half the smallest latency
      of the table (``CostTable.shifted``): wider (``+``) or narrower (``-``) trees look cheaper
      relatively than they are.
    - ``other-bs``: the row of the profiled batch size farthest (in log scale) from the running one
      (the profile of the wrong batch size: bs 1 gets the largest profiled row, bs 16 the smallest).
    - ``other-device:i``: the i-th extra table (another device's profile), if one was given.
    """
    if name == "profiled":
        return table
    kind, _, arg = name.partition(":")
    if kind == "scaled":
        return table.scaled(float(arg))
    if kind == "shifted":
        smallest = min(min(r) for r in table.median)
        delta = 0.5 * smallest
        return table.shifted(delta if arg == "+" else -delta)
    if kind == "other-bs":
        bss = list(table.batch_sizes)

        def cost(batch_size: int, widths: torch.Tensor) -> torch.Tensor:
            other = max(bss, key=lambda b: abs(math.log(b) - math.log(max(batch_size, 1))))
            return table.step_cost(other, widths)

        return cost
    if kind == "other-device":
        i = int(arg)
        if i >= len(other_tables):
            raise ValueError(f"ablation {name!r}: only {len(other_tables)} extra cost tables were given")
        return other_tables[i]
    raise ValueError(f"unknown cost-table variant {name!r}: use profiled, scaled:F, shifted:+/-, other-bs")


# ------------------------------------------------------------------------- engine results


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear y(x) over ascending xs (x inside the range)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.0)
    return float(ys[-1])


def _get(obj: Any, names: Sequence[str], default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict):
            if n in obj:
                return obj[n]
        elif hasattr(obj, n):
            return getattr(obj, n)
    return default


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, (int, float)):
        return [x]
    return list(x)


def record_from_result(
    result: Any,
    mode: ModeSpec,
    batch_size: int,
    seed: int,
    wall_s: float,
    prompt_ids: Sequence[int],
    step_cost: Callable[[int, int], float] | None = None,
    time_scale: float = 1.0,
    modeled_step_s: Callable[..., float] | None = None,
) -> RunRecord:
    """Turn the engine's ``GenerationResult`` into a :class:`RunRecord`.

    Reads ``outputs`` (new token ids per request) and per-step stats ``steps`` (each with the
    verified ``width``, per-request ``accepted`` token counts of the active requests, ``draft_s``,
    ``verify_s``, ``decision_s`` and, for EVICT, ``predicted_accepted``). ``step_cost(bs, width)``
    gives EVICT's predicted step time in seconds. ``time_scale`` multiplies the engine's own
    (wall-clock) stage times, to put them on the clock of ``wall_s`` (CPU time over wall time of
    the call when timing by CPU time). ``modeled_step_s(bs, width, real_width, drafted, shape)`` charges
    each decode step from a modeled cost table (``real_width``: real tokens per request, root
    included, below ``width`` when per-request widths padded the batch); the sum is ``modeled_s``.
    """
    outputs = [list(map(int, _as_list(o))) for o in _get(result, ("outputs", "tokens", "output_ids"), [])]
    rec = RunRecord(
        mode=mode.name,
        batch_size=batch_size,
        seed=seed,
        new_tokens=sum(len(o) for o in outputs),
        wall_s=float(wall_s),
        outputs=outputs,
        prompt_ids=list(prompt_ids),
        prefill_s=time_scale * float(_get(result, ("prefill_s", "prefill_time"), 0.0) or 0.0),
    )
    rec.request_emitted = [0] * len(outputs)
    rec.request_steps_each = [0] * len(outputs)
    for st in _get(result, ("steps", "step_stats"), []) or []:
        rec.steps += 1
        active = _as_list(_get(st, ("active",), None))
        accepted = _as_list(_get(st, ("accepted", "accepted_lengths", "accept_lengths"), []))
        if active and len(active) == len(accepted):
            for b, a in zip(active, accepted):
                if 0 <= int(b) < len(outputs):
                    rec.request_emitted[int(b)] += int(a)
                    rec.request_steps_each[int(b)] += 1
        width = int(_get(st, ("width", "verified_width"), 1))
        rec.width_sum += width
        depth = _get(st, ("depth",), None)
        shape = None if depth is None else (int(_get(st, ("topk",), 1) or 1), int(depth))  # (topk, depth)
        if shape is not None:
            label = str(DraftShape(*shape))
            rec.shapes[label] = rec.shapes.get(label, 0) + 1
        if modeled_step_s is not None and active:
            counts = _get(st, ("kept_counts",), None)
            real = width if counts is None else 1.0 + sum(counts) / len(active)
            rec.modeled_s += modeled_step_s(len(active), width, real, mode.kind != "ar", shape)
        acc = [a for a in accepted if a > 0]
        draft, verify, decision, extend = (
            time_scale * float(_get(st, names, 0.0) or 0.0)
            for names in (
                ("draft_s", "draft_time"),
                ("verify_s", "verify_time"),
                ("decision_s", "decision_time"),
                ("extend_s",),
            )
        )
        if len(accepted) == batch_size:  # a full batch: the steady state of a refilled server batch
            emitted = _as_list(_get(st, ("emitted",), None)) or acc  # capped at max_new_tokens
            rec.full_tokens += int(sum(emitted))
            rec.full_s += draft + decision + verify + extend
        rec.request_steps += len(acc)
        rec.emitted += int(sum(acc))
        rec.draft_s += draft
        rec.verify_s += verify
        rec.decision_s += decision
        pred = _as_list(_get(st, ("predicted_accepted", "expected_accepted"), None))
        pred = [p for p in pred if p is not None and math.isfinite(float(p))]
        if mode.kind == "evict" and pred:
            n = len(acc) if acc and len(acc) < len(pred) else len(pred)
            rec.predicted_accepted_sum += float(sum(pred[:n]))
            rec.predicted_count += n
            if len(acc) == len(pred):
                rec.calibration.extend((float(p), int(a)) for p, a in zip(pred, acc))
        pred_ms = _get(st, ("predicted_step_ms",), None)
        if mode.kind == "evict" and pred_ms is not None:
            rec.predicted_step_s_sum += float(pred_ms) / 1000.0
            rec.predicted_step_count += 1
        elif mode.kind == "evict" and step_cost is not None:
            rec.predicted_step_s_sum += step_cost(batch_size, width)
            rec.predicted_step_count += 1
    return rec


# ------------------------------------------------------------------------- the bench


def _timed(engine: Any, batch: list[list[int]], max_new_tokens: int) -> tuple[Any, float, float]:
    """``generate`` timed by the wall clock and by this process's CPU time."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = engine.generate(batch, max_new_tokens)
    return result, time.perf_counter() - t0, time.process_time() - c0


@dataclass
class BenchData:
    """Everything a run produced: timed and instrumented records, sweep results, metadata."""

    records: list[RunRecord] = field(default_factory=list)
    instrumented: list[RunRecord] = field(default_factory=list)
    sweep: dict[int, list[tuple[tuple[int, int, int], float]]] = field(default_factory=dict)
    modes: dict[int, list[ModeSpec]] = field(default_factory=dict)  # per batch size
    acceptance_priors: dict[str, dict[str, Any]] = field(default_factory=dict)  # per calibrated mode
    meta: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs modes on prompt batches through engines built by ``engine_factory``.

    ``engine_factory(mode, cost_source)`` returns an object with
    ``generate(prompts: list[list[int]], max_new_tokens: int) -> GenerationResult``;
    ``target`` is the model whose forward the router hooks wrap, ``num_experts`` its expert count.
    """

    def __init__(
        self,
        engine_factory: EngineFactory,
        target: torch.nn.Module,
        num_experts: int,
        table: Any = None,
        other_tables: Sequence[Any] = (),
        norm_topk_prob: bool = True,
        log: Callable[[str], None] = print,
        clock: str = "wall",
        decision: str = "immediate",
        backend: str = "torch",
        pad_cost: float = 1.0,
        modeled_table: Any = None,
    ) -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.clock = clock
        self.engine_factory = engine_factory
        self.target = target
        self.num_experts = int(num_experts)
        self.table = table
        self.other_tables = list(other_tables)
        self.norm_topk_prob = norm_topk_prob
        self.log = log
        self.decision = decision
        self.backend = backend
        self.pad_cost = float(pad_cost)
        self.modeled_table = modeled_table
        self.modeled_pad_cost = float(
            (getattr(modeled_table, "metadata", None) or {}).get("padding_cost", 1.0)
        )
        self._engines: dict[str, Any] = {}

    @staticmethod
    def _engine_key(mode: ModeSpec) -> str:
        return (
            f"{mode.name}|{mode.tree}|{mode.cost}|{mode.budget}|{mode.decision}|{mode.acceptance}"
            f"|{mode.per_request}|{mode.whole_step}"
        )

    def engine(self, mode: ModeSpec) -> Any:
        """The (cached) engine of a mode; EVICT modes get their cost-table variant."""
        key = self._engine_key(mode)
        if key not in self._engines:
            policy = None
            if mode.kind == "evict":
                if self.table is None:
                    raise ValueError("EVICT needs a cost table: pass --cost-table PATH")
                pad_cost = self.pad_cost
                if mode.cost == "modeled":  # EVICT deciding from the modeled GPU table
                    if self.modeled_table is None:
                        raise ValueError("mode with cost 'modeled' needs --modeled-gpu-table PATH")
                    cost, pad_cost = self.modeled_table, self.modeled_pad_cost
                else:
                    cost = cost_variant(self.table, mode.cost, self.other_tables)
                widths = resolve_widths(mode.num_draft, table_widths=self.table.widths)
                decision = mode.decision or self.decision
                policy = TruncationPolicy(
                    cost,
                    widths=widths,
                    decision=decision,
                    decider=make_decider(self.backend),
                    per_request=mode.per_request,
                    pad_cost=pad_cost,
                )
            self._engines[key] = self.engine_factory(mode, policy)
        return self._engines[key]

    def acceptance_reports(self) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, Any]]]:
        """Per EVICT mode with a calibrated estimator: (reliability per depth, learned state as a prior)."""
        rel, priors = {}, {}
        for key, engine in self._engines.items():
            est = getattr(engine, "acceptance", None)
            if est is not None and est.enabled:
                name = key.split("|")[0]
                rel[name], priors[name] = est.reliability(), est.state_dict()
        return rel, priors

    def depth_reports(self) -> dict[str, dict[str, Any]]:
        """Per whole-step EVICT mode: steps per draft shape, probes and per-family reliability."""
        return {
            key.split("|")[0]: engine.depth.stats()
            for key, engine in self._engines.items()
            if getattr(engine, "depth", None) is not None
        }

    def _step_cost_s(self, batch_size: int, width: int) -> float:
        return float(self.table.step_cost(batch_size, [width])[0]) / 1000.0

    def _modeled_step_s(
        self, batch_size: int, width: int, real: float, drafted: bool, shape: tuple[int, int] | None = None
    ) -> float:
        """One decode step charged from the modeled table: the real tokens' cost, plus padding at
        the table's ``padding_cost``; drafting priced for the ``(topk, depth)`` the step drafted when
        the table prices it (``draft_ms``), else the table's own tree's (``fixed_ms``), and none
        when nothing was drafted (autoregressive)."""
        t = self.modeled_table
        full, real_t = (float(v) for v in t.step_cost(batch_size, [float(width), float(real)]))
        ms = real_t + self.modeled_pad_cost * (full - real_t)
        own = getattr(t, "draft_tree", None)
        priced = getattr(t, "draft_shapes", None) or {}
        if drafted and shape is not None and own is not None and priced.get(shape[0], -1) >= shape[1]:
            ms += t.draft_cost(batch_size, shape[0], shape[1]) - t.draft_cost(batch_size, own[1], own[0])
        elif not drafted and t.fixed_ms is not None:  # autoregressive: no drafter forwards
            bss = [float(b) for b in t.batch_sizes]
            b = min(max(float(batch_size), bss[0]), bss[-1])
            ms -= _interp(b, bss, [float(f) for f in t.fixed_ms])
        return ms / 1000.0

    def run_one(
        self,
        mode: ModeSpec,
        prompts: Sequence[Sequence[int]],
        prompt_ids: Sequence[int],
        batch_size: int,
        seed: int,
        max_new_tokens: int,
        instrument: bool = False,
    ) -> RunRecord:
        """Decode one prompt batch with one mode and time the whole ``generate`` call."""
        engine = self.engine(mode)
        budget = MoESpecBudget(mode.budget, self.norm_topk_prob) if mode.kind == "moe-spec" else None
        counter = ExpertUnionCounter(self.num_experts) if instrument else None
        batch = [list(p) for p in prompts]
        if hasattr(engine, "router_hook"):  # the engine passes it to verify forwards only
            saved = engine.router_hook
            engine.router_hook = chain_hooks(saved, budget, counter)
            try:
                result, wall, cpu = _timed(engine, batch, max_new_tokens)
            finally:
                engine.router_hook = saved
        else:  # wrap the target's forward, skipping prefills
            with verify_router_hook(self.target, budget, counter):
                result, wall, cpu = _timed(engine, batch, max_new_tokens)
        if mode.kind == "oracle":  # the look-ahead that finds the accepted path is not charged
            wall -= float(getattr(result, "lookahead_s", 0.0))
            cpu -= float(getattr(result, "lookahead_cpu_s", 0.0))
        rec = record_from_result(
            result,
            mode,
            batch_size,
            seed,
            cpu if self.clock == "cpu" else wall,
            prompt_ids,
            self._step_cost_s if (self.table is not None and mode.kind == "evict") else None,
            time_scale=(cpu / wall if wall > 0 else 1.0) if self.clock == "cpu" else 1.0,
            modeled_step_s=self._modeled_step_s if self.modeled_table is not None else None,
        )
        if counter is not None:
            rec.union_sum, rec.union_count = counter.take()
        return rec

    def run_batches(
        self,
        modes: Sequence[ModeSpec],
        prompts: Sequence[Sequence[int]],
        batch_size: int,
        seed: int,
        max_new_tokens: int,
        instrument: bool = False,
        shuffle: bool = True,
        max_batches: int | None = None,
    ) -> list[RunRecord]:
        """Prompt batches of one batch size (the first ``max_batches``, default all), every mode per
        batch, in an order shuffled by ``seed``."""
        rng = random.Random(seed * 1_000_003 + batch_size * 2 + int(instrument))
        out = []
        idx = list(range(len(prompts)))
        starts = list(range(0, len(idx) - batch_size + 1, batch_size))
        for start in starts[:max_batches] if max_batches else starts:
            ids = idx[start : start + batch_size]
            order = list(modes)
            if shuffle:
                rng.shuffle(order)
            for m in order:
                out.append(
                    self.run_one(
                        m,
                        [prompts[i] for i in ids],
                        ids,
                        batch_size,
                        seed,
                        max_new_tokens,
                        instrument=instrument,
                    )
                )
        return out

    def sweep(
        self,
        grid: Sequence[tuple[int, int, int]],
        prompts: Sequence[Sequence[int]],
        batch_size: int,
        max_new_tokens: int,
    ) -> list[tuple[tuple[int, int, int], float]]:
        """Tokens/s of every static configuration on calibration prompts, best first."""
        modes = [
            ModeSpec(name=f"sweep{t}", kind="static", steps=t[0], topk=t[1], num_draft=t[2]) for t in grid
        ]
        # warm each engine once on a single short batch, then one timed interleaved pass
        self.run_batches(modes, prompts[:batch_size], batch_size, -1, min(8, max_new_tokens))
        recs = self.run_batches(modes, prompts, batch_size, -1, max_new_tokens)
        agg = aggregate(recs)
        res = [(m.tree, agg[(m.name, batch_size, -1)].tokens_per_s) for m in modes]
        for m in modes:  # sweep engines are not reused
            self._engines.pop(self._engine_key(m), None)
        return sorted(res, key=lambda x: -x[1])
