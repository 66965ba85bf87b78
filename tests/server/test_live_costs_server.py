"""Live step costs on SGLang 0.5.23's real CPU server: the table moves to what the server spends.

One EVICT server starts from a deliberately wrong ``EVICT_COST_TABLE`` (made for this machine, so
it passes the setup check, but about a hundredth of the real step time and flat in the width).
Greedy requests are sent one at a time; EVICT's metrics line reports, per interval, the table's
predicted step time against the measured one. What must hold:

- the first interval, priced by the wrong table, predicts at least 5x below the measured step;
- after warm-up the table predicts the served step within 10% (the median over the later
  intervals of their median measured / predicted), and its log shows measured cells.

Marker ``server`` (excluded from the default run). About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from evict.profiler.table import checkpoint_config_hash  # noqa: E402
from evict.profiler.torch_backend import device_name  # noqa: E402
from evict.testing.cpu_server import EAGLE3_FLAGS, TESTBED_TARGET  # noqa: E402
from evict.testing.server import CpuServer  # noqa: E402

pytestmark = pytest.mark.server

LOG_INTERVAL = 8
WARMUP_STEPS = 48  # steps before the check: the first publications replace the wrong table
START_TIMEOUT = float(os.environ.get("EVICT_TEST_SERVER_START_TIMEOUT", "420"))
PROMPTS = [
    "import os\nimport sys\n\ndef main(argv):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "The printing press changed how ideas travelled because",
    "def parse_header(line):\n    key, _, value =",
    "Rivers shape the land they cross: over centuries",
    "def merge_sorted(a, b):\n    out = []\n",
]
_STEP = re.compile(
    r"EVICT: steps=(\d+) .*step_ms predicted=([\d.]+) measured=([\d.]+) measured/predicted=([\d.]+) timed=(\d+)"
)


def _wrong_table(path: Path) -> Path:
    """Right metadata for this machine and model, wrong numbers: ~1 ms a step, flat in the width."""
    import torch

    widths, bss = [1, 2, 4, 8], [1, 4, 16]
    grid = [[1.0 + 0.01 * w for w in widths] for _ in bss]
    table = {
        "schema_version": 1,
        "metadata": {
            "model_id": "evict/testbed/target",
            "model_config_hash": checkpoint_config_hash(TESTBED_TARGET),
            "device": device_name(torch.device("cpu")),
            "dtype": "float32",
            "tp_size": 1,
            "backend": "hand-made (deliberately wrong, for the live-costs test)",
        },
        "batch_sizes": bss,
        "widths": widths,
        "latency_ms": {"median": grid, "p10": grid, "p90": grid},
    }
    path.write_text(json.dumps(table))
    return path


def test_live_step_costs_converge_from_a_wrong_table(tmp_path):
    env = {
        **{k: None for k in os.environ if k.startswith("EVICT_")},
        "TRITON_INTERPRET": None,
        "OMP_NUM_THREADS": "1",  # one server thread: the shared 2 cores otherwise thrash
        "EVICT_COST_TABLE": str(_wrong_table(tmp_path / "wrong.json")),
        "EVICT_CACHE_DIR": str(tmp_path / "cache"),
        "EVICT_WIDTHS": "2,4",
        "EVICT_LOG_INTERVAL": str(LOG_INTERVAL),
    }
    args = ["--dtype", "float32", "--sleep-on-idle", "--random-seed", "0", "--speculative-algorithm", "EVICT"]
    server = CpuServer([*args, *EAGLE3_FLAGS], env, tmp_path / "evict.log", name="evict-live")
    server.start()
    try:
        server.wait_ready(START_TIMEOUT)
        for prompt in PROMPTS:
            r = requests.post(
                server.url + "/generate",
                json={
                    "text": prompt,
                    "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True},
                },
                timeout=600,
            )
            r.raise_for_status()
    finally:
        server.stop()
    log = (tmp_path / "evict.log").read_text(errors="replace")
    lines = [tuple(float(x) for x in m.groups()) for m in _STEP.finditer(log)]
    assert len(lines) >= 8, f"too few EVICT metrics lines:\n{log[-3000:]}"
    for steps, pred, meas, ratio, timed in lines:
        print(
            f"steps={int(steps)} predicted={pred:.1f} ms measured={meas:.1f} ms ratio={ratio:.3f} n={int(timed)}"
        )
    first = lines[0]
    assert first[3] > 5, f"the wrong table should predict far below the measured step: {first}"
    later = [ratio for steps, _, _, ratio, timed in lines if steps > WARMUP_STEPS and timed > 0]
    assert len(later) >= 4
    overall = statistics.median(later)
    print(f"after warm-up: median measured/predicted = {overall:.3f} over {len(later)} intervals")
    assert abs(overall - 1) < 0.10, f"measured/predicted after warm-up: {later}"
    assert "live step costs (ms, * = measured)" in log and "*" in log.split("live step costs (ms, *")[-1]
    assert all(" errors=0 " in line for line in log.splitlines() if "EVICT: steps=" in line)
