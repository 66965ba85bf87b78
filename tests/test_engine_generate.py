"""SpecEngine behaviour beyond losslessness: statistics, the policy contract, errors, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import oracle_pair, random_pair

from evict import cli
from evict.engine import SpecEngine
from evict.profiler.table import model_config_hash
from evict.profiler.torch_backend import device_name
from evict.truncation import AcceptanceEstimator, TruncationPolicy

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 3, 3]]
WIDTHS = [1, 2, 4, 8, 16]
STAIRCASE = [1.0, 1.35, 1.8, 2.6, 4.0]


@pytest.fixture(scope="module")
def pair():
    return oracle_pair(0)


class CountingPolicy(TruncationPolicy):
    """Records every ``decide`` call (scores shape and chosen width)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def decide(self, scores):
        d = super().decide(scores)
        self.calls.append((tuple(scores.shape), d.width))
        return d


def test_evict_calls_decide_once_per_step_on_active_scores(pair):
    target, drafter = pair
    policy = CountingPolicy(STAIRCASE, widths=WIDTHS)
    res = SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy).generate(PROMPTS, 12)
    assert len(policy.calls) == len(res.steps)
    k_total = 2 + 3 * 4
    for (shape, width), st in zip(policy.calls, res.steps):
        assert shape == (len(st.active), k_total)
        assert st.width == width
        assert st.predicted_accepted is not None and len(st.predicted_accepted) == len(st.active)
        assert all(1.0 <= b <= width for b in st.predicted_accepted)
        expected_ms = STAIRCASE[WIDTHS.index(16 if width == k_total + 1 else width)]
        assert st.predicted_step_ms == pytest.approx(expected_ms, rel=1e-6)
        assert all(1 <= a <= width for a in st.accepted)
        assert st.draft_s > 0 and st.verify_s > 0 and st.decision_s >= 0
    # the policy's own counters see the realized lengths
    stats = policy.stats()
    assert stats["steps"] == len(res.steps)
    assert stats["mean_realized_accepted"] == pytest.approx(res.mean_accepted_length)


def test_step_stats_add_up(pair):
    target, drafter = pair
    res = SpecEngine(target, drafter, mode="static", steps=3, topk=2, num_draft_tokens=6).generate(
        PROMPTS, 10
    )
    for b, toks in enumerate(res.tokens):
        emitted = sum(st.emitted[st.active.index(b)] for st in res.steps if b in st.active)
        assert len(toks) == 10 == emitted + 1  # + the prefill's token
    assert res.new_tokens == 30
    assert res.mean_width == 6
    assert res.tokens_per_s > 0 and res.wall_s >= res.prefill_s > 0
    assert res.request_steps == sum(len(s.active) for s in res.steps)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["tokens"] == res.tokens and len(d["steps"]) == len(res.steps) and d["mean_width"] == 6


def test_flat_cost_keeps_the_full_tree(pair):
    target, drafter = pair
    policy = TruncationPolicy([1.0] * 5, widths=WIDTHS)  # 8 and 16 clamp to K + 1 = 7
    res = SpecEngine(target, drafter, mode="evict", steps=2, topk=2, policy=policy).generate(PROMPTS, 8)
    assert {s.width for s in res.steps} == {7}


def test_configuration_errors(pair):
    target, drafter = pair
    with pytest.raises(ValueError, match="mode must be one of"):
        SpecEngine(target, drafter, mode="eagle")
    with pytest.raises(ValueError, match="needs policy"):
        SpecEngine(target, drafter, mode="evict")
    with pytest.raises(ValueError, match="needs a drafter"):
        SpecEngine(target, None, mode="static")
    with pytest.raises(ValueError, match=r"num_draft_tokens must be an int in \[1, K\+1 = 7\]"):
        SpecEngine(target, drafter, mode="static", steps=2, topk=2, num_draft_tokens=8)
    with pytest.raises(ValueError, match="widths <= 4"):
        SpecEngine(
            target,
            drafter,
            mode="evict",
            steps=2,
            topk=2,
            num_draft_tokens=4,
            policy=TruncationPolicy(STAIRCASE, widths=WIDTHS),
        )
    with pytest.raises(ValueError, match="top_p"):
        SpecEngine(target, drafter, temperature=1.0, top_p=0.0)
    engine = SpecEngine(target, drafter, mode="static", steps=2, topk=2, num_draft_tokens=4)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 99]], 4)
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], 0)


def test_nan_scores_fall_back_without_crashing():
    target, drafter = random_pair(0)
    with torch.no_grad():
        drafter.lm_head.weight[0, 0] = float("nan")  # every draft distribution becomes NaN
    policy = TruncationPolicy(STAIRCASE, widths=WIDTHS)
    engine = SpecEngine(target, drafter, mode="evict", steps=3, topk=2, policy=policy)
    res = engine.generate(PROMPTS, 5)
    # the fallback verifies the whole tree, and verification keeps the output the target's own
    reference = SpecEngine(target, None, mode="ar").generate(PROMPTS, 5).tokens
    assert res.tokens == reference
    fallbacks = [s for s in res.steps if s.fallback]
    assert fallbacks and len(fallbacks) == len(res.steps)  # every step's scores are NaN
    assert all(s.width == engine.num_draft_tokens for s in fallbacks)
    assert all(s.fallback == len(s.active) for s in fallbacks)  # counted once per request
    assert policy.stats()["fallbacks"] == sum(s.fallback for s in fallbacks)


class FakeTokenizer:
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % 15) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def _checkpoint_of(target, tmp_path, monkeypatch):
    """Point the CLI at a folder holding the in-memory target's config.json (what it hashes)."""
    folder = tmp_path / "target"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(target.config.to_dict(), default=str))
    monkeypatch.setattr(cli, "_model_dirs", lambda testbed=None: (folder, tmp_path / "no_drafter"))
    return folder


def test_cli_generate_all_modes(pair, monkeypatch, tmp_path, capsys):
    target, drafter = pair
    monkeypatch.setattr(
        cli, "_load_pair", lambda device, dtype, testbed=None: (target, drafter, FakeTokenizer())
    )
    _checkpoint_of(target, tmp_path, monkeypatch)
    table = {
        "schema_version": 1,
        "metadata": {
            "model_id": "tiny",
            "model_config_hash": model_config_hash(target.config),
            "device": device_name(torch.device("cpu")),
            "dtype": "float32",
            "tp_size": 1,
        },
        "batch_sizes": [1, 4],
        "widths": WIDTHS,
        "latency_ms": {
            "median": [STAIRCASE, STAIRCASE],
            "p10": [STAIRCASE, STAIRCASE],
            "p90": [STAIRCASE, STAIRCASE],
        },
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    args = ["generate", "--prompt", "hello", "--mode", "all", "--steps", "2", "--topk", "2"]
    rc = cli.main(args + ["--num-draft-tokens", "7", "--max-new-tokens", "8", "--cost-table", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for mode in ("ar", "static", "evict"):
        assert f"=== mode {mode} ===" in out and f"[{mode}] 8 tokens" in out
    assert "greedy outputs identical across modes: True" in out
    # the lagged decision and the Triton backend are options of the engine too, and stay lossless
    rc = cli.main(
        args
        + ["--num-draft-tokens", "7", "--max-new-tokens", "8", "--cost-table", str(path)]
        + ["--decision", "lagged", "--backend", "triton"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "decision=lagged" in out, out
    assert "greedy outputs identical across modes: True" in out
    # calibrated acceptance (the online estimator) is an option too, cold or warm from a JSON prior
    prior = tmp_path / "prior.json"
    AcceptanceEstimator(2, 2).save(prior)
    for extra in (
        ["--acceptance", "calibrated"],
        ["--acceptance", "calibrated", "--acceptance-prior", str(prior)],
    ):
        rc = cli.main(
            args + ["--num-draft-tokens", "7", "--max-new-tokens", "8", "--cost-table", str(path)] + extra
        )
        out = capsys.readouterr().out
        assert rc == 0 and "acceptance: calibrated" in out, out
        assert "greedy outputs identical across modes: True" in out
    rc = cli.main(
        args + ["--cost-table", str(path), "--num-draft-tokens", "7", "--acceptance-prior", str(prior)]
    )
    assert rc == 2 and "--acceptance calibrated" in capsys.readouterr().err
    # a table made for another model is refused, with the fix in the message
    table["metadata"]["model_config_hash"] = "0123456789abcdef"
    path.write_text(json.dumps(table))
    rc = cli.main(args + ["--num-draft-tokens", "7", "--mode", "evict", "--cost-table", str(path)])
    assert rc == 2 and "model_config_hash" in capsys.readouterr().err


def test_cli_errors_are_clear(pair, monkeypatch, tmp_path, capsys):
    target, drafter = pair
    monkeypatch.setattr(
        cli, "_load_pair", lambda device, dtype, testbed=None: (target, drafter, FakeTokenizer())
    )
    _checkpoint_of(target, tmp_path, monkeypatch)
    rc = cli.main(
        ["generate", "--prompt", "x", "--mode", "evict", "--cost-table", str(tmp_path / "none.json")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "none.json: file not found" in err and "evict-profile" in err
    rc = cli.main(["generate", "--prompt", "x", "--mode", "static", "--steps", "2", "--topk", "2"])
    assert rc == 2  # N = 16 > K + 1 = 7
    assert "--num-draft-tokens 16 is outside 1..7" in capsys.readouterr().err


def test_one_new_token_needs_no_decode_step(pair):
    target, drafter = pair
    res = SpecEngine(target, drafter, mode="static", steps=2, topk=2, num_draft_tokens=4).generate(PROMPTS, 1)
    assert [len(t) for t in res.tokens] == [1, 1, 1] and res.steps == []
    assert res.finish_reasons == ["length"] * 3


def test_router_hook_sees_every_verify_forward(pair):
    target, drafter = pair
    seen: list[tuple[int, int]] = []

    def hook(layer_idx, router_logits, topk_ids):
        seen.append((layer_idx, int(topk_ids.shape[0])))
        return None

    res = SpecEngine(
        target, drafter, mode="static", steps=2, topk=2, num_draft_tokens=4, router_hook=hook
    ).generate(PROMPTS, 6)
    n_layers = target.config.num_hidden_layers
    assert len(seen) == n_layers * len(res.steps)  # verify forwards only, not the prefill
    tokens_per_step = [len(s.active) * s.width for s in res.steps]
    assert [n for (layer, n) in seen if layer == 0] == tokens_per_step


def test_finished_requests_leave_the_batch_with_finite_caches(pair):
    """Compaction copies only the committed prefix of each cache; the rest of the new buffers must
    still be finite (masked slots enter attention's matmuls, and 0 * NaN is NaN). Under
    deterministic algorithms torch fills uninitialized memory with NaN, so a buffer left
    uninitialized fails here, and the greedy output then differs from autoregressive decoding."""
    from evict.engine.engine import select_rows

    target, drafter = pair
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [3, 3, 3, 3, 3]]
    full = SpecEngine(target, drafter, mode="ar").generate(prompts, 10).tokens
    eos = next(t for t in full[1][2:] if sum(t in row for row in full) < len(full))  # ends some rows early
    ar = SpecEngine(target, drafter, mode="ar", eos_token_id=eos).generate(prompts, 10).tokens
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cache = target.new_cache(3, 16)
        cache.k_all.normal_()
        cache.v_all.normal_()
        cache.lengths.copy_(torch.tensor([5, 9, 2]))
        small = select_rows(cache, torch.tensor([2, 0]))
        assert small.lengths.tolist() == [2, 5] and small.k_all.shape[1] == 2
        assert torch.isfinite(small.k_all).all() and torch.isfinite(small.v_all).all()
        assert torch.equal(small.k_all[:, 1, :, :5], cache.k_all[:, 0, :, :5])
        assert torch.equal(small.v_all[:, 0, :, :2], cache.v_all[:, 2, :, :2])
        res = SpecEngine(target, drafter, mode="static", steps=3, topk=2, eos_token_id=eos).generate(
            prompts, 10
        )
    finally:
        torch.use_deterministic_algorithms(was)
    assert len({len(s.active) for s in res.steps}) > 1, "no request left the batch early"
    assert res.tokens == ar
