"""The GPU check's launcher and bookkeeping, on CPU: what the device call will run must be right here."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evict.testing import gpu_check, gpu_server
from evict.testing.cpu_server import eagle3_flags
from evict.testing.gpu_bundle import FAKE_CUDA_PRELUDE

ROOT = Path(__file__).resolve().parents[1]


def test_server_command_adds_the_gpu_flags_only_when_missing():
    cmd = gpu_server.gpu_server_command(["--attention-backend", "fa3", "--port", "1"], python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    assert cmd.count("--attention-backend") == 1 and "fa3" in cmd  # the caller's choice wins
    assert cmd[cmd.index("--sampling-backend") + 1] == "pytorch"
    assert "--disable-prefill-cuda-graph" in cmd
    assert cmd[cmd.index("--model-path") + 1] == str(gpu_server.TESTBED_TARGET)
    cmd = gpu_server.gpu_server_command(["--model-path=/m", "--grammar-backend=xgrammar"], python="py")
    assert "--model-path" not in cmd and "--grammar-backend" not in cmd


def test_env_puts_shim_bundle_and_checkout_first_once(tmp_path):
    env = gpu_server.gpu_env({"PYTHONPATH": f"/x{os.pathsep}{gpu_server.CUDA_SHIM_DIR}"}, site=tmp_path)
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts == [str(gpu_server.CUDA_SHIM_DIR), str(tmp_path), str(gpu_server.REPO_ROOT), "/x"]
    assert env["EVICT_CUDA_SHIM"] == "1" and env["SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK"] == "1"


def test_entry_point_record_is_found_by_importlib_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_server, "_evict_plugin_registered", lambda: False)
    info = gpu_server.ensure_entry_point(tmp_path)
    assert info is not None and info.parent == tmp_path
    code = (
        "import importlib.metadata as m;"
        "print([e.value for e in m.entry_points(group='sglang.srt.plugins') if e.name == 'evict'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "evict.plugin:register" in out
    dists = [d for d in importlib.metadata.distributions(path=[str(tmp_path)])]
    assert [d.metadata["Name"] for d in dists] == ["evict"]


def test_no_record_when_evict_is_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_server, "_evict_plugin_registered", lambda: True)
    assert gpu_server.ensure_entry_point(tmp_path) is None
    assert not any(tmp_path.iterdir())


def test_compare_greedy_counts_matches_and_first_mismatch():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8]]
    got = [[1, 2, 3], [4, 9, 6], [7]]
    assert gpu_check.compare_greedy(ref, got) == {"identical": 1, "of": 3, "first_mismatch": {1: 1, 2: 1}}


def test_record_survives_as_json_after_every_update(tmp_path):
    rec = gpu_check._Record(tmp_path / "x.json")
    rec["a"] = 1
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    rec["b"] = {"c": Path("/p")}  # anything str() can show is kept
    assert json.loads((tmp_path / "x.json").read_text())["b"] == {"c": "/p"}


def test_served_configs_compare_evict_with_eagle3_on_its_own_tree():
    names = list(gpu_check.SERVED_CONFIGS)
    assert names[0] == "eagle3_5_4_32"  # the identity reference is served first
    assert gpu_check._TREE["evict_5_4_32"] == gpu_check._TREE["eagle3_5_4_32"]
    for name, (args, _) in gpu_check.SERVED_CONFIGS.items():
        if name != "none":
            assert args[args.index("--speculative-algorithm") + 1] == name.split("_")[0].upper()


def test_the_30b_configs_have_qwen3_30b_a3b_routing():
    target = json.loads((gpu_check.GPU_CONFIGS / "qwen3_30b_a3b" / "config.json").read_text())
    drafter = json.loads((gpu_check.GPU_CONFIGS / "qwen3_30b_a3b_eagle3" / "config.json").read_text())
    assert (target["num_experts"], target["num_experts_per_tok"], target["norm_topk_prob"]) == (128, 8, True)
    assert (target["num_hidden_layers"], target["hidden_size"], target["moe_intermediate_size"]) == (
        48,
        2048,
        768,
    )
    assert drafter["architectures"] == ["LlamaForCausalLMEagle3"]
    assert drafter["hidden_size"] == target["hidden_size"] and drafter["vocab_size"] == target["vocab_size"]


def test_gpu_check_script_is_valid_bash_and_returns_at_most_eight_files():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    # files written to $OUT: summary, results, servers, and one log per step
    steps = ["env", "kernels", "gputests", "serve", "cost"]
    assert all(f"run_step {s} " in text for s in steps)
    assert 3 + len(steps) <= 8


def test_env_and_kernels_steps_record_json_without_a_gpu(tmp_path):
    # the steps must leave their JSON even where nothing of SGLang's CUDA path can run
    subprocess.run(
        [sys.executable, "-m", "evict.testing.gpu_check", "env", "--out", str(tmp_path)],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    rec = json.loads((tmp_path / "env.json").read_text())
    assert rec["torch"] and "elapsed_s" in rec


def test_the_launchers_environment_passes_the_plugins_config_check(tmp_path):
    from evict.plugin.config import parse_env

    env = gpu_server.gpu_env({"EVICT_GPU_SITE": str(tmp_path)}, site=tmp_path)
    parse_env(env)  # an EVICT_* name the plugin does not know stops the launch


@pytest.mark.sglang
def test_the_gpu_launch_gets_to_the_device_under_fake_cuda(tmp_path):
    """The GPU launcher, SGLang's argument resolution with the GPU flags, the plugin's checks and the
    scheduler's imports, all on CPU with torch pretending to see an H200: the launch must die at the
    first real CUDA call (``set_device``), never earlier. Two GPU runs died earlier (an EVICT_* name
    the plugin refused, a CUDA-only module-level import)."""
    pytest.importorskip("sglang")
    sc = tmp_path / "fake"
    sc.mkdir()
    shim = gpu_server.CUDA_SHIM_DIR / "sitecustomize.py"
    (sc / "sitecustomize.py").write_text(f"{FAKE_CUDA_PRELUDE}\nexec(open({str(shim)!r}).read())\n")
    env = gpu_server.gpu_env(site=tmp_path / "no_bundle")
    env["PYTHONPATH"] = os.pathsep.join([str(sc), env["PYTHONPATH"]])
    env["EVICT_CACHE_DIR"] = str(tmp_path / "cache")
    args = [
        "--speculative-algorithm",
        "EVICT",
        *eagle3_flags(gpu_server.TESTBED_DRAFTER),
        "--port",
        "1",
        "--max-total-tokens",
        "4096",
    ]
    out = subprocess.run(
        gpu_server.gpu_server_command(args),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "EVICT: widths" in log, log[-3000:]  # the plugin resolved its settings
    assert "Init parallel begin" in log, log[-3000:]  # the scheduler process got that far
    assert "set_device" in log, log[-3000:]  # ... and died at the first real CUDA call
    raised = [line for line in log.splitlines() if line.startswith(("ModuleNotFoundError:", "ImportError:"))]
    assert not raised and "EvictConfigError" not in log, log[-3000:]


def test_a_server_whose_port_was_taken_restarts_on_a_fresh_port(tmp_path, monkeypatch):
    """Five CPU servers starting together: one lost its port to another's worker before binding it
    (uvicorn logs the bind error and hangs). wait_ready restarts it on a new port instead of timing out."""
    from evict.testing import server as srv

    log = tmp_path / "s.log"
    s = srv.CpuServer(["--speculative-algorithm", "EVICT"], log_path=log, port=40001, name="s")

    class Proc:
        returncode = None

        def poll(self):
            return None

    starts = []

    def start():
        starts.append(s.port)
        s.proc = Proc()
        if len(starts) == 1:
            log.write_text(
                "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 40001)\n"
            )
        return s

    monkeypatch.setattr(s, "start", start)
    monkeypatch.setattr(s, "stop", lambda timeout=30.0: setattr(s, "proc", None))

    class Ok:
        status = 200

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def urlopen(url, timeout=5):
        if len(starts) < 2:
            raise OSError("not up")
        return Ok()

    monkeypatch.setattr(srv.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(s, "get_json", lambda path, timeout=10.0: {})
    monkeypatch.setattr(srv.time, "sleep", lambda x: None)
    s.start()
    assert s.wait_ready(timeout=30) is s
    assert len(starts) == 2 and starts[1] != 40001
    assert s.args[s.args.index("--port") + 1] == str(starts[1]) and s.args.count("--port") == 1
    assert "restarted on" in log.read_text()
