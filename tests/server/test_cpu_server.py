"""SGLang 0.5.23's real server on CPU with the shipped testbed pair: no speculation, EAGLE3 and EVICT.

Three servers (``evict.testing.CpuServer``: the launcher with the pure-torch operator stand-ins) are
started once for the module, side by side, with identical flags except the speculative ones, and
are always stopped (whole process groups) at the end. Requests go through the ``openai`` client
and raw HTTP (``/generate``, streaming ``/v1/completions``, ``/v1/loads``). Prompts are held-out
standard-library code and prose (``evict.bench.prompts``), sent as token ids.

What must hold, on every server unless noted:
- greedy output is identical to no speculation, one request at a time and 8 at once;
- seeded sampled requests complete and repeat exactly;
- a request dropped mid-stream is aborted and its KV slots come back (``num_used_tokens`` returns
  to its idle value, and the server keeps serving);
- ``max_tokens=1``, stop strings, and a prompt of several prefill chunks work;
- EVICT: the metrics line shows more than one verified width, and repeated widths;
- EVICT with per-request widths (``EVICT_PER_REQUEST=1``, ``EVICT_PAD_COST=0``: a fourth server,
  started with the others, tested only here): greedy output at 6 concurrent requests identical to
  no speculation while its metrics line shows padded steps.
- EVICT deciding the depth (``EVICT_DEPTH=1``, a fifth server, from a table whose tree drafting is
  dear but for one draft step at batch size 1, and whose chain drafting is free under load): one
  request at a time it drafts one step deep (a depth state of its own), under concurrency it
  drafts the chain of 3 (topk 1, EVICT's own draft loop) or decodes plainly (SGLang's steps=0
  path), and it drafts the full tree on its warm-up and probe steps, so the shape goes up and
  down, and greedy output is still identical to no speculation, one at a time and under
  concurrency; seeded sampled requests complete.

Marker ``server`` (excluded from the default run; ``.ci/run`` runs it in the SGLang environment).
Needs sglang==0.5.23 and about 4-6 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("sglang")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from evict.paths import shipped_config  # noqa: E402
from evict.testing.cpu_server import EAGLE3_FLAGS  # noqa: E402
from evict.testing.server import CpuServer, started_together  # noqa: E402

pytestmark = pytest.mark.server

NAMES = ("plain", "eagle3", "evict")
SPECULATIVE = ("eagle3", "evict")
MAX_TOKENS = 24
CHUNK = 64  # --chunked-prefill-size: the long prompt below takes several chunks
LONG_PROMPT_TOKENS = 6 * 64 + 20
EVICT_WIDTHS = "2,4"  # plus N = 8, always added: three widths to choose from
EVICT_LOG_INTERVAL = 10
START_TIMEOUT = float(os.environ.get("EVICT_TEST_SERVER_START_TIMEOUT", "420"))

COMMON_ARGS = [
    "--dtype",
    "float32",  # bf16 matmuls have no fast path on CPUs without AMX/AVX512-BF16 (5x slower here)
    "--chunked-prefill-size",
    str(CHUNK),
    "--sleep-on-idle",  # an idle scheduler must not spin on the 2 shared cores
    "--random-seed",
    "0",
    "--enable-deterministic-inference",  # per-request `seed` (the shim lets it run on intel_amx/CPU)
]


def _server_specs(log_dir: Path) -> dict[str, CpuServer]:
    table = shipped_config()
    assert table is not None, "the shipped testbed cost table is missing"
    no_evict = {k: None for k in os.environ if k.startswith("EVICT_")}
    base_env = {
        **no_evict,
        "TRITON_INTERPRET": None,
    }  # the test process's interpreter flag is not the server's
    evict_env = {
        **base_env,
        "EVICT_COST_TABLE": str(table),
        "EVICT_ALLOW_TABLE_MISMATCH": "1",
        "EVICT_WIDTHS": EVICT_WIDTHS,
        "EVICT_LOG_INTERVAL": str(EVICT_LOG_INTERVAL),
    }
    per_request_env = {**evict_env, "EVICT_PER_REQUEST": "1", "EVICT_PAD_COST": "0"}
    depth_env = {
        **evict_env,
        "EVICT_COST_TABLE": str(_dear_drafting_table(table, log_dir / "depth_table.json")),
    }
    depth_env["EVICT_DEPTH"] = "1"
    spec = ["--speculative-algorithm"]
    return {
        "plain": CpuServer(COMMON_ARGS, base_env, log_dir / "plain.log", name="plain"),
        "eagle3": CpuServer([*COMMON_ARGS, *spec, "EAGLE3", *EAGLE3_FLAGS], base_env, log_dir / "eagle3.log", name="eagle3"),
        "evict": CpuServer([*COMMON_ARGS, *spec, "EVICT", *EAGLE3_FLAGS], evict_env, log_dir / "evict.log", name="evict"),
        "evict_per_request": CpuServer(
            [*COMMON_ARGS, *spec, "EVICT", *EAGLE3_FLAGS], per_request_env, log_dir / "evict_per_request.log",
            name="evict_per_request",
        ),
        "evict_depth": CpuServer(
            [*COMMON_ARGS, *spec, "EVICT", *EAGLE3_FLAGS], depth_env, log_dir / "evict_depth.log", name="evict_depth",
        ),
    }  # fmt: skip


def _dear_drafting_table(shipped: Path, out: Path) -> Path:
    """The shipped table with drafting priced far above verification (draft_ms), except one draft
    step at batch size 1 and the chain of 3 under load: one request at a time the server drafts
    one step deep (a shallower tree than its own), under load it drafts the chain (topk 1) or
    decodes plainly, and the full tree is drafted only on the warm-up and probe steps."""
    d = json.loads(shipped.read_text())
    steps = int(d["metadata"]["draft_steps"])
    topk = str(d["metadata"]["draft_topk"])
    dear = [0.0] + [400.0 * s for s in range(1, steps + 1)]
    rows = [
        [0.0, 0.0] + [400.0 * (s - 1) for s in range(2, steps + 1)] if b == 1 else dear
        for b in d["batch_sizes"]
    ]
    chain = [
        [400.0 * s for s in range(steps + 1)] if b == 1 else [0.0] * (steps + 1) for b in d["batch_sizes"]
    ]
    d["draft_ms"] = {topk: rows, "1": chain}
    d["fixed_ms"] = [row[steps] + 1.0 for row in rows]
    out.write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """All four servers, started together; a server that failed to start is its exception."""
    with started_together(_server_specs(tmp_path_factory.mktemp("cpu_servers")), START_TIMEOUT) as out:
        yield out


def get(servers, name: str) -> CpuServer:
    s = servers[name]
    if isinstance(s, Exception):
        pytest.fail(f"the {name} server did not start:\n{s}", pytrace=False)
    return s


def client(server: CpuServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)


def complete(server: CpuServer, prompt: list[int], **kw) -> openai.types.Completion:
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("temperature", 0.0)
    return client(server).completions.create(model="default", prompt=prompt, **kw)


def greedy_texts(server: CpuServer, prompts: list[list[int]], concurrency: int = 1) -> list[str]:
    def one(p: list[int]) -> str:
        return complete(server, p).choices[0].text

    if concurrency == 1:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from evict.testing.cpu_server import TESTBED_TARGET

    return AutoTokenizer.from_pretrained(str(TESTBED_TARGET))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """6 held-out prompts of 48 tokens, code and docstring prose alternating."""
    from evict.bench.prompts import build_prompts

    return [list(p.ids) for p in build_prompts(tokenizer, 3, 48)]


@pytest.fixture(scope="module")
def reference(servers, prompts) -> list[str]:
    """Greedy continuations without speculation, one request at a time."""
    texts = greedy_texts(get(servers, "plain"), prompts)
    assert len(set(texts)) == len(texts) and all(len(t) > 10 for t in texts)
    return texts


def loads(server: CpuServer) -> dict:
    (load,) = server.get_json("/v1/loads")["loads"]
    return load


def wait_used(server: CpuServer, used: int | None = None, timeout: float = 60.0) -> dict:
    """The load snapshot once ``num_used_tokens`` equals ``used`` (default: once it stops changing
    with nothing running). ``num_running_reqs`` alone is not enough: with speculative decoding the
    snapshot can report 0 running requests while one is decoding."""
    end = time.monotonic() + timeout
    last = None
    while True:
        load = loads(server)
        settled = load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0
        if used is not None and load["num_used_tokens"] == used and settled:
            return load
        if (
            used is None
            and settled
            and last is not None
            and last["num_used_tokens"] == load["num_used_tokens"]
        ):
            return load
        if time.monotonic() > end:
            raise AssertionError(f"{server.name}: KV pool not back to {used} after {timeout} s: {load}")
        last = load
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# greedy: identical to no speculation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECULATIVE)
def test_greedy_output_identical_to_no_speculation_one_at_a_time(servers, prompts, reference, name):
    got = greedy_texts(get(servers, name), prompts)
    diff = [i for i, (a, b) in enumerate(zip(got, reference, strict=True)) if a != b]
    assert not diff, (
        f"{name} differs from no speculation on prompts {diff}: {got[diff[0]]!r} vs {reference[diff[0]]!r}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_greedy_output_identical_under_concurrency(servers, prompts, reference, name):
    got = greedy_texts(get(servers, name), prompts, concurrency=len(prompts))
    diff = [i for i, (a, b) in enumerate(zip(got, reference, strict=True)) if a != b]
    assert not diff, (
        f"{name} at concurrency {len(prompts)} differs on prompts {diff}: {got[diff[0]]!r} vs {reference[diff[0]]!r}"
    )


# ------------------------------------------------------------------------------------------------
# sampling, max_tokens=1, stop strings, chunked prefill
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_completes_and_repeats(servers, prompts, name):
    server = get(servers, name)

    def sample(seed: int) -> tuple[str, str, int]:
        r = complete(server, prompts[1], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        c = r.choices[0]
        return c.text, c.finish_reason, r.usage.completion_tokens

    first = {seed: sample(seed) for seed in (1, 2)}
    for text, reason, n in first.values():
        assert reason in ("length", "stop") and (n == 16 or reason == "stop") and text
    assert sample(1) == first[1], f"{name}: seed 1 did not repeat"
    # the seed reaches the sampler; on EAGLE3/EVICT also the tree's sampling verification
    # (CPU_SERVER_SAMPLING_VERIFY, which the launcher sets), else tokens 2.. would be greedy
    assert first[1][0] != first[2][0], "the seed does not reach the sampler"


@pytest.mark.parametrize("name", NAMES)
def test_max_tokens_one_over_raw_http(servers, prompts, reference, name):
    server = get(servers, name)
    r = requests.post(
        server.url + "/generate",
        json={"input_ids": prompts[2], "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
        timeout=120,
    )
    r.raise_for_status()
    body = r.json()
    assert body["meta_info"]["completion_tokens"] == 1
    assert body["meta_info"]["finish_reason"]["type"] == "length"
    assert body["text"] and reference[2].startswith(body["text"])


@pytest.mark.parametrize("name", NAMES)
def test_stop_string_cuts_the_greedy_output(servers, prompts, reference, name):
    server = get(servers, name)
    for i in (3,):
        ref = reference[i]
        stop = ref[len(ref) // 2 : len(ref) // 2 + 3]
        want = ref[: ref.find(stop)]
        c = complete(server, prompts[i], stop=[stop]).choices[0]
        assert (c.text, c.finish_reason) == (want, "stop"), (name, stop)


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> list[int]:
    from evict.corpus import heldout_files, read_source

    for path in heldout_files():
        ids = tokenizer.encode(read_source(path), add_special_tokens=False)
        if len(ids) >= LONG_PROMPT_TOKENS:
            return list(ids[:LONG_PROMPT_TOKENS])
    pytest.skip("no held-out file is long enough")


@pytest.fixture(scope="module")
def long_reference(servers, long_prompt) -> str:
    return complete(get(servers, "plain"), long_prompt, max_tokens=8).choices[0].text


@pytest.mark.parametrize("name", NAMES)
def test_long_prompt_under_chunked_prefill(servers, long_prompt, long_reference, name):
    server = get(servers, name)
    before = len(server.log())
    c = complete(server, long_prompt, max_tokens=8).choices[0]
    assert c.finish_reason == "length" and c.text == long_reference
    if name != "plain":  # the plain server's first run made the reference; this one may hit its cache
        chunks = re.findall(r"Prefill batch.*?#new-token: (\d+)", server.log()[before:])
        assert chunks.count(str(CHUNK)) >= LONG_PROMPT_TOKENS // CHUNK - 1, chunks


# ------------------------------------------------------------------------------------------------
# abort frees KV slots
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_request_dropped_mid_stream_frees_its_kv_slots(servers, prompts, name):
    server = get(servers, name)
    idle = wait_used(server)["num_used_tokens"]
    body = {
        "model": "default",
        "prompt": prompts[4],
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    chunks = 0
    busy = None
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                chunks += 1
            if chunks == 6:
                busy = loads(server)
                break
    # the connection is closed here, mid-generation: SGLang aborts the request
    assert busy is not None and busy["num_used_tokens"] > idle, busy
    wait_used(server, idle)
    # still serving, and the slots really are reusable
    assert complete(server, prompts[5], max_tokens=4).choices[0].finish_reason == "length"
    wait_used(server, idle)


# ------------------------------------------------------------------------------------------------
# EVICT's metrics: the width varies, and repeats
# ------------------------------------------------------------------------------------------------

_METRICS = re.compile(r"EVICT: steps=(\d+) mean_width=([\d.]+) .*?width_switches=(\d+)")
_WIDTHS = re.compile(r"widths=((?:\d+:\d+,?)+)")


def test_evict_metrics_show_several_widths_and_repeats(servers, prompts):
    """Run last in the module, after the other tests made EVICT decode a hundred steps or so."""
    server = get(servers, "evict")
    lines = _METRICS.findall(server.log())
    if not lines or float(lines[-1][0]) < 60:  # run alone, make it decode (a batch of 6) first
        threads = [threading.Thread(target=complete, args=(server, p)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = _METRICS.findall(server.log())
    assert lines, f"no EVICT metrics line in the log:\n{server.log_tail()}"
    last = server.log().rsplit("EVICT: steps=", 1)[-1].splitlines()[0]
    steps, mean_width, switches = (float(x) for x in lines[-1])
    allowed = sorted({int(w) for w in EVICT_WIDTHS.split(",")} | {8})
    assert steps >= 40, last
    assert "fallbacks=0" in last and "errors=0" in last, last
    # several distinct widths, and repeats of the same width
    assert allowed[0] < mean_width < allowed[-1], last
    assert 2 <= switches < steps - 1, last
    hist = _WIDTHS.search(last)
    if hist:  # per-width step counts, e.g. widths=4:66,8:24
        counts = {int(w): int(c) for w, c in (kv.split(":") for kv in hist.group(1).strip(",").split(","))}
        assert set(counts) <= set(allowed), last
        assert sum(counts.values()) == steps, last
        assert len([w for w, c in counts.items() if c >= 2]) >= 2, last


# ------------------------------------------------------------------------------------------------
# EVICT with per-request widths: padded slots are never accepted
# ------------------------------------------------------------------------------------------------

_PADDED = re.compile(r"real_nodes_per_req=([\d.]+) padded_steps=(\d+)")


def test_per_request_widths_pad_and_keep_greedy_output_identical(servers, prompts, reference):
    """EVICT_PER_REQUEST=1 with EVICT_PAD_COST=0: the batch verifies one width, each request keeps its
    own best nodes and the rest are padding (root token, unlinked); the output must not change."""
    server = get(servers, "evict_per_request")
    got = greedy_texts(server, prompts, concurrency=len(prompts))
    diff = [i for i, (a, b) in enumerate(zip(got, reference, strict=True)) if a != b]
    assert not diff, (
        f"per-request widths differ on prompts {diff}: {got[diff[0]]!r} vs {reference[diff[0]]!r}"
    )
    log = server.log()
    assert "per-request widths (pad cost 0)" in log, server.log_tail()
    lines = _PADDED.findall(log)
    assert lines, f"no per-request metrics in the log:\n{server.log_tail()}"
    last = log.rsplit("EVICT: steps=", 1)[-1].splitlines()[0]
    real, padded = float(lines[-1][0]), int(lines[-1][1])
    assert padded >= 1 and "errors=0" in last and "fallbacks=0" in last, last
    assert 0.0 <= real < 7.0, last  # N = 8: fewer than N-1 real nodes per request on average


# ------------------------------------------------------------------------------------------------
# EVICT deciding the depth: plain decoding between full-tree steps
# ------------------------------------------------------------------------------------------------

_SHAPES = re.compile(r"shapes=((?:[a-z]+(?:\(\d+,\d+\))?:\d+,?)+)")


def test_depth_decision_goes_plain_and_back_with_identical_output(servers, prompts, reference):
    """EVICT_DEPTH=1 (issue 20): plain steps (SGLang's steps=0 path), one-step-deep trees, chains
    (topk 1, EVICT_DEPTH_CHAIN's default) and full-tree steps interleave in one server's decoding,
    and the output is the target's, one request at a time and under load."""
    server = get(servers, "evict_depth")
    for concurrency in (1, len(prompts)):
        got = greedy_texts(server, prompts, concurrency=concurrency)
        diff = [i for i, (a, b) in enumerate(zip(got, reference, strict=True)) if a != b]
        assert not diff, (
            f"EVICT_DEPTH=1 at concurrency {concurrency} differs on prompts {diff}: "
            f"{got[diff[0]]!r} vs {reference[diff[0]]!r}"
        )
    # Seeded sampling completes; it repeats only when the depth decisions do, and they follow the
    # server's recent history (averaged scores, probe schedule), as --speculative-adaptive's steps
    # do. The sampled distribution at every depth is the rig's test.
    for _ in range(2):
        out = complete(server, prompts[1], max_tokens=16, temperature=1.0, top_p=0.95, seed=3)
        assert out.choices[0].text and 0 < out.usage.completion_tokens <= 16, out
    log = server.log()
    assert "depth decision on" in log, server.log_tail()
    found = _SHAPES.findall(log)
    assert found, f"no shapes in EVICT's metrics lines:\n{server.log_tail()}"
    shapes = {k: int(n) for k, n in re.findall(r"([a-z]+(?:\(\d+,\d+\))?):(\d+)", found[-1])}
    tree = sum(n for k, n in shapes.items() if k.startswith("tree"))
    # one at a time: one step deep; under load: the chain of 3 or plain (and the plain step's
    # first timings); the warm-up and probes draft the full (3, 4) tree
    assert shapes.get("plain", 0) >= 1 and shapes.get("tree(1,4)", 0) >= 3, shapes
    assert shapes.get("chain(3,1)", 0) >= 3, shapes
    assert shapes.get("tree(3,4)", 0) >= 1 and tree == sum(
        shapes.get(f"tree({d},4)", 0) for d in (1, 2, 3)
    ), shapes
    assert "drafted to depth 1, 2, 3 or a chain of 3" in log, server.log_tail()
    last = log.rsplit("EVICT: steps=", 1)[-1].splitlines()[0]
    assert "errors=0" in last and "fallbacks=0" in last, last
