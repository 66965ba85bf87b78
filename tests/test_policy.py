"""Tests of TruncationPolicy: decisions, deciders, cost sources, counters."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from evict.kernels import make_decider
from evict.profiler.table import CostTable
from evict.truncation import TORCH_RULE, TruncationPolicy, choose_width, is_ancestor_closed, keep_top

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example_cost_table.json"

WIDTHS = [1, 2, 4, 8]
# steep cost: weak drafts -> width 1, strong drafts -> width 8
COST = torch.tensor([1.0, 1.6, 2.2, 2.6])


def strong(bs: int = 2, k: int = 10) -> torch.Tensor:
    return torch.full((bs, k), 0.95)


def weak(bs: int = 2, k: int = 10) -> torch.Tensor:
    return torch.full((bs, k), 0.02)


def test_immediate_matches_choose_width():
    pol = TruncationPolicy(COST, WIDTHS)
    for scores in (strong(), weak(), strong(3, 5)):
        ref = choose_width(scores, COST, WIDTHS)
        got = pol.decide(scores)
        assert got.width == ref.width and torch.equal(got.kept, ref.kept)
        assert torch.equal(got.objective, ref.objective)
    assert choose_width(strong(), COST, WIDTHS).width == 8  # the two inputs really differ
    assert choose_width(weak(), COST, WIDTHS).width == 1


def test_lagged_uses_previous_width_but_current_kept_nodes():
    pol = TruncationPolicy(COST, WIDTHS, decision="lagged")
    first = pol.decide(strong())
    assert first.width == 8  # first call: immediate
    gen = torch.Generator().manual_seed(0)
    s = weak() + torch.rand(2, 10, generator=gen) * 0.01  # distinct scores, order not by index
    second = pol.decide(s)
    assert second.width == 8  # width from the previous (strong) scores
    top = s.float().argsort(dim=-1, descending=True, stable=True)[:, :7].sort(-1).values
    assert torch.equal(second.kept, top)  # kept set from the current scores
    third = pol.decide(strong())
    assert third.width == 1  # from the weak scores of the previous call
    fourth = pol.decide(strong())
    assert fourth.width == 8


def test_lagged_fallback_widens_the_next_step():
    # the host fixed this step's width before its scores existed: a bad row is cut on its ramp
    # (its first flat indices: ancestor-closed, so lossless) and the full tree follows next step
    gen = torch.Generator().manual_seed(3)
    pol = TruncationPolicy(COST, WIDTHS, decision="lagged")
    assert pol.decide(strong()).width == 8
    bad = weak() + torch.rand(2, 10, generator=gen) * 0.01
    bad[0, 3] = float("nan")
    d = pol.decide(bad)
    assert d.width == 8 and d.fallback.tolist() == [True, False]
    assert d.kept[0].tolist() == list(range(7))  # the ramp: first 7 candidates
    assert torch.equal(d.kept[1], keep_top(bad[1:], 8)[0])  # the good row: its own top 7
    assert pol.decide(weak()).width == 8  # the fallback widens this step
    bad = weak()
    bad[1, 0] = -1.0
    d = pol.decide(bad)
    assert d.width == 1 and d.fallback.tolist() == [False, True]  # lagged from the weak step
    assert pol.decide(weak()).width == 8 and pol.decide(weak()).width == 1
    assert pol.stats()["fallbacks"] == 2


_HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy")


@pytest.mark.parametrize("mode", ["lagged", "off"])
def test_lagged_and_off_steps_read_no_tensor_on_the_host(monkeypatch, mode):
    # After its first step a lagged policy reads one value on the host, the index it held from the
    # previous step (pinned memory behind a CUDA event on a GPU); off mode reads nothing. Any other
    # read of a tensor (a device sync on a GPU) fails here, including the counters' bulk flush.
    gen = torch.Generator().manual_seed(4)
    steps = [torch.rand(1 + i % 3, 12, generator=gen) ** (1 + i % 4) for i in range(300)]
    steps[7][0, 2] = float("nan")
    ref = TruncationPolicy(COST, WIDTHS, decision=mode)
    want = [ref.decide(s) for s in steps]
    pol = TruncationPolicy(COST, WIDTHS, decision=mode)
    got = [pol.decide(steps[0])]
    held = pol._held
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if self is not held._buffer:
                raise AssertionError(f"decide() read a tensor on the host (Tensor.{_name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    got += [pol.decide(s) for s in steps[1:]]
    monkeypatch.undo()
    for a, b in zip(want, got):
        assert (a.width, a.width_index) == (b.width, b.width_index)
        assert torch.equal(a.kept, b.kept) and torch.equal(a.fallback, b.fallback)
    keys = ("steps", "requests", "mean_width", "mean_predicted_accepted", "fallbacks")
    assert [pol.stats()[k] for k in keys] == [ref.stats()[k] for k in keys]
    assert pol.stats()["fallbacks"] == 1


def test_off_mode_always_full_tree():
    pol = TruncationPolicy(COST, WIDTHS, decision="off")
    for scores in (weak(), strong(), weak(3, 20)):
        d = pol.decide(scores)
        assert d.width == min(8, scores.shape[1] + 1) and d.width_index == 3
    d = pol.decide(weak(2, 3))  # widths beyond K+1 clamp to the whole tree
    assert d.width == 4 and d.kept.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_counters_and_stats():
    pol = TruncationPolicy(COST, WIDTHS)
    d1 = pol.decide(strong(2))
    bad = weak(3)
    bad[2, 0] = -1.0
    d2 = pol.decide(bad)
    pol.counters.record_accepted(torch.tensor([3, 5]))
    pol.counters.record_accepted([1, 1, 2])
    st = pol.stats()
    assert st["steps"] == 2 and st["requests"] == 5
    assert st["mean_width"] == pytest.approx((d1.width + d2.width) / 2)
    pred = (d1.expected_accepted.sum() + d2.expected_accepted.sum()) / 5
    assert st["mean_predicted_accepted"] == pytest.approx(float(pred), rel=1e-6)
    assert st["mean_realized_accepted"] == pytest.approx(12 / 5)
    assert st["fallbacks"] == 1
    pol.counters.reset()
    assert pol.stats()["steps"] == 0 and pol.stats()["fallbacks"] == 0


def test_cost_table_source_and_per_batch_cache():
    table = CostTable.load(EXAMPLE)
    calls = []

    class Spy:
        widths = table.widths

        def step_cost(self, bs, widths):
            calls.append(bs)
            return table.step_cost(bs, widths)

    pol = TruncationPolicy(Spy())
    assert pol.widths.tolist() == table.widths
    for _ in range(3):
        pol.decide(torch.rand(4, 30))
    pol.decide(torch.rand(1, 30))
    assert calls == [4, 1]  # one table lookup per batch size
    assert torch.equal(pol.step_cost(4), table.step_cost(4, table.widths))
    # the policy's decision is the rule's decision on the table's costs
    scores = torch.rand(4, 63)
    ref = choose_width(scores, table.step_cost(4, table.widths), table.widths)
    assert TruncationPolicy(table).decide(scores).width == ref.width


def test_callable_cost_and_validation():
    pol = TruncationPolicy(lambda bs, w: 1.0 + 0.1 * bs * w.float(), [1, 2, 4])
    d = pol.decide(torch.full((2, 5), 0.9))
    assert d.width in (1, 2, 4)
    with pytest.raises(ValueError, match="positive and finite"):
        TruncationPolicy(lambda bs, w: torch.zeros(3), [1, 2, 4]).decide(torch.rand(1, 4))
    with pytest.raises(ValueError, match="decision must be one of"):
        TruncationPolicy(COST, WIDTHS, decision="sometimes")
    with pytest.raises(ValueError, match="backend"):
        make_decider("cuda")
    with pytest.raises(ValueError, match="widths is required"):
        TruncationPolicy(COST)
    with pytest.raises(ValueError, match="4 widths"):
        TruncationPolicy(torch.tensor([1.0, 2.0]), WIDTHS)


def test_triton_backend_falls_back_or_loads(caplog, monkeypatch):
    import evict.kernels.width as width_mod

    for available in (True, False):
        monkeypatch.setattr(width_mod, "triton_available", lambda available=available: available)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evict"):
            pol = TruncationPolicy(COST, WIDTHS, decider=make_decider("triton"))
        assert pol.backend == ("triton" if available else "torch")
        assert sum("Triton" in r.getMessage() for r in caplog.records) == (0 if available else 1)
    assert make_decider("torch") is TORCH_RULE


@pytest.mark.parametrize("mode", ["immediate", "lagged", "off"])
def test_triton_backend_same_decisions_as_torch(mode):
    # on CPU without TRITON_INTERPRET the kernel cannot run: the policy's one fallback takes the
    # torch rule at the first step (a warning, not an error), with the same decisions in every mode
    gen = torch.Generator().manual_seed(1)
    seq = [strong(), weak() + 0.01 * torch.rand(2, 10, generator=gen), strong(), weak(), strong()]
    ref = TruncationPolicy(COST, WIDTHS, decision=mode)
    tri = TruncationPolicy(COST, WIDTHS, decision=mode, decider=make_decider("triton"))
    for s in seq:
        a, b = ref.decide(s), tri.decide(s)
        assert a.width == b.width and torch.equal(a.kept, b.kept)
    assert ref.stats()["mean_width"] == tri.stats()["mean_width"]
    assert tri.stats()["errors"] == 0 and tri.stats()["decision"] == mode


def test_kept_sets_ancestor_closed_through_policy():
    parents = torch.tensor([[-1, -1, 0, 0, 1, 2, 2, 5]])
    scores = torch.tensor([[0.6, 0.4, 0.6, 0.3, 0.4, 0.5, 0.1, 0.5]])  # ties between parent/child
    for mode in ("immediate", "lagged", "off"):
        pol = TruncationPolicy(torch.tensor([1.0, 1.1, 1.3, 1.6]), [1, 3, 5, 9], decision=mode)
        for _ in range(2):
            d = pol.decide(scores)
            mask = torch.zeros(1, 8, dtype=torch.bool)
            mask[0, d.kept[0]] = True
            assert bool(is_ancestor_closed(parents, mask).all())


def test_counters_survive_bulk_flush():
    # counters are reduced in bulk every few hundred steps; totals must not depend on that
    pol = TruncationPolicy(COST, WIDTHS)
    gen = torch.Generator().manual_seed(2)
    total_pred, total_fb, n_req = 0.0, 0, 0
    for step in range(300):
        bs = 1 + step % 3
        s = torch.rand(bs, 6, generator=gen)
        if step % 50 == 0:
            s[0, 0] = float("nan")
        d = pol.decide(s)
        total_pred += float(d.expected_accepted.sum())
        total_fb += int(d.fallback.sum())
        n_req += bs
    st = pol.stats()
    assert st["steps"] == 300 and st["requests"] == n_req and st["fallbacks"] == total_fb == 6
    assert st["mean_predicted_accepted"] == pytest.approx(total_pred / n_req, rel=1e-6)


def test_every_front_end_offers_the_policys_choices():
    # the plugin's EVICT_DECISION/EVICT_BACKEND and `evict generate` stay torch-free at import, so
    # they spell the choices out; they must be exactly the policy's
    from evict.cli import build_parser
    from evict.kernels import BACKENDS
    from evict.plugin import config
    from evict.truncation import USER_DECISIONS

    assert config._DECISIONS == USER_DECISIONS and config._BACKENDS == BACKENDS
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: tuple(a.choices) for a in generate._actions if a.choices}
    assert choices["decision"] == USER_DECISIONS and choices["backend"] == BACKENDS


def test_a_failing_kernel_costs_one_error_and_the_torch_rule_takes_over(caplog):
    # e.g. Triton cannot compile for this GPU: the first call logs, later calls use the rule
    gen = torch.Generator().manual_seed(6)
    steps = [torch.rand(2, 10, generator=gen) ** (1 + i % 3) for i in range(5)]
    ref = TruncationPolicy(COST, WIDTHS, decision="lagged")
    calls = []

    class Broken:
        backend = "triton"

        def __call__(self, *args, **kwargs):
            calls.append(1)
            raise RuntimeError("no kernel image is available for execution on the device")

    pol = TruncationPolicy(COST, WIDTHS, decision="lagged", decider=Broken())
    assert pol.backend == "triton"
    with caplog.at_level(logging.ERROR, logger="evict"):
        for s in steps:
            a, b = ref.decide(s), pol.decide(s)
            assert (a.width, a.width_index) == (b.width, b.width_index) and torch.equal(a.kept, b.kept)
    assert len(calls) == 1 and pol.backend == "torch"
    assert pol.stats()["errors"] == 1 and pol.stats()["backend"] == "torch"
    assert sum("triton width decision failed" in r.getMessage() for r in caplog.records) == 1


def test_a_decider_that_cannot_run_here_costs_one_warning_and_no_error(caplog):
    class Unavailable:
        backend = "triton"

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("not on this device")

    pol = TruncationPolicy(COST, WIDTHS, decider=Unavailable())
    with caplog.at_level(logging.WARNING, logger="evict"):
        for s in (strong(), weak(), strong()):
            assert pol.decide(s).width == choose_width(s, COST, WIDTHS).width
    assert pol.backend == "torch" and pol.stats()["errors"] == 0
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_the_torch_rule_raises_instead_of_falling_back():
    # the rule is the fallback: its own errors go to the caller (the plugin verifies the full tree)
    pol = TruncationPolicy(COST, WIDTHS, decider=TORCH_RULE)
    with pytest.raises(ValueError, match="floating point"):
        pol.decide(torch.ones(2, 3, dtype=torch.long))
