"""The Triton width kernels against the torch rule (``evict.truncation``), on CPU.

Triton runs the kernels on CPU tensors in its interpreter, which reads ``TRITON_INTERPRET`` when the
kernels are decorated (on first use), so the variable is set here, before anything imports them.
Every comparison is with the rule itself (``choose_width``, ``keep_top``, ``TruncationPolicy`` with
the torch rule), never with a second implementation. Skipped when triton is not installed.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from evict.kernels import (  # noqa: E402
    DeviceWidthDecision,
    KernelUnavailable,
    TritonDecider,
    choose_width_triton,
    keep_top_triton,
    make_decider,
    triton_usable,
)
from evict.truncation import TruncationPolicy, choose_width, keep_top  # noqa: E402

# Rounding differs in the last bits, never in the rule: the kernel computes B = 1 + top sum in
# float64 and rounds once, and sums over requests exactly; the torch rule on CPU uses a float32
# matmul for B and a float32 sum. So B and the objective are compared to float32 accuracy, the
# kept sets exactly, and the widths exactly unless two widths' objectives tie to that accuracy.
NEAR_TIE = 1e-5


def _costs(widths: torch.Tensor, gen: torch.Generator, flat: bool = False) -> torch.Tensor:
    """Increasing step costs (a staircase with random steps), or flat ones."""
    if flat:
        return torch.ones(widths.numel())
    steps = torch.rand(widths.numel(), generator=gen) * 0.5
    return 1.0 + steps.cumsum(0)


def _assert_same(kernel: DeviceWidthDecision, scores, cost, widths) -> None:
    ref = choose_width(scores, cost, widths)
    got = kernel.to_width_decision()
    torch.testing.assert_close(got.objective, ref.objective, rtol=NEAR_TIE / 4, atol=0)
    assert torch.equal(got.fallback, ref.fallback)
    if got.width_index != ref.width_index:
        # only allowed for a near-tie between the two widths, never with a fallback row
        assert not bool(ref.fallback.any())
        obj = ref.objective
        top = float(obj.max())
        assert float(obj[got.width_index]) >= top * (1 - NEAR_TIE), (got.width_index, ref.width_index, obj)
        return
    assert got.width == ref.width
    assert got.kept.dtype == torch.long
    assert torch.equal(got.kept, ref.kept), (got.kept, ref.kept)
    torch.testing.assert_close(got.expected_accepted, ref.expected_accepted, rtol=NEAR_TIE / 4, atol=0)
    # the padded device form: kept indices first, then -1
    pad = kernel.kept[:, got.width - 1 :]
    assert bool((pad == -1).all())
    assert kernel.kept.shape == scores.shape


def test_interpreter_is_used_on_cpu() -> None:
    assert triton_usable("cpu")
    scores = torch.rand(2, 5)
    d = choose_width_triton(scores, [1.0, 1.5], [1, 3])
    assert isinstance(d, DeviceWidthDecision)
    assert d.width.dim() == 0 and d.width.device == scores.device


@pytest.mark.parametrize(
    ("bs", "k"),
    [(1, 1), (1, 7), (3, 2), (4, 16), (8, 64), (5, 100), (2, 256), (70, 5)],
)
def test_random_matches_rule(bs: int, k: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bs + k)
    for trial in range(3):
        widths = torch.tensor([1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 300])
        cost = _costs(widths, gen, flat=trial == 2)
        # cumulative-probability-like scores: products of uniforms, so many are small
        scores = torch.rand(bs, k, generator=gen) ** torch.randint(1, 4, (bs, k), generator=gen)
        _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)


def test_ties_go_to_lower_flat_index_and_smaller_width() -> None:
    gen = torch.Generator().manual_seed(7)
    widths = torch.tensor([1, 2, 4, 8, 16])
    for base in (torch.ones(6, 20), torch.zeros(6, 20), (torch.rand(6, 20, generator=gen) * 4).round() / 4):
        for cost in (torch.ones(5), widths.float(), torch.tensor([1.0, 1.2, 1.9, 2.0, 4.0])):
            _assert_same(choose_width_triton(base, cost, widths), base, cost, widths)
    # all scores 1.0 and T proportional to m: every width has the same objective -> width 1
    d = choose_width_triton(torch.ones(3, 10), widths.float(), widths).to_width_decision()
    assert d.width == 1 and d.kept.shape == (3, 0)
    # equal scores: the kept set is the lowest flat indices (the parents), listed ascending
    d = choose_width_triton(torch.ones(2, 10), torch.ones(5), widths).to_width_decision()
    assert d.width == 11 and torch.equal(d.kept, torch.arange(10).expand(2, 10))
    kept = keep_top_triton(torch.full((1, 9), 0.5), 5)
    assert torch.equal(kept, torch.tensor([[0, 1, 2, 3]]))


def test_negative_zero_and_scores_above_one() -> None:
    scores = torch.tensor([[0.0, -0.0, 0.3, 1.5, 1.0, -0.0], [1.0000001, 0.2, 0.2, 0.0, 0.9, 0.1]])
    widths = torch.tensor([1, 2, 3, 5, 7])
    for cost in (torch.ones(5), torch.tensor([1.0, 1.01, 1.3, 1.4, 1.45])):
        _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)
    for m in range(1, 8):
        assert torch.equal(keep_top_triton(scores, m), keep_top(scores, m))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -0.25])
def test_bad_rows_fall_back_to_full_tree(bad: float) -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 12, generator=gen)
    scores[2, 4] = bad
    widths = torch.tensor([1, 2, 4, 8])
    cost = torch.tensor([1.0, 3.0, 9.0, 27.0])  # steep: without the bad row, width 1 wins
    kernel = choose_width_triton(scores, cost, widths)
    _assert_same(kernel, scores, cost, widths)
    d = kernel.to_width_decision()
    assert d.width == 8 and d.width_index == 3
    assert d.fallback.tolist() == [False, False, True, False, False]
    assert torch.equal(d.kept[2], torch.arange(7))  # ramp over flat index: the first m-1 nodes
    assert int(kernel.best_index) == 3  # this step's own choice includes the fallback
    # a forced (host-known) index is used as given: the bad row is cut on its ramp, and
    # best_index still carries the fallback to the next step; the torch rule agrees
    for decide in (TritonDecider(), choose_width):
        f = decide(scores, cost, widths, index=1)
        assert (f.width, f.width_index, int(f.own_index())) == (2, 1, 3), decide
        assert f.kept[2].tolist() == [0] and torch.equal(f.kept, keep_top(scores, 2))
        assert torch.equal(f.kept, keep_top_triton(scores, 2))
        assert f.fallback.tolist() == d.fallback.tolist()
        torch.testing.assert_close(f.expected_accepted, 1.0 + keep_top_scores(scores, 1))
    clean = scores.clone()
    clean[2] = 0.1
    assert choose_width_triton(clean, cost, widths).to_width_decision().width == 1


def keep_top_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of each row's n best sanitized scores (what B(n + 1) - 1 must be)."""
    from evict.truncation import sanitize_scores

    return sanitize_scores(scores)[0].sort(dim=-1, descending=True).values[:, :n].sum(dim=-1)


def test_all_rows_bad_and_widths_beyond_tree() -> None:
    scores = torch.full((3, 3), float("nan"))
    widths = torch.tensor([1, 2, 8, 64])  # 8 and 64 exceed K + 1 = 4: clamped to the whole tree
    cost = torch.tensor([1.0, 1.1, 1.2, 1.2])
    _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)
    d = choose_width_triton(scores, cost, widths).to_width_decision()
    assert d.width == 4 and d.width_index == 3 and d.kept.shape == (3, 3)
    # clean scores: widths 8 and 64 both mean the whole tree at the same cost -> the smaller index
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    d = choose_width_triton(scores, cost, widths).to_width_decision()
    ref = choose_width(scores, cost, widths)
    assert (d.width, d.width_index) == (ref.width, ref.width_index) == (4, 2)


def test_k1_single_candidate() -> None:
    widths = torch.tensor([1, 2, 3])
    for s in (0.0, 0.3, 1.0, float("nan")):
        scores = torch.tensor([[s]])
        for cost in (torch.tensor([1.0, 1.2, 1.5]), torch.tensor([1.0, 1.0, 1.0])):
            _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)


def test_dtypes_and_strided_input() -> None:
    gen = torch.Generator().manual_seed(11)
    widths = torch.tensor([1, 2, 4, 8, 16])
    cost = _costs(widths, gen)
    base = torch.rand(4, 30, generator=gen, dtype=torch.float64)
    for scores in (
        base,
        base.to(torch.float16),
        base.to(torch.bfloat16),
        base[:, ::2],
        base.t().contiguous().t(),
    ):
        _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)


def test_forced_index_and_lagged_policy_match_torch() -> None:
    gen = torch.Generator().manual_seed(5)
    widths = torch.tensor([1, 2, 4, 8, 16])
    cost = torch.tensor([1.0, 1.05, 1.2, 1.6, 2.5])
    for mode in ("lagged", "immediate", "off"):
        ref = TruncationPolicy(cost, widths, decision=mode)
        dev = TruncationPolicy(cost, widths, decision=mode, decider=make_decider("triton"))
        assert dev.backend == "triton"
        for step in range(4):
            scores = torch.rand(3, 20, generator=gen) ** (step + 1)
            if step == 2:
                scores[1, 0] = float("nan")
            a, b = ref.decide(scores), dev.decide(scores)
            assert (a.width, a.width_index) == (b.width, b.width_index), (mode, step)
            assert torch.equal(a.kept, b.kept) and torch.equal(a.fallback, b.fallback)
            torch.testing.assert_close(a.expected_accepted, b.expected_accepted, rtol=NEAR_TIE / 4, atol=0)
            assert int(a.own_index()) == int(b.own_index()), (mode, step)
        assert dev.backend == "triton" and dev.stats()["errors"] == 0  # the kernel ran every step
    # a forced index keeps best_index = this step's argmax (what lagged mode carries forward)
    scores = torch.rand(2, 20, generator=gen)
    free = choose_width_triton(scores, cost, widths)
    forced = choose_width_triton(scores, cost, widths, index=torch.tensor(1))
    assert int(forced.width_index) == 1 and int(forced.width) == 2
    assert int(forced.best_index) == int(free.best_index) == int(free.width_index)
    assert torch.equal(forced.objective, free.objective)


def test_keep_top_with_given_width() -> None:
    gen = torch.Generator().manual_seed(9)
    scores = torch.rand(4, 16, generator=gen)
    scores[0, :5] = 1.0
    scores[3, 2] = -1.0
    for m in (1, 2, 5, 16, 17, 40):
        assert torch.equal(keep_top_triton(scores, m), keep_top(scores, m))
        dev = keep_top_triton(scores, torch.tensor(m))
        n = min(m, 17) - 1
        assert dev.shape == (4, 16)
        assert torch.equal(dev[:, :n], keep_top(scores, m)) and bool((dev[:, n:] == -1).all())


def test_the_triton_decider_keeps_the_rules_contract() -> None:
    # same arguments, same WidthDecision (own_index included), host widths as the policy passes them
    gen = torch.Generator().manual_seed(2)
    widths = (1, 2, 4, 8, 16)
    cost = torch.tensor([1.0, 1.1, 1.3, 1.7, 2.0])
    assert TritonDecider.backend == make_decider("triton").backend == "triton"
    for step in range(4):
        scores = torch.rand(3, 10, generator=gen) ** (step + 1)
        for index in (None, 0, 2, 4):
            ref = choose_width(scores, cost, widths, index=index, check=False)
            got = TritonDecider()(scores, cost, widths, index=index, check=False)
            assert (got.width, got.width_index) == (ref.width, ref.width_index), (step, index)
            assert int(got.own_index()) == int(ref.own_index()) and torch.equal(got.kept, ref.kept)
            torch.testing.assert_close(got.objective, ref.objective, rtol=NEAR_TIE / 4, atol=0)


def test_bad_arguments_raise_clear_errors() -> None:
    scores = torch.rand(2, 4)
    with pytest.raises(ValueError, match="backend"):
        make_decider("cuda")
    with pytest.raises(ValueError, match="ascending"):
        choose_width_triton(scores, [1.0, 1.0], [2, 1])
    with pytest.raises(ValueError, match="index"):
        choose_width_triton(scores, [1.0, 2.0], [1, 2], index=2)
    with pytest.raises(ValueError, match="2-D"):
        choose_width_triton(torch.rand(4), [1.0], [1])
    with pytest.raises(ValueError, match="width m"):
        keep_top_triton(scores, 0)
    # shapes the kernel does not take: KernelUnavailable, a NotImplementedError (the Decider contract)
    for shape in ((1, 2000), (0, 4)):
        with pytest.raises(KernelUnavailable, match="K <= ") as err:
            choose_width_triton(torch.rand(*shape), [1.0], [1])
        assert isinstance(err.value, NotImplementedError)


_VALUES = [0.0, -0.0, 1.0, 0.5, 0.25, 0.125, 1e-30, 0.7, 0.3000001, 0.3, 1.5]
_BAD = [float("nan"), float("inf"), float("-inf"), -1e-9]


def _check_tie_case(scores: torch.Tensor, cost: torch.Tensor, widths: list[int], m: int) -> None:
    _assert_same(choose_width_triton(scores, cost, widths), scores, cost, widths)
    assert torch.equal(keep_top_triton(scores, m), keep_top(scores, m))


# Fresh examples on every run (a derandomized set of 20 was the same test every time); hypothesis
# keeps a failing example in its database and prints how to reproduce it. The cases that matter
# most are pinned below in test_tie_heavy_pinned_cases.
@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    bs=st.integers(1, 6),
    k=st.integers(1, 24),
    widths=st.lists(st.integers(1, 40), min_size=1, max_size=6, unique=True).map(sorted),
)
def test_hypothesis_tie_heavy_matches_rule(data, bs: int, k: int, widths: list[int]) -> None:
    """Scores from a small set (many exact ties, 1.0, 0 and -0), sometimes a bad value."""
    pool = _VALUES + (_BAD if data.draw(st.booleans()) else [])
    flat = data.draw(st.lists(st.sampled_from(pool), min_size=bs * k, max_size=bs * k))
    scores = torch.tensor(flat, dtype=torch.float32).reshape(bs, k)
    steps = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=len(widths), max_size=len(widths)))
    cost = 1.0 + torch.tensor(steps).cumsum(0)
    _check_tie_case(scores, cost, widths, data.draw(st.sampled_from(widths)))


@pytest.mark.parametrize(
    ("rows", "steps", "widths", "m"),
    [
        ([[0.5] * 6], [0.0, 0.25, 1.0], [1, 3, 7], 3),  # every score tied
        ([[0.0, -0.0, 0.0, -0.0], [-0.0, 0.0, -0.0, 0.0]], [0.0, 0.0], [1, 5], 5),  # signed zeros
        ([[0.3, float("nan"), 0.3, 0.3]], [0.0, 0.25], [2, 5], 2),  # NaN among ties
        ([[1.0, 1.0, 1e-30, 0.0, float("inf")]], [0.0, 1.0, 0.25], [1, 2, 6], 6),  # inf, 1.0 ties
    ],
)
def test_tie_heavy_pinned_cases(rows, steps, widths, m) -> None:
    scores = torch.tensor(rows, dtype=torch.float32)
    _check_tie_case(scores, 1.0 + torch.tensor(steps).cumsum(0), widths, m)


def test_where_the_kernels_cannot_run_they_say_how_and_the_policy_takes_the_rule(monkeypatch) -> None:
    import evict.kernels.width as width_mod

    monkeypatch.setattr(width_mod, "triton_available", lambda: False)
    assert not triton_usable("cpu")
    scores = torch.rand(3, 6, generator=torch.Generator().manual_seed(4))
    with pytest.raises(KernelUnavailable, match="pip install"):
        choose_width_triton(scores, [1.0], [1])
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(width_mod, "triton_available", lambda: True)
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        keep_top_triton(scores, 2)
    pol = TruncationPolicy([1.0, 1.2, 1.5], [1, 3, 7], decider=make_decider("triton"))
    d = pol.decide(scores)
    ref = choose_width(scores, [1.0, 1.2, 1.5], [1, 3, 7])
    assert (d.width, d.width_index) == (ref.width, ref.width_index) and torch.equal(d.kept, ref.kept)
    assert pol.backend == "torch" and pol.stats()["errors"] == 0


_BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_without_gpu_says_so_and_exits_0(capsys) -> None:
    assert _load_bench().main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_interpreter_check_agrees(capsys) -> None:
    assert _load_bench().main(["--interpreter", "--bs", "1", "9", "--k", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count(" yes") == 4 and " NO" not in out


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu() -> None:
    """The interpreter cannot catch compiled-path errors: compile every variant to a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(_BENCH), "--compile-check", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("cubin") == 8
