"""``evict-bench --served``: EVICT against SGLang's own configurations, through SGLang's real server.

Examples::

    evict-bench --served --quick                                  # smoke run: 3 servers, ~5 min on 2 cores
    evict-bench --served                                          # seven servers at 1, 4 and 16 requests
    evict-bench --served --servers eagle3_tree evict --concurrency 1 --rounds 20
    python -m evict.bench.served --help                           # the same command

Why this design (issue 19, item 4). On a shared CPU, a served configuration's throughput moves by
up to 40% within minutes, so whole runs one server after another cannot compare servers that differ
by 10%. Here every server is started once and kept up, and all but the one being measured are
*paused* (``SIGSTOP`` of their whole process group: an idle SGLang CPU scheduler busy-polls at 100%
of a core, so idle servers side by side would slow the measured one). The measurement is cut into
many short rounds; in each round every server serves the *same* few requests, in an order that
rotates from round to round, and the tokens/s of each server is divided by the reference server's
in the same round. Machine drift hits both sides of such a paired ratio alike; the report gives the
median and the 10th-90th percentiles of the per-round ratios.

Requests go to SGLang's native streaming ``/generate`` with token ids (greedy, ``ignore_eos``), so
the outputs can be compared token for token (EVICT against EAGLE3 with the same tree) and the
timing of every streamed chunk gives TTFT and inter-token latencies. SGLang's own
``python -m sglang.bench_serving --dataset-name custom`` was tried first and does not fit: importing
it takes about 12 s per invocation on the 2-core testbed machine (a round lasts 1-10 s, and rounds
cannot share one process while the servers are paused and resumed around them), it re-tokenizes
text prompts, and it does not return output token ids, so greedy identity could not be checked.

Mean verified width and EVICT's predicted / realized accepted length come from the ``EVICT: steps=...``
metrics lines in each server's log (differenced over the measured window); the accepted length of
every speculative server also comes from ``meta_info.spec_verify_ct``.

Exit status: 0 on success (also when a target is missed: the report says so), 2 on bad arguments
or when the reference server does not start, 3 when EVICT's greedy output differs from EAGLE3 with
the same tree.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evict.boundary import OneLineArgumentParser, run_console
from evict.machine import cpu_model
from evict.paths import PACKAGE_DIR
from evict.profiler.timing import percentile as _percentile

from .modes import SGLANG_QWEN3_MOE_DEFAULT

__all__ = [
    "SERVER_NAMES",
    "ServerSpec",
    "server_specs",
    "round_orders",
    "round_prompt_indices",
    "RequestResult",
    "RoundResult",
    "percentile",
    "spread",
    "paired_ratios",
    "parse_metrics_line",
    "last_metrics",
    "metrics_lines",
    "metrics_window",
    "compare_outputs",
    "summarize",
    "render_markdown",
    "save_plot",
    "write_results",
    "build_parser",
    "main",
]

REPO = PACKAGE_DIR.parent
EXIT_BAD_INPUT = 2
EXIT_IDENTITY = 3

# name -> label; the order is the report's row order
SERVER_NAMES: dict[str, str] = {
    "plain": "no speculation",
    "eagle3_default": "EAGLE3, SGLang's MoE default chain",
    "eagle3_adaptive": "EAGLE3 --speculative-adaptive (topk 1)",
    "eagle3_tree": "EAGLE3, EVICT's tree uncut",
    "evict": "EVICT (raw acceptance)",
    "evict_cal": "EVICT (EVICT_ACCEPTANCE=calibrated)",
    "evict_depth": "EVICT deciding the draft depth (plain, 1..S, full) and the width (EVICT_DEPTH=1)",
    "evict_depth_tree": "EVICT_DEPTH=1 without chains (EVICT_DEPTH_CHAIN=0)",
}
SGLANG_CONFIGS = ("plain", "eagle3_default", "eagle3_adaptive", "eagle3_tree")  # SGLang's own
EVICT_SERVERS = ("evict", "evict_cal", "evict_depth", "evict_depth_tree")
# ``--servers`` left out: all but the chain A/B (evict_depth_tree), which asks for itself
DEFAULT_SERVERS = tuple(n for n in SERVER_NAMES if n != "evict_depth_tree")
# The CPU rig's tests' EVICT tree (evict.testing.cpu_server.EAGLE3_FLAGS, docs/cpu_server.md)
DEFAULT_TREE = (3, 4, 8)
DEFAULT_CONCURRENCY = (1, 4, 16)


# ------------------------------------------------------------------------------------------------
# servers
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One server to start: its ``sglang.launch_server`` arguments, extra environment and tree."""

    name: str
    label: str
    args: tuple[str, ...]
    env: Mapping[str, str | None]
    tree: tuple[int, int, int] | None  # (steps, topk, N); None without speculation

    @property
    def width(self) -> int:
        """Tokens verified per request and step when nothing is cut (1 without speculation)."""
        return self.tree[2] if self.tree else 1


def _spec_flags(algorithm: str, drafter: str, tree: tuple[int, int, int]) -> list[str]:
    s, k, n = tree
    return [
        "--speculative-algorithm", algorithm, "--speculative-draft-model-path", drafter,
        "--speculative-num-steps", str(s), "--speculative-eagle-topk", str(k),
        "--speculative-num-draft-tokens", str(n),
    ]  # fmt: skip


def server_specs(
    names: Sequence[str],
    tree: tuple[int, int, int],
    drafter: str,
    common_args: Sequence[str] = (),
    evict_env: Mapping[str, str | None] | None = None,
    log_interval: int = 10,
) -> list[ServerSpec]:
    """The servers ``names`` (keys of :data:`SERVER_NAMES`), in the report's order.

    Every server gets ``common_args`` and an environment without the caller's ``EVICT_*`` variables
    (so a stray setting cannot change one side of an A/B); EVICT's servers get ``evict_env`` (e.g.
    ``EVICT_COST_TABLE``) and ``EVICT_LOG_INTERVAL=log_interval`` so the metrics lines are frequent
    enough to difference over a measurement window.
    """
    unknown = [n for n in names if n not in SERVER_NAMES]
    if unknown:
        raise ValueError(f"unknown server(s) {unknown}; choose from {', '.join(SERVER_NAMES)}")
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("EVICT_")}
    clean["TRITON_INTERPRET"] = None
    evict = {**clean, **(evict_env or {}), "EVICT_LOG_INTERVAL": str(log_interval)}
    chain = tuple(SGLANG_QWEN3_MOE_DEFAULT)
    s, k, n = tree
    table: dict[str, tuple[list[str], dict[str, str | None], tuple[int, int, int] | None, str]] = {
        "plain": ([], clean, None, ""),
        "eagle3_default": (_spec_flags("EAGLE3", drafter, chain), clean, chain, f" ({chain[0]},{chain[1]},{chain[2]})"),
        "eagle3_adaptive": (
            [*_spec_flags("EAGLE3", drafter, chain), "--speculative-adaptive"], clean, chain,
            f" (from {chain[0]},{chain[1]},{chain[2]})",
        ),
        "eagle3_tree": (_spec_flags("EAGLE3", drafter, tree), clean, tree, f" ({s},{k},{n})"),
        "evict": (_spec_flags("EVICT", drafter, tree), evict, tree, f" ({s},{k},{n})"),
        "evict_cal": (
            _spec_flags("EVICT", drafter, tree), {**evict, "EVICT_ACCEPTANCE": "calibrated"}, tree, f" ({s},{k},{n})",
        ),
        "evict_depth": (
            _spec_flags("EVICT", drafter, tree), {**evict, "EVICT_DEPTH": "1"}, tree, f" ({s},{k},{n})",
        ),
        "evict_depth_tree": (
            _spec_flags("EVICT", drafter, tree), {**evict, "EVICT_DEPTH": "1", "EVICT_DEPTH_CHAIN": "0"}, tree,
            f" ({s},{k},{n})",
        ),
    }  # fmt: skip
    out = []
    for name in SERVER_NAMES:
        if name in names:
            args, env, t, suffix = table[name]
            out.append(ServerSpec(name, SERVER_NAMES[name] + suffix, (*common_args, *args), env, t))
    return out


# ------------------------------------------------------------------------------------------------
# scheduling
# ------------------------------------------------------------------------------------------------


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order in which the servers serve each round.

    Round r rotates the list by r; every other full cycle runs it backwards. So over ``2 * len(names)``
    rounds every server takes every position equally often and follows / precedes every other
    server alike: a cost that depends on the position (a cache the previous server warmed, a
    scheduler that wakes up slowly after SIGCONT) does not favour anyone.
    """
    n = len(names)
    out = []
    for r in range(rounds):
        k = r % n if n else 0
        order = list(names[k:]) + list(names[:k])
        if n and (r // n) % 2 == 1:
            order.reverse()
        out.append(order)
    return out


def round_prompt_indices(num_prompts: int, per_round: int, rounds: int, offset: int = 0) -> list[list[int]]:
    """The prompts of each round: consecutive blocks of ``per_round``, cycling through the set.

    Every server gets the same block in the same round (that is what makes the ratio paired);
    ``offset`` starts a concurrency level elsewhere in the set so levels do not all open on prompt 0.
    """
    if num_prompts < 1 or per_round < 1:
        raise ValueError(f"need num_prompts >= 1 and per_round >= 1, got {num_prompts}, {per_round}")
    return [[(offset + r * per_round + i) % num_prompts for i in range(per_round)] for r in range(rounds)]


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One streamed request: output token ids and when each chunk of them arrived."""

    prompt: int
    output_ids: list[int] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    ttft_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks that carried new tokens
    completion_tokens: int = 0
    spec_verify_ct: int | None = None
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class RoundResult:
    """One server's part of one round: a few requests sent ``concurrency`` at a time."""

    server: str
    concurrency: int
    round: int
    position: int  # place in the round's order
    requests: list[RequestResult]

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.requests)

    @property
    def wall_s(self) -> float:
        """From the first request sent to the last one finished."""
        if not self.requests:
            return float("nan")
        return max(r.end for r in self.requests) - min(r.start for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        w = self.wall_s
        return self.tokens / w if w > 0 else float("nan")


def percentile(xs: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) of the non-NaN values (a failed round is NaN); NaN when none."""
    v = [x for x in xs if not math.isnan(x)]
    return _percentile(v, q) if v else float("nan")


def spread(xs: Sequence[float]) -> dict[str, float | int]:
    """Median, 10th-90th percentiles, min, max and geometric mean of per-round ratios."""
    v = [x for x in xs if not math.isnan(x) and x > 0]
    if not v:
        return {"n": 0, "median": float("nan"), "p10": float("nan"), "p90": float("nan"),
                "min": float("nan"), "max": float("nan"), "geomean": float("nan")}  # fmt: skip
    return {
        "n": len(v),
        "median": statistics.median(v),
        "p10": percentile(v, 10),
        "p90": percentile(v, 90),
        "min": min(v),
        "max": max(v),
        "geomean": math.exp(sum(math.log(x) for x in v) / len(v)),
    }


def paired_ratios(
    rounds: Sequence[RoundResult], server: str, reference: str, concurrency: int
) -> list[float]:
    """tokens/s of ``server`` over ``reference`` in each round (at ``concurrency``) both served."""
    by: dict[tuple[str, int], RoundResult] = {
        (r.server, r.round): r for r in rounds if r.concurrency == concurrency
    }
    out = []
    for (name, rnd), a in sorted(by.items(), key=lambda kv: kv[0][1]):
        if name != server or (reference, rnd) not in by:
            continue
        b = by[(reference, rnd)]
        if a.tokens_per_s > 0 and b.tokens_per_s > 0:
            out.append(a.tokens_per_s / b.tokens_per_s)
    return out


# ------------------------------------------------------------------------------------------------
# EVICT's metrics lines
# ------------------------------------------------------------------------------------------------

_METRICS_PREFIX = "EVICT: steps="
_KV = re.compile(r"^([A-Za-z_][\w./]*)=(\S+)$")


def _number(text: str) -> float | int | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_metrics_line(line: str) -> dict[str, Any] | None:
    """The fields of one ``EVICT: steps=... mean_width=... accept_len predicted=... realized=...`` line.

    Generic on purpose, so fields the plugin adds later (e.g. predicted against measured step time)
    are kept without a change here: ``key=value`` pairs become entries; a bare word (``accept_len``)
    prefixes the pairs that follow it until the next bare word (``accept_len.predicted``); the width
    histogram ``widths=4:66,8:24`` becomes ``{4: 66, 8: 24}``. None when the line is not a metrics line.
    """
    i = line.find(_METRICS_PREFIX)
    if i < 0:
        return None
    out: dict[str, Any] = {}
    prefix = ""
    for tok in line[i + len("EVICT:") :].split():
        m = _KV.match(tok)
        if not m:
            prefix = tok.strip(":,") + "."
            continue
        key, value = m.group(1), m.group(2).rstrip(",")
        if key == "widths" and ":" in value:
            try:
                out["widths"] = {int(w): int(c) for w, c in (kv.split(":") for kv in value.split(",") if kv)}
            except ValueError:
                out["widths"] = value
            continue
        if key == "shapes":  # EVICT_DEPTH=1: shapes=plain:79,tree(3,4):901
            out["shapes"] = {k: int(n) for k, n in re.findall(r"([a-z]+(?:\(\d+,\d+\))?):(\d+)", value)}
            continue
        if key in ("steps", "mean_width", "fallbacks", "errors", "width_switches", "decision", "backend"):
            prefix = ""  # the plugin's top-level fields end a prefix group
        out[prefix + key] = _number(value)
    return out if isinstance(out.get("steps"), int) else None


def last_metrics(log_text: str) -> dict[str, Any] | None:
    """The last complete metrics line in a server log (None when there is none yet)."""
    for line in reversed(log_text.splitlines()):
        if _METRICS_PREFIX in line:
            got = parse_metrics_line(line)
            if got is not None:
                return got
    return None


_STEP_MEANS = ("mean_width", "accept_len.predicted", "accept_len.realized")
_COUNTERS = ("fallbacks", "errors", "width_switches")


def metrics_window(
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    window_lines: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The metrics of the steps between two cumulative lines (``before`` None: since start-up).

    The plugin's counters are cumulative over the server's life, so a window's mean is
    ``(S2*m2 - S1*m1) / (S2 - S1)``. For the accepted lengths (means over request-steps, not steps)
    this step weighting is exact at one request and an approximation under batching; the report
    says so. The live step-cost fields (``step_ms predicted=... measured=... measured/predicted=...
    timed=...``) cover the steps since the previous line, so they are pooled over ``window_lines``
    (every parsed line of the window): timed-weighted mean predicted and measured step time, and the
    median of the lines' measured/predicted. Other fields are taken from ``after`` as they are.
    """
    if after is None:
        return {"steps": 0}
    s2 = int(after.get("steps", 0))
    s1 = int(before.get("steps", 0)) if before else 0
    out: dict[str, Any] = {"steps": s2 - s1}
    if s2 - s1 <= 0:
        return out
    for key in _STEP_MEANS:
        m2 = after.get(key)
        m1 = before.get(key) if before else 0.0
        if isinstance(m2, int | float) and isinstance(m1, int | float) and not math.isnan(m2):
            m1 = 0.0 if (s1 == 0 or math.isnan(m1)) else m1
            out[key] = (s2 * m2 - s1 * m1) / (s2 - s1)
    for key in _COUNTERS:
        if isinstance(after.get(key), int):
            out[key] = after[key] - (int(before.get(key, 0)) if before else 0)
    for hist in ("widths", "shapes"):  # per-width and per-draft-shape step counts, differenced
        h2, h1 = after.get(hist), (before or {}).get(hist) or {}
        if isinstance(h2, dict) and isinstance(h1, dict):
            out[hist] = {w: c - h1.get(w, 0) for w, c in h2.items() if c - h1.get(w, 0) > 0}
    timed = [m for m in window_lines if isinstance(m.get("step_ms.timed"), int) and m["step_ms.timed"] > 0]
    if timed:
        n = sum(m["step_ms.timed"] for m in timed)
        for key in ("predicted", "measured"):
            out[f"step_ms.{key}"] = sum(m["step_ms.timed"] * float(m[f"step_ms.{key}"]) for m in timed) / n
        ratios = [float(m["step_ms.measured/predicted"]) for m in timed if "step_ms.measured/predicted" in m]
        if ratios:
            out["step_ms.measured/predicted.median_of_lines"] = statistics.median(ratios)
        out["step_ms.timed"] = n
    for key, value in after.items():
        if key not in out and key not in _STEP_MEANS and key not in _COUNTERS and key != "widths":
            if not key.startswith("step_ms."):
                out["last." + key] = value
    return out


def metrics_lines(log_text: str) -> list[dict[str, Any]]:
    """Every parsed metrics line of a log (or of a slice of it), in order."""
    return [m for m in map(parse_metrics_line, log_text.splitlines()) if m is not None]


# ------------------------------------------------------------------------------------------------
# greedy identity
# ------------------------------------------------------------------------------------------------


def compare_outputs(outputs: Mapping[tuple[str, int, int], list[int]], a: str, b: str) -> dict[str, Any]:
    """Token-for-token comparison of servers ``a`` and ``b`` on every (concurrency, prompt) both served.

    ``outputs`` maps (server, concurrency, prompt) to the output ids. Returns the number compared,
    the number identical, and the first few differences with the first differing position.
    """
    keys = sorted({(c, p) for (s, c, p) in outputs if s == a} & {(c, p) for (s, c, p) in outputs if s == b})
    diffs = []
    for c, p in keys:
        x, y = outputs[(a, c, p)], outputs[(b, c, p)]
        if x != y:
            pos = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            diffs.append({"concurrency": c, "prompt": p, "first_diff": pos})
    return {"a": a, "b": b, "compared": len(keys), "identical": len(keys) - len(diffs), "diffs": diffs[:10]}


# ------------------------------------------------------------------------------------------------
# the client
# ------------------------------------------------------------------------------------------------


def stream_generate(
    url: str, ids: Sequence[int], max_new_tokens: int, timeout: float = 600.0
) -> RequestResult:
    """One greedy request (``ignore_eos``) to SGLang's streaming ``/generate``, timed per chunk.

    Each streamed chunk carries the cumulative ``output_ids``; a chunk that adds tokens is one
    arrival. TTFT is the first arrival after sending, ITL the gaps between arrivals (a speculative
    step that accepts several tokens arrives as one chunk, as SGLang users see it).
    """
    import requests  # noqa: PLC0415  (only the served bench needs it)

    res = RequestResult(prompt=-1)
    body = {
        "input_ids": list(ids),
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    res.start = time.perf_counter()
    last = res.start
    n = 0
    try:
        with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                out = chunk.get("output_ids") or []
                meta = chunk.get("meta_info") or {}
                if len(out) > n:
                    if n == 0:
                        res.ttft_s = now - res.start
                    else:
                        res.itl_s.append(now - last)
                    last, n = now, len(out)
                    res.output_ids = list(out)
                res.completion_tokens = int(meta.get("completion_tokens", n))
                if "spec_verify_ct" in meta:
                    res.spec_verify_ct = int(meta["spec_verify_ct"])
    except Exception as exc:  # noqa: BLE001  (reported per request, the run goes on)
        res.error = f"{type(exc).__name__}: {exc}"
    res.end = time.perf_counter()
    return res


def run_round(
    url: str,
    prompts: Sequence[Sequence[int]],
    indices: Sequence[int],
    concurrency: int,
    max_new_tokens: int,
    send: Callable[[str, Sequence[int], int], RequestResult] = stream_generate,
) -> list[RequestResult]:
    """Send the round's prompts, at most ``concurrency`` in flight, and return them in order."""

    def one(i: int) -> RequestResult:
        r = send(url, prompts[i], max_new_tokens)
        r.prompt = i
        return r

    with ThreadPoolExecutor(max(1, min(concurrency, len(indices)))) as pool:
        return list(pool.map(one, indices))


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """What one served run does (filled from the command line)."""

    servers: list[str]
    tree: tuple[int, int, int]
    concurrency: list[int]
    rounds: dict[int, int]
    per_round: dict[int, int]
    max_new_tokens: int
    reference: str
    settle_s: float = 0.3
    start_timeout_s: float = 420.0


class ServedBench:
    """Starts the servers, runs the interleaved rounds with all but the active server paused, stops them."""

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        prompts: Sequence[Sequence[int]],
        cfg: RunConfig,
        log_dir: Path,
        server_cls: type,
        progress: bool = True,
    ) -> None:
        self.specs = list(specs)
        self.prompts = [list(p) for p in prompts]
        self.cfg = cfg
        self.log_dir = log_dir
        self.server_cls = server_cls
        self.progress = progress
        self.servers: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self.rounds: list[RoundResult] = []
        self.outputs: dict[tuple[str, int, int], list[int]] = {}
        self.unstable: list[dict[str, Any]] = []  # a server's repeat of a prompt gave other tokens
        self.metrics: dict[str, dict[int, dict[str, Any]]] = {}
        self.startup_s: dict[str, float] = {}
        self.windows: dict[int, tuple[str, str]] = {}  # level -> wall-clock start, end of its timed rounds
        self.errors: list[str] = []

    def start(self) -> None:
        """Start the servers one at a time, each paused once ready.

        One at a time because a ready server spins on a core and would slow the next one's start-up;
        a server that does not start is recorded (with its log tail) and left out of the run.
        """
        for spec in self.specs:
            srv = self.server_cls(spec.args, spec.env, self.log_dir / f"{spec.name}.log", name=spec.name)
            t0 = time.monotonic()
            print(
                f"evict-bench --served: starting {spec.name} ({spec.label}) ...", file=sys.stderr, flush=True
            )
            try:
                srv.start()
                srv.wait_ready(self.cfg.start_timeout_s)
            except Exception as exc:  # noqa: BLE001  (ServerStartError and friends: reported)
                srv.stop()
                self.failed[spec.name] = str(exc)[-3000:]
                print(f"evict-bench --served: {spec.name} did not start: {str(exc)[:300]}", file=sys.stderr)
                continue
            self.startup_s[spec.name] = time.monotonic() - t0
            self.servers[spec.name] = srv
            srv.pause()

    def stop(self) -> None:
        """Stop every server (in parallel: each waits for SGLang's own shutdown)."""
        servers = list(self.servers.values())
        if servers:
            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(lambda s: s.stop(), servers))

    def _serve(self, name: str, indices: Sequence[int], concurrency: int) -> list[RequestResult]:
        srv = self.servers[name]
        srv.resume()
        try:
            time.sleep(self.cfg.settle_s)  # let the continued scheduler get back onto a core
            return run_round(srv.url, self.prompts, indices, concurrency, self.cfg.max_new_tokens)
        finally:
            srv.pause()

    def _record_outputs(self, name: str, concurrency: int, reqs: Sequence[RequestResult]) -> None:
        for r in reqs:
            if r.error:
                self.errors.append(f"{name} c={concurrency} prompt {r.prompt}: {r.error}")
                continue
            key = (name, concurrency, r.prompt)
            if key in self.outputs and self.outputs[key] != r.output_ids:
                self.unstable.append({"server": name, "concurrency": concurrency, "prompt": r.prompt})
            self.outputs.setdefault(key, r.output_ids)

    def run(self) -> None:
        """All concurrency levels: an untimed warm-up round per server, then the timed rounds."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        names = [s.name for s in self.specs if s.name in self.servers]
        total = sum(self.cfg.rounds[c] * len(names) for c in self.cfg.concurrency)
        bar = tqdm(
            total=total, desc="served rounds", unit="srv-round", disable=not self.progress, file=sys.stderr
        )
        offset = 0
        for c in self.cfg.concurrency:
            k = self.cfg.per_round[c]
            blocks = round_prompt_indices(len(self.prompts), k, self.cfg.rounds[c] + 1, offset)
            offset += k * (self.cfg.rounds[c] + 1)
            for name in names:  # warm-up at this concurrency (first requests pay one-off costs)
                self._record_outputs(name, c, self._serve(name, blocks[0], c))
            before = {n: last_metrics(self.servers[n].log()) for n in names}
            offsets = {n: len(self.servers[n].log()) for n in names}
            t_start = _dt.datetime.now().isoformat(timespec="seconds")
            for r, order in enumerate(round_orders(names, self.cfg.rounds[c])):
                for pos, name in enumerate(order):
                    bar.set_postfix_str(f"c={c} round {r + 1}/{self.cfg.rounds[c]} {name}")
                    reqs = self._serve(name, blocks[r + 1], c)
                    self._record_outputs(name, c, reqs)
                    self.rounds.append(RoundResult(name, c, r, pos, [q for q in reqs if not q.error]))
                    bar.update(1)
            self.windows[c] = (t_start, _dt.datetime.now().isoformat(timespec="seconds"))
            for n in names:
                log = self.servers[n].log()
                self.metrics.setdefault(n, {})[c] = metrics_window(
                    before[n], last_metrics(log), metrics_lines(log[offsets[n] :])
                )
        bar.close()


# ------------------------------------------------------------------------------------------------
# summary and report
# ------------------------------------------------------------------------------------------------


def _num(x: Any) -> Any:
    """JSON-safe: NaN/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _num(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_num(v) for v in x]
    return x


def _verdict(s: Mapping[str, Any]) -> str:
    """'faster' (median >= 1), 'within spread' (median < 1 <= p90), 'slower' (p90 < 1), or 'n/a'."""
    if not s or not s.get("n"):
        return "n/a"
    if s["median"] >= 1.0:
        return "not slower"
    return "within spread" if s["p90"] >= 1.0 else "slower"


def summarize(
    rounds: Sequence[RoundResult],
    outputs: Mapping[tuple[str, int, int], list[int]],
    metrics: Mapping[str, Mapping[int, Mapping[str, Any]]],
    specs: Sequence[ServerSpec],
    reference: str,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Every number of the report, JSON-ready: per concurrency and server, ratios, latencies, widths."""
    names = [s.name for s in specs if any(r.server == s.name for r in rounds)]
    spec_by = {s.name: s for s in specs}
    levels = sorted({r.concurrency for r in rounds})
    out: dict[str, Any] = {"meta": dict(meta), "reference": reference, "servers": {}, "levels": {}}
    for s in specs:
        out["servers"][s.name] = {"label": s.label, "tree": s.tree, "args": list(s.args)}
    for c in levels:
        lvl: dict[str, Any] = {}
        best_sglang = None
        for name in names:
            rs = [r for r in rounds if r.server == name and r.concurrency == c]
            reqs = [q for r in rs for q in r.requests]
            tokens = sum(r.tokens for r in rs)
            wall = sum(r.wall_s for r in rs)
            itl = [x for q in reqs for x in q.itl_s]
            ttft = [q.ttft_s for q in reqs]
            verify = [q.spec_verify_ct for q in reqs if q.spec_verify_ct]
            accept = (
                sum(q.completion_tokens for q in reqs if q.spec_verify_ct) / sum(verify) if verify else
                (1.0 if spec_by[name].tree is None else float("nan"))
            )  # fmt: skip
            m = dict(metrics.get(name, {}).get(c, {}))
            row = {
                "rounds": len(rs),
                "requests": len(reqs),
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
                "per_round_tokens_per_s": spread([r.tokens_per_s for r in rs]),
                "ratio_vs_reference": spread(paired_ratios(rounds, name, reference, c)),
                "ttft_ms": {q: 1000 * percentile(ttft, q) for q in (50, 90, 99)},
                "itl_ms": {q: 1000 * percentile(itl, q) for q in (50, 90, 99)},
                "accept_len": accept,
                # EVICT's from its log; adaptive EAGLE3 changes its steps (so N) as it runs: not known
                "mean_width": m.get(
                    "mean_width",
                    float("nan") if name in (*EVICT_SERVERS, "eagle3_adaptive") else float(spec_by[name].width),
                ),
                "evict_metrics": m if name in EVICT_SERVERS else {},
            }  # fmt: skip
            lvl[name] = row
            if name in SGLANG_CONFIGS and (
                best_sglang is None or row["tokens_per_s"] > lvl[best_sglang]["tokens_per_s"]
            ):
                best_sglang = name
        checks: dict[str, Any] = {"best_sglang": best_sglang}
        for ev in EVICT_SERVERS:
            if ev not in lvl:
                continue
            for other in ("eagle3_tree", "eagle3_default", "eagle3_adaptive", best_sglang):
                if other and other in lvl and other != ev:
                    sp = spread(paired_ratios(rounds, ev, other, c))
                    checks[f"{ev}/{other}"] = {**sp, "verdict": _verdict(sp)}
        if "evict_depth" in lvl and "evict_depth_tree" in lvl:  # what the chains gain or cost
            sp = spread(paired_ratios(rounds, "evict_depth", "evict_depth_tree", c))
            checks["evict_depth/evict_depth_tree"] = {**sp, "verdict": _verdict(sp)}
        lvl["_checks"] = checks
        out["levels"][str(c)] = lvl
    out["identity"] = {
        f"{a}=={b}": compare_outputs(outputs, a, b)
        for a, b in (
            ("evict", "eagle3_tree"),
            ("evict_cal", "eagle3_tree"),
            ("evict_depth", "eagle3_tree"),
            ("evict_depth", "plain"),
            ("evict_depth_tree", "eagle3_tree"),
            ("eagle3_tree", "plain"),
            ("evict", "plain"),
            ("eagle3_default", "plain"),
        )  # fmt: skip
        if any(k[0] == a for k in outputs) and any(k[0] == b for k in outputs)
    }
    out["targets"] = _targets(out)
    return _num(out)


def _targets(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's served targets, each with its evidence and MET / NOT MET / n/a."""
    out = []
    for c, lvl in summary["levels"].items():
        checks = lvl["_checks"]
        pairs = [("evict", o) for o in ("eagle3_tree", "eagle3_default")]
        pairs += [("evict_depth", o) for o in ("eagle3_default", "eagle3_adaptive")]  # issue 20
        for ev, other in pairs:
            sp = checks.get(f"{ev}/{other}")
            if sp is None:
                continue
            who = "EVICT" if ev == "evict" else "EVICT_DEPTH=1"
            out.append({
                "target": f"{who} never slower than {other} at {c} concurrent",
                "median": sp["median"], "p10": sp["p10"], "p90": sp["p90"],
                "status": "NOT MET" if sp["verdict"] == "slower" else "MET",
                "note": sp["verdict"],
            })  # fmt: skip
    lvl1 = summary["levels"].get("1")
    if lvl1 is not None:
        best = lvl1["_checks"].get("best_sglang")
        sp = lvl1["_checks"].get(f"evict/{best}") if best else None
        if sp is not None:
            out.append({
                "target": f"goal: EVICT 1.10x the best SGLang configuration ({best}) at 1 concurrent",
                "median": sp["median"], "p10": sp["p10"], "p90": sp["p90"],
                "status": "MET" if sp["median"] >= 1.10 else "NOT MET", "note": "",
            })  # fmt: skip
    for key, ident in summary.get("identity", {}).items():
        if key.startswith("evict"):
            out.append({
                "target": f"greedy identity {key}", "median": None, "p10": None, "p90": None,
                "status": "MET" if ident["compared"] and ident["identical"] == ident["compared"] else "NOT MET",
                "note": f"{ident['identical']}/{ident['compared']} outputs identical",
            })  # fmt: skip
    return out


def _f(x: Any, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _sp(s: Mapping[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{_f(s['median'])} [{_f(s['p10'])}-{_f(s['p90'])}]"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """results.md: how it was run, then one table per concurrency level, the checks and identity."""
    meta = summary["meta"]
    ref = summary["reference"]
    lines = [
        "# Served benchmark: EVICT against SGLang's configurations through SGLang's real server",
        "",
        f"- command: `{meta.get('command', '')}`",
        f"- date: {meta.get('date', '')}; wall time {meta.get('wall_s', 0):.0f} s; machine: {meta.get('machine', '')}",
        f"- server: {meta.get('server', '')}; tree (steps, topk, N): {meta.get('tree')}; "
        f"{meta.get('max_new_tokens')} new tokens per request, greedy, ignore_eos; "
        f"{meta.get('num_prompts')} prompts ({meta.get('prompt_desc', '')})",
        f"- EVICT's costs: {meta.get('cost_source', '')}",
        f"- interleaving: all servers up, all but the active one paused (SIGSTOP of its process group); "
        f"rounds per concurrency {meta.get('rounds')}, requests per round {meta.get('per_round')}, "
        "server order rotating (and reversed every other cycle); one untimed warm-up round per server and level",
        f"- ratios are per-round paired tokens/s ratios: median [p10-p90] over rounds; reference `{ref}`",
    ]
    if meta.get("note"):
        lines.append(f"- note: {meta['note']}")
    if meta.get("interrupted"):
        lines.append("- **interrupted**: the rounds measured before the interrupt only")
    if meta.get("failed"):
        lines.append(f"- servers that did not start: {', '.join(meta['failed'])} (log tails in results.json)")
    if meta.get("request_errors"):
        lines.append(f"- request errors: {meta['request_errors']} (first ones in results.json)")
    for c, lvl in summary["levels"].items():
        lines += [
            "",
            f"## {c} concurrent request{'s' if c != '1' else ''}",
            "",
            f"| server | tok/s (all rounds) | per-round tok/s median [p10-p90] | / {ref} per round | "
            "TTFT p50/p90 ms | ITL p50/p90/p99 ms | accepted len | mean width |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in lvl.items():
            if name.startswith("_"):
                continue
            label = summary["servers"][name]["label"]
            t, i = row["ttft_ms"], row["itl_ms"]
            lines.append(
                f"| {label} | {_f(row['tokens_per_s'], 1)} | {_sp(row['per_round_tokens_per_s'])} | "
                f"{_sp(row['ratio_vs_reference'])} | {_f(t['50'], 0)} / {_f(t['90'], 0)} | "
                f"{_f(i['50'], 0)} / {_f(i['90'], 0)} / {_f(i['99'], 0)} | {_f(row['accept_len'])} | "
                f"{_f(row['mean_width'], 1)} |"
            )
        checks = lvl["_checks"]
        pairs = [(k, v) for k, v in checks.items() if "/" in k]
        if pairs:
            lines += [
                "",
                "| paired ratio | median [p10-p90] | min-max | rounds | verdict |",
                "|---|---|---|---|---|",
            ]
            for k, v in pairs:
                lines.append(
                    f"| {k} | {_sp(v)} | {_f(v['min'])}-{_f(v['max'])} | {v['n']} | {v['verdict']} |"
                )
        for name in EVICT_SERVERS:
            m = lvl.get(name, {}).get("evict_metrics") if name in lvl else None
            if m:
                step = (
                    f", step time predicted {_f(m['step_ms.predicted'])} ms / measured "
                    f"{_f(m['step_ms.measured'])} ms over {m.get('step_ms.timed')} timed steps (median of "
                    f"lines' measured/predicted {_f(m.get('step_ms.measured/predicted.median_of_lines'), 3)})"
                    if "step_ms.measured" in m
                    else ", no step times in the log"
                )
                lines.append(
                    f"\n{name}: {m.get('steps', 0)} metered steps, mean width {_f(m.get('mean_width'))}, accepted "
                    f"length predicted {_f(m.get('accept_len.predicted'))} / realized "
                    f"{_f(m.get('accept_len.realized'))} (step-weighted), fallbacks {m.get('fallbacks', '-')}, "
                    f"errors {m.get('errors', '-')}, widths {m.get('widths', '-')}"
                    + (f", draft shapes {m['shapes']}" if m.get("shapes") else "")
                    + step
                )
    lines += ["", "## Greedy identity (token ids, every concurrency and prompt both served)", ""]
    for key, ident in summary.get("identity", {}).items():
        lines.append(
            f"- {key}: {ident['identical']}/{ident['compared']} identical"
            + (f"; first differences {ident['diffs'][:3]}" if ident["diffs"] else "")
        )
    lines += [
        "",
        "## Targets (issue 19)",
        "",
        "| target | median [p10-p90] | status | note |",
        "|---|---|---|---|",
    ]
    for t in summary.get("targets", []):
        sp = f"{_f(t['median'])} [{_f(t['p10'])}-{_f(t['p90'])}]" if t["median"] is not None else "-"
        lines.append(f"| {t['target']} | {sp} | {t['status']} | {t['note']} |")
    lines += [
        "",
        "Verdicts: *not slower* = median ratio >= 1; *within spread* = median < 1 but the 90th percentile "
        ">= 1; *slower* = even the 90th percentile round is below 1 (the target counts only this as NOT MET).",
    ]
    return "\n".join(lines) + "\n"


def save_plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """served.png: per-round ratio vs the reference (median, p10-p90 bars) and ITL p50, per level."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    levels = list(summary["levels"])
    names = [n for n in SERVER_NAMES if any(n in summary["levels"][c] for c in levels)]
    if not levels or not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, med, lo, hi, itl = [], [], [], [], []
        for i, c in enumerate(levels):
            row = summary["levels"][c].get(name)
            if not row:
                continue
            sp = row["ratio_vs_reference"]
            m = sp["median"] if sp["n"] else float("nan")
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            med.append(m)
            lo.append(max(0.0, m - sp["p10"]) if sp["n"] else 0.0)
            hi.append(max(0.0, sp["p90"] - m) if sp["n"] else 0.0)
            itl.append(row["itl_ms"]["50"] or float("nan"))
        axes[0].bar(xs, med, width, yerr=[lo, hi], capsize=2, label=summary["servers"][name]["label"])
        axes[1].bar(xs, itl, width, label=name)
    for ax in axes:
        ax.set_xticks(range(len(levels)), [f"{c} concurrent" for c in levels])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel(f"tokens/s / {summary['reference']} (per round; median, p10-p90)")
    axes[1].set_ylabel("ITL p50 (ms)")
    axes[0].legend(fontsize=7)
    fig.suptitle("evict-bench --served")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    summary: Mapping[str, Any], out_dir: Path, extra: Mapping[str, Any] | None = None
) -> list[Path]:
    """results.md, results.json (the summary plus ``extra``, e.g. raw rounds) and served.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(render_markdown(summary))
    js = out_dir / "results.json"
    js.write_text(json.dumps(_num({**summary, **(extra or {})}), indent=1))
    paths = [md, js]
    png = save_plot(summary, out_dir / "served.png")
    if png is not None:
        paths.append(png)
    return paths


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from evict.models.testbeds import testbed_choices  # noqa: PLC0415 (torch loads only when used)

    p = OneLineArgumentParser(
        prog="evict-bench --served", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 3 servers, 1 and 4 concurrent, 3 rounds, 32 tokens"
    )
    p.add_argument(
        "--servers",
        nargs="+",
        choices=list(SERVER_NAMES),
        help=f"default: {' '.join(DEFAULT_SERVERS)} (evict_depth_tree only when named)",
    )
    p.add_argument("--reference", choices=list(SERVER_NAMES), help="ratio denominator (default eagle3_default, "
                   "else the first server)")  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULT_TREE[0], help="EVICT's tree: draft steps (default 3)")
    p.add_argument("--topk", type=int, default=DEFAULT_TREE[1], help="EVICT's tree: topk (default 4)")
    p.add_argument(
        "--num-draft-tokens", type=int, default=DEFAULT_TREE[2], help="EVICT's tree: N (default 8)"
    )
    p.add_argument(
        "--concurrency", type=int, nargs="+", help="concurrent requests per level (default 1 4 16)"
    )
    p.add_argument("--rounds", type=int, nargs="+", help="timed rounds per level: one value, or one per level "
                   "(default 12; quick 3)")  # fmt: skip
    p.add_argument("--requests-per-round", type=int, nargs="+", help="one value or one per level (default: "
                   "max(2, concurrency))")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, help="default 48 (quick 32)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, help="held-out prompts per domain (default 8; quick 2)")
    p.add_argument("--ood-prompts", type=int, help="out-of-domain prompts per domain (default --num-prompts)")
    p.add_argument("--cost-table", type=Path, help="EVICT_COST_TABLE for EVICT's servers (with "
                   "EVICT_ALLOW_TABLE_MISMATCH=1); default: none, the server decides where its costs come from")  # fmt: skip
    p.add_argument(
        "--evict-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more EVICT_* for EVICT's servers",
    )
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra launch_server argument for every server (repeatable, e.g. --server-arg=--dtype=bfloat16)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="CpuServer or GpuServer")
    p.add_argument(
        "--testbed",
        metavar="NAME",
        help=f"serve a shipped testbed pair by name ({testbed_choices()}) instead of the model paths",
    )
    p.add_argument("--model-path", help="target (default: the shipped testbed target)")
    p.add_argument("--draft-model-path", help="EAGLE-3 drafter (default: the shipped testbed drafter)")
    p.add_argument("--log-interval", type=int, default=10, help="EVICT_LOG_INTERVAL for EVICT's servers")
    p.add_argument("--settle-s", type=float, default=0.3, help="pause after SIGCONT before a server's round")
    p.add_argument("--start-timeout", type=float, default=420.0, help="seconds per server start-up")
    p.add_argument("--out", type=Path, help="default runs/served (quick: runs/served-quick)")
    p.add_argument("--note", default="", help="printed in the report (e.g. machine load)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _per_level(
    values: Sequence[int] | None, levels: Sequence[int], default: Callable[[int], int], flag: str
) -> dict[int, int]:
    if not values:
        return {c: default(c) for c in levels}
    if len(values) == 1:
        return {c: values[0] for c in levels}
    if len(values) != len(levels):
        raise ValueError(f"{flag}: give one value or one per concurrency level ({len(levels)})")
    return dict(zip(levels, values, strict=True))


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "evict"], capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return f"{head}{' + uncommitted changes in ' + str(len(dirty.splitlines())) + ' evict/ files' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _prompts(args: argparse.Namespace) -> tuple[list[list[int]], str]:
    from transformers import AutoTokenizer  # noqa: PLC0415

    from evict.testing.cpu_server import TESTBED_TARGET  # noqa: PLC0415

    from .prompts import build_ood_prompts, build_prompts  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(args.model_path or str(TESTBED_TARGET))
    held = build_prompts(tok, args.num_prompts, args.prompt_tokens)
    ood = build_ood_prompts(tok, args.ood_prompts, args.prompt_tokens) if args.ood_prompts else []
    # interleave held-out and out-of-domain, so every round block mixes domains
    mixed = []
    for i in range(max(len(held), len(ood))):
        mixed += [p for p in (held[i] if i < len(held) else None, ood[i] if i < len(ood) else None) if p]
    desc = f"{len(held)} held-out stdlib code/prose + {len(ood)} out-of-domain code/prose, {args.prompt_tokens} tokens each"
    return [list(p.ids) for p in mixed], desc


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Parse-checked arguments to a written results folder; returns the exit status."""
    if args.quick:
        args.servers = args.servers or ["eagle3_default", "eagle3_tree", "evict"]
        args.concurrency = args.concurrency or [1, 4]
        args.rounds = args.rounds or [3]
        args.max_new_tokens = args.max_new_tokens or 32
        args.num_prompts = args.num_prompts or 2
    servers = args.servers or list(DEFAULT_SERVERS)
    levels = args.concurrency or list(DEFAULT_CONCURRENCY)
    args.max_new_tokens = args.max_new_tokens or 48
    args.num_prompts = args.num_prompts or 8
    args.ood_prompts = args.num_prompts if args.ood_prompts is None else args.ood_prompts
    reference = args.reference or ("eagle3_default" if "eagle3_default" in servers else servers[0])
    if reference not in servers:
        raise ValueError(f"--reference {reference} is not among --servers")
    if min(levels) < 1:
        raise ValueError("--concurrency must be >= 1")
    tree = (args.steps, args.topk, args.num_draft_tokens)
    cfg = RunConfig(
        servers=servers, tree=tree, concurrency=levels,
        rounds=_per_level(args.rounds, levels, lambda c: 12, "--rounds"),
        per_round=_per_level(args.requests_per_round, levels, lambda c: max(2, c), "--requests-per-round"),
        max_new_tokens=args.max_new_tokens, reference=reference, settle_s=args.settle_s,
        start_timeout_s=args.start_timeout,
    )  # fmt: skip
    out = args.out or REPO / ("runs/served-quick" if args.quick else "runs/served")
    device = args.device
    if device == "auto":
        import torch  # noqa: PLC0415

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from evict.testing.cpu_server import TESTBED_DRAFTER  # noqa: PLC0415
    from evict.testing.server import CpuServer, GpuServer  # noqa: PLC0415

    server_cls = GpuServer if device == "cuda" else CpuServer
    evict_env: dict[str, str | None] = {}
    cost_source = "none given: the server's own (start-up calibration when it can; see its log)"
    if args.cost_table is not None:
        if not args.cost_table.is_file():
            raise ValueError(f"--cost-table {args.cost_table}: no such file")
        evict_env |= {"EVICT_COST_TABLE": str(args.cost_table.resolve()), "EVICT_ALLOW_TABLE_MISMATCH": "1"}
        cost_source = f"EVICT_COST_TABLE={args.cost_table} (EVICT_ALLOW_TABLE_MISMATCH=1)"
    for kv in args.evict_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("EVICT_"):
            raise ValueError(f"--evict-env {kv!r}: want EVICT_NAME=VALUE")
        evict_env[key] = value
        cost_source += f"; {key}={value}"
    common = ["--random-seed", "0", *args.server_arg]
    if args.model_path:
        common = ["--model-path", args.model_path, *common]
    drafter = args.draft_model_path or str(TESTBED_DRAFTER)
    specs = server_specs(servers, tree, drafter, common, evict_env, args.log_interval)
    prompts, prompt_desc = _prompts(args)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    t0 = time.monotonic()
    bench = ServedBench(specs, prompts, cfg, logs, server_cls, progress=not args.no_progress)
    # SIGTERM (and SIGINT, which a non-interactive shell's background job ignores) must still stop
    # the servers: paused process groups would otherwise stay behind, holding memory
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        bench.start()
        if reference not in bench.servers:
            print(
                f"evict-bench --served: error: the reference server {reference} did not start",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        interrupted = False
        try:
            bench.run()
        except KeyboardInterrupt:  # keep what was measured: the rounds done are complete pairs
            interrupted = True
            print("evict-bench --served: interrupted; writing the rounds measured so far", file=sys.stderr)
    finally:  # also on Ctrl-C: never leave (paused) servers behind
        bench.stop()
    meta = {
        "command": "evict-bench --served " + shlex.join(argv),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.monotonic() - t0,
        "machine": _machine(),
        "server": f"{server_cls.__name__} ({server_cls.launcher}), sglang {_version('sglang')}, torch {_version('torch')}",
        "git": _git_state(),
        "tree": list(tree),
        "max_new_tokens": cfg.max_new_tokens,
        "num_prompts": len(prompts),
        "prompt_desc": prompt_desc,
        "rounds": {str(k): v for k, v in cfg.rounds.items()},
        "per_round": {str(k): v for k, v in cfg.per_round.items()},
        "cost_source": cost_source,
        "note": args.note,
        "load_average": list(os.getloadavg()),
        "startup_s": bench.startup_s,
        "windows": {str(c): list(w) for c, w in bench.windows.items()},
        "failed": list(bench.failed),
        "request_errors": len(bench.errors),
        "interrupted": interrupted,
    }
    summary = summarize(bench.rounds, bench.outputs, bench.metrics, specs, reference, meta)
    extra = {
        "failed_logs": bench.failed,
        "request_error_samples": bench.errors[:20],
        "unstable_outputs": bench.unstable[:50],
        "rounds_raw": [
            {
                **{k: v for k, v in asdict(r).items() if k != "requests"},
                "tokens": r.tokens,
                "wall_s": r.wall_s,
                "tokens_per_s": r.tokens_per_s,
            }
            for r in bench.rounds
        ],  # fmt: skip
    }
    paths = write_results(summary, out, extra)
    print(render_markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    ident = summary["identity"]
    bad = [k for k, v in ident.items() if k.startswith("evict") and v["identical"] != v["compared"]]
    if interrupted:
        return 130
    return EXIT_IDENTITY if bad else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (also ``evict-bench --served``); 130 on Ctrl-C with the servers stopped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    def go() -> int:
        try:
            if args.testbed:
                if args.model_path or args.draft_model_path:
                    raise ValueError(
                        "--testbed names both models; leave out --model-path and --draft-model-path"
                    )
                from evict.models.testbeds import testbed_dir  # noqa: PLC0415

                try:
                    root = testbed_dir(args.testbed)
                except FileNotFoundError as exc:
                    raise ValueError(f"--testbed: {exc}") from None
                args.model_path, args.draft_model_path = str(root / "target"), str(root / "drafter")
            return run(args, argv)
        except ValueError as exc:
            parser.error(str(exc))
            return EXIT_BAD_INPUT

    return run_console("evict-bench --served", go, on_interrupt="servers stopped, no results written")


if __name__ == "__main__":
    sys.exit(main())
