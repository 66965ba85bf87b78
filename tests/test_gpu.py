"""GPU behaviour of the width decision: the kernel on CUDA, and lagged steps that never wait.

Skipped without CUDA (CI has none); run them on a GPU machine with ``python -m pytest -m gpu``.
The CPU suite covers the same logic in Triton's interpreter and with host-read guards
(``tests/test_kernels.py``, ``tests/test_policy.py``).
"""

from __future__ import annotations

import pytest
import torch

from evict.kernels import make_decider
from evict.truncation import TruncationPolicy, choose_width

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

WIDTHS = [1, 2, 4, 8, 16, 32, 64]
COST = [10.0, 10.2, 10.5, 11.2, 12.5, 16.0, 24.0]


def _scores(bs: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(bs, k, generator=gen) ** torch.randint(1, 4, (bs, k), generator=gen)).cuda()


@pytest.mark.parametrize("bs,k", [(1, 1), (1, 8), (8, 16), (32, 63), (128, 64), (3, 300)])
def test_kernel_on_cuda_matches_the_rule(bs: int, k: int) -> None:
    pytest.importorskip("triton")
    from evict.kernels import choose_width_triton

    for seed in range(5):
        scores = _scores(bs, k, seed)
        if seed == 4:
            scores[bs - 1, 0] = float("nan")
        ref = choose_width(scores.cpu(), COST, WIDTHS)
        got = choose_width_triton(scores, COST, WIDTHS).to_width_decision()
        torch.testing.assert_close(got.objective.cpu(), ref.objective, rtol=1e-5, atol=0)
        if got.width_index == ref.width_index:
            assert torch.equal(got.kept.cpu(), ref.kept)
        else:  # only an objective tie to float32 accuracy may pick another width
            assert float(ref.objective[got.width_index]) >= float(ref.objective.max()) * (1 - 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lagged_decide_does_not_wait_for_queued_gpu_work(backend: str) -> None:
    # A long kernel queued just before decide() stands for this step's drafter: a lagged decision
    # returns while it still runs (immediate mode would have to wait for it to read the width).
    pol = TruncationPolicy(COST, WIDTHS, decision="lagged", decider=make_decider(backend))
    scores = _scores(64, 63, 0)
    for _ in range(3):
        pol.decide(scores)
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU cycles
    d = pol.decide(scores)
    assert not stream.query(), "lagged decide() waited for GPU work queued before it"
    assert d.kept.shape == (64, d.width - 1)
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["lagged", "off"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lagged_and_off_steps_make_no_synchronizing_call(mode: str, backend: str) -> None:
    pol = TruncationPolicy(COST, WIDTHS, decision=mode, decider=make_decider(backend))
    steps = [_scores(16, 63, s) for s in range(300)]
    pol.decide(steps[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in steps[1:]:
            pol.decide(s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pol.stats()["steps"] == 300
    assert pol.backend == backend and pol.stats()["errors"] == 0  # the kernel ran every step


def test_engine_on_cuda_is_lossless_on_the_testbed_pair() -> None:
    """The reference engine on the GPU: static tree, EVICT (immediate, lagged, calibrated) and AR all
    emit the AR engine's greedy tokens, with EVICT really choosing several widths."""
    from evict.engine import SpecEngine
    from evict.models import load_testbed
    from evict.truncation import AcceptanceEstimator

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        target, drafter, tok = load_testbed(device="cuda")
    except FileNotFoundError:
        pytest.skip("testbed weights not shipped in this checkout")
    prompts = [
        [int(i) for i in tok.encode(t)]
        for t in ("import os\n", "def main(args):\n    ", 'class Parser:\n    """', "for i in range(")
    ]
    ref = SpecEngine(target, None, mode="ar").generate(prompts, 24).tokens
    widths = [1, 2, 4, 8, 16, 32]
    staircase = [1.0, 1.1, 1.3, 1.7, 2.6, 4.2]
    widths_seen: set[int] = set()
    for decision in ("immediate", "lagged"):
        for acceptance in (None, AcceptanceEstimator(topk=4, max_depth=5)):
            policy = TruncationPolicy(staircase, widths=widths, decision=decision)
            eng = SpecEngine(
                target,
                drafter,
                mode="evict",
                steps=5,
                topk=4,
                num_draft_tokens=32,
                policy=policy,
                acceptance=acceptance,
            )
            res = eng.generate(prompts, 24)
            assert res.tokens == ref, (decision, acceptance is not None)
            widths_seen |= {s.width for s in res.steps}
    static = SpecEngine(target, drafter, mode="static", steps=5, topk=4, num_draft_tokens=32).generate(
        prompts, 24
    )
    assert static.tokens == ref
    assert static.mean_accepted_length > 1.5
    assert len(widths_seen) >= 2, widths_seen
