"""Tests of evict-bench: report maths on fake records, the MoE-Spec hook, the lossless check, runs.

The report arithmetic and hooks are checked on hand-made inputs whose answers are known; the
run loop on a fake engine; the real reference engine on random-init tiny models (when present).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from evict.bench.cli import build_parser
from evict.bench.hooks import ExpertUnionCounter, MoESpecBudget, chain_hooks, verify_router_hook
from evict.bench.modes import ModeSpec, check_tree, num_candidates, parse_tree, sweep_grid
from evict.bench.report import render_markdown, save_plots, summarize
from evict.bench.runner import Bench, BenchData, record_from_result
from evict.bench.stats import (
    LosslessError,
    ModeSeed,
    RunRecord,
    Spread,
    aggregate,
    check_lossless,
    mismatch_rate,
    paired_ratio,
    slower_than_by_more_than_spread,
    target_efficiency,
)

# ----------------------------------------------------------------------------- report maths


def rec(mode, seed, tokens, wall, bs=1, steps=0, emitted=0, req_steps=0, width=0, **kw):
    return RunRecord(
        mode=mode, batch_size=bs, seed=seed, new_tokens=tokens, wall_s=wall, steps=steps,
        emitted=emitted, request_steps=req_steps, width_sum=width, **kw,
    )  # fmt: skip


def test_aggregate_sums_records_and_takes_ratios_of_sums():
    stats = aggregate([rec("a", 0, 10, 1.0, steps=5, emitted=10, req_steps=5), rec("a", 0, 30, 1.0, steps=5)])
    s = stats[("a", 1, 0)]
    assert s.records == 2
    assert s.tokens_per_s == pytest.approx(20.0)  # 40 tokens / 2 s, not the mean of 10 and 30
    assert s.accepted_length == pytest.approx(2.0)
    assert math.isnan(s.predicted_accepted)  # no predictions recorded


def test_paired_speedup_is_per_seed_then_summarized():
    recs = [rec("ar", 0, 10, 1.0), rec("ar", 1, 20, 1.0), rec("evict", 0, 25, 1.0), rec("evict", 1, 30, 1.0)]
    stats = aggregate(recs)
    sp = paired_ratio(stats, "evict", "ar", 1)
    assert sp.n == 2
    assert sp.lo == pytest.approx(1.5) and sp.hi == pytest.approx(2.5)
    assert sp.mean == pytest.approx(2.0)  # mean of per-seed ratios (ratio of means would be 1.83)
    assert sp.width == pytest.approx(1.0)
    assert paired_ratio(stats, "evict", "missing", 1).n == 0


def test_target_efficiency_is_speedup_over_accepted_length():
    recs = [
        rec("ar", 0, 100, 10.0, steps=100, emitted=100, req_steps=100),
        rec("tree", 0, 100, 5.0, steps=25, emitted=100, req_steps=25),  # 2x faster, 4 tokens/step
    ]
    te = target_efficiency(aggregate(recs), "tree", 1)
    assert te.mean == pytest.approx(0.5)
    assert target_efficiency(aggregate(recs), "ar", 1).mean == pytest.approx(1.0)


def test_spread_format_and_slowdown_rule():
    assert Spread.of([1.0, 2.0, 3.0]).fmt(1) == "2.0 [1.0-3.0]"
    assert Spread.of([1.5]).fmt(2) == "1.50"
    assert Spread.of([4.131, 4.129]).fmt(2) == "4.13"  # no spread at this precision: no brackets
    assert Spread.of([float("nan")]).fmt() == "-"
    assert not slower_than_by_more_than_spread(Spread.of([0.95, 1.05]))  # 0 slowdown
    assert not slower_than_by_more_than_spread(Spread.of([0.9, 1.0]))  # 5% slower, spread 10%
    assert slower_than_by_more_than_spread(Spread.of([0.80, 0.82]))  # 19% slower, spread 2%
    assert slower_than_by_more_than_spread(Spread.of([0.99]))  # one seed: no spread to hide in


def test_lossless_check_fails_loudly_on_mismatch():
    outs = {("ar", 1, 0, 0): [1, 2, 3], ("evict", 1, 0, 0): [1, 2, 3], ("static(3,1,4)", 1, 0, 0): [1, 9, 3]}
    with pytest.raises(LosslessError) as exc:
        check_lossless(outs)
    msg = str(exc.value)
    assert "static(3,1,4)" in msg and "token 1" in msg and "evict" not in msg.split("\n", 1)[1]
    del outs[("static(3,1,4)", 1, 0, 0)]
    assert check_lossless(outs) == 1
    outs[("moe-spec(B=2)", 1, 0, 0)] = [7, 7, 7]
    assert check_lossless(outs, lossy=["moe-spec(B=2)"]) == 1
    with pytest.raises(LosslessError, match="compared nothing"):
        check_lossless({("ar", 1, 0, 0): [1]})
    with pytest.raises(LosslessError, match="length|lengths"):
        check_lossless({("ar", 1, 0, 0): [1, 2], ("evict", 1, 0, 0): [1]})


def test_calibration_bins_are_equal_count_and_ordered_by_prediction():
    from evict.bench.stats import calibration_bins

    b = calibration_bins([(4.0, 5), (1.0, 1), (3.0, 1), (2.0, 2)], bins=2)
    assert b == [{"predicted": 1.5, "realized": 1.5, "n": 2}, {"predicted": 3.5, "realized": 3.0, "n": 2}]
    assert calibration_bins([]) == [] and len(calibration_bins([(1.0, 1)], bins=8)) == 1


def test_mismatch_rate_counts_positions_and_missing_tokens():
    assert mismatch_rate([[1, 2, 3, 4]], [[1, 2, 0, 4]]) == pytest.approx(0.25)
    assert mismatch_rate([[1, 2], [3, 4]], [[1, 2], [3]]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mismatch_rate([[1]], [])
    from evict.bench.stats import first_divergence

    assert first_divergence([[1, 2, 3, 4], [5, 6]], [[1, 2, 0, 4], [5, 6]]) == pytest.approx((2 + 2) / 2)


# ----------------------------------------------------------------------------- hooks


def _routing(n=24, e=16, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) * 2
    ids = torch.topk(logits, k, dim=-1).indices
    return logits, ids


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_moe_spec_keeps_exactly_b_experts_and_renormalizes(budget):
    logits, ids = _routing()
    out_ids, out_w = MoESpecBudget(budget)(0, logits, ids)
    assert out_ids.shape == ids.shape and out_w.shape == ids.shape
    active = out_ids[out_w > 0]
    assert torch.unique(out_ids).numel() == budget  # every id read belongs to the budget set
    assert torch.unique(active).numel() == budget
    # the kept set is the top-B experts by total (normalized top-k) routing weight over the tokens
    probs = torch.softmax(logits, -1)
    w = probs.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    totals = torch.zeros(16).scatter_add_(0, ids.reshape(-1), w.reshape(-1))
    assert set(torch.unique(out_ids).tolist()) == set(torch.topk(totals, budget).indices.tolist())
    assert torch.allclose(out_w.sum(-1), torch.ones(ids.shape[0]), atol=1e-5)  # renormalized per token
    # a token keeping >= 1 of its experts keeps their original proportions
    for t in range(ids.shape[0]):
        kept = [j for j in range(4) if ids[t, j] in set(out_ids[t][out_w[t] > 0].tolist())]
        if kept:
            orig = w[t, kept] / w[t, kept].sum()
            got = torch.stack([out_w[t][(out_ids[t] == ids[t, j]) & (out_w[t] > 0)].sum() for j in kept])
            assert torch.allclose(orig, got, atol=1e-5)


def test_moe_spec_within_budget_leaves_routing_alone_and_rejects_bad_budget():
    logits, ids = _routing(n=2, e=16, k=2)
    assert MoESpecBudget(16)(0, logits, ids) is None
    with pytest.raises(ValueError, match="budget"):
        MoESpecBudget(0)


class FakeCache:
    def __init__(self, lengths):
        self.lengths = torch.tensor(lengths)


class FakeTarget(torch.nn.Module):
    """Three 'MoE layers' routing each token to experts (t % 8, (t+1) % 8)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, input_ids, positions, cache, attn_mask=None, router_hook=None):
        n = input_ids.numel()
        ids = torch.stack([input_ids.reshape(-1) % 8, (input_ids.reshape(-1) + 1) % 8], -1)
        for layer in range(3):
            if router_hook is not None:
                r = router_hook(layer, torch.zeros(n, 8), ids)
                self.seen.append(None if r is None else r[0])
        return "out"


def test_verify_hook_skips_prefill_counts_unions_and_restores_forward():
    t = FakeTarget()
    counter = ExpertUnionCounter(8)
    with verify_router_hook(t, None, counter):
        t(torch.arange(6).view(1, 6), None, FakeCache([0]))  # prefill: not counted
        t(torch.tensor([[0, 1, 2]]), None, FakeCache([6]))  # experts {0,1,2,3} -> 4
        t(torch.tensor([[5]]), None, FakeCache([9]))  # {5,6} -> 2
    assert counter.take() == (6.0, 2)
    assert "forward" not in t.__dict__  # the class forward is back
    t(torch.tensor([[1]]), None, FakeCache([3]))
    assert counter.take() == (0.0, 0)


def test_chained_budget_is_what_the_counter_sees():
    t = FakeTarget()
    counter = ExpertUnionCounter(8)
    with verify_router_hook(t, MoESpecBudget(1), counter):
        t(torch.tensor([[0, 1, 2, 3]]), None, FakeCache([4]))
    assert counter.take() == (1.0, 1)
    assert chain_hooks(None, None) is None


# ----------------------------------------------------------------------------- modes


def test_trees():
    assert num_candidates(3, 1) == 3 and num_candidates(6, 8) == 328
    assert parse_tree("3,1,4") == (3, 1, 4)
    for bad in ("3,1,5", "1,2,9", "x", "0,1,2"):
        with pytest.raises(ValueError):
            parse_tree(bad)
    for t in sweep_grid() + sweep_grid(quick=True):
        check_tree(*t)


# ----------------------------------------------------------------------------- runs on a fake engine


class FakeEngine:
    """Emits a deterministic continuation; ``wrong`` modes corrupt one token (a broken mode)."""

    def __init__(self, mode, target, wrong=False):
        self.mode, self.target, self.wrong = mode, target, wrong

    def generate(self, prompts, max_new_tokens):
        w = 1 if self.mode.kind == "ar" else self.mode.num_draft
        acc = 1 if self.mode.kind == "ar" else 2
        outs = [[(sum(p) + i) % 50 for i in range(max_new_tokens)] for p in prompts]
        if self.wrong:
            outs[0][1] += 1
        steps = []
        cache = FakeCache([len(prompts[0])] * len(prompts))
        for _ in range(-(-max_new_tokens // acc)):
            self.target(torch.tensor(prompts)[:, :w], None, cache)
            steps.append(SimpleNamespace(width=w, accepted=[acc] * len(prompts), decision_s=0.0,
                                         predicted_accepted=[2.5] * len(prompts)))  # fmt: skip
        return SimpleNamespace(outputs=outs, steps=steps)


class FakeTable:
    """T(bs, w) = factor * (bs + 0.1 w) + shift. ``scaled`` / ``shifted`` return *new* tables, as
    CostTable's do, so a bench that ignores them (ablating with the main table) is caught."""

    widths = [1, 2, 4, 8]
    batch_sizes = [1, 4]
    median = [[1.0, 1.1, 1.3, 2.0], [2.0, 2.2, 2.6, 4.0]]

    def __init__(self, factor=1.0, shift=0.0):
        self.factor, self.shift = factor, shift

    def step_cost(self, bs, widths):
        ws = torch.as_tensor(widths).tolist()
        return torch.tensor([self.factor * (float(bs) + 0.1 * float(w)) + self.shift for w in ws])

    def scaled(self, f):
        return FakeTable(self.factor * f, self.shift * f)

    def shifted(self, ms):
        return FakeTable(self.factor, self.shift + ms)


def _fake_bench(wrong_mode=None):
    target = FakeTarget()
    return Bench(
        lambda m, cost: FakeEngine(m, target, wrong=m.name == wrong_mode), target, num_experts=8,
        table=FakeTable(), log=lambda s: None,
    )  # fmt: skip


def _args(**kw):
    base = dict(
        quick=True, batch_sizes=[1, 2], seeds=[0, 1], num_prompts=2, prompt_tokens=8, max_new_tokens=6,
        evict_tree=(3, 2, 8), static_trees=[(2, 2, 4)], chain_steps=3, no_sweep=True, no_ablation=False, max_batches=0, sweep_grid=None,
        moe_spec_budget=2, moe_spec_tree=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


def test_run_bench_on_fake_engine_builds_the_full_report(tmp_path):
    from evict.bench.cli import run_bench

    data, err = run_bench(_args(), _fake_bench(), ByteTokenizer(), log=lambda s: None)
    assert err is None
    names = [m.name for m in data.modes[1]]
    assert names[:3] == ["ar", "static(3,1,4)", "static(2,2,4)"]  # chain(3) == SGLang default, not twice
    assert "evict" in names and "evict[shifted:+]" in names and "moe-spec(B=2)" in names
    summary = summarize(data)
    rows = {r["mode"]: r for r in summary["batch_sizes"]["1"]["rows"]}
    assert rows["ar"]["accepted_length"]["mean"] == pytest.approx(1.0)
    assert rows["evict"]["mean_width"]["mean"] == pytest.approx(8.0)
    assert rows["evict"]["predicted_accepted"]["mean"] == pytest.approx(2.5)
    assert rows["evict"]["predicted_step_ms"]["mean"] == pytest.approx(1.8)
    assert rows["moe-spec(B=2)"]["experts_per_verify"] <= 2.0  # the budget reached the target
    assert rows["static(2,2,4)"]["experts_per_verify"] > 2.0
    assert rows["moe-spec(B=2)"]["mismatch_rate"] == 0.0  # fake engine ignores routing
    assert rows["moe-spec(B=2)"]["first_divergence"] == 6.0
    md = render_markdown(summary)
    assert "### Batch size 2" in md and "LOSSY" in md and "Ablations (bs 1)" in md
    assert "Lossless check: passed" in md
    files = save_plots(summary, tmp_path)
    assert {f.name for f in files} >= {"throughput.png", "experts.png", "ablation.png", "calibration.png"}
    assert rows["evict"]["calibration"][0]["predicted"] == pytest.approx(2.5)
    assert rows["evict"]["calibration"][0]["realized"] == pytest.approx(2.0)
    assert all(f.stat().st_size > 1000 for f in files)


def test_full_run_ablates_the_other_decision_mode():
    from evict.bench.cli import run_bench

    for decision, other in (("immediate", "lagged"), ("lagged", "immediate")):
        policies = {}
        target = FakeTarget()

        def factory(m, policy, target=target, policies=policies):
            policies[m.name] = policy
            return FakeEngine(m, target)

        bench = Bench(factory, target, 8, table=FakeTable(), log=lambda s: None, decision=decision)
        args = _args(quick=False, batch_sizes=[1], seeds=[0], moe_spec_budget=0, decision=decision)
        data, err = run_bench(args, bench, ByteTokenizer(), log=lambda s: None)
        assert err is None
        assert (
            policies["evict"].decision == decision and policies[f"evict[decision:{other}]"].decision == other
        )
        assert policies["evict[shifted:+]"].decision == decision  # cost ablations keep the run's decision
        # each cost ablation decides from its own variant of the table, never the main one
        main = policies["evict"].step_cost(1)
        assert torch.allclose(main, torch.tensor([1.1, 1.2, 1.4, 1.8]))  # widths 1, 2, 4, 8 at bs 1
        assert torch.allclose(policies["evict[scaled:2]"].step_cost(1), 2 * main)
        assert torch.allclose(policies["evict[shifted:+]"].step_cost(1), main + 0.5)  # half the smallest
        assert torch.allclose(policies["evict[shifted:-]"].step_cost(1), main - 0.5)
        assert torch.allclose(policies["evict[other-bs]"].step_cost(1), main + 3.0)  # bs 4's row
        assert torch.equal(policies[f"evict[decision:{other}]"].step_cost(1), main)
        rows = {r["mode"]: r for r in summarize(data)["batch_sizes"]["1"]["rows"]}
        assert rows[f"evict[decision:{other}]"]["decision"] == other
        data.meta["decision"] = decision
        md = render_markdown(summarize(data))
        assert f"| {other} decision |" in md and f"profiled (right), {decision} decision" in md


def test_run_bench_reports_a_lossless_failure():
    from evict.bench.cli import run_bench

    data, err = run_bench(
        _args(seeds=[0], moe_spec_budget=0), _fake_bench(wrong_mode="static(2,2,4)"), ByteTokenizer(),
        log=lambda s: None,
    )  # fmt: skip
    assert err is not None and "LOSSLESS CHECK FAILED" in err and "static(2,2,4)" in err
    assert data.meta["lossless"].startswith("FAILED")


def test_record_from_result_reads_engine_stats():
    res = SimpleNamespace(
        outputs=[[1, 2, 3], [4, 5]],
        steps=[
            SimpleNamespace(
                width=4, accepted=torch.tensor([2, 0]), draft_s=0.1, verify_s=0.2, decision_s=0.01
            )
        ],
        prefill_s=0.5,
    )
    r = record_from_result(res, ModeSpec("static(3,1,4)", "static", 3, 1, 4), 2, 0, 1.0, [0, 1])
    assert r.new_tokens == 5 and r.request_steps == 1 and r.emitted == 2 and r.width_sum == 4
    assert r.prefill_s == 0.5 and r.decision_s == pytest.approx(0.01)


def test_full_batch_steps_are_the_ones_every_request_was_still_in():
    """The steady-state throughput counts only steps with the whole batch live: a step after a
    request finished (the static batch's tail) is left out, tokens and time alike."""
    step = dict(width=4, draft_s=0.1, verify_s=0.2, decision_s=0.01, extend_s=0.05)
    res = SimpleNamespace(
        outputs=[[1, 2, 3, 4], [5, 6]],
        steps=[
            SimpleNamespace(active=[0, 1], accepted=[3, 2], emitted=[2, 2], **step),  # full; row 0 capped
            SimpleNamespace(active=[0], accepted=[2], emitted=[2], **step),  # the tail
        ],
        prefill_s=0.5,
    )
    r = record_from_result(res, ModeSpec("static(3,1,4)", "static", 3, 1, 4), 2, 0, 1.0, [0, 1])
    assert r.full_tokens == 4 and r.full_s == pytest.approx(0.36)
    seed = ModeSeed(mode=r.mode, batch_size=2, seed=0)
    seed.add(r)
    assert seed.full_batch_tokens_per_s == pytest.approx(4 / 0.36)
    assert r.emitted == 7  # the end-to-end counts keep the tail


def test_whole_step_report_gives_the_full_batch_verdict_next_to_the_end_to_end_one():
    from evict.bench.report import _whole_step_lines

    def row(name, total, full):
        return {"mode": name, "step_over_this": total, "step_over_this_full_batch": full}

    def spread(mean, lo, hi):
        return {"mean": mean, "min": lo, "max": hi, "n": 2}

    s = {
        "evict_step": "evict-step",
        "sglang_default": "static(3,1,4)",
        "sglang_adaptive": None,
        "rows": [
            {"mode": "evict-step", "draft_shapes": {"chain(2,1)": 3}},
            row("ar", spread(0.92, 0.91, 0.93), spread(1.20, 1.18, 1.22)),
            row("static(3,1,4)", spread(0.95, 0.94, 0.96), spread(1.04, 0.99, 1.09)),
        ],
    }
    text = "\n".join(_whole_step_lines(s, "64"))
    assert "adaptive (AR): 0.92 [0.91-0.93]x, SLOWER" in text
    assert "best of the three (SGLang default): 1.04 [0.99-1.09]x, not slower" in text
    assert "Full-batch" not in "\n".join(_whole_step_lines(s, "1"))  # every bs-1 step is full


def test_prompts_are_held_out_and_alternate_domains():
    from evict.bench.prompts import build_prompts, heldout_files

    held = {str(p) for p in heldout_files()}
    ps = build_prompts(ByteTokenizer(), 3, 32)
    assert [p.domain for p in ps] == ["code", "prose"] * 3
    assert all(len(p.ids) == 32 for p in ps)
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(str(root / p.source) in held for p in ps)
    calib = build_prompts(ByteTokenizer(), 2, 32, skip=3)
    assert not {p.ids for p in calib} & {p.ids for p in ps}


# ----------------------------------------------------------------------------- real engine, tiny models


def _tiny_pair():
    transformers = pytest.importorskip("transformers")
    from evict.models import Eagle3Drafter, Qwen3MoeTarget, eagle3_config

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
        tie_word_embeddings=False,
    )  # fmt: skip
    target = Qwen3MoeTarget.from_config(cfg, seed=0)
    drafter = Eagle3Drafter.from_config(eagle3_config(cfg, 256, target.aux_layer_ids), target, seed=1)
    return target, drafter


def _tiny_table():
    from evict.profiler.table import CostTable

    med = [[1.0, 1.2, 1.5, 2.5], [1.5, 1.8, 2.4, 4.0]]
    return CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "tiny", "device": "cpu", "dtype": "float32", "tp_size": 1},
            "batch_sizes": [1, 2],
            "widths": [1, 2, 4, 8],
            "latency_ms": {"median": med, "p10": med, "p90": med},
            "fixed_ms": [0.5, 0.7],
        }
    )


def test_tiny_end_to_end_on_the_reference_engine(tmp_path):
    pytest.importorskip("evict.engine")
    from evict.bench.cli import _engine_factory, run_bench

    target, drafter = _tiny_pair()
    bench = Bench(_engine_factory(target, drafter, "cpu"), target, num_experts=8, table=_tiny_table())
    args = _args(
        batch_sizes=[1, 2], seeds=[0], num_prompts=1, no_ablation=True, moe_spec_budget=2, max_new_tokens=6
    )
    data, err = run_bench(args, bench, ByteTokenizer(), log=lambda s: None)
    assert err is None, err  # greedy tree decoding is token-identical to autoregressive
    summary = summarize(data)
    for bs in ("1", "2"):
        rows = {r["mode"]: r for r in summary["batch_sizes"][bs]["rows"]}
        assert rows["ar"]["mean_width"]["mean"] == 1.0 and rows["ar"]["accepted_length"]["mean"] == 1.0
        assert rows["static(2,2,4)"]["mean_width"]["mean"] == 4.0
        # the reported width is the timed records' verified tokens per step (not just "some width")
        ev = [r for r in data.records if r.mode == "evict" and r.batch_size == int(bs)]
        assert rows["evict"]["mean_width"]["mean"] == pytest.approx(
            sum(r.width_sum for r in ev) / sum(r.steps for r in ev)
        )
        assert rows["evict"]["mean_width"]["n"] == 1
        assert rows["evict"]["predicted_step_ms"]["n"] == 1
        # experts per verify: AR at bs 1 reads exactly top-k = 2 experts per layer; the budget caps at 2
        if bs == "1":
            assert rows["ar"]["experts_per_verify"] == pytest.approx(2.0)
        assert rows["moe-spec(B=2)"]["experts_per_verify"] <= 2.0 + 1e-9
        assert rows["static(2,2,4)"]["experts_per_verify"] >= rows["ar"]["experts_per_verify"]
        # the mismatch rate is the share of AR's token positions the lossy peer got wrong
        ref = {(r.seed, p): o for r in data.records if r.mode == "ar" and r.batch_size == int(bs)
               for p, o in zip(r.prompt_ids, r.outputs)}  # fmt: skip
        got = {(r.seed, p): o for r in data.records if r.mode == "moe-spec(B=2)" and r.batch_size == int(bs)
               for p, o in zip(r.prompt_ids, r.outputs)}  # fmt: skip
        wrong = sum(a != b for k in ref for a, b in zip(ref[k], got[k] + [-1] * len(ref[k])))
        assert rows["moe-spec(B=2)"]["mismatch_rate"] == pytest.approx(wrong / sum(map(len, ref.values())))
    assert "Lossless check: passed" in render_markdown(summary)
    for r in data.records:  # at bs 1 every decode step is a full-batch step; at bs 2 some may not be
        assert r.full_tokens <= r.emitted and r.full_s <= r.wall_s - r.prefill_s
        if r.batch_size == 1:
            assert r.full_tokens == r.emitted and r.full_s > 0
    # per-request accounting adds up to the batch totals, and both domains are reported
    for r in data.records:
        assert sum(r.request_emitted) == r.emitted and sum(r.request_steps_each) == r.request_steps
    ev = {r["mode"]: r for r in summary["batch_sizes"]["1"]["rows"]}["evict"]
    assert set(ev["accepted_by_domain"]) == {"code", "prose"}


def test_evict_tree_follows_the_tables_drafting_profile():
    from evict.bench.cli import evict_tree_for

    t = _tiny_table()
    assert evict_tree_for(t) == (5, 4, 8)  # no drafting shape recorded: the fallback, capped at width 8
    t.metadata.update(draft_steps=3, draft_topk=4)
    assert evict_tree_for(t) == (3, 4, 8)  # whole tree has 37 nodes, capped at the largest width 8
    t.metadata.update(draft_steps=3, draft_topk=1)
    assert evict_tree_for(t) == (3, 1, 4)
    # the shape is read from its fields, never from the free-text note
    t.metadata.pop("draft_steps")
    t.metadata["fixed_ms"] = "EAGLE-3 drafter drafter: 2 forwards x 2 tokens per request"
    assert evict_tree_for(t) == (5, 4, 8)


def test_evict_always_may_keep_the_full_tree_even_off_the_tables_widths():
    """--evict-tree 5,4,20 on a table profiled at 16 and 32: width 20 (the whole tree) is allowed."""
    from evict.profiler.table import CostTable

    med = [[1.0, 1.2, 1.5, 2.5, 3.0, 4.0]]
    table = CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "tiny", "device": "cpu", "dtype": "float32", "tp_size": 1},
            "batch_sizes": [1],
            "widths": [1, 2, 4, 8, 16, 32],
            "latency_ms": {"median": med, "p10": med, "p90": med},
        }
    )
    seen = []
    bench = Bench(lambda mode, policy: seen.append(policy) or object(), FakeTarget(), 8, table=table)
    bench.engine(ModeSpec(name="evict", kind="evict", steps=5, topk=4, num_draft=20, role="evict"))
    assert seen[0].widths.tolist() == [1, 2, 4, 8, 16, 20]


def test_max_batches_takes_the_first_prompt_batches_and_every_mode_runs_each():
    bench = _fake_bench()
    modes = [ModeSpec("ar", "ar", role="baseline"), ModeSpec("static(2,2,4)", "static", 2, 2, 4)]
    recs = bench.run_batches(modes, [[1, 2], [3, 4], [5, 6]], 1, 0, 3, max_batches=2)
    assert sorted((r.mode, tuple(r.prompt_ids)) for r in recs) == [
        ("ar", (0,)), ("ar", (1,)), ("static(2,2,4)", (0,)), ("static(2,2,4)", (1,)),
    ]  # fmt: skip


def test_targets_on_known_numbers():
    from evict.bench.modes import static_mode

    data = BenchData()
    modes = [
        ModeSpec("ar", "ar", role="baseline"),
        static_mode((3, 1, 4), "sglang-default"),
        static_mode((5, 4, 8), "best-static"),
        ModeSpec("evict", "evict", 5, 4, 32, role="evict"),
    ]
    data.modes[1] = modes
    data.sweep[1] = [((5, 4, 8), 1.0)]
    data.modes[4] = [modes[0], static_mode((3, 1, 4), "sglang-default"), modes[3]]
    data.sweep[4] = [((3, 1, 4), 1.0), ((5, 4, 8), 0.5)]  # the winner is SGLang's default itself
    for seed in (0, 1):
        data.records += [rec("ar", seed, 10, 1.0, bs=4), rec("static(3,1,4)", seed, 12, 1.0, bs=4)]
        data.records += [rec("evict", seed, 13, 1.0, bs=4)]
    assert summarize(data)["batch_sizes"]["4"]["best_static"] == "static(3,1,4)"
    tps = {"ar": (10, 10), "static(3,1,4)": (15, 16), "static(5,4,8)": (26, 24), "evict": (25, 25)}
    for name, vals in tps.items():
        for seed, v in enumerate(vals):
            data.records.append(rec(name, seed, v, 1.0))
    t = {x["target"].split(" static")[0]: x for x in summarize(data)["targets"]}
    assert (
        t["EVICT >= 2.0x autoregressive"]["value"] == pytest.approx(2.5)
        and t["EVICT >= 2.0x autoregressive"]["met"]
    )
    d = next(x for x in summarize(data)["targets"] if "SGLang default" in x["target"])
    assert d["value"] == pytest.approx((25 / 15 + 25 / 16) / 2) and d["met"]
    b = next(x for x in summarize(data)["targets"] if "best static" in x["target"])
    # EVICT/best per seed: 0.96, 1.04 -> no slowdown on average
    assert b["value"] == pytest.approx((25 / 26 + 25 / 24) / 2) and b["met"]
    data.records = [r for r in data.records if r.mode != "evict"] + [
        rec("evict", 0, 20, 1.0),
        rec("evict", 1, 19, 1.0),
    ]
    b = next(x for x in summarize(data)["targets"] if "best static" in x["target"])
    assert not b["met"]  # ~21% slower, per-seed spread ~0.0


def test_cost_variants_for_the_mismatch_ablation():
    from evict.bench.runner import ablation_names, cost_variant

    t = _tiny_table()
    w = [1, 2, 4, 8]
    base1, base2 = t.step_cost(1, w), t.step_cost(2, w)
    assert torch.allclose(cost_variant(t, "scaled:2").step_cost(1, w), 2 * base1)
    plus, minus = cost_variant(t, "shifted:+").step_cost(1, w), cost_variant(t, "shifted:-").step_cost(1, w)
    assert torch.allclose(plus - base1, torch.full((4,), 0.5)) and torch.allclose(
        base1 - minus, torch.full((4,), 0.5)
    )
    other = cost_variant(t, "other-bs")
    assert torch.allclose(other(1, torch.tensor(w)), base2) and torch.allclose(
        other(2, torch.tensor(w)), base1
    )
    assert cost_variant(t, "other-device:0", [t]) is t
    assert "other-device:0" in ablation_names(t, [t]) and "other-device:0" not in ablation_names(t)
    with pytest.raises(ValueError, match="unknown"):
        cost_variant(t, "bogus")


def test_other_device_tables_are_found_next_to_the_main_one(tmp_path):
    from evict.bench.cli import _other_device_tables

    main = _tiny_table()
    main.metadata["model_config_hash"] = "abc"
    main.save(tmp_path / "m_cost_table.json")
    gpu = _tiny_table()
    gpu.metadata.update(model_config_hash="abc", device="NVIDIA H100")
    gpu.save(tmp_path / "m_gpu_cost_table.json")
    other_model = _tiny_table()
    other_model.metadata.update(model_config_hash="zzz", device="NVIDIA H100")
    other_model.save(tmp_path / "x_cost_table.json")
    (tmp_path / "broken_cost_table.json").write_text("{")
    found = _other_device_tables(main, tmp_path / "m_cost_table.json", log=lambda s: None)
    assert [t.metadata["device"] for t in found] == ["NVIDIA H100"] and found[0].metadata[
        "model_config_hash"
    ] == "abc"


@pytest.mark.parametrize("decision,backend", [("immediate", "torch"), ("lagged", "triton")])
def test_evict_engines_get_the_chosen_decision_and_backend(decision, backend):
    seen = []
    bench = Bench(
        lambda m, p: seen.append(p) or object(),
        FakeTarget(),
        8,
        table=_tiny_table(),
        log=lambda s: None,
        decision=decision,
        backend=backend,
    )
    bench.engine(ModeSpec(name="evict", kind="evict", steps=2, topk=2, num_draft=4, role="evict"))
    policy = seen[0]
    assert policy.decision == decision
    assert policy.backend == (backend if importlib.util.find_spec("triton") else "torch")
    args = build_parser().parse_args(["--decision", decision, "--backend", backend])
    assert (args.decision, args.backend) == (decision, backend)


def test_cpu_clock_ignores_time_spent_off_cpu():
    import time as _time

    class Sleeper:
        def generate(self, prompts, max_new_tokens):
            _time.sleep(0.2)  # waiting, as when other tenants hold the cores
            return SimpleNamespace(outputs=[[1] * max_new_tokens for _ in prompts], steps=[], prefill_s=0.2)

    target = FakeTarget()
    mode = ModeSpec("ar", "ar", role="baseline")
    wall = Bench(lambda m, p: Sleeper(), target, 8, log=lambda s: None).run_one(mode, [[1]], [0], 1, 0, 2)
    cpu = Bench(lambda m, p: Sleeper(), target, 8, log=lambda s: None, clock="cpu").run_one(
        mode, [[1]], [0], 1, 0, 2
    )
    assert wall.wall_s >= 0.2 and cpu.wall_s < 0.1
    assert cpu.prefill_s < 0.1  # engine stage times are rescaled to the CPU clock
    with pytest.raises(ValueError, match="clock"):
        Bench(lambda m, p: Sleeper(), target, 8, clock="gpu")


def test_cli_rejects_bad_arguments_with_a_clear_message(capsys):
    from evict.bench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--batch-sizes", "32", "--num-prompts", "2"])
    assert exc.value.code == 2 and "raise --num-prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--evict-tree", "3,1,9"])
    assert "at most steps + 1" in capsys.readouterr().err


def test_cli_exits_non_zero_and_still_writes_the_report_when_lossless_fails(tmp_path, monkeypatch, capsys):
    import evict.bench.cli as cli

    target = FakeTarget()
    target.config = SimpleNamespace(num_experts=8, norm_topk_prob=True)
    monkeypatch.setattr(
        cli, "_load", lambda args, device: (target, None, ByteTokenizer(), FakeTable(), [], None)
    )
    monkeypatch.setattr(
        cli,
        "_engine_factory",
        lambda t, d, dev, prior=None: lambda m, p: FakeEngine(m, target, wrong=m.name == "evict"),
    )
    argv = ["--quick", "--batch-sizes", "1", "--no-sweep", "--no-ablation", "--max-new-tokens", "4"]
    rc = cli.main(
        argv + ["--prompt-tokens", "8", "--evict-tree", "3,2,8", "--device", "cpu", "--out", str(tmp_path)]
    )
    assert rc == cli.EXIT_LOSSLESS == 3
    assert "LOSSLESS CHECK FAILED" in capsys.readouterr().err
    assert "Lossless check: FAILED" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.json").is_file() and (tmp_path / "throughput.png").is_file()


def test_calibrated_evict_oracle_cut_and_out_of_domain_prompts_on_the_reference_engine():
    pytest.importorskip("evict.engine")
    from evict.bench.cli import _engine_factory, run_bench

    target, drafter = _tiny_pair()
    bench = Bench(_engine_factory(target, drafter, "cpu"), target, num_experts=8, table=_tiny_table())
    args = _args(
        batch_sizes=[1], seeds=[0], num_prompts=1, no_ablation=True, moe_spec_budget=0, max_new_tokens=6,
        acceptance="both", no_oracle=False, ood_prompts=1,
    )  # fmt: skip
    data, err = run_bench(args, bench, ByteTokenizer(), log=lambda s: None)
    assert err is None, err  # calibrated EVICT and the oracle cut are lossless too
    assert data.meta["prompt_domains"] == ["code", "prose", "code-ood", "prose-ood"]
    summary = summarize(data)
    rows = {r["mode"]: r for r in summary["batch_sizes"]["1"]["rows"]}
    assert rows["evict+cal"]["role"] == "evict-cal" and rows["oracle-cut"]["role"] == "oracle"
    assert rows["evict+cal"]["predicted_accepted"]["n"] == 1
    # the oracle verifies only the accepted path: width = accepted length at bs 1
    assert rows["oracle-cut"]["mean_width"]["mean"] == pytest.approx(
        rows["oracle-cut"]["accepted_length"]["mean"]
    )
    assert rows["evict"]["oracle_over_this"]["mean"] > 0
    rel = data.meta["acceptance_reliability"]["evict+cal"]
    assert all(0 <= r["realized"] <= 1 and r["trials"] > 0 for r in rel)
    assert bool(rel) == (rows["evict+cal"]["mean_width"]["mean"] > 1)  # trials only when the tree is verified
    assert data.acceptance_priors["evict+cal"]["format"] == "evict-acceptance-prior"
    md = render_markdown(summary)
    assert "Oracle cut (bs 1" in md and "EVICT calibrated" in md


def test_sweep_engines_are_freed_after_the_sweep():
    pytest.importorskip("evict.engine")
    from evict.bench.cli import _engine_factory

    target, drafter = _tiny_pair()
    bench = Bench(_engine_factory(target, drafter, "cpu"), target, num_experts=8, table=_tiny_table())
    kept = bench.engine(ModeSpec(name="ar", kind="ar"))
    res = bench.sweep([(2, 2, 4), (3, 1, 4)], [[1, 2, 3], [4, 5, 6]], batch_size=1, max_new_tokens=4)
    assert sorted(t for t, _ in res) == [(2, 2, 4), (3, 1, 4)]
    assert list(bench._engines.values()) == [kept]  # only the run's own engine stays cached
