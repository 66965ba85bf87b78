"""Bad inputs a user would give each front end: every one ends in one clear line (or a counted fallback).

The list, with what each input gets, is docs/bad_inputs.md. Each front-end case also proves the
check runs *before* the expensive part: the model loader is replaced by one that fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from evict import cli as gen_cli
from evict.bench import cli as bench_cli
from evict.boundary import BoundaryError, check_unique, write_folder_atomically
from evict.plugin.config import EvictConfigError, load_cost_table, parse_env, resolve_widths
from evict.profiler import cli as prof_cli
from evict.profiler import torch_backend
from evict.profiler.table import CostTable, CostTableError

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
NO_CUDA = not torch.cuda.is_available()


def _no_load(*a, **k):
    raise AssertionError("the model was loaded before the bad input was found")


def _run(main, argv) -> tuple[int, str]:
    """Run a console main; return (exit status, stderr). argparse's own errors arrive as SystemExit."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def _one_line(err: str, prog: str) -> str:
    text = err.strip()
    assert "Traceback" not in text
    assert text.count("\n") == 0, f"expected one line, got:\n{text}"
    assert text.startswith(prog) and ": error: " in text, text  # "evict generate: error: ..." too
    return text


def _table_dict(**meta) -> dict:
    med = [[10.0, 12.0, 16.0]]
    return {
        "schema_version": 1,
        "metadata": {"model_id": "m", "device": "cpu", "dtype": "float32", "tp_size": 1, **meta},
        "batch_sizes": [1],
        "widths": [1, 2, 4],
        "latency_ms": {"median": med, "p10": med, "p90": med},
    }


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A plain file, an existing directory with foreign files, a results folder, a table, a bad JSON."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    return {"plain": plain, "dir": foreign, "broken": broken, "array": array, "tmp": tmp_path}


def _sub(argv: list[str], f: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in f.items()}) for a in argv]


# ------------------------------------------------------------------------------ evict generate

GENERATE_CASES = [
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
    (["--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    (["--prompt", "x", "--topk", "0"], "--topk must be >= 1"),
    (
        ["--prompt", "x", "--mode", "static", "--num-draft-tokens", "0"],
        "--num-draft-tokens 0 is outside 1..53",
    ),
    (["--prompt", "x", "--steps", "2", "--topk", "2", "--num-draft-tokens", "100"], "is outside 1..7"),
    (["--prompt", "x", "--mode", "evict", "--num-draft-tokens", "1"], "--num-draft-tokens >= 2"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", ""], "--prompt is empty"),
    (
        ["--prompt", "x", "--cost-table", "{tmp}/none.json"],
        "file not found; give the path of an existing cost",
    ),
    (["--prompt", "x", "--cost-table", "{dir}"], "is a directory; give the path of a cost table JSON"),
    (["--prompt", "x", "--acceptance-prior", "{plain}"], "--acceptance-prior needs --acceptance calibrated"),
    (
        ["--prompt", "x", "--acceptance", "calibrated", "--acceptance-prior", "{tmp}/no.json"],
        "--acceptance-prior",
    ),
    (["--prompt", "x", "--device", "tpu"], "--device 'tpu' is not supported; use cpu or cuda[:N]"),
    pytest.param(
        ["--prompt", "x", "--device", "cuda"],
        "torch sees no CUDA device; use --device cpu",
        marks=pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA message"),
    ),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the target's 4096 positions"),
    (["--prompt", "x", "--mode", "bogus"], "invalid choice: 'bogus'"),
    (["--prompt", "x", "--max-new-tokens", "abc"], "invalid int value: 'abc'"),
    ([], "the following arguments are required: --prompt"),
    (["--prompt", "x", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["--prompt", "x", "--decision", "eager"], "invalid choice: 'eager'"),
    (["--prompt", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("argv", "needle"), GENERATE_CASES)
def test_generate_rejects_before_loading(argv, needle, files, monkeypatch):
    monkeypatch.setattr(gen_cli, "_load_pair", _no_load)
    code, err = _run(gen_cli.main, ["generate", *_sub(argv, files)])
    assert code == 2
    assert needle in _one_line(err, "evict"), err


class _Tok:
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % 15) for c in text]

    def decode(self, ids: list[int]) -> str:
        return ""


@pytest.fixture
def loaded_pair(monkeypatch, tmp_path):
    """``evict generate`` with a tiny in-memory pair (for the checks that need the tokenizer or table)."""
    from engine_fixtures import oracle_pair

    target, drafter = oracle_pair(0)
    monkeypatch.setattr(gen_cli, "_load_pair", lambda device, dtype, testbed=None: (target, drafter, _Tok()))
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(target.config.to_dict(), default=str))
    monkeypatch.setattr(gen_cli, "_model_dirs", lambda testbed=None: (folder, tmp_path / "no_drafter"))
    return target


AFTER_LOAD_CASES = [
    ("broken table", ["--cost-table", "{broken}"], "invalid JSON at line 1"),
    ("table that is a JSON array", ["--cost-table", "{array}"], "expected a JSON object, got list"),
    ("table for another device", ["--cost-table", "{other}"], "--allow-table-mismatch"),
    (
        "broken acceptance prior",
        ["--acceptance", "calibrated", "--acceptance-prior", "{broken}", "--cost-table", "{other}"],
        "--allow-table-mismatch",  # the table is checked first
    ),
    (
        "broken acceptance prior, table allowed",
        ["--acceptance", "calibrated", "--acceptance-prior", "{broken}", "--cost-table", "{other}"]
        + ["--allow-table-mismatch"],
        "cannot read acceptance prior",
    ),
    (
        "prompt of tokens beyond the limit",
        ["--max-new-tokens", "400", "--prompt-long"],
        "shorten the prompt",
    ),
]


@pytest.mark.parametrize(("name", "extra", "needle"), AFTER_LOAD_CASES, ids=[c[0] for c in AFTER_LOAD_CASES])
def test_generate_rejects_files_after_loading_with_one_line(
    name, extra, needle, files, loaded_pair, tmp_path
):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_table_dict(device="NVIDIA H100")))
    files = {**files, "other": other}
    prompt = "x" * 200 if "--prompt-long" in extra else "hello"
    extra = [a for a in extra if a != "--prompt-long"]
    argv = ["generate", "--prompt", prompt, "--mode", "evict", "--steps", "2", "--topk", "2"]
    argv += ["--num-draft-tokens", "7", *_sub(extra, files)]
    code, err = _run(gen_cli.main, argv)
    assert code == 2
    assert needle in _one_line(err, "evict"), err


def test_generate_ctrl_c_is_one_line_and_130(monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_cli, "_load_pair", interrupt)
    code, err = _run(gen_cli.main, ["generate", "--prompt", "x", "--mode", "ar"])
    assert code == 130 and err.strip() == "evict: interrupted"


# ------------------------------------------------------------------------------ evict-profile

PROFILE_CASES = [
    (["--out", "{dir}"], "is a directory; give a file path such as"),
    (["--out", "{plain}/t.json"], "is a file, not a folder"),
    (["--out", "{tmp}/t.json", "--plot", "{dir}"], "--plot"),
    (["--out", "{tmp}/t.json", "--plot", "{tmp}/t.json"], "is the table itself; give a .png path"),
    (["--out", "{tmp}/t.json", "--no-plot", "--plot", "{tmp}/p.png"], "--plot and --no-plot contradict"),
    (["--check", "{tmp}/none.json"], "--check"),
    (["--check", "{dir}"], "is a directory"),
    (["--replot", "{tmp}/none.json"], "--replot"),
    (["--replot", "{plain}", "--check", "{plain}"], "--replot and --check do different jobs"),
    (["--check", "{plain}", "--plot", "{tmp}/p.png"], "--check writes no plot"),
    (["--check", "{broken}"], "invalid JSON at line 1"),
    (["--widths", "0,4"], "--widths: 0 is below the minimum 1"),
    (["--widths", "1,two"], "--widths: 'two' is not an integer"),
    (["--batch-sizes", "1.5"], "--batch-sizes: '1.5' is not an integer"),
    (["--batch-sizes", ","], "--batch-sizes: empty list"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--context-len", "0"], "--context-len must be >= 1"),
    (["--tolerance", "0"], "--tolerance must be > 0"),
    (["--tolerance", "nan"], "--tolerance must be > 0"),
    (["--tp-size", "2"], "--tp-size > 1: the torch backend runs on one device"),
    (["--check-points", "0"], "--check-points must be >= 1"),
    (["--draft-steps", "0"], "--draft-steps and --draft-topk must be >= 1"),
    (["--draft-model", "{dir}"], "has no config.json; pass an EAGLE-3 drafter directory"),
    (["--backend", "sglang"], "--backend sglang is retired"),
    (["--device", "tpu", "--out", "{tmp}/t.json"], "unknown device 'tpu'"),
    pytest.param(
        ["--device", "cuda", "--out", "{tmp}/t.json"],
        "torch sees no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA message"),
    ),
    (["--context-len", "5000", "--out", "{tmp}/t.json"], "max_position_embeddings 4096; lower --context-len"),
    (["--model", "{tmp}/nope", "--out", "{tmp}/t.json"], "does not exist"),
    (["--model", "{dir}", "--out", "{tmp}/t.json"], "no config.json"),
    (["--model", "{plain}", "--out", "{tmp}/t.json"], "is not a directory"),
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--repeats", "many"], "invalid int value: 'many'"),
    (
        ["--testbed", "moe64", "--out", "{tmp}/t.json"],
        "--testbed: testbed 'moe64' is neither a known testbed",
    ),
    (["--testbed", "moe128", "--model", "{dir}"], "--testbed names both models; leave out --model"),
]


@pytest.mark.parametrize(("argv", "needle"), PROFILE_CASES)
def test_profile_rejects_before_loading(argv, needle, files, monkeypatch):
    monkeypatch.setattr(torch_backend, "make_runner", _no_load)
    code, err = _run(prof_cli.main, _sub(argv, files))
    assert code == 2
    assert needle in _one_line(err, "evict-profile"), err
    assert not (files["tmp"] / "t.json").exists()


def test_profile_ctrl_c_keeps_the_previous_table(tmp_path, monkeypatch):
    out = tmp_path / "t.json"
    out.write_text("previous")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prof_cli, "_measure", interrupt)
    code, err = _run(prof_cli.main, ["--out", str(out), "--quiet"])
    assert code == 130 and out.read_text() == "previous"
    assert err.strip() == "evict-profile: interrupted; nothing was written (a previous table is unchanged)"


# ------------------------------------------------------------------------------ evict-bench

BENCH_CASES = [
    (["--out", "{plain}"], "is a file; give a folder"),
    (["--out", "{dir}"], "holds files that are not a previous result (no results.json)"),
    (["--out", "{plain}/sub"], "is a file, not a folder"),
    (["--seeds", "0", "0"], "--seeds repeats 0; list each value once"),
    (["--batch-sizes", "1", "1"], "--batch-sizes repeats 1"),
    (["--batch-sizes", "0"], "batch sizes, --num-prompts and --max-new-tokens must be >= 1"),
    (["--num-prompts", "0"], "must be >= 1, got [1, 4, 16], 0"),
    (["--max-new-tokens", "0"], "must be >= 1, got [1, 4, 16], 8, 0"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
    (["--chain-steps", "0"], "--chain-steps must be >= 1"),
    (["--max-batches", "-1"], "--max-batches must be >= 0"),
    (["--moe-spec-budget", "-1"], "--moe-spec-budget must be >= 1 experts"),
    (["--moe-spec-tree", "3,1,4"], "--moe-spec-tree has no effect without --moe-spec-budget"),
    (["--no-sweep", "--sweep-grid", "quick"], "--sweep-grid and --no-sweep contradict"),
    (["--acceptance", "raw", "--acceptance-prior", "{plain}"], "--acceptance-prior warms the calibrated"),
    (["--acceptance-prior", "{tmp}/none.json"], "--acceptance-prior"),
    (["--acceptance-prior", "{broken}"], "is not valid JSON"),
    (["--acceptance-prior", "{array}"], "is not an acceptance prior"),
    (["--cost-table", "{tmp}/none.json"], "file not found"),
    (["--cost-table", "{dir}"], "is a directory"),
    (["--extra-cost-table", "{tmp}/none.json"], "--extra-cost-table"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--nice", "-1"], "lowering the niceness needs root"),
    (["--device", "tpu"], "--device 'tpu' is not supported"),
    pytest.param(
        ["--device", "cuda"],
        "torch sees no CUDA device",
        marks=pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA message"),
    ),
    (["--testbed", "{tmp}/nope"], "neither a known testbed (moe32, moe128, moe128-padded) nor a folder"),
    (["--max-new-tokens", "5000"], "beyond the target's max_position_embeddings 4096"),
    (["--evict-tree", "3,1,9"], "at most steps + 1"),
    (["--evict-tree", "a,b,c"], "must be three integers"),
    (["--batch-sizes", "32", "--num-prompts", "2"], "raise --num-prompts"),
    (["--ood-prompts", "-1"], "--ood-prompts must be >= 0"),
    (["--seeds", "x"], "invalid int value: 'x'"),
    (["--clock", "gpu"], "invalid choice: 'gpu'"),
]


@pytest.mark.parametrize(("argv", "needle"), BENCH_CASES)
def test_bench_rejects_before_loading(argv, needle, files, monkeypatch):
    monkeypatch.setattr(bench_cli, "_load", _no_load)
    code, err = _run(bench_cli.main, ["--out", str(files["tmp"] / "res"), *_sub(argv, files)])
    assert code == 2
    assert needle in _one_line(err, "evict-bench"), err
    assert not (files["tmp"] / "res").exists()


def _fake_bench_run(monkeypatch, out: Path, plots=None) -> int:
    from test_bench import ByteTokenizer, FakeEngine, FakeTable, FakeTarget

    from evict.bench import report

    target = FakeTarget()
    target.config = type("C", (), {"num_experts": 8, "norm_topk_prob": True})()
    monkeypatch.setattr(
        bench_cli, "_load", lambda a, d: (target, None, ByteTokenizer(), FakeTable(), [], None)
    )
    monkeypatch.setattr(
        bench_cli, "_engine_factory", lambda t, d, dev, p=None: lambda m, p: FakeEngine(m, target)
    )
    if plots is not None:
        monkeypatch.setattr(report, "save_plots", plots)
    argv = ["--quick", "--batch-sizes", "1", "--no-sweep", "--no-ablation", "--max-new-tokens", "4"]
    argv += ["--prompt-tokens", "8", "--evict-tree", "3,2,8", "--device", "cpu", "--no-oracle"]
    code, _ = _run(bench_cli.main, argv + ["--acceptance", "raw", "--ood-prompts", "0", "--out", str(out)])
    return code


def test_bench_results_folder_is_replaced_as_a_unit(tmp_path, monkeypatch):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "old_mode.png").write_text("from an earlier run with more modes")
    assert _fake_bench_run(monkeypatch, out) == 0
    names = {p.name for p in out.iterdir()}
    assert "old_mode.png" not in names and {"results.md", "results.json", "throughput.png"} <= names
    assert "old" not in json.loads((out / "results.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["res"]  # no temporary sibling left
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_bench_interrupted_while_writing_keeps_the_previous_results(tmp_path, monkeypatch):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')

    def interrupted_plots(summary, folder):
        assert (folder / "results.md").is_file() and folder != out  # written aside
        raise KeyboardInterrupt

    assert _fake_bench_run(monkeypatch, out, plots=interrupted_plots) == 130
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["res"]


def test_bench_ctrl_c_is_one_line_and_130(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "_load", interrupt)
    code, err = _run(bench_cli.main, ["--quick", "--out", str(tmp_path / "r")])
    assert code == 130
    assert err.strip() == "evict-bench: interrupted; no results written (a previous --out is unchanged)"


def test_write_folder_atomically_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "res"
    final.mkdir()
    (final / "results.json").write_text("old")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # moving the new folder into place fails
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"), write_folder_atomically(final) as tmp:
        (tmp / "results.json").write_text("new")
    assert (final / "results.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["res"]


def test_check_unique_names_every_repeat():
    check_unique([0, 1, 2], "--seeds")
    with pytest.raises(BoundaryError, match=r"--seeds repeats 0, 2; list each value once"):
        check_unique([2, 0, 1, 0, 2, 2], "--seeds")


# ------------------------------------------------------------------------------ plugin environment

ENV_CASES = [
    ({"EVICT_WIDHTS": "4,8"}, "did you mean EVICT_WIDTHS?"),
    ({"EVICT_COSTTABLE": "t.json"}, "did you mean EVICT_COST_TABLE?"),
    ({"EVICT_DISABLE": "maybe"}, "not a boolean"),
    ({"EVICT_ALLOW_TABLE_MISMATCH": "2"}, "not a boolean"),
    ({"EVICT_RECALIBRATE": "always"}, "not a boolean"),
    ({"EVICT_DECISION": "eager"}, "use one of: immediate, lagged"),
    ({"EVICT_BACKEND": "cuda"}, "use one of: torch, triton"),
    ({"EVICT_WIDTHS": "4,x"}, "'x' is not an integer"),
    ({"EVICT_WIDTHS": "0,4"}, "width 0 < 1"),
    ({"EVICT_WIDTHS": "-4"}, "width -4 < 1"),
    ({"EVICT_WIDTHS": "4,4"}, "repeats a width"),
    ({"EVICT_WIDTHS": ","}, "EVICT_WIDTHS is empty"),
    ({"EVICT_LOG_INTERVAL": "ten"}, "not an integer"),
    ({"EVICT_LOG_INTERVAL": "1.5"}, "not an integer"),
    ({"EVICT_LOG_INTERVAL": "-1"}, "is negative; use 0 to turn logging off"),
]


@pytest.mark.parametrize(("env", "needle"), ENV_CASES)
def test_plugin_env_bad_values(env, needle):
    with pytest.raises(EvictConfigError) as exc:
        parse_env(env)
    assert needle in str(exc.value) and next(iter(env)) in str(exc.value)


PLUGIN_TABLE_CASES = [
    ("missing file", "{tmp}/none.json", "file not found"),
    ("a directory", "{dir}", "file not found"),
    ("broken JSON", "{broken}", "invalid JSON"),
    ("a JSON array", "{array}", "expected a JSON object"),
]


@pytest.mark.parametrize(
    ("name", "path", "needle"), PLUGIN_TABLE_CASES, ids=[c[0] for c in PLUGIN_TABLE_CASES]
)
def test_plugin_cost_table_files(name, path, needle, files):
    cfg = parse_env({"EVICT_COST_TABLE": _sub([path], files)[0]})
    with pytest.raises(EvictConfigError) as exc:
        load_cost_table(cfg)
    msg = str(exc.value)
    assert needle in msg and msg.startswith("EVICT_COST_TABLE=") and "calibrates its own table" in msg


def test_plugin_widths_beyond_the_tree_or_the_table():
    with pytest.raises(EvictConfigError, match=r"EVICT_WIDTHS=4,64 with --speculative-num-draft-tokens=8"):
        resolve_widths((4, 64), 8)
    with pytest.raises(EvictConfigError, match=r"covers widths 1\.\.4 .*unset EVICT_COST_TABLE"):
        resolve_widths((2, 8), 8, table_widths=[1, 2, 4])


# ------------------------------------------------------------------------------ cost-table files

TABLE_CASES = [
    ("empty file", "", "invalid JSON"),
    ("binary garbage", b"\xff\xfe\x00garbage", "cannot read the file"),
    ("NaN latency", json.dumps(_table_dict()).replace("16.0", "NaN"), "finite number, got nan"),
    ("boolean tp_size", json.dumps(_table_dict(tp_size=True)), "metadata.tp_size"),
    ("empty device", json.dumps(_table_dict(device="")), "metadata.device"),
    ("schema version as text", json.dumps({**_table_dict(), "schema_version": "1"}), "schema_version"),
    ("negative draft_topk", json.dumps(_table_dict(draft_topk=0)), "metadata.draft_topk"),
    ("versions not an object", json.dumps(_table_dict(versions="2.13")), "metadata.versions"),
]


@pytest.mark.parametrize(("name", "content", "needle"), TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_cost_table_files(name, content, needle, tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CostTableError) as exc:
        CostTable.load(p)
    assert needle in str(exc.value) and "t.json" in str(exc.value)
