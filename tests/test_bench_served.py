"""``evict-bench --served`` without a server: scheduling, paired ratios, metrics lines, the report.

Why: the served run takes half an hour on the testbed machine; everything it computes from the
measurements is checked here on fake rounds in milliseconds.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from evict.bench.served import (
    SERVER_NAMES,
    RequestResult,
    RoundResult,
    RunConfig,
    ServedBench,
    compare_outputs,
    last_metrics,
    metrics_lines,
    metrics_window,
    paired_ratios,
    parse_metrics_line,
    percentile,
    round_orders,
    round_prompt_indices,
    server_specs,
    spread,
    summarize,
    write_results,
)

# --------------------------------------------------------------------------------------------
# round scheduling
# --------------------------------------------------------------------------------------------


def test_round_orders_rotate_and_balance_positions_and_neighbours():
    names = ["a", "b", "c", "d"]
    orders = round_orders(names, 2 * len(names))
    assert all(sorted(o) == names for o in orders)
    # every server takes every position equally often over two cycles
    for pos in range(len(names)):
        assert Counter(o[pos] for o in orders) == {n: 2 for n in names}
    # and directly follows every other server alike (forward cycle one way, reversed cycle the other)
    follows = Counter((o[i], o[i + 1]) for o in orders for i in range(len(o) - 1))
    for x in names:
        for y in names:
            if x != y:
                assert follows[(x, y)] == follows[(y, x)], (x, y)
    assert orders[0] == names and orders[1] == ["b", "c", "d", "a"]
    assert orders[len(names)] == list(reversed(names))


def test_round_orders_edge_cases():
    assert round_orders([], 3) == [[], [], []]
    assert round_orders(["x"], 2) == [["x"], ["x"]]


def test_round_prompt_indices_cycle_through_the_set():
    blocks = round_prompt_indices(5, 2, 4, offset=3)
    assert blocks == [[3, 4], [0, 1], [2, 3], [4, 0]]
    with pytest.raises(ValueError):
        round_prompt_indices(0, 2, 1)


# --------------------------------------------------------------------------------------------
# paired ratios and spreads
# --------------------------------------------------------------------------------------------


def _req(prompt: int, tokens: int, start: float, end: float, verify: int | None = None) -> RequestResult:
    return RequestResult(
        prompt=prompt,
        output_ids=list(range(tokens)),
        start=start,
        end=end,
        ttft_s=0.1,
        itl_s=[0.05] * (tokens - 1),
        completion_tokens=tokens,
        spec_verify_ct=verify,
    )


def _round(server: str, c: int, r: int, tok_s: float, verify: int | None = 4) -> RoundResult:
    return RoundResult(server, c, r, 0, [_req(r, 10, 0.0, 10 / tok_s, verify)])


def test_percentile_matches_linear_interpolation():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 10) == pytest.approx(1.4)
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert math.isnan(percentile([], 50))
    assert percentile([float("nan"), 2.0], 50) == 2.0


def test_paired_ratios_pair_by_round_and_concurrency():
    rounds = [
        _round("ref", 1, 0, 10.0), _round("x", 1, 0, 12.0),
        _round("ref", 1, 1, 20.0), _round("x", 1, 1, 22.0),  # drift: both faster, ratio stays ~1.1
        _round("ref", 4, 0, 50.0), _round("x", 4, 0, 25.0),
        _round("x", 1, 2, 99.0),  # no reference in round 2: unpaired, left out
    ]  # fmt: skip
    got = paired_ratios(rounds, "x", "ref", 1)
    assert got == pytest.approx([1.2, 1.1])
    assert paired_ratios(rounds, "x", "ref", 4) == pytest.approx([0.5])
    assert paired_ratios(rounds, "ref", "ref", 1) == pytest.approx([1.0, 1.0])


def test_spread_summarizes_ratios():
    s = spread([0.9, 1.0, 1.1, 1.2, 1.3])
    assert s["n"] == 5 and s["median"] == pytest.approx(1.1)
    assert s["p10"] == pytest.approx(0.94) and s["p90"] == pytest.approx(1.26)
    assert s["min"] == 0.9 and s["max"] == 1.3
    assert s["geomean"] == pytest.approx(math.prod([0.9, 1.0, 1.1, 1.2, 1.3]) ** 0.2)
    assert spread([])["n"] == 0 and math.isnan(spread([])["median"])


def test_round_result_throughput_spans_first_send_to_last_finish():
    r = RoundResult("x", 2, 0, 0, [_req(0, 10, 1.0, 2.0), _req(1, 10, 1.5, 3.0)])
    assert r.tokens == 20 and r.wall_s == pytest.approx(2.0) and r.tokens_per_s == pytest.approx(10.0)


# --------------------------------------------------------------------------------------------
# metrics lines
# --------------------------------------------------------------------------------------------

LINE = (
    "[2026-12-04 15:23:29 TP0] EVICT: steps=30 mean_width=5.33 accept_len predicted=3.11 realized=3.21 "
    "fallbacks=0 errors=0 width_switches=14 decision=immediate backend=torch widths=4:20,8:10"
)


def test_parse_metrics_line_reads_every_field():
    m = parse_metrics_line(LINE)
    assert m == {
        "steps": 30,
        "mean_width": 5.33,
        "accept_len.predicted": 3.11,
        "accept_len.realized": 3.21,
        "fallbacks": 0,
        "errors": 0,
        "width_switches": 14,
        "decision": "immediate",
        "backend": "torch",
        "widths": {4: 20, 8: 10},
    }
    assert parse_metrics_line("INFO: Prefill batch. #new-token: 64") is None


def test_parse_metrics_line_keeps_fields_added_later():
    extra = " real_nodes_per_req=3.20 padded_steps=2 step_ms predicted=80.10 measured=84.00 measured/predicted=1.049 timed=10"
    m = parse_metrics_line(LINE + extra)
    assert m["step_ms.predicted"] == 80.1 and m["step_ms.measured"] == 84.0
    assert m["step_ms.measured/predicted"] == 1.049 and m["step_ms.timed"] == 10
    assert m["real_nodes_per_req"] == 3.2 and m["accept_len.predicted"] == 3.11


def test_window_pools_the_per_line_step_times():
    lines = [
        parse_metrics_line(
            LINE + f" step_ms predicted={p} measured={q} measured/predicted={q / p:.3f} timed={n}"
        )
        for p, q, n in ((80.0, 88.0, 10), (80.0, 80.0, 30), (40.0, 60.0, 0))  # a line with no timed steps
    ]
    w = metrics_window(None, lines[-1], lines)
    assert w["step_ms.timed"] == 40
    assert w["step_ms.measured"] == pytest.approx((10 * 88 + 30 * 80) / 40)
    assert w["step_ms.predicted"] == pytest.approx(80.0)
    assert w["step_ms.measured/predicted.median_of_lines"] == pytest.approx((1.1 + 1.0) / 2)
    assert metrics_lines("x\n" + LINE + "\ny\n") == [parse_metrics_line(LINE)]


def test_last_metrics_and_window_difference_cumulative_lines():
    first = LINE
    second = (
        LINE.replace("steps=30", "steps=50")
        .replace("mean_width=5.33", "mean_width=6.00")
        .replace("realized=3.21", "realized=3.50")
        .replace("width_switches=14", "width_switches=20")
        .replace("widths=4:20,8:10", "widths=4:20,8:30")
    )
    log = f"noise\n{first}\nmore noise\n{second}\ntail without metrics\n"
    last = last_metrics(log)
    assert last is not None and last["steps"] == 50
    w = metrics_window(parse_metrics_line(first), last)
    assert w["steps"] == 20
    assert w["mean_width"] == pytest.approx((50 * 6.0 - 30 * 5.33) / 20)
    assert w["accept_len.realized"] == pytest.approx((50 * 3.5 - 30 * 3.21) / 20)
    assert w["width_switches"] == 6 and w["widths"] == {8: 20}
    assert w["last.decision"] == "immediate"
    assert metrics_window(None, last)["mean_width"] == pytest.approx(6.0)
    assert metrics_window(None, None) == {"steps": 0}
    assert last_metrics("no metrics here") is None


# --------------------------------------------------------------------------------------------
# identity, summary, report
# --------------------------------------------------------------------------------------------


def test_compare_outputs_finds_the_first_difference():
    outputs = {
        ("a", 1, 0): [1, 2, 3], ("b", 1, 0): [1, 2, 3],
        ("a", 1, 1): [1, 2, 3], ("b", 1, 1): [1, 9, 3],
        ("a", 4, 0): [5], ("b", 1, 2): [7],  # not served by both: not compared
    }  # fmt: skip
    got = compare_outputs(outputs, "a", "b")
    assert got["compared"] == 2 and got["identical"] == 1
    assert got["diffs"] == [{"concurrency": 1, "prompt": 1, "first_diff": 1}]


def _fake_run():
    specs = server_specs(
        list(SERVER_NAMES), (3, 4, 8), "DRAFTER", ["--random-seed", "0"], {"EVICT_X": "1"}, 10
    )
    speeds = {
        "plain": 30,
        "eagle3_default": 50,
        "eagle3_adaptive": 48,
        "eagle3_tree": 52,
        "evict": 55,
        "evict_cal": 53,
    }
    rounds = []
    for c in (1, 4):
        for r in range(6):
            drift = 1.0 + 0.3 * (r % 3)  # the machine's drift hits every server of a round alike
            for name, v in speeds.items():
                rounds.append(_round(name, c, r, v * c * drift, None if name == "plain" else 4))
    outputs = {(n, c, p): [1, 2, p] for n in speeds for c in (1, 4) for p in range(6)}
    outputs[("evict_cal", 4, 3)] = [1, 2, 99]
    metrics = {"evict": {1: metrics_window(None, parse_metrics_line(LINE))}}
    meta = {"command": "evict-bench --served --quick", "date": "2026-12-04", "wall_s": 1.0, "tree": [3, 4, 8]}
    return specs, summarize(rounds, outputs, metrics, specs, "eagle3_default", meta)


def test_server_specs_flags_and_environment():
    specs, _ = _fake_run()
    by = {s.name: s for s in specs}
    assert [s.name for s in specs] == list(SERVER_NAMES)
    assert "--speculative-algorithm" not in by["plain"].args and by["plain"].tree is None
    assert by["eagle3_default"].tree == (3, 1, 4) and "EAGLE3" in by["eagle3_default"].args
    assert "--speculative-adaptive" in by["eagle3_adaptive"].args
    assert by["eagle3_tree"].tree == (3, 4, 8) and "EAGLE3" in by["eagle3_tree"].args
    assert "EVICT" in by["evict"].args and by["evict"].env["EVICT_X"] == "1"
    assert by["evict"].env["EVICT_LOG_INTERVAL"] == "10" and "EVICT_ACCEPTANCE" not in by["evict"].env
    assert by["evict_cal"].env["EVICT_ACCEPTANCE"] == "calibrated"
    assert "EVICT_X" not in by["eagle3_tree"].env  # EVICT's settings reach only EVICT's servers
    assert all(s.args[:2] == ("--random-seed", "0") for s in specs)
    with pytest.raises(ValueError, match="unknown"):
        server_specs(["nope"], (3, 4, 8), "D")


def test_summary_ratios_are_drift_free_and_targets_follow():
    _, s = _fake_run()
    lvl = s["levels"]["1"]
    r = lvl["evict"]["ratio_vs_reference"]
    assert (
        r["median"] == pytest.approx(1.1)
        and r["p10"] == pytest.approx(1.1)
        and r["p90"] == pytest.approx(1.1)
    )
    assert lvl["evict"]["per_round_tokens_per_s"]["max"] > lvl["evict"]["per_round_tokens_per_s"]["min"]
    assert lvl["eagle3_tree"]["accept_len"] == pytest.approx(10 / 4) and lvl["plain"]["accept_len"] == 1.0
    assert lvl["eagle3_tree"]["mean_width"] == 8.0 and lvl["evict"]["mean_width"] == pytest.approx(5.33)
    assert lvl["_checks"]["best_sglang"] == "eagle3_tree"
    assert lvl["_checks"]["evict/eagle3_tree"]["verdict"] == "not slower"
    assert lvl["evict"]["ttft_ms"]["50"] == pytest.approx(100.0) and lvl["evict"]["itl_ms"][
        "90"
    ] == pytest.approx(50.0)
    targets = {t["target"]: t for t in s["targets"]}
    assert targets["EVICT never slower than eagle3_tree at 1 concurrent"]["status"] == "MET"
    goal = targets["goal: EVICT 1.10x the best SGLang configuration (eagle3_tree) at 1 concurrent"]
    assert goal["status"] == "NOT MET" and goal["median"] == pytest.approx(55 / 52)
    assert targets["greedy identity evict==eagle3_tree"]["status"] == "MET"
    assert targets["greedy identity evict_cal==eagle3_tree"]["status"] == "NOT MET"
    assert s["identity"]["evict_cal==eagle3_tree"]["diffs"] == [
        {"concurrency": 4, "prompt": 3, "first_diff": 2}
    ]


def test_slower_verdict_only_when_the_whole_band_is_below_one():
    specs = server_specs(["eagle3_tree", "evict"], (3, 4, 8), "D")
    rounds = []
    for r, (a, b) in enumerate([(10, 9), (10, 9.5), (10, 9.2), (10, 8.8), (10, 9.1)]):
        rounds += [_round("eagle3_tree", 1, r, a), _round("evict", 1, r, b)]
    s = summarize(rounds, {}, {}, specs, "eagle3_tree", {})
    assert s["levels"]["1"]["_checks"]["evict/eagle3_tree"]["verdict"] == "slower"
    (t,) = [t for t in s["targets"] if "never slower" in t["target"]]
    assert t["status"] == "NOT MET"


def test_write_results_writes_markdown_json_and_plot(tmp_path):
    _, s = _fake_run()
    paths = write_results(s, tmp_path, {"rounds_raw": []})
    names = {p.name for p in paths}
    assert {"results.md", "results.json"} <= names
    md = (tmp_path / "results.md").read_text()
    assert "## 1 concurrent request" in md and "## 4 concurrent requests" in md
    assert "evict/eagle3_tree" in md and "Targets (issue 19)" in md and "1.10 [1.10-1.10]" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["levels"]["1"]["evict"]["ratio_vs_reference"]["n"] == 6 and data["rounds_raw"] == []
    pytest.importorskip("matplotlib")
    assert (tmp_path / "served.png").stat().st_size > 1000


class _FakeServer:
    """Records pause/resume calls; 'serves' by the injected send function."""

    log_text = ""

    def __init__(self, args, env, log_path, name):
        self.name, self.url, self.events = name, f"http://{name}", []

    def start(self):
        return self

    def wait_ready(self, timeout):
        if self.name == "evict_cal":
            raise RuntimeError("boom")
        return self

    def pause(self):
        self.events.append("pause")

    def resume(self):
        self.events.append("resume")

    def stop(self):
        self.events.append("stop")

    def log(self):
        return self.log_text


def test_served_bench_pauses_all_but_the_active_server(monkeypatch, tmp_path):
    import evict.bench.served as served

    active: list[str] = []
    all_servers: dict[str, _FakeServer] = {}

    def send(url, ids, n):
        name = url.removeprefix("http://")
        active.append(name)
        # only the active server is running: every other one is paused
        for other, srv in all_servers.items():
            paused = srv.events[-1] == "pause" if srv.events else False
            assert paused == (other != name), (name, other, srv.events)
        return _req(0, n, 0.0, 1.0, 2)

    monkeypatch.setattr(served, "stream_generate", send)
    monkeypatch.setattr(
        served, "run_round", lambda url, prompts, idx, c, n: [send(url, prompts[i], n) for i in idx]
    )
    specs = server_specs(["eagle3_default", "evict", "evict_cal"], (3, 4, 8), "D")
    cfg = RunConfig(["eagle3_default", "evict", "evict_cal"], (3, 4, 8), [1, 2], {1: 3, 2: 2}, {1: 2, 2: 2}, 4,
                    "eagle3_default", settle_s=0.0)  # fmt: skip

    class Factory(_FakeServer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            all_servers[self.name] = self

    bench = ServedBench(specs, [[1], [2], [3]], cfg, tmp_path, Factory, progress=False)
    bench.start()
    assert set(bench.servers) == {"eagle3_default", "evict"} and "evict_cal" in bench.failed
    all_servers.pop("evict_cal")
    bench.run()
    bench.stop()
    # warm-up + timed rounds, two servers, two levels
    assert len(active) == 2 * ((3 + 1) * 2 + (2 + 1) * 2)
    assert len(bench.rounds) == 2 * (3 + 2)
    assert {(r.server, r.concurrency) for r in bench.rounds} == {
        (n, c) for n in ("eagle3_default", "evict") for c in (1, 2)
    }
    assert all(s.events[-1] == "stop" for s in all_servers.values())


def test_draft_shape_counts_are_parsed_and_differenced_over_a_window():
    from evict.bench.served import metrics_window, parse_metrics_line

    head = "EVICT: steps={} mean_width=7.00 accept_len predicted=3.1 realized=3.0 fallbacks=0 errors=0 "
    a = parse_metrics_line(head.format(10) + "widths=4:2,8:8 shapes=plain:3,tree(3,4):7")
    b = parse_metrics_line(head.format(20) + "widths=4:4,8:16 shapes=plain:5,tree(3,4):15")
    assert a["shapes"] == {"plain": 3, "tree(3,4)": 7} and a["widths"] == {4: 2, 8: 8}
    window = metrics_window(a, b)
    assert window["shapes"] == {"plain": 2, "tree(3,4)": 8} and window["widths"] == {4: 2, 8: 8}
