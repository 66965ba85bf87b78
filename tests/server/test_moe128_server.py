"""SGLang's real CPU server on the 128-expert testbed, weight-read-bound variant: EAGLE3 and EVICT.

``moe128-padded`` (docs/testbed.md) is what the 128-expert served figures are measured on, so the
rig must load it as it loads the first pair (the padded checkpoint is written into the cache on
first use), and EVICT must serve it losslessly with no cost table given: the server measures its
own costs (start-up calibration, then live steps). Greedy output is compared with EAGLE3 on the same
tree (3 steps x top-4, 8 tokens), one request at a time and 6 at once.

Marker ``server``; about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang")
openai = pytest.importorskip("openai")

from evict.models import testbeds  # noqa: E402
from evict.testing.cpu_server import eagle3_flags  # noqa: E402
from evict.testing.server import CpuServer, started_together  # noqa: E402

pytestmark = pytest.mark.server

TESTBED = "moe128-padded"
MAX_TOKENS = 20
START_TIMEOUT = float(os.environ.get("EVICT_TEST_SERVER_START_TIMEOUT", "420"))
_METRICS = re.compile(r"EVICT: steps=(\d+) mean_width=([\d.]+)")


@pytest.fixture(scope="module")
def pair():
    try:
        return testbeds.testbed_dir(TESTBED)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def servers(pair, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("moe128_servers")
    common = [
        "--model-path",
        str(pair / "target"),
        "--dtype",
        "float32",
        "--sleep-on-idle",
        "--random-seed",
        "0",
        "--speculative-algorithm",
    ]
    base_env = {k: None for k in os.environ if k.startswith("EVICT_")} | {"TRITON_INTERPRET": None}
    evict_env = base_env | {"EVICT_LOG_INTERVAL": "10"}
    flags = eagle3_flags(pair / "drafter")
    specs = {
        "eagle3": CpuServer([*common, "EAGLE3", *flags], base_env, log_dir / "eagle3.log", name="eagle3"),
        "evict": CpuServer([*common, "EVICT", *flags], evict_env, log_dir / "evict.log", name="evict"),
    }
    with started_together(specs, START_TIMEOUT) as out:
        yield out


def get(servers, name: str) -> CpuServer:
    s = servers[name]
    if isinstance(s, Exception):
        pytest.fail(f"the {name} server did not start on {TESTBED}:\n{s}", pytrace=False)
    return s


@pytest.fixture(scope="module")
def prompts(pair) -> list[list[int]]:
    from transformers import AutoTokenizer

    from evict.bench.prompts import build_prompts

    tok = AutoTokenizer.from_pretrained(str(pair / "target"))
    return [list(p.ids) for p in build_prompts(tok, 3, 48)]


def greedy(server: CpuServer, prompts: list[list[int]], concurrency: int = 1) -> list[str]:
    cl = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)

    def one(p: list[int]) -> str:
        r = cl.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS, temperature=0.0)
        return r.choices[0].text

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def test_evict_serves_the_padded_128_expert_pair_as_eagle3_does(servers, prompts):
    eagle3, evict = get(servers, "eagle3"), get(servers, "evict")
    ref = greedy(eagle3, prompts)
    assert len(set(ref)) == len(ref) and all(len(t) > 10 for t in ref)
    for concurrency in (1, len(prompts)):
        got = greedy(evict, prompts, concurrency)
        diff = [i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b]
        assert not diff, (
            f"EVICT at concurrency {concurrency} differs on {diff}: {got[diff[0]]!r} vs {ref[diff[0]]!r}"
        )
    log = evict.log()
    # no table was given: the server priced its steps itself, and nothing fell back
    assert "EVICT: start-up cost table" in log or "EVICT: live step costs" in log, evict.log_tail()
    lines = _METRICS.findall(log)
    assert lines, f"no EVICT metrics line:\n{evict.log_tail()}"
    last = log.rsplit("EVICT: steps=", 1)[-1].splitlines()[0]
    assert int(lines[-1][0]) >= 20 and "fallbacks=0" in last and "errors=0" in last, last
