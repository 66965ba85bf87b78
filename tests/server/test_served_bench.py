"""``evict-bench --served`` end to end on the CPU rig, and ``CpuServer.pause``/``resume``.

Why: the unit tests (``tests/test_bench_served.py``) check the arithmetic on fake rounds; this
checks that the real thing holds together: two real servers started and paused, a couple of
interleaved rounds through the streaming ``/generate`` API, EVICT's metrics lines read from the
log, identical greedy tokens, and the results folder written. And that SIGSTOP really stops the
whole process group (an idle CPU scheduler would otherwise spin on a core).

Marker ``server``; needs sglang==0.5.23; about 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from evict.paths import shipped_config  # noqa: E402
from evict.testing.server import CpuServer  # noqa: E402

pytestmark = pytest.mark.server

START_TIMEOUT = float(os.environ.get("EVICT_TEST_SERVER_START_TIMEOUT", "420"))


def _group_states(pgid: int) -> dict[int, str]:
    """Process state letter (R, S, T, ...) of every process in the group."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            out[int(d.name)] = fields[0]
    return out


def test_pause_stops_the_whole_group_and_resume_serves_again(tmp_path):
    no_evict = {k: None for k in os.environ if k.startswith("EVICT_")}
    with CpuServer([], no_evict, tmp_path / "plain.log", name="plain") as srv:
        body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        first = requests.post(srv.url + "/generate", json=body, timeout=60).json()["output_ids"]
        srv.pause()
        assert srv.paused
        time.sleep(0.5)
        states = _group_states(srv.proc.pid)
        assert len(states) >= 3 and set(states.values()) == {"T"}, states  # launcher, scheduler, detokenizer
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(srv.url + "/generate", json=body, timeout=2)
        srv.resume()
        assert not srv.paused
        assert "T" not in set(_group_states(srv.proc.pid).values())
        assert requests.post(srv.url + "/generate", json=body, timeout=60).json()["output_ids"] == first
        srv.pause()  # stop() must also take down a paused group
    assert srv.proc is None


def test_served_bench_two_servers_one_concurrency(tmp_path):
    from evict.bench.cli import main

    table = shipped_config()
    assert table is not None
    out = tmp_path / "served"
    rc = main(
        [
            "--served", "--servers", "eagle3_tree", "evict", "--concurrency", "1", "--rounds", "2",
            "--num-prompts", "1", "--ood-prompts", "1", "--max-new-tokens", "16", "--log-interval", "5",
            "--cost-table", str(table), "--start-timeout", str(START_TIMEOUT), "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0, (out / "results.md").read_text() if (out / "results.md").exists() else rc
    data = json.loads((out / "results.json").read_text())
    assert not data["meta"]["failed"] and data["meta"]["request_errors"] == 0
    lvl = data["levels"]["1"]
    assert set(lvl) == {"eagle3_tree", "evict", "_checks"}
    assert lvl["evict"]["rounds"] == 2 and lvl["evict"]["tokens"] == 2 * 2 * 16  # 2 rounds x 2 requests
    assert lvl["evict"]["ratio_vs_reference"]["n"] == 2  # reference: the first server here (no default chain)
    assert lvl["eagle3_tree"]["ratio_vs_reference"]["median"] == pytest.approx(1.0)
    assert lvl["evict"]["accept_len"] > 1.0 and lvl["evict"]["ttft_ms"]["50"] > 0
    m = lvl["evict"]["evict_metrics"]
    assert m["steps"] > 0 and 1.0 <= m["mean_width"] <= 8.0 and m["errors"] == 0
    ident = data["identity"]["evict==eagle3_tree"]
    assert ident["compared"] == 4 and ident["identical"] == 4  # 4 prompts, warm-up and rounds
    assert len(data["rounds_raw"]) == 4
    md = (out / "results.md").read_text()
    assert "evict/eagle3_tree" in md and "Greedy identity" in md
    assert (out / "served.png").stat().st_size > 1000
    assert (out / "logs" / "evict.log").exists()
