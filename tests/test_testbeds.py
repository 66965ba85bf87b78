"""Named testbeds and the zero-padded, weight-read-bound variant: same function, more bytes.

The padded variant is what the 128-expert cost figures are measured on, so its identity with the
trained pair is checked on real weights: logits, and greedy speculative decoding token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import greedy_reference

from evict.engine import SpecEngine
from evict.models import Qwen3MoeTarget, load_testbed
from evict.models import testbeds as tb
from evict.models.testbeds import PADDED_INTERMEDIATE, TESTBEDS, materialize_padded, pad_expert_tensors
from evict.truncation import TruncationPolicy

PROMPTS_TEXT = ("import os\n", "def main(args):\n    ", "The quick brown fox")


def _shipped(name: str):
    try:
        return tb.testbed_dir(name)
    except FileNotFoundError:
        pytest.skip(f"testbed {name} not shipped in this checkout")


def test_unknown_testbed_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="moe32, moe128, moe128-padded"):
        tb.testbed_dir("moe64")
    with pytest.raises(ValueError, match="target/config.json"):
        tb.testbed_dir(tmp_path)  # a folder without the pair


def test_a_folder_with_a_pair_is_accepted_as_is(tmp_path):
    for sub in ("target", "drafter"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text("{}")
    assert tb.testbed_dir(tmp_path) == tmp_path


def test_pad_expert_tensors_pads_only_expert_intermediate_dims_with_zeros():
    g = torch.randn(3, 5)
    d = torch.randn(5, 3)
    other = torch.randn(7, 5)
    out = pad_expert_tensors(
        {
            "model.layers.0.mlp.experts.1.gate_proj.weight": g,
            "model.layers.0.mlp.experts.1.up_proj.weight": g,
            "model.layers.0.mlp.experts.1.down_proj.weight": d,
            "model.layers.0.mlp.gate.weight": other,
        },
        3,
        8,
    )
    gp = out["model.layers.0.mlp.experts.1.gate_proj.weight"]
    dp = out["model.layers.0.mlp.experts.1.down_proj.weight"]
    assert gp.shape == (8, 5) and dp.shape == (5, 8)
    assert torch.equal(gp[:3], g) and not gp[3:].any()
    assert torch.equal(dp[:, :3], d) and not dp[:, 3:].any()
    assert out["model.layers.0.mlp.gate.weight"] is other or torch.equal(
        out["model.layers.0.mlp.gate.weight"], other
    )
    with pytest.raises(ValueError, match="below"):
        pad_expert_tensors({}, 8, 3)
    with pytest.raises(ValueError, match="expected 4 rows"):
        pad_expert_tensors({"model.layers.0.mlp.experts.0.up_proj.weight": g}, 4, 8)


@pytest.mark.parametrize("name", ["moe32", "moe128"])
def test_padded_copy_computes_the_same_logits_and_greedy_text(name, tmp_path):
    """Small padding here (the function is what is checked); the shipped width is checked below."""
    shipped = _shipped(name)
    inter = json.loads((shipped / "target" / "config.json").read_text())["moe_intermediate_size"]
    padded_dir = materialize_padded(shipped, inter + 40, cache_root=tmp_path)
    cfg = json.loads((padded_dir / "target" / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == inter + 40
    assert cfg["evict_padded_from"]["moe_intermediate_size"] == inter
    assert materialize_padded(shipped, inter + 40, cache_root=tmp_path) == padded_dir  # reused
    base, _, tok = load_testbed(name=shipped)
    padded = Qwen3MoeTarget.from_pretrained(padded_dir / "target")
    ids = torch.tensor([tok.encode("def main(args):\n    return [x for x in args]\n")])
    pos = torch.arange(ids.shape[1]).view(1, -1)
    with torch.no_grad():
        a = base(ids, pos).logits
        b = padded(ids, pos).logits
    # zero rows/columns add exact zeros; only the GEMM's blocking over the longer K may reorder sums
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_shipped_padded_variant_is_the_trained_pair_token_for_token():
    """moe128-padded at its shipped width: greedy AR, static tree and EVICT all emit moe128's text."""
    root = _shipped("moe128-padded")
    assert (
        json.loads((root / "target" / "config.json").read_text())["moe_intermediate_size"]
        == PADDED_INTERMEDIATE
    )
    base, _, tok = load_testbed(name="moe128")
    target, drafter, _ = load_testbed(name="moe128-padded")
    prompts = [[int(i) for i in tok.encode(t)] for t in PROMPTS_TEXT]
    ref = [greedy_reference(base, p, 10) for p in prompts]
    assert [greedy_reference(target, p, 10) for p in prompts] == ref
    policy = TruncationPolicy([1.0, 1.3, 1.8, 2.6, 4.0], widths=[1, 2, 4, 8, 16])
    res = SpecEngine(
        target, drafter, mode="evict", steps=4, topk=4, num_draft_tokens=16, policy=policy
    ).generate(prompts, 10)
    assert res.tokens == ref


def test_every_named_testbed_is_listed_with_its_folder():
    assert set(TESTBEDS) == {"moe32", "moe128", "moe128-padded"}
    assert TESTBEDS["moe128-padded"].folder == TESTBEDS["moe128"].folder
    assert TESTBEDS["moe128-padded"].pad_intermediate == PADDED_INTERMEDIATE


def test_each_padded_testbed_finds_its_own_shipped_cost_table():
    """``--testbed moe128-padded`` on a 1-thread run uses its shipped table, not the first pair's."""
    from evict.paths import TESTBED_COST_TABLE, shipped_config
    from evict.profiler.auto import shipped_table_for
    from evict.profiler.table import checkpoint_config_hash

    padded = checkpoint_config_hash(_shipped("moe128-padded") / "target")
    path = shipped_table_for(padded)
    assert path is not None and path.name == "testbed_moe128_padded_cpu_cost_table.json"
    assert json.loads(path.read_text())["metadata"]["model_config_hash"] == padded
    first = checkpoint_config_hash(_shipped("moe32") / "target")
    assert shipped_table_for(first) == shipped_config(TESTBED_COST_TABLE)
    assert shipped_table_for("0" * 16) == shipped_config(TESTBED_COST_TABLE)  # mismatch reported on it


def test_a_padded_copy_is_keyed_by_the_pairs_contents_drafter_included(tmp_path):
    """A retrained drafter (it is copied into the padded folder) must not be served from an old copy;
    an identical pair (a fresh clone) finds the copy it made before."""
    from safetensors.torch import save_file

    pair = tmp_path / "pair"
    (pair / "target").mkdir(parents=True)
    (pair / "drafter").mkdir()
    (pair / "target" / "config.json").write_text(json.dumps({"moe_intermediate_size": 2}))
    save_file(
        {"model.layers.0.mlp.experts.0.up_proj.weight": torch.ones(2, 3)},
        str(pair / "target" / "model.safetensors"),
    )
    (pair / "drafter" / "config.json").write_text('{"v": 1}')
    first = materialize_padded(pair, 4, cache_root=tmp_path / "cache")
    assert materialize_padded(pair, 4, cache_root=tmp_path / "cache") == first
    (pair / "drafter" / "config.json").write_text('{"v": 2}')
    second = materialize_padded(pair, 4, cache_root=tmp_path / "cache")
    assert second != first
    assert json.loads((second / "drafter" / "config.json").read_text()) == {"v": 2}


@pytest.mark.parametrize(
    "module",
    ["evict.cli", "evict.profiler.cli", "evict.bench.cli", "evict.bench.oracle_gap",
     "evict.bench.domain_shift", "evict.bench.served"],
)  # fmt: skip
def test_every_testbed_option_lists_every_testbed(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    parsers = [parser] + [p for s in subs for p in s.choices.values()]
    helps = [a.help for p in parsers for a in p._actions if "--testbed" in a.option_strings]
    assert helps, f"{module} has no --testbed option"
    for text in helps:
        assert all(name in text for name in TESTBEDS), text
        assert f"{tb.DEFAULT_TESTBED} (default)" in text, text
