"""Tests of evict-profile: the torch timing backend, expert counting, the CLI's errors, --check, plot.

Models are tiny random Qwen3-MoE checkpoints written to a temp dir (and the shipped testbed target
when present), so the whole file runs in a few seconds on one CPU core.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from evict.profiler import cli
from evict.profiler.experts import (
    ExpertRecorder,
    layer_union,
    mean_union,
    topk_from_router_logits,
    uniform_union,
)
from evict.profiler.table import CostTable
from evict.profiler.torch_backend import (
    HFRunner,
    ancestor_mask,
    engine_available,
    percentile,
    random_tree_parents,
    read_model_config,
    sibling_ranks,
    tree_depths,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 8-expert top-2 Qwen3-MoE with non-degenerate random router weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # routing that depends on the token
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    model.save_pretrained(path)
    return path


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


def cli_error(argv: list[str]) -> str:
    """Run the CLI expecting one clean error line and exit status 2; return the line."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    text = err.getvalue().strip()
    assert code == 2, f"expected exit status 2, got {code!r} ({text})"
    assert text.startswith("evict-profile: error: ") and "\n" not in text and "Traceback" not in text
    return text


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------------------
# trees and statistics


def test_random_tree_is_nested_and_parents_precede_children():
    gen = torch.Generator().manual_seed(3)
    parents = random_tree_parents(40, gen)
    assert parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(parents) if i > 0)
    depth = tree_depths(parents)
    mask = ancestor_mask(parents)
    for i, p in enumerate(parents):
        # each node sees itself and exactly its depth-many ancestors
        assert mask[i, i] and int(mask[i].sum()) == depth[i] + 1
        if p >= 0:
            assert mask[i, p] and torch.equal(mask[i] & ~torch.eye(40, dtype=torch.bool)[i], mask[p])
    # the first w nodes form the tree used for width w: its mask is the top-left block
    assert torch.equal(ancestor_mask(parents[:7]), mask[:7, :7])
    ranks = sibling_ranks([-1, 0, 0, 1, 0, 1])
    assert ranks == [0, 0, 1, 0, 2, 1]


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 3.0, 2.0, 8.0, 13.0]
    for q in (0, 10, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


class _FakeRunner:
    """Prefill-only stand-in: logits rank token (id + r) % V r-th after the id at each position."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def prefill(self, ids, context_len, max_width):
        tail = ids[:, context_len - 1 :]
        v = torch.arange(self.vocab)
        return -((v.view(1, 1, -1) - tail.unsqueeze(-1)) % self.vocab).float()


@pytest.mark.parametrize("mode", ["random", "draft"])
def test_inputs_of_a_request_do_not_depend_on_the_grid(tmp_path, mode):
    """Request b sees the same context, tree and tokens at any batch size or max width (for --check)."""
    from evict.profiler.torch_backend import _build_inputs

    vocab, ctx = 97, 8
    small = _build_inputs(_FakeRunner(vocab), 2, ctx, 5, vocab, mode, 0, tmp_path, torch.device("cpu"))
    big = _build_inputs(_FakeRunner(vocab), 3, ctx, 12, vocab, mode, 0, tmp_path, torch.device("cpu"))
    for b in range(2):
        assert big.parents[b][:5] == small.parents[b]
        assert torch.equal(big.tokens[b, :5], small.tokens[b])
        assert torch.equal(big.prefill_ids[b, :ctx], small.prefill_ids[b, :ctx])
    if mode == "draft":
        # a node's token is its sibling rank's prediction after the text at its depth
        depth, rank = tree_depths(big.parents[0]), sibling_ranks(big.parents[0])
        for i in range(1, 12):
            expect = (int(big.prefill_ids[0, ctx - 1 + depth[i]]) + rank[i]) % vocab
            assert int(big.tokens[0, i]) == expect


# ------------------------------------------------------------------------------------------------
# expert counting


def brute_force_union(router_logits: torch.Tensor, top_k: int) -> int:
    chosen = set()
    for row in router_logits.tolist():
        order = sorted(range(len(row)), key=lambda e: row[e], reverse=True)
        chosen.update(order[:top_k])
    return len(chosen)


def test_layer_union_equals_brute_force_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    for n, e, k in [(1, 8, 2), (5, 16, 4), (64, 32, 4), (3, 4, 4)]:
        logits = torch.randn(n, e, generator=gen)
        assert layer_union(topk_from_router_logits(logits, k), e) == brute_force_union(logits, k)
    with pytest.raises(ValueError, match="out of range"):
        layer_union(torch.tensor([[0, 9]]), 8)


def test_uniform_union_formula():
    assert uniform_union(32, 4, 1) == pytest.approx(4.0)
    assert uniform_union(32, 4, 0) == 0.0
    assert uniform_union(32, 4, 10_000) == pytest.approx(32.0)


def test_recorded_union_equals_brute_force_from_router_logits(tiny_model):
    """The union the profiler records for a tree verify equals a set count over the model's router logits."""
    cfg = read_model_config(tiny_model)
    runner = HFRunner(tiny_model, torch.float32, torch.device("cpu"), cfg)
    ctx, w, bs = 12, 6, 2
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (bs, ctx + 1), generator=gen)
    parents = [-1, 0, 0, 1, 1, 2]
    tree = torch.randint(0, 512, (bs, w), generator=gen)
    depth = tree_depths(parents)
    pos = torch.tensor([[ctx + d for d in depth]] * bs)
    mask = torch.ones(bs, w, ctx + w, dtype=torch.bool)
    mask[:, :, ctx:] = ancestor_mask(parents)
    with torch.inference_mode():
        runner.prefill(ids, ctx, w)
        recorded = runner.verify(tree, pos, mask, record=True)
        assert runner.past.get_seq_length() == ctx  # the context is left as it was
        # brute force: the decoder's router logits for the same tree forward
        neg = torch.finfo(torch.float32).min
        add = torch.zeros(mask.shape).masked_fill_(~mask, neg).unsqueeze(1)
        out = runner.model.get_decoder()(
            input_ids=tree,
            position_ids=pos,
            attention_mask=add,
            past_key_values=runner.past,
            use_cache=True,
            output_router_logits=True,
        )
    assert len(recorded) == len(out.router_logits) == 2
    expected = [brute_force_union(r, 2) for r in out.router_logits]
    assert [layer_union(t, 8) for t in recorded] == expected
    assert mean_union(recorded, 8) == pytest.approx(sum(expected) / 2)
    assert all(2 <= u <= 8 for u in expected)


def test_expert_recorder_matches_hook_contract():
    rec = ExpertRecorder(num_experts=6)
    logits = torch.randn(5, 6)
    ids = topk_from_router_logits(logits, 2)
    assert rec(1, logits, ids) is None  # routing unchanged
    rec(0, logits, ids[:1])
    assert [t.shape[0] for t in rec.per_layer()] == [1, 5]
    assert rec.mean_union() == pytest.approx((2 + layer_union(ids, 6)) / 2)


# ------------------------------------------------------------------------------------------------
# the CLI end to end on CPU


SMALL = [
    "--batch-sizes",
    "1,2",
    "--widths",
    "1",
    "4",
    "8",
    "--context-len",
    "16",
    "--repeats",
    "3",
    "--quiet",
]


@pytest.mark.parametrize("tokens", ["draft", "random"])
def test_torch_backend_writes_valid_table_and_png(tiny_model, tmp_path, tokens):
    out = tmp_path / "table.json"
    assert (
        run_cli(["--model", str(tiny_model), "--impl", "hf", "--tokens", tokens, "--out", str(out), *SMALL])
        == 0
    )
    table = CostTable.load(out)
    assert table.batch_sizes == [1, 2] and table.widths == [1, 4, 8]
    meta = table.metadata
    assert meta["backend"] == "torch" and meta["dtype"] == "float32" and meta["tp_size"] == 1
    assert meta["context_len"] == 16 and meta["repeats"] == 3
    assert meta["device"].startswith("cpu")
    from evict.profiler.table import model_config_hash

    assert meta["model_config_hash"] == model_config_hash(
        json.loads((tiny_model / "config.json").read_text())
    )
    assert "torch" in meta["versions"] and "transformers" in meta["versions"]
    # one verified token per request routes to exactly top_k experts; more tokens never fewer
    union = table.expert_union
    assert union[0][0] == pytest.approx(2.0)
    for row in union:
        assert all(2.0 <= u <= 8.0 for u in row)
        assert row == sorted(row)  # nested trees: the union can only grow with the width
    table.check_compatible(
        config_hash=meta["model_config_hash"], device=meta["device"], dtype="float32", tp_size=1
    )
    w, h = png_size(out.with_suffix(".png"))
    assert w > 300 and h > 200
    assert meta["command"].startswith("evict-profile --model")
    # --replot redraws from the JSON alone
    replot = tmp_path / "again.png"
    assert run_cli(["--replot", str(out), "--plot", str(replot)]) == 0
    assert png_size(replot) == (w, h)


def test_other_moe_architecture_goes_through_transformers(tmp_path):
    """A Mixtral checkpoint (not qwen3_moe) is timed with AutoModelForCausalLM, unions included."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    model_dir = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(cfg).save_pretrained(model_dir)
    out = tmp_path / "mix.json"
    argv = ["--batch-sizes", "1", "--widths", "1,4", "--context-len", "8", "--repeats", "2", "--quiet"]
    assert (
        run_cli(["--model", str(model_dir), "--tokens", "random", "--no-plot", "--out", str(out), *argv]) == 0
    )
    table = CostTable.load(out)
    assert table.metadata["implementation"] == "transformers.AutoModelForCausalLM"
    assert table.metadata["model_type"] == "mixtral"
    assert table.expert_union[0][0] == pytest.approx(2.0) and 2.0 <= table.expert_union[0][1] <= 4.0


def test_cpu_clock_is_recorded_and_needs_one_thread(tiny_model, tmp_path):
    out = tmp_path / "cpu.json"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        argv = ["--model", str(tiny_model), "--impl", "hf", "--clock", "cpu", "--no-plot", "--out", str(out)]
        assert run_cli([*argv, *SMALL]) == 0
        assert CostTable.load(out).metadata["clock"].startswith("time.process_time")
        torch.set_num_threads(2)
        assert "--clock cpu needs one intra-op thread" in cli_error([*argv, *SMALL])
    finally:
        torch.set_num_threads(threads)


def test_engine_target_times_reference_engine(tiny_model, tmp_path):
    if not engine_available():
        pytest.skip("evict.models.Qwen3MoeTarget not available")
    out = tmp_path / "engine.json"
    assert run_cli(["--model", str(tiny_model), "--out", str(out), "--no-plot", *SMALL]) == 0
    table = CostTable.load(out)
    assert table.metadata["implementation"] == "evict.engine.Qwen3MoeTarget"
    assert table.expert_union[0][0] == pytest.approx(2.0)
    assert not out.with_suffix(".png").exists()


def test_draft_model_fills_fixed_ms(tiny_model, tmp_path):
    if not engine_available():
        pytest.skip("evict.models not available")
    from evict.models import Eagle3Drafter, Qwen3MoeTarget, eagle3_config

    target = Qwen3MoeTarget.from_pretrained(tiny_model)
    cfg = eagle3_config(target.config, draft_vocab_size=128, aux_layer_ids=target.aux_layer_ids)
    drafter_dir = tmp_path / "drafter"
    Eagle3Drafter.from_config(cfg, target, seed=0).save_pretrained(drafter_dir)
    out = tmp_path / "fixed.json"
    argv = ["--model", str(tiny_model), "--draft-model", str(drafter_dir), "--draft-steps", "2"]
    assert run_cli([*argv, "--no-plot", "--out", str(out), *SMALL]) == 0
    table = CostTable.load(out)
    assert table.fixed_ms is not None and len(table.fixed_ms) == 2 and min(table.fixed_ms) > 0
    assert "2 forwards x 4 tokens" in table.metadata["fixed_ms"]
    # the step cost the truncation rule reads is fixed + verify
    cost = table.step_cost(1, [1, 8])
    assert cost.tolist() == pytest.approx(
        [table.fixed_ms[0] + m for m in (table.median[0][0], table.median[0][2])]
    )
    missing = cli_error([*argv[:2], "--draft-model", str(tmp_path / "none"), "--out", str(out), *SMALL])
    assert "--draft-model" in missing and "no config.json" in missing


def test_shipped_testbed_target_profiles(tmp_path):
    target = cli.default_model_path()
    if not (target / "config.json").is_file() or not list(target.glob("*.safetensors")):
        pytest.skip("shipped testbed target not built yet")
    out = tmp_path / "testbed.json"
    argv = ["--batch-sizes", "1,2", "--widths", "1,8", "--context-len", "32", "--repeats", "2", "--quiet"]
    assert run_cli([*argv, "--out", str(out)]) == 0
    table = CostTable.load(out)
    cfg = json.loads((target / "config.json").read_text())
    k = cfg["num_experts_per_tok"]
    assert table.expert_union[0][0] == pytest.approx(k)
    assert table.expert_union[1][1] >= k


def test_shipped_cpu_table_matches_shipped_target():
    """configs/testbed_cpu_cost_table.json is valid and was measured on the shipped target's config."""
    from evict.profiler.table import model_config_hash

    repo = Path(__file__).resolve().parent.parent
    table_path = repo / "configs" / "testbed_cpu_cost_table.json"
    target = cli.default_model_path()
    if not table_path.is_file() or not (target / "config.json").is_file():
        pytest.skip("shipped table or testbed target not present")
    table = CostTable.load(table_path)
    cfg = json.loads((target / "config.json").read_text())
    table.check_compatible(config_hash=model_config_hash(cfg), tp_size=1, dtype="float32")
    meta = table.metadata
    assert meta["model_id"] == "evict/testbed/target" and meta["backend"] == "torch"
    assert meta["implementation"] == "evict.engine.Qwen3MoeTarget" and meta["tokens"] == "draft"
    assert table.batch_sizes == [1, 4, 16] and table.widths == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert table.fixed_ms is not None and len(table.fixed_ms) == 3
    for i, row in enumerate(table.expert_union):
        assert row == sorted(row) and row[0] >= cfg["num_experts_per_tok"]  # nested trees
        assert table.median[i][-1] > table.median[i][0]  # 64 tokens cost more than one
    assert '"/' not in table_path.read_text()  # no absolute machine paths in a shipped file


def test_check_mode_reports_drift_and_exit_codes(tiny_model, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert run_cli(["--model", str(tiny_model), "--impl", "hf", "--out", str(out), "--no-plot", *SMALL]) == 0
    capsys.readouterr()
    # against the table just measured, a tolerance far above timing noise on a loaded machine passes
    code = run_cli(
        ["--check", str(out), "--model", str(tiny_model), "--impl", "hf", "--tolerance", "1000", "--quiet"]
    )
    report = capsys.readouterr().out
    assert code == 0 and "rel_err" in report and "OK" in report
    # a table whose latencies are 1000x off has a relative error near 100% (tolerance 25%)
    slow = tmp_path / "slow.json"
    CostTable.load(out).scaled(1000.0).save(slow)
    code = run_cli(
        ["--check", str(slow), "--model", str(tiny_model), "--impl", "hf", "--check-points", "2", "--quiet"]
    )
    report = capsys.readouterr().out
    assert code == 1 and "DRIFT" in report and "FAILED" in report
    # a table for another device is refused with a clear message (CostTable.check_compatible)
    d = json.loads(out.read_text())
    d["metadata"]["device"] = "NVIDIA H100 80GB HBM3"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    msg = cli_error(["--check", str(other), "--model", str(tiny_model), "--impl", "hf", "--quiet"])
    assert "metadata.device" in msg and "H100" in msg


def _table_for_this_machine(model: Path, median: list[list[float]]) -> dict:
    from evict.profiler.table import checkpoint_config_hash
    from evict.profiler.torch_backend import device_name

    return {
        "schema_version": 1,
        "metadata": {
            "model_id": "tiny",
            "model_config_hash": checkpoint_config_hash(model),
            "device": device_name(torch.device("cpu")),
            "dtype": "float32",
            "tp_size": 1,
            "context_len": 16,
            "repeats": 2,
        },
        "batch_sizes": [1, 4],
        "widths": [1, 2, 8],
        "latency_ms": {"median": median, "p10": median, "p90": median},
    }


@pytest.mark.parametrize("off", [None, (4, 2), (1, 8)])
def test_check_compares_each_point_with_its_own_table_entry(tiny_model, tmp_path, monkeypatch, capsys, off):
    """--check reads table[bs][width] for every re-measured point (not one fixed cell): a machine that
    measures exactly the table passes, and a drift at one point flags that point and only it."""
    median = [[10.0, 13.0, 31.0], [20.0, 27.0, 70.0]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table_for_this_machine(tiny_model, median)))
    measured: list[list[tuple[int, int]]] = []

    def fake_measure(args, points=None):
        measured.append(list(points))
        bss, ws = [1, 4], [1, 2, 8]
        now = {(b, w): median[bss.index(b)][ws.index(w)] for b in bss for w in ws}
        if off is not None:
            now[off] *= 2.0

        class Result:
            def point(self, bs, w):
                return type("P", (), {"median_ms": now[(bs, w)]})()

        return Result()

    monkeypatch.setattr(cli, "_measure", fake_measure)
    code = run_cli(["--check", str(path), "--model", str(tiny_model), "--check-points", "4", "--quiet"])
    out = capsys.readouterr().out
    assert measured == [[(1, 1), (4, 8), (1, 8), (4, 2)]]
    rows = {tuple(map(int, ln.split()[:2])): ln for ln in out.splitlines()[1:-1]}
    assert set(rows) == {(1, 1), (4, 8), (1, 8), (4, 2)}
    for (b, w), line in rows.items():
        table_ms = float(line.split()[2])
        assert table_ms == pytest.approx(median[[1, 4].index(b)][[1, 2, 8].index(w)], abs=1e-3)
        assert ("DRIFT" in line) == ((b, w) == off)
    if off is None:
        assert code == 0 and "max relative error 0.0%" in out and out.rstrip().endswith("OK")
    else:
        assert code == 1 and "max relative error 100.0%" in out and "FAILED" in out


def test_check_refuses_table_of_another_model(tiny_model, tmp_path):
    d = {
        "schema_version": 1,
        "metadata": {
            "model_id": "x",
            "model_config_hash": "0123456789abcdef",
            "device": "cpu",
            "dtype": "float32",
            "tp_size": 1,
        },
        "batch_sizes": [1],
        "widths": [1, 2],
        "latency_ms": {"median": [[1.0, 2.0]], "p10": [[1.0, 2.0]], "p90": [[1.0, 2.0]]},
    }
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(d))
    msg = cli_error(["--check", str(path), "--model", str(tiny_model), "--quiet"])
    assert "model_config_hash" in msg and "Re-profile" in msg


# ------------------------------------------------------------------------------------------------
# bad arguments and bad models: SystemExit with a message, never a traceback


def test_unknown_backend_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--backend", "vllm"])
    assert exc.value.code == 2
    assert "invalid choice: 'vllm'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--widths", "0,4"], "--widths: 0 is below the minimum 1"),
        (["--widths", "1,two"], "--widths: 'two' is not an integer"),
        (["--batch-sizes", "1.5"], "--batch-sizes: '1.5' is not an integer"),
        (["--batch-sizes", ","], "--batch-sizes: empty list"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--context-len", "0"], "--context-len must be >= 1"),
        (["--tolerance", "0"], "--tolerance must be > 0"),
        (["--tp-size", "2"], "--tp-size > 1: the torch backend runs on one device"),
    ],
)
def test_bad_numeric_arguments(tiny_model, argv, needle):
    assert needle in cli_error(["--model", str(tiny_model), *argv])


def test_cuda_device_without_cuda(tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this checks the no-CUDA message")
    msg = cli_error(
        ["--model", str(tiny_model), "--device", "cuda", *SMALL, "--out", str(tmp_path / "t.json")]
    )
    assert "no CUDA device" in msg and "--device cpu" in msg


def test_missing_model_dir(tmp_path):
    msg = cli_error(["--model", str(tmp_path / "nope"), "--quiet"])
    assert "does not exist" in msg and "--model" in msg


def test_dir_without_config(tmp_path):
    msg = cli_error(["--model", str(tmp_path), "--quiet"])
    assert "no config.json" in msg


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in cli_error(["--model", str(tmp_path), "--quiet"])


def test_checkpoint_without_weights(tiny_model, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    assert "no *.safetensors weights" in cli_error(["--model", str(tmp_path), "--quiet"])


@pytest.mark.parametrize("impl", ["hf", "auto"])
def test_unloadable_weights(tiny_model, tmp_path, impl):
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)  # corrupt header
    msg = cli_error(["--model", str(tmp_path), "--impl", impl, *SMALL, "--out", str(tmp_path / "t.json")])
    assert "could not load" in msg and str(tmp_path) in msg


def test_sglang_backend_is_retired_in_favour_of_the_start_up_calibration(tiny_model, tmp_path):
    out = tmp_path / "t.json"
    msg = cli_error(["--model", str(tiny_model), "--backend", "sglang", "--quiet", "--out", str(out)])
    assert "--backend sglang is retired" in msg and "without EVICT_COST_TABLE" in msg
    assert "calibrates its own table at start-up" in msg and not out.exists()
