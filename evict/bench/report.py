"""The benchmark report: summary numbers, the Markdown tables, the JSON and the PNG plots.

:func:`summarize` turns raw records into one JSON-ready dict (the single source for the Markdown
and the plots); :func:`render_markdown` prints it; :func:`save_plots` draws it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .runner import BenchData
from .stats import (
    ModeSeed,
    Spread,
    accepted_by_group,
    aggregate,
    calibration_bins,
    first_divergence,
    mismatch_rate,
    paired_ratio,
    slower_than_by_more_than_spread,
    target_efficiency,
)

__all__ = ["summarize", "render_markdown", "save_plots", "check_targets"]

# the targets on CPU with the shipped pair
TARGET_VS_AR_BS1 = 2.0
TARGET_VS_SGLANG_DEFAULT = 1.25


def _spread_over(stats: dict, mode: str, bs: int, attr: str) -> Spread:
    return Spread.of(getattr(v, attr) for (m, b, _), v in stats.items() if m == mode and b == bs)


def _pooled(instr: dict[tuple[str, int, int], ModeSeed], mode: str, bs: int) -> ModeSeed | None:
    rows = [v for (m, b, _), v in instr.items() if m == mode and b == bs]
    return rows[0] if rows else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summarize(data: BenchData) -> dict[str, Any]:
    """Per batch size and mode: throughput, speedups, acceptance, width, experts, predictions."""
    stats = aggregate(data.records)
    instr = aggregate(data.instrumented)
    out: dict[str, Any] = {"meta": data.meta, "batch_sizes": {}}
    for bs, modes in sorted(data.modes.items()):
        names = [m.name for m in modes]
        evict = next((m.name for m in modes if m.role == "evict"), None)
        evict_cal = next((m.name for m in modes if m.role == "evict-cal"), None)
        evict_step = next((m.name for m in modes if m.role == "evict-step"), None)
        oracle = next((m.name for m in modes if m.role == "oracle"), None)
        statics = [m for m in modes if m.kind == "static"]
        rows = []
        for m in modes:
            tps = _spread_over(stats, m.name, bs, "tokens_per_s")
            if tps.n == 0:
                continue
            ins = _pooled(instr, m.name, bs)
            row: dict[str, Any] = {
                "mode": m.name,
                "kind": m.kind,
                "role": m.role,
                "tree": list(m.tree) if m.kind != "ar" else None,
                "cost": m.cost if m.kind == "evict" else None,
                "decision": m.decision if m.kind == "evict" else None,
                "lossy": m.lossy,
                "tokens_per_s": tps.to_dict(),
                "speedup_vs_ar": paired_ratio(stats, m.name, "ar", bs).to_dict() if "ar" in names else None,
                "evict_over_this": paired_ratio(stats, evict, m.name, bs).to_dict() if evict else None,
                "calibrated_over_this": paired_ratio(stats, evict_cal, m.name, bs).to_dict()
                if evict_cal
                else None,
                "oracle_over_this": paired_ratio(stats, oracle, m.name, bs).to_dict() if oracle else None,
                "step_over_this": paired_ratio(stats, evict_step, m.name, bs).to_dict()
                if evict_step
                else None,
                "step_over_this_full_batch": paired_ratio(
                    stats, evict_step, m.name, bs, "full_batch_tokens_per_s"
                ).to_dict()
                if evict_step
                else None,
                "accepted_length": _spread_over(stats, m.name, bs, "accepted_length").to_dict(),
                "modeled_tokens_per_s": _spread_over(stats, m.name, bs, "modeled_tokens_per_s").to_dict(),
                "mean_width": _spread_over(stats, m.name, bs, "mean_width").to_dict(),
                "experts_per_verify": _num(ins.mean_union) if ins else None,
                "target_efficiency": target_efficiency(stats, m.name, bs).to_dict()
                if "ar" in names
                else None,
                "decision_share": _spread_over(stats, m.name, bs, "decision_share").to_dict(),
                "step_ms": {
                    k: v * 1000 for k, v in _spread_over(stats, m.name, bs, "step_s").to_dict().items()
                }
                | {"n": _spread_over(stats, m.name, bs, "step_s").n},
            }
            shapes: dict[str, int] = {}
            for r in data.records:
                if r.mode == m.name and r.batch_size == bs:
                    for k, v in r.shapes.items():
                        shapes[k] = shapes.get(k, 0) + v
            if m.whole_step or m.kind == "adaptive":
                row["draft_shapes"] = dict(sorted(shapes.items(), key=lambda kv: -kv[1]))
            if m.kind == "evict":
                pairs = [
                    c for r in data.records if r.mode == m.name and r.batch_size == bs for c in r.calibration
                ]
                row["calibration"] = calibration_bins(pairs)
                row["predicted_accepted"] = _spread_over(stats, m.name, bs, "predicted_accepted").to_dict()
                row["predicted_step_ms"] = {
                    k: (v * 1000 if k != "n" else v)
                    for k, v in _spread_over(stats, m.name, bs, "predicted_step_s").to_dict().items()
                }
            if m.lossy and "ar" in names:
                ref, got = _outputs(data, "ar", bs), _outputs(data, m.name, bs)
                keys = sorted(set(ref) & set(got))
                row["mismatch_rate"] = _num(mismatch_rate([ref[k] for k in keys], [got[k] for k in keys]))
                row["first_divergence"] = _num(
                    first_divergence([ref[k] for k in keys], [got[k] for k in keys])
                )
            domains = data.meta.get("prompt_domains")
            if domains:
                recs = [r for r in data.records if r.mode == m.name and r.batch_size == bs]
                row["accepted_by_domain"] = {
                    k: _num(v) for k, v in accepted_by_group(recs, dict(enumerate(domains))).items()
                }
            rows.append(row)
        best_static = next((m.name for m in modes if m.role == "best-static"), None)
        if best_static is None and data.sweep.get(bs):  # the sweep's winner was already listed
            winner = tuple(data.sweep[bs][0][0])
            best_static = next((m.name for m in statics if m.tree == winner), None)
        if best_static is None and statics:
            best_static = max(
                statics, key=lambda m: _spread_over(stats, m.name, bs, "tokens_per_s").mean
            ).name
        static_rows = [r for r in rows if r["kind"] == "static" and math.isfinite(r["tokens_per_s"]["mean"])]
        fastest = max(static_rows, key=lambda r: r["tokens_per_s"]["mean"])["mode"] if static_rows else None
        out["batch_sizes"][str(bs)] = {
            "rows": rows,
            "evict": evict,
            "evict_cal": evict_cal,
            "evict_step": evict_step,
            "sglang_adaptive": next((m.name for m in modes if m.role == "sglang-adaptive"), None),
            "oracle": oracle,
            "best_static": best_static,
            "fastest_static": fastest,
            "sglang_default": next((m.name for m in modes if m.role == "sglang-default"), None),
            "sweep": [{"tree": list(t), "tokens_per_s": v} for t, v in data.sweep.get(bs, [])],
        }
    out["targets"] = check_targets(out)
    return out


def _shape_mix(row: dict | None) -> str:
    shapes = (row or {}).get("draft_shapes") or {}
    total = sum(shapes.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shapes.items()) if total else "-"


def _verdict(peers: list[tuple[str, dict]]) -> str:
    """'(label): ratio, verdict' for the peer EVICT does worst against (the best of the peers)."""
    label, worst = min(peers, key=lambda p: p[1]["mean"])
    verdict = "not slower" if worst["mean"] >= 1.0 else ("within spread" if worst["max"] >= 1.0 else "SLOWER")
    return f"({label}): {_fmt(worst)}x, {verdict}"


def _whole_step_lines(s: dict, bs: str) -> list[str]:
    """EVICT deciding the whole step against AR, SGLang's default and adaptive chains, the best
    static tree and width-only EVICT (issue 20's target: never slower than the best of the first three)."""
    me = _row(s, s.get("evict_step"))
    if not me:
        return []
    parts, peers, full = [], [], []
    for label, name in (
        ("AR", "ar"),
        ("SGLang default", s.get("sglang_default")),
        ("SGLang adaptive", s.get("sglang_adaptive")),
        ("best static", s.get("best_static")),
        ("EVICT width only", s.get("evict")),
    ):
        other = _row(s, name)
        ratio = (other or {}).get("step_over_this")
        if ratio and ratio.get("n"):
            parts.append(f"{_fmt(ratio)}x {label}")
            if label in ("AR", "SGLang default", "SGLang adaptive"):
                peers.append((label, ratio))
                steady = other.get("step_over_this_full_batch")
                if steady and steady.get("n"):
                    full.append((label, steady))
    L = [f"EVICT whole step (bs {bs}), per-seed paired tokens/s ratio: " + ", ".join(parts) + "."]
    if peers:
        L.append(f"Against the best of AR, SGLang's default and adaptive {_verdict(peers)}.")
    if full and int(bs) > 1:  # at bs 1 every step is a full-batch step
        L.append(
            "Full-batch decode steps only (the steady state of a server that refills its batch: no "
            "static-batch tail, no prefill): "
            + ", ".join(f"{_fmt(r)}x {label}" for label, r in full)
            + f"; against the best of the three {_verdict(full)}."
        )
    L.append(f"Draft shapes chosen: {_shape_mix(me)}.")
    adaptive = _row(s, s.get("sglang_adaptive"))
    if adaptive:
        L.append(f"SGLang adaptive chain lengths: {_shape_mix(adaptive)}.")
    return [*L, ""]


def _calibrated_lines(s: dict, bs: str, meta: dict, first: bool) -> list[str]:
    """EVICT with the acceptance estimator against raw EVICT, the static baselines and the oracle cut."""
    L: list[str] = []
    cal, orc = _row(s, s.get("evict_cal")), _row(s, s.get("oracle"))
    if cal and cal.get("predicted_accepted"):
        L.append(
            f"EVICT calibrated, prediction vs measurement (bs {bs}): accepted length predicted "
            f"{_fmt(cal['predicted_accepted'])} vs measured {_fmt(cal['accepted_length'])}."
        )
        L.append("")
    ratios = []
    for label, name, row in (
        ("raw EVICT", s.get("evict"), cal),
        ("best static", s.get("best_static"), cal),
        ("SGLang default", s.get("sglang_default"), cal),
    ):
        other = _row(s, name)
        if row and other:
            inv = other.get("calibrated_over_this")
            if inv and inv.get("mean") is not None:
                ratios.append(f"{_fmt(inv)}x {label}")
    if ratios:
        L.append(f"EVICT calibrated (bs {bs}), per-seed paired tokens/s ratio: " + ", ".join(ratios) + ".")
        L.append("")
    if orc:
        parts = []
        for label, name in (("raw EVICT", s.get("evict")), ("calibrated EVICT", s.get("evict_cal"))):
            other = _row(s, name)
            if other and other.get("oracle_over_this") and other["oracle_over_this"].get("mean") is not None:
                parts.append(f"{_fmt(other['oracle_over_this'])}x {label}")
        if parts:
            L.append(
                f"Oracle cut (bs {bs}; same draft tree, verifies only the accepted path, its look-ahead not "
                f"charged): {', '.join(parts)} -- the headroom any cut could still gain."
            )
            L.append("")
    rel = (meta.get("acceptance_reliability") or {}).get(s.get("evict_cal") or "", [])
    if rel and first:
        L.append(
            "Reliability per depth (whole run, all batch sizes; trials = verified nodes whose parent was "
            "accepted): mean raw drafter conditional, mean calibrated conditional, realized acceptance rate."
        )
        L.append("")
        L.append("| depth | trials | raw | calibrated | realized |")
        L.append("|---|---|---|---|---|")
        for r in rel:
            L.append(
                f"| {r['depth']} | {r['trials']} | {r['raw']:.3f} | {r['calibrated']:.3f} | {r['realized']:.3f} |"
            )
        L.append("")
    return L


def _modeled_lines(s: dict, bs: str, meta: dict) -> list[str]:
    """The MODELED-GPU table of one batch size: every step of the same runs charged from the modeled
    table (decode only, prefill left out), and each row's ratio to SGLang's default and to the best
    static row under that model.  Only the '@gpu' EVICT rows decided from the modeled table."""
    rows = [
        r
        for r in s["rows"]
        if (r.get("modeled_tokens_per_s") or {}).get("mean") not in (None,)
        and math.isfinite(r["modeled_tokens_per_s"]["mean"])
        and r["role"] != "ablation"
        and not r["lossy"]
    ]
    if not rows:
        return []

    def tps(name: str | None) -> float:
        r = _row(s, name)
        return r["modeled_tokens_per_s"]["mean"] if r else float("nan")

    statics = [r for r in rows if r["kind"] == "static"]
    best = max(statics, key=lambda r: r["modeled_tokens_per_s"]["mean"]) if statics else None
    ar, sg = tps("ar"), tps(s.get("sglang_default"))
    L = [
        f"**MODELED GPU (bs {bs}), not measured:** the same runs, each decode step charged from "
        f"`{meta.get('modeled_gpu_table')}` (a bandwidth model of Qwen3-30B-A3B on H100, see its metadata); "
        f"'@gpu' rows are EVICT deciding from that table, other EVICT rows decided from the CPU table. "
        f"Best static under the model: {best['mode'] if best else '-'}.",
        "",
        "| mode | modeled tokens/s | vs AR | vs SGLang default | vs best static (modeled) | verified width |",
        "|---|---|---|---|---|---|",
    ]
    bt = best["modeled_tokens_per_s"]["mean"] if best else float("nan")
    for r in rows:
        v = r["modeled_tokens_per_s"]["mean"]
        L.append(
            f"| {r['mode']} | {v:.1f} | {v / ar:.2f}x | {v / sg:.2f}x | {v / bt:.2f}x | {_fmt(r['mean_width'])} |"
        )
    L.append("")
    return L


def _outputs(data: BenchData, mode: str, bs: int) -> dict[tuple[int, int], list[int]]:
    res = {}
    for r in data.records + data.instrumented:
        if r.mode == mode and r.batch_size == bs:
            for p, o in zip(r.prompt_ids, r.outputs):
                res[(r.seed, p)] = o
    return res


def _row(summary_bs: dict, name: str | None) -> dict | None:
    return next((r for r in summary_bs["rows"] if r["mode"] == name), None) if name else None


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: EVICT >= 2x AR at bs 1, >= 1.25x SGLang's default, ~>= best static."""
    res = []
    for bs, s in summary["batch_sizes"].items():
        ev = _row(s, s["evict"])
        if ev is None:
            continue
        if bs == "1" and ev["speedup_vs_ar"]:
            v = ev["speedup_vs_ar"]["mean"]
            res.append(
                {
                    "bs": int(bs),
                    "target": f"EVICT >= {TARGET_VS_AR_BS1}x autoregressive",
                    "value": v,
                    "met": bool(v >= TARGET_VS_AR_BS1),
                }
            )
        d = _row(s, s["sglang_default"])
        if d and d["evict_over_this"]:
            v = d["evict_over_this"]["mean"]
            res.append(
                {
                    "bs": int(bs),
                    "target": f"EVICT >= {TARGET_VS_SGLANG_DEFAULT}x SGLang default {d['mode']}",
                    "value": v,
                    "met": bool(v >= TARGET_VS_SGLANG_DEFAULT),
                }
            )
        names = [s["best_static"]]
        if s.get("fastest_static") not in names:
            names.append(s.get("fastest_static"))
        first = "best static (sweep)" if s["sweep"] else "fastest listed static"
        for which, name in zip((first, "fastest static of this run, post hoc"), names):
            b = _row(s, name)
            if not b or not b["evict_over_this"]:
                continue
            sp = Spread(
                **{
                    k2: b["evict_over_this"][k1]
                    for k1, k2 in (("mean", "mean"), ("min", "lo"), ("max", "hi"), ("n", "n"))
                }
            )
            res.append(
                {
                    "bs": int(bs),
                    "target": f"EVICT not slower than the {which} {b['mode']} beyond the spread",
                    "value": sp.mean,
                    "spread": sp.width,
                    "met": not slower_than_by_more_than_spread(sp),
                }
            )
    return res


# ------------------------------------------------------------------------- markdown


def _fmt(d: dict | None, digits: int = 2, suffix: str = "") -> str:
    if not d or not d.get("n"):
        return "-"
    return Spread(d["mean"], d["min"], d["max"], d["n"]).fmt(digits, suffix)


def _pct(d: dict | None) -> str:
    if not d or not d.get("n") or not math.isfinite(d["mean"]):
        return "-"
    return f"{100 * d['mean']:.2f}%"


def _tree(row: dict) -> str:
    if row["tree"] is None:
        return "-"
    return "({},{},{})".format(*row["tree"])


def _variant(row: dict[str, Any]) -> str:
    """An ablation row's label: its cost-table variant, or its decision mode when that differs."""
    return f"{row['decision']} decision" if row.get("decision") else str(row["cost"])


def render_markdown(summary: dict[str, Any]) -> str:
    """The report as Markdown: main table per batch size, ablation, predictions, lossy peer, targets."""
    meta = summary["meta"]
    L: list[str] = []
    L.append("## Benchmark results")
    L.append("")
    L.append(f"Command: `{meta.get('command', 'evict-bench')}`  ")
    if meta.get("testbed"):
        L.append(f"Testbed: {meta['testbed']}  ")
    L.append(f"Machine: {meta.get('machine', '?')}  ")
    L.append(f"Date (UTC): {meta.get('date', '?')}; wall time of the run: {meta.get('elapsed_s', 0):.0f} s  ")
    L.append(
        f"Prompts: {meta.get('num_prompts', '?')} ({meta.get('domains', 'code + prose')}, "
        f"{meta.get('prompt_tokens', '?')} tokens each, held-out stdlib files of Python {meta.get('python', '?')}); "
        f"{meta.get('max_new_tokens', '?')} new tokens per prompt, greedy; seeds {meta.get('seeds', '?')}"
        + (
            f"; at most {meta['max_batches']} prompt batches per batch size"
            if meta.get("max_batches")
            else ""
        )
        + "  "
    )
    if meta.get("clock") == "cpu":
        L.append(
            "Timing clock: process CPU time (single-threaded), so other tenants' load does not count; the "
            "engine's stage times (prefill, decision) are scaled by each call's CPU/wall ratio.  "
        )
    if meta.get("noisy_note"):
        L.append(f"**Note:** {meta['noisy_note']}  ")
    if meta.get("cost_table"):
        L.append(f"Cost table: `{meta['cost_table']}`  ")
    if meta.get("decision"):
        L.append(f"EVICT decision: {meta['decision']}, backend {meta.get('backend', 'torch')}  ")
    L.append("")
    L.append(
        "Numbers are mean [min-max] over seeds; speedups are per-seed ratios of runs interleaved in the same "
        "repeat. See docs/benchmark.md for the meaning of every column."
    )
    L.append("")
    for bs, s in summary["batch_sizes"].items():
        L.append(f"### Batch size {bs}")
        L.append("")
        step = bool(s.get("evict_step"))
        L.append(
            "| mode | tree (s,k,N) | tokens/s | speedup vs AR | EVICT / this | "
            + ("EVICT whole step / this | " if step else "")
            + "accepted len | verified width | experts/layer/verify | target eff. | decision share |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if step else ""))
        for r in s["rows"]:
            if r["role"] in ("ablation",) or r["lossy"]:
                continue
            name = r["mode"]
            if r["mode"] == s["best_static"]:
                name += " (best static)"
            if r["role"] == "sglang-default":
                name += " (SGLang default)"
            if r["role"] == "evict-off":
                name += " (EVICT's tree, uncut)"
            if r["role"] == "evict-cal":
                name += " (EVICT, calibrated acceptance)"
            if r["role"] == "oracle":
                name += " (ceiling: verifies exactly the accepted path)"
            if r["role"] == "evict-step":
                name += " (EVICT: depth, chain or tree, and width)"
            if r["role"] == "sglang-adaptive":
                name += " (SGLang --speculative-adaptive)"
            ex = r["experts_per_verify"]
            step_col = f"| {_fmt(r.get('step_over_this'))}x " if step else ""
            L.append(
                f"| {name} | {_tree(r)} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['speedup_vs_ar'])}x "
                f"| {_fmt(r['evict_over_this'])}x {step_col}| {_fmt(r['accepted_length'])} | {_fmt(r['mean_width'])} "
                f"| {'-' if ex is None else f'{ex:.1f}'} | {_fmt(r['target_efficiency'])} "
                f"| {_pct(r['decision_share']) if r['kind'] == 'evict' else '-'} |"
            )
        L.append("")
        dom_rows = [r for r in s["rows"] if r.get("accepted_by_domain") and r["role"] != "ablation"]
        if dom_rows:
            doms = sorted({d for r in dom_rows for d in r["accepted_by_domain"]})
            L.append(
                f"Accepted length by prompt domain (bs {bs}): "
                + "; ".join(
                    f"{r['mode']} "
                    + " / ".join(
                        f"{d} {r['accepted_by_domain'][d]:.2f}"
                        for d in doms
                        if r["accepted_by_domain"].get(d) is not None
                    )
                    for r in dom_rows
                    if r["kind"] != "ar"
                )
            )
            L.append("")
        ev = _row(s, s["evict"])
        if ev and ev.get("predicted_accepted"):
            L.append(
                f"EVICT prediction vs measurement (bs {bs}): accepted length predicted "
                f"{_fmt(ev['predicted_accepted'])} vs measured {_fmt(ev['accepted_length'])}; step time predicted "
                f"{_fmt(ev['predicted_step_ms'], 1)} ms (cost table T(bs, m*)) vs measured {_fmt(ev['step_ms'], 1)} ms "
                "(decode wall time / steps)."
            )
            L.append("")
        L.extend(_calibrated_lines(s, bs, meta, first=bs == next(iter(summary["batch_sizes"]))))
        L.extend(_whole_step_lines(s, bs))
        L.extend(_modeled_lines(s, bs, meta))
        abl = [r for r in s["rows"] if r["role"] == "ablation"]
        if abl and ev:
            L.append(
                f"Ablations (bs {bs}): EVICT with a wrong cost table (profile mismatch), or with the "
                "other decision mode (lagged: this step's width from the previous step's scores)."
            )
            L.append("")
            L.append("| variant | tokens/s | vs EVICT (as run) | speedup vs AR | verified width |")
            L.append("|---|---|---|---|---|")
            L.append(
                f"| profiled (right), {meta.get('decision') or 'immediate'} decision | "
                f"{_fmt(ev['tokens_per_s'], 1)} | 1.00x | {_fmt(ev['speedup_vs_ar'])}x "
                f"| {_fmt(ev['mean_width'])} |"
            )
            for r in abl:
                inv = r["evict_over_this"]
                vs = (
                    {k: (1 / v if k in ("mean",) else v) for k, v in inv.items()}
                    if inv and inv.get("n")
                    else None
                )
                vs_txt = "-"
                if vs:
                    lo, hi = 1 / inv["max"], 1 / inv["min"]
                    vs_txt = Spread(1 / inv["mean"], lo, hi, inv["n"]).fmt(2) + "x"
                L.append(
                    f"| {_variant(r)} | {_fmt(r['tokens_per_s'], 1)} | {vs_txt} | {_fmt(r['speedup_vs_ar'])}x "
                    f"| {_fmt(r['mean_width'])} |"
                )
            L.append("")
        lossy = [r for r in s["rows"] if r["lossy"]]
        if lossy:
            L.append(f"**LOSSY peer, not comparable on quality** (bs {bs}): MoE-Spec-style expert budget.")
            L.append("")
            L.append(
                "| mode | tree | tokens/s | speedup vs AR | token mismatch vs AR | tokens before first mismatch "
                "| experts/layer/verify |"
            )
            L.append("|---|---|---|---|---|---|---|")
            for r in lossy:
                mm, fd = r.get("mismatch_rate"), r.get("first_divergence")
                ex = r["experts_per_verify"]
                L.append(
                    f"| {r['mode']} (LOSSY) | {_tree(r)} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['speedup_vs_ar'])}x "
                    f"| {'-' if mm is None else f'{100 * mm:.1f}%'} | {'-' if fd is None else f'{fd:.1f}'} "
                    f"| {'-' if ex is None else f'{ex:.1f}'} |"
                )
            L.append("")
        if s["sweep"]:
            top = ", ".join("({},{},{}) {:.1f}".format(*x["tree"], x["tokens_per_s"]) for x in s["sweep"][:5])
            L.append(f"Static sweep (bs {bs}, calibration prompts, tokens/s, best first): {top}")
            L.append("")
    L.append("### Targets")
    L.append("")
    for t in summary["targets"]:
        extra = f" (spread {t['spread']:.2f})" if "spread" in t else ""
        L.append(
            f"- bs {t['bs']}: {t['target']}: {t['value']:.2f}{extra} -> {'MET' if t['met'] else 'NOT MET'}"
        )
    lc = meta.get("lossless")
    if lc:
        L.append("")
        L.append(f"Lossless check: {lc}")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------- plots


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write at the report's resolution and free one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput/speedup bars, width vs experts, and the ablation; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    bss = list(summary["batch_sizes"])
    if not bss:
        return files

    # 1. tokens/s and speedup vs AR per mode, one panel per batch size
    fig, axes = plt.subplots(2, len(bss), figsize=(5 * len(bss), 7.5), squeeze=False)
    for j, bs in enumerate(bss):
        rows = [r for r in summary["batch_sizes"][bs]["rows"] if r["role"] != "ablation"]
        names = [r["mode"] + (" LOSSY" if r["lossy"] else "") for r in rows]
        colors = [_color(r) for r in rows]
        for i, (key, label) in enumerate((("tokens_per_s", "tokens/s"), ("speedup_vs_ar", "speedup vs AR"))):
            ax = axes[i][j]
            d = [r[key] or {"mean": float("nan"), "min": float("nan"), "max": float("nan")} for r in rows]
            mean = [x["mean"] for x in d]
            err = [[m - x["min"] for m, x in zip(mean, d)], [x["max"] - m for m, x in zip(mean, d)]]
            ax.bar(range(len(rows)), mean, yerr=err, color=colors, capsize=3)
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label)
            if key == "speedup_vs_ar":
                ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"batch size {bs}: {label} (min-max over seeds)", fontsize=9)
    files.append(_save(plt, fig, out_dir / "throughput.png"))

    # 2. verified width vs experts per verify step
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "os^D"
    for j, bs in enumerate(bss):
        for r in summary["batch_sizes"][bs]["rows"]:
            if r["experts_per_verify"] is None or r["role"] == "ablation":
                continue
            ax.scatter(
                r["mean_width"]["mean"], r["experts_per_verify"], color=_color(r), marker=markers[j % 4]
            )
            ax.annotate(r["mode"], (r["mean_width"]["mean"], r["experts_per_verify"]), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean verified width (tokens per request, root included)")
    ax.set_ylabel("experts per MoE layer per verify step")
    ax.set_title(
        "Expert union vs verified width ("
        + ", ".join(f"{markers[j % 4]}: bs {b}" for j, b in enumerate(bss))
        + ")",
        fontsize=9,
    )
    files.append(_save(plt, fig, out_dir / "experts.png"))

    # 3. EVICT's predicted accepted length (drafter scores) vs the realized one, binned
    cal = {
        bs: next(
            (r.get("calibration") for r in summary["batch_sizes"][bs]["rows"] if r["role"] == "evict"), None
        )
        for bs in bss
    }
    if any(cal.values()):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        hi = 1.0
        for bs, c in cal.items():
            if c:
                xs, ys = [b["predicted"] for b in c], [b["realized"] for b in c]
                ax.plot(xs, ys, marker="o", label=f"bs {bs}")
                hi = max(hi, *xs, *ys)
        ax.plot([1, hi], [1, hi], color="gray", lw=0.8, ls="--", label="calibrated")
        ax.set_xlabel("predicted accepted length B(m*) (drafter scores)")
        ax.set_ylabel("realized accepted length")
        ax.set_title("EVICT: predicted vs realized tokens per step (equal-count bins)", fontsize=9)
        ax.legend(fontsize=8)
        files.append(_save(plt, fig, out_dir / "calibration.png"))

    # 4. ablation: EVICT's tokens/s with wrong tables relative to the right one
    abl = {bs: [r for r in summary["batch_sizes"][bs]["rows"] if r["role"] == "ablation"] for bs in bss}
    if any(abl.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        variants = sorted({_variant(r) for rs in abl.values() for r in rs})
        width = 0.8 / max(1, len(bss))
        for j, bs in enumerate(bss):
            vals = []
            for v in variants:
                r = next((r for r in abl[bs] if _variant(r) == v), None)
                vals.append(
                    1 / r["evict_over_this"]["mean"] if r and r["evict_over_this"]["n"] else float("nan")
                )
            ax.bar([i + j * width for i in range(len(variants))], vals, width=width, label=f"bs {bs}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([i + width * (len(bss) - 1) / 2 for i in range(len(variants))])
        ax.set_xticklabels(variants, fontsize=8)
        ax.set_ylabel("tokens/s relative to EVICT as run")
        ax.set_title("Ablations: wrong cost tables, other decision mode", fontsize=9)
        ax.legend(fontsize=8)
        files.append(_save(plt, fig, out_dir / "ablation.png"))
    return files


def _color(row: dict) -> str:
    return {
        "baseline": "#888888",
        "chain": "#9ecae1",
        "sglang-default": "#3182bd",
        "static": "#6baed6",
        "best-static": "#08519c",
        "evict-off": "#fdae6b",
        "evict": "#e6550d",
        "ablation": "#fdd0a2",
        "lossy": "#756bb1",
    }.get(row["role"], "#6baed6")
