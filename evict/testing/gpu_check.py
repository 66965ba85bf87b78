"""The prepared GPU check's Python steps (``scripts/gpu_check.sh`` runs them, each under a time box).

    python -m evict.testing.gpu_check env|kernels|serve|cost --out DIR [--budget SECONDS]

Why a module and not shell: each step must leave its results in ``--out`` even when it fails or
runs out of time, so the next session can read what happened from one short device call. Every
step writes one JSON (``DIR/<step>.json``) as it goes, and server logs under ``DIR/logs/`` for the
script to gather. Steps:

* ``env``: device, driver, Python/torch/Triton versions, what of SGLang imports.
* ``kernels``: ``evict.testing.cuda_ops.selftest("cuda")`` (every stand-in once) and imports of the
  SGLang modules the served path loads.
* ``serve``: the testbed pair served by SGLang on the GPU with CUDA graphs: EAGLE3 (5,4,32), EVICT
  (5,4,32), EAGLE3 (5,4,8) and no speculation, one at a time; greedy outputs compared with EAGLE3 on
  EVICT's tree, tokens/s at 1 and 8 concurrent requests, EVICT's logged calibration table and
  per-width capture lines.
* ``cost``: a Qwen3-30B-A3B-shaped target and EAGLE-3 drafter (``configs/gpu_check``) with
  ``--load-format dummy`` served as EVICT: the start-up calibration table T(bs, m) and how long
  start-up took. Random weights route near-uniformly, which overstates the expert union of
  correlated tree tokens: the table is an upper bound on the width cost of the real model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from evict.testing.gpu_bundle import PROBE_MODULES

__all__ = ["main", "SERVED_CONFIGS", "generate", "compare_greedy"]

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = REPO / "configs" / "gpu_check"

# name -> (extra launch args, extra env); EAGLE3 on EVICT's tree first: it is the identity reference
SERVED_CONFIGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "eagle3_5_4_32": (["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "5"], {}),
    "evict_5_4_32": (["--speculative-algorithm", "EVICT", "--speculative-num-steps", "5"], {}),
    "eagle3_5_4_8": (["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "5"], {}),
    "none": ([], {}),
}
_TREE = {"eagle3_5_4_32": ("4", "32"), "evict_5_4_32": ("4", "32"), "eagle3_5_4_8": ("4", "8")}


class _Record:
    """A JSON file that is rewritten after every update, so a killed step still leaves its results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def _run(cmd: Sequence[str], timeout: float = 30) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{type(e).__name__}: {e}>"


# ------------------------------------------------------------------------------------------------
# env, kernels
# ------------------------------------------------------------------------------------------------


def step_env(rec: _Record) -> None:
    import torch

    rec["python"] = sys.version
    rec["platform"] = platform.platform()
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    rec["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError as e:
        rec["triton"] = f"<{e}>"
    rec["nvidia_smi"] = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"]
    )
    rec["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else None
    try:
        import sglang

        rec["sglang"] = f"{sglang.__version__} from {Path(sglang.__file__).parent}"
    except Exception as e:  # noqa: BLE001 - recorded, not raised: the point is to see what fails
        rec["sglang"] = f"<{type(e).__name__}: {e}>"


# what the bundle's build probed, plus the graph runner the serve step reaches at capture time
SERVED_MODULES = (*PROBE_MODULES, "sglang.srt.model_executor.runner.decode_cuda_graph_runner")


def step_kernels(rec: _Record) -> None:
    import importlib
    import traceback

    import torch

    from evict.testing import cuda_ops

    t = time.monotonic()
    try:
        rec["selftest"] = cuda_ops.selftest("cuda" if torch.cuda.is_available() else "cpu")
    except Exception:  # noqa: BLE001
        rec["selftest"] = traceback.format_exc()
    rec["selftest_s"] = round(time.monotonic() - t, 2)
    imports: dict[str, str] = {}
    for name in SERVED_MODULES:
        t = time.monotonic()
        try:
            importlib.import_module(name)
            imports[name] = f"ok {time.monotonic() - t:.1f}s"
        except Exception as e:  # noqa: BLE001
            imports[name] = f"{type(e).__name__}: {e}"[:800]
        rec["imports"] = imports


# ------------------------------------------------------------------------------------------------
# serving
# ------------------------------------------------------------------------------------------------


def generate(url: str, ids: list[int], max_new_tokens: int, timeout: float = 120) -> dict[str, Any]:
    """One greedy ``/generate`` request by token ids (works with ``--skip-tokenizer-init`` too)."""
    body = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
    }
    req = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _output_ids(resp: dict[str, Any]) -> list[int]:
    ids = resp.get("output_ids")
    if ids is None:
        ids = resp.get("meta_info", {}).get("output_ids")
    return list(ids) if ids is not None else []


def compare_greedy(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """How many prompts match exactly, and where the first mismatch of each other one is."""
    diffs = {}
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs[i] = first
    return {"identical": len(ref) - len(diffs), "of": len(ref), "first_mismatch": diffs}


def _serve_round(
    url: str, prompts: list[list[int]], max_new: int, concurrency: int
) -> tuple[list[list[int]], float, list[dict[str, Any]]]:
    t = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        resps = list(pool.map(lambda p: generate(url, p, max_new), prompts))
    wall = time.monotonic() - t
    return [_output_ids(r) for r in resps], wall, [r.get("meta_info", {}) for r in resps]


_EVICT_LINE = re.compile(r"EVICT[: ].*")


def _evict_lines(log: str, limit: int = 60) -> list[str]:
    lines = [m.group(0)[:400] for m in _EVICT_LINE.finditer(log)]
    return lines[:limit]


def _start(name: str, args: list[str], env: dict[str, str], logs: Path, budget: float) -> tuple[Any, float]:
    from evict.testing.server import GpuServer

    srv = GpuServer(args, env=env, log_path=logs / f"{name}.log", name=name)
    t = time.monotonic()
    srv.start()
    srv.wait_ready(timeout=budget)
    return srv, time.monotonic() - t


def step_serve(rec: _Record, out: Path, budget: float) -> None:
    from transformers import AutoTokenizer

    from evict.bench.prompts import build_prompts
    from evict.testing.gpu_server import TESTBED_DRAFTER, TESTBED_TARGET

    deadline = time.monotonic() + budget
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TESTBED_TARGET))
    prompts = [list(p.ids) for p in build_prompts(tok, 4, 48)]  # 8 held-out prompts
    max_new = 48
    rec["prompts"] = {"n": len(prompts), "prompt_tokens": 48, "max_new_tokens": max_new}
    common = [
        "--mem-fraction-static",
        "0.3",
        "--max-total-tokens",
        "65536",
        "--cuda-graph-max-bs-decode",
        "8",
        "--max-running-requests",
        "8",
        "--dtype",
        "bfloat16",
    ]
    results: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    for name, (args, env) in SERVED_CONFIGS.items():
        left = deadline - time.monotonic()
        if left < 40:
            results[name] = {"skipped": f"{left:.0f} s left of the step's budget"}
            rec["servers"] = results
            continue
        argv = [*common, *args]
        if name in _TREE:
            topk, n = _TREE[name]
            argv += [
                "--speculative-draft-model-path",
                str(TESTBED_DRAFTER),
                "--speculative-eagle-topk",
                topk,
                "--speculative-num-draft-tokens",
                n,
            ]
        env = {**env, "EVICT_CACHE_DIR": str(out / "cache"), "EVICT_LOG_INTERVAL": "20"}
        res: dict[str, Any] = {"args": argv}
        srv = None
        try:
            srv, start_s = _start(name, argv, env, logs, min(100.0, max(20.0, left - 20)))
            res["start_s"] = round(start_s, 1)
            ids1, wall1, meta1 = _serve_round(srv.url, prompts, max_new, 1)
            ids8, wall8, _ = _serve_round(srv.url, prompts, max_new, 8)
            outputs[name] = ids1
            n_tok = sum(len(x) for x in ids1)
            res["tok_s_c1"] = round(n_tok / wall1, 1)
            res["tok_s_c8"] = round(sum(len(x) for x in ids8) / wall8, 1)
            res["same_c1_c8"] = compare_greedy(ids1, ids8)
            verify = [m.get("spec_verify_ct") for m in meta1]
            if all(isinstance(v, int) and v > 0 for v in verify):
                res["accept_len"] = round(n_tok / sum(verify), 3)
        except Exception as e:  # noqa: BLE001 - record and go on to the next server
            res["error"] = f"{type(e).__name__}: {e}"[-3000:]
        finally:
            if srv is not None:
                res["evict_log"] = _evict_lines(srv.log())
                srv.stop(timeout=10)
        results[name] = res
        rec["servers"] = results
    ref = outputs.get("eagle3_5_4_32")
    if ref is not None:
        rec["greedy_vs_eagle3_5_4_32"] = {
            k: compare_greedy(ref, v) for k, v in outputs.items() if k != "eagle3_5_4_32"
        }
    for f in (out / "cache").rglob("*.json") if (out / "cache").exists() else []:
        rec[f"table:{f.name}"] = json.loads(f.read_text())


def step_cost(rec: _Record, out: Path, budget: float) -> None:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    target, drafter = GPU_CONFIGS / "qwen3_30b_a3b", GPU_CONFIGS / "qwen3_30b_a3b_eagle3"
    from evict.testing.gpu_server import TESTBED_TARGET

    widths = os.environ.get("EVICT_GPU_CHECK_WIDTHS", "2,4,8,16,32")
    argv = [
        "--model-path",
        str(target),
        "--tokenizer-path",
        str(TESTBED_TARGET),
        "--skip-tokenizer-init",
        "--load-format",
        "dummy",
        "--speculative-algorithm",
        "EVICT",
        "--speculative-draft-model-path",
        str(drafter),
        "--speculative-num-steps",
        "5",
        "--speculative-eagle-topk",
        "4",
        "--speculative-num-draft-tokens",
        "32",
        "--mem-fraction-static",
        "0.85",
        "--max-total-tokens",
        "200000",
        "--cuda-graph-bs-decode",
        "1",
        "2",
        "4",
        "8",
        "16",
        "32",
        "--max-running-requests",
        "32",
        "--context-length",
        "4096",
        "--dtype",
        "bfloat16",
    ]
    env = {"EVICT_CACHE_DIR": str(out / "cache30b"), "EVICT_WIDTHS": widths, "EVICT_LOG_INTERVAL": "20"}
    rec["args"] = argv
    rec["note"] = (
        "dummy (random) weights route near-uniformly: the expert union of correlated tree tokens, and "
        "so the cost of wider verification, is overstated against the real Qwen3-30B-A3B"
    )
    srv = None
    try:
        srv, start_s = _start("qwen3_30b_a3b_evict", argv, env, logs, budget - 15)
        rec["start_s"] = round(start_s, 1)
        ids, wall, meta = _serve_round(srv.url, [[100 + i] * 64 for i in range(4)], 32, 4)
        rec["smoke"] = {"tokens": sum(len(x) for x in ids), "wall_s": round(wall, 2)}
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[-3000:]
    finally:
        if srv is not None:
            rec["evict_log"] = _evict_lines(srv.log())
            srv.stop(timeout=10)
    for f in (out / "cache30b").rglob("*.json") if (out / "cache30b").exists() else []:
        rec[f"table:{f.name}"] = json.loads(f.read_text())


# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["env", "kernels", "serve", "cost"])
    p.add_argument("--out", type=Path, required=True, help="results folder (one JSON per step)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds this step may take")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rec = _Record(a.out / f"{a.step}.json")
    rec["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    t = time.monotonic()
    steps: dict[str, Callable[[], None]] = {
        "env": lambda: step_env(rec),
        "kernels": lambda: step_kernels(rec),
        "serve": lambda: step_serve(rec, a.out, a.budget),
        "cost": lambda: step_cost(rec, a.out, a.budget),
    }
    try:
        steps[a.step]()
    finally:
        rec["elapsed_s"] = round(time.monotonic() - t, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
