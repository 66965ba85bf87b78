"""EVICT's registration with the real sglang==0.5.23: registry entry, EAGLE-3 properties, server args.

Needs sglang (skipped without it).  Server arguments are resolved with ``--device cpu``: SGLang's
resolution pipeline runs in-process here; the whole server runs on CPU only through
``evict.testing.cpu_server`` (tests/server, see docs/cpu_server.md).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("sglang")

from _tiny_configs import tiny_configs  # noqa: E402
from sglang.srt.arg_groups.arg_utils import record_fields  # noqa: E402
from sglang.srt.arg_groups.overrides import resolution_result  # noqa: E402
from sglang.srt.arg_groups.pipeline import run_resolution_pipeline  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402
from sglang.srt.speculative.spec_registry import CustomSpecAlgo  # noqa: E402

import evict.plugin  # noqa: E402
from evict.plugin.config import EvictConfigError  # noqa: E402
from evict.plugin.spec_algo import EvictSpecAlgo  # noqa: E402
from evict.testing.cpu_server import eagle3_flags  # noqa: E402

pytestmark = pytest.mark.sglang

EAGLE3 = SpeculativeAlgorithm.EAGLE3

TARGET_CONFIG, DRAFT_CONFIG = tiny_configs()


@pytest.fixture(scope="module", autouse=True)
def _loaded_plugins():
    load_plugins()  # what launch_server does before parsing arguments
    yield


@pytest.fixture
def models(tmp_path):
    """Tiny local HF config dirs: resolution reads the architecture, never weights."""
    target, draft = tmp_path / "target", tmp_path / "draft"
    for d, cfg in ((target, TARGET_CONFIG), (draft, DRAFT_CONFIG)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    return str(target), str(draft)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("EVICT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def resolve(models, algorithm, *extra):
    target, draft = models
    args = [
        "--model-path", target,
        "--speculative-algorithm", algorithm,
        "--speculative-draft-model-path", draft,
        "--device", "cpu",
        "--skip-tokenizer-init",
        "--random-seed", "7",
        *extra,
    ]  # fmt: skip
    server_args = prepare_server_args(args)
    run_resolution_pipeline(server_args)
    return server_args


TREE = eagle3_flags()[2:]  # the CPU rig's tree (3 steps x top-4, 8 tokens), without the drafter


# -- registry --------------------------------------------------------------------------------
def test_load_plugins_registers_evict_from_the_entry_point():
    algo = SpeculativeAlgorithm.from_string("EVICT")
    assert isinstance(algo, EvictSpecAlgo) and isinstance(algo, CustomSpecAlgo)
    assert SpeculativeAlgorithm.from_string("evict") is algo
    assert algo.name == "EVICT" and algo.supports_overlap
    assert algo.factory is evict.plugin.create_evict_worker
    evict.plugin.register()  # idempotent: a second call neither raises nor replaces the entry
    assert SpeculativeAlgorithm.from_string("EVICT") is algo


def test_evict_has_every_eagle3_property():
    algo = SpeculativeAlgorithm.from_string("EVICT")
    predicates = sorted(n for n in vars(SpeculativeAlgorithm) if n.startswith(("is_", "supports_")))
    predicates += ["has_draft_kv", "carries_draft_hidden_states", "need_topk", "get_platform_worker_cls"]
    assert "is_eagle3" in predicates and "supports_mixed_chunk" in predicates
    for name in predicates:
        assert getattr(algo, name)() == getattr(EAGLE3, name)(), name
    assert algo.is_eagle() and algo.is_eagle3() and algo.need_topk() and algo.supports_grammar_overlap()
    assert not algo.supports_ragged_verify()
    for n in (1, 8, 32):
        for draft in (False, True):
            assert algo.get_num_tokens_per_req_for_target_verify(n, draft) == n


def test_evict_implements_the_whole_algorithm_interface():
    """Every public method of the enum exists on EVICT's class (call sites use them unguarded)."""
    public = {n for n, v in vars(SpeculativeAlgorithm).items() if callable(v) and not n.startswith("_")}
    public -= {"from_string", "register"}
    missing = sorted(n for n in public if not hasattr(EvictSpecAlgo, n))
    assert not missing
    delegated = {"create_future_map", "build_disagg_draft_input", "resolve_max_speculative_num_draft_tokens"}
    assert all(n in vars(EvictSpecAlgo) for n in delegated)


# -- server arguments --------------------------------------------------------------------------
def test_server_args_resolve_like_eagle3_field_by_field(models, clean_env):
    clean_env.setenv("EVICT_DISABLE", "1")  # no table needed for this comparison
    ref = resolve(models, "EAGLE3", *TREE)
    got = resolve(models, "EVICT", *TREE)
    fields = [f.name for f in record_fields(type(ref))]
    assert len(fields) > 100
    diff = {
        f: (resolution_result(ref, f), resolution_result(got, f))
        for f in fields
        if resolution_result(ref, f) != resolution_result(got, f)
    }
    assert diff == {"speculative_algorithm": ("EAGLE3", "EVICT")}
    # EAGLE's defaults really were applied (not just copied from the command line):
    assert resolution_result(got, "max_running_requests") == 48
    assert resolution_result(got, "speculative_draft_model_revision") == "main"
    algo = SpeculativeAlgorithm.from_string(resolution_result(got, "speculative_algorithm"))
    assert algo.resolve_max_speculative_num_draft_tokens(got) == 8


def test_chain_defaults_are_refused_with_a_tree_suggestion(models, clean_env):
    clean_env.setenv("EVICT_DISABLE", "1")
    # Without speculative flags SGLang picks (3, 1, 4) for Qwen3-MoE: a chain, nothing to cut.
    with pytest.raises(EvictConfigError, match=r"--speculative-eagle-topk=1.*--speculative-eagle-topk 8"):
        resolve(models, "EVICT")


def test_adaptive_falls_back_to_static_as_for_eagle3(models, clean_env):
    """SGLang's adaptive steps need topk 1; with a tree it turns itself off, for EAGLE3 and EVICT alike."""
    clean_env.setenv("EVICT_DISABLE", "1")
    got = resolve(models, "EVICT", *TREE, "--speculative-adaptive")
    ref = resolve(models, "EAGLE3", *TREE, "--speculative-adaptive")
    assert resolution_result(got, "speculative_adaptive") is False
    assert resolution_result(ref, "speculative_adaptive") is False


def test_without_a_table_resolution_passes_and_leaves_the_costs_to_calibration(models, clean_env):
    from evict.plugin.server_args_hook import validate_evict_server_args

    got = resolve(models, "EVICT", *TREE)
    assert resolution_result(got, "speculative_algorithm") == "EVICT"
    assert validate_evict_server_args(got) == (2, 4, 8)  # the default widths below N, plus N


def test_unknown_evict_variable_stops_resolution(models, clean_env):
    clean_env.setenv("EVICT_DISABLED", "1")
    with pytest.raises(EvictConfigError, match="did you mean EVICT_DISABLE"):
        resolve(models, "EVICT", *TREE)


def test_eagle3_is_untouched_by_evict_variables(models, clean_env):
    clean_env.setenv("EVICT_WIDTHS", "not-a-number")  # only read for EVICT
    ref = resolve(models, "EAGLE3", *TREE)
    assert resolution_result(ref, "speculative_algorithm") == "EAGLE3"


def _table(path, widths, config_hash):
    median = [[1.0 + 0.2 * w for w in widths], [2.0 + 0.4 * w for w in widths]]
    path.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "metadata": {
                    "model_id": "tiny",
                    "model_config_hash": config_hash,
                    "device": "NVIDIA H100",
                    "dtype": "bfloat16",
                    "tp_size": 1,
                },
                "batch_sizes": [1, 16],
                "widths": list(widths),
                "latency_ms": {"median": median, "p10": median, "p90": median},
            }
        )
    )
    return str(path)


def test_table_is_checked_against_the_target_model(models, clean_env, tmp_path):
    from evict.profiler.table import model_config_hash

    # evict-profile hashes the raw config.json of the checkpoint directory.
    good_hash = model_config_hash(TARGET_CONFIG)
    clean_env.setenv("EVICT_COST_TABLE", _table(tmp_path / "good.json", [1, 2, 4, 8], good_hash))
    got = resolve(models, "EVICT", *TREE)
    assert resolution_result(got, "speculative_algorithm") == "EVICT"

    clean_env.setenv("EVICT_COST_TABLE", _table(tmp_path / "short.json", [1, 2, 4], good_hash))
    with pytest.raises(EvictConfigError, match=r"covers widths 1\.\.4"):
        resolve(models, "EVICT", *TREE)

    clean_env.setenv("EVICT_COST_TABLE", _table(tmp_path / "other.json", [1, 2, 4, 8], "0123456789abcdef"))
    with pytest.raises(EvictConfigError, match="model_config_hash"):
        resolve(models, "EVICT", *TREE)
    clean_env.setenv("EVICT_ALLOW_TABLE_MISMATCH", "1")
    assert resolution_result(resolve(models, "EVICT", *TREE), "speculative_algorithm") == "EVICT"


def test_scoped_width_override_keeps_the_kv_reservation_at_n(models, clean_env):
    """The worker verifies at width m under ``get_spec().override``; KV stays reserved for N."""
    from sglang.srt.mem_cache.allocation_sizing import get_alloc_len_per_decode
    from sglang.srt.runtime_context import get_spec, max_speculative_num_draft_tokens, publish, reset_context

    clean_env.setenv("EVICT_DISABLE", "1")
    server_args = resolve(models, "EVICT", *TREE)
    publish(server_args, role="test")
    try:
        assert get_spec().speculative_algorithm == "EVICT"
        before = get_alloc_len_per_decode()
        with get_spec().override(speculative_num_draft_tokens=2):
            assert get_spec().speculative_num_draft_tokens == 2
            assert max_speculative_num_draft_tokens() == 8
            assert get_alloc_len_per_decode() == before
        assert get_spec().speculative_num_draft_tokens == 8
    finally:
        reset_context()


def test_an_automatic_memory_fraction_leaves_room_for_the_extra_widths_graphs(models, clean_env):
    """Defect 4: the KV pool is sized before the extra widths' graphs are captured."""
    from evict.plugin import server_args_hook

    clean_env.setenv("EVICT_WIDTHS", "2,4")
    clean_env.setattr("sglang.srt.utils.common.get_device_memory_capacity", lambda device=None: 80 * 1024)
    clean_env.setattr(server_args_hook, "_decode_graph_max_bs", lambda view: 64)
    auto = resolve(models, "EVICT", *TREE)
    given = resolve(models, "EVICT", *TREE, "--mem-fraction-static", "0.7")
    clean_env.setenv("EVICT_DISABLE", "1")
    eagle = resolve(models, "EAGLE3", *TREE)
    # widths 2, 4 and N=8: two extra graph sets of 64 x 2 MB each, out of 80 GB
    assert resolution_result(auto, "mem_fraction_static") == pytest.approx(
        round(resolution_result(eagle, "mem_fraction_static") - 2 * 64 * 2 / (80 * 1024), 3)
    )
    assert resolution_result(given, "mem_fraction_static") == 0.7  # the user's value is kept
    assert server_args_hook.width_graph_reserve_mb((2, 4, 8), 8, 64) == 256.0
    assert server_args_hook.width_graph_reserve_mb((8,), 8, 64) == 0.0


def test_the_reserve_follows_the_attention_backends_allocations(models, clean_env):
    """Issue 22 item 3: with a modelled backend the reserve is what the widths' graphs allocate."""
    from evict.plugin import server_args_hook

    clean_env.setenv("EVICT_WIDTHS", "2,4")
    clean_env.setattr("sglang.srt.utils.common.get_device_memory_capacity", lambda device=None: 80 * 1024)
    clean_env.setattr(server_args_hook, "_decode_graph_max_bs", lambda view: 64)
    clean_env.setattr(server_args_hook, "_decode_graph_sizes", lambda view: [1, 2, 4, 8, 16, 32, 64])
    clean_env.setattr(server_args_hook, "_attention_backend", lambda view: "flashinfer")
    clean_env.setattr(server_args_hook, "_context_len", lambda view: 4096)
    auto = resolve(models, "EVICT", *TREE)
    clean_env.setenv("EVICT_DISABLE", "1")
    eagle = resolve(models, "EAGLE3", *TREE)
    want = server_args_hook.width_graph_reserve("flashinfer", (2, 4, 8), 8, [1, 2, 4, 8, 16, 32, 64], 4096)
    # width m: 2 backends x (5 bytes x 64*m tokens x 4096 + 7 captured sizes x 8 MiB)
    assert want.gpu_bytes == {m: 2 * (5 * 64 * m * 4096 + 7 * 8 * 2**20) for m in (2, 4)}
    assert resolution_result(auto, "mem_fraction_static") == pytest.approx(
        round(resolution_result(eagle, "mem_fraction_static") - want.total_gpu_mb / (80 * 1024), 3)
    )
    # EVICT_DEPTH=1 also captures width 1 (plain steps), a draft state per shallower depth that
    # fills a width >= 2 (TREE's depths 1 and 2 of 3, what the worker builds) and one per chain
    # whose tokens fill a width (the chain of 3, at topk 1; EVICT_DEPTH_CHAIN=0 leaves it out)
    clean_env.delenv("EVICT_DISABLE")
    clean_env.setenv("EVICT_DEPTH", "1")
    sizes = [1, 2, 4, 8, 16, 32, 64]
    widths = server_args_hook.width_graph_reserve("flashinfer", (1, 2, 4, 8), 8, sizes, 4096)
    drafts = server_args_hook.depth_graph_reserve("flashinfer", (1, 2), 4, sizes, 4096)
    chain = server_args_hook.depth_graph_reserve("flashinfer", (3,), 1, sizes, 4096)
    for chains, extra in (("1", chain.total_gpu_mb), ("0", 0.0)):
        clean_env.setenv("EVICT_DEPTH_CHAIN", chains)
        deep = resolve(models, "EVICT", *TREE)
        assert resolution_result(deep, "mem_fraction_static") == pytest.approx(
            round(
                resolution_result(eagle, "mem_fraction_static")
                - (widths.total_gpu_mb + drafts.total_gpu_mb + extra) / (80 * 1024),
                3,
            )
        ), chains
