"""Timing SGLang's own EAGLE verify forward (GPU only).

Why: on a GPU server the cost EVICT must predict is SGLang's target-verify forward (its attention
backend, fused MoE kernels, CUDA graphs), not the reference engine's. This backend loads the target
in-process the way SGLang's one-batch benchmark does (``sglang.benchmark.one_batch``: ServerArgs
resolution, ``load_model`` -> ``ModelRunner`` with its memory pools, attention backends and graphs),
prefills ``bs`` requests of ``context_len`` tokens with ``extend``, and then, for every width w,
runs ``ForwardMode.TARGET_VERIFY`` forwards with an ``EagleVerifyInput`` carrying a random tree of
w nodes per request (SGLang's full tree-mask layout: per request w rows of ``seq_len + w``
columns), timed with CUDA events. The verify input is built the way ``eagle_prepare_for_verify``
builds it (KV slots for the w tokens after each request's prefix), so the attention backend and
MoE kernels see exactly a verify batch.

Limits (stated in the table metadata): TP size 1 only; the forward runs eagerly unless the model
runner's captured decode graph accepts the verify batch (it reports which); expert unions are not
counted (use ``--backend torch`` for them); tokens are random ids (no tokenizer round trip).
Not exercised on a GPU in the session that wrote it: run ``evict-profile --backend sglang`` once
and compare with ``--backend torch --device cuda`` before relying on it (docs/profiling.md).
"""

from __future__ import annotations

import datetime
import sys

import torch

from evict.profiler.torch_backend import (
    PointResult,
    ProfileError,
    ProfileResult,
    ProfileSpec,
    ancestor_mask,
    library_versions,
    model_id_for,
    moe_shape,
    random_tree_parents,
    read_model_config,
    tree_depths,
)

SGLANG_VERSION = "0.5.23"


def check_prerequisites() -> None:
    """Fail with a clear message unless sglang and a CUDA GPU are both usable."""
    if not torch.cuda.is_available():
        raise ProfileError(
            "the sglang backend times SGLang's CUDA verify forward and needs an NVIDIA GPU, but torch "
            "sees none; use --backend torch here (CPU), or run it on a GPU machine (docs/profiling.md)"
        )
    try:
        import sglang
    except ImportError as exc:
        raise ProfileError(
            f"the sglang backend needs sglang=={SGLANG_VERSION} ({exc}); install it with "
            "`pip install 'evict[sglang]'`, or use --backend torch"
        ) from exc
    version = getattr(sglang, "__version__", "unknown")
    if version != SGLANG_VERSION:
        print(
            f"evict-profile: warning: the sglang backend was written for sglang {SGLANG_VERSION}, found {version}",
            file=sys.stderr,
        )


def _load(spec: ProfileSpec, max_bs: int, max_tokens: int):
    """ServerArgs resolution + ModelRunner load, as ``sglang.benchmark.one_batch.main`` does."""
    from sglang.benchmark import one_batch
    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.entrypoints.engine import _set_envs_and_config
    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig, Phase
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import PortArgs, ServerArgs

    server_args = ServerArgs(
        model_path=str(spec.model_path),
        dtype=spec.dtype,
        tp_size=1,
        disable_radix_cache=True,
        random_seed=spec.seed,
        max_running_requests=max_bs,
    )
    explicit = server_args.cuda_graph_config
    if isinstance(explicit, CudaGraphConfig):
        explicit = explicit.to_dict()
    graph = dict(explicit or {})
    decode = dict(graph.get(Phase.DECODE) or {})
    decode["max_bs"] = max_bs
    graph[Phase.DECODE] = decode
    declare_resolution(server_args, "evict.profiler.sglang_backend", cuda_graph_config=graph)
    server_args.resolve_once()
    _set_envs_and_config(server_args)
    port_args = PortArgs.init_new(server_args)
    publish(
        server_args,
        role="scheduler",
        ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0),
    )
    one_batch._init_process_global_configs()
    bench_runner, _tok = one_batch.load_model(server_args, port_args, gpu_id=0, tp_rank=0)
    runner = bench_runner.torch_runner
    if runner.max_total_num_tokens < max_tokens:
        raise ProfileError(
            f"the KV pool holds {runner.max_total_num_tokens} tokens, the grid needs {max_tokens}; "
            "lower --batch-sizes / --context-len"
        )
    return bench_runner, runner


def _verify_batch(model_runner, batch, parents_per_row, tokens, ctx: int, width: int):
    """Turn the prefilled ScheduleBatch into a TARGET_VERIFY ForwardBatch of ``width`` tokens/request."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    device = model_runner.device
    bs = len(parents_per_row)
    loc = model_runner.token_to_kv_pool_allocator.alloc(bs * width)
    if loc is None:
        raise ProfileError("out of KV slots for the verify tokens; lower --batch-sizes or --context-len")
    req_to_token = model_runner.req_to_token_pool.req_to_token
    for b in range(bs):
        req_to_token[batch.req_pool_indices[b], ctx : ctx + width] = loc[b * width : (b + 1) * width].to(
            req_to_token.dtype
        )
    masks, positions = [], []
    for parents in parents_per_row:
        p = parents[:width]
        m = torch.ones(width, ctx + width, dtype=torch.bool)
        m[:, ctx:] = ancestor_mask(p)
        masks.append(m.reshape(-1))
        positions.append(torch.tensor([ctx + d for d in tree_depths(p)]))
    depth = max(max(tree_depths(p[:width])) for p in parents_per_row)
    draft = tokens[:, :width].reshape(-1).to(device)
    spec_info = EagleVerifyInput(
        draft_token=draft,
        custom_mask=torch.cat(masks).to(device),
        positions=torch.cat(positions).to(device),
        retrieve_index=torch.arange(bs * width, device=device).view(bs, width),
        retrieve_next_token=torch.full((bs, width), -1, dtype=torch.long, device=device),
        retrieve_next_sibling=torch.full((bs, width), -1, dtype=torch.long, device=device),
        retrieve_cum_len=None,
        spec_steps=max(depth, 1),
        topk=-1,
        draft_token_num=width,
        capture_hidden_mode=CaptureHiddenMode.FULL,
        seq_lens_sum=int(batch.seq_lens_cpu.sum()),
        seq_lens_cpu=batch.seq_lens_cpu,
    )
    batch.input_ids = draft
    batch.out_cache_loc = loc
    batch.spec_info = spec_info
    batch.forward_mode = ForwardMode.TARGET_VERIFY
    fb = ForwardBatch.init_new(
        batch,
        model_runner,
        capture_hidden_mode=CaptureHiddenMode.FULL,
        return_hidden_states_before_norm=False,
    )
    graph = getattr(model_runner, "decode_cuda_graph_runner", None)
    uses_graph = bool(graph and graph.can_run_graph(fb))
    return fb, loc, uses_graph


def profile_sglang(spec: ProfileSpec, tp_size: int = 1) -> ProfileResult:
    """Measure the grid with SGLang's verify forward; same result type as the torch backend."""
    check_prerequisites()
    if tp_size != 1:
        raise ProfileError(
            "the sglang backend runs one rank in-process; --tp-size > 1 is not supported yet "
            "(profile TP=1, or time a TP server with SGLang's own benchmark tools)"
        )
    from sglang.benchmark import one_batch
    from tqdm.auto import tqdm

    from evict.profiler.table import model_config_hash

    cfg = read_model_config(spec.model_path)
    vocab = int(cfg.get("vocab_size") or 0)
    grid = (
        sorted(set(spec.points)) if spec.points else [(b, w) for b in spec.batch_sizes for w in spec.widths]
    )
    max_bs = max(b for b, _ in grid)
    max_w = max(w for _, w in grid)
    bench_runner, mr = _load(spec, max_bs, max_bs * (spec.context_len + max_w))
    points: list[PointResult] = []
    graph_used: set[bool] = set()
    gen = torch.Generator().manual_seed(spec.seed)
    bar = tqdm(total=len(grid), desc="evict-profile[sglang]", disable=not spec.progress, file=sys.stderr)
    with torch.inference_mode():
        for bs in sorted({b for b, _ in grid}):
            widths = [w for b, w in grid if b == bs]
            bench_runner.clear()
            ctx_ids = torch.randint(0, vocab, (bs, spec.context_len), generator=gen).tolist()
            reqs = one_batch.prepare_synthetic_inputs_for_latency_test(
                bs, spec.context_len, custom_inputs=ctx_ids
            )
            _next, _logits, batch = one_batch.extend(reqs, mr)
            parents = [random_tree_parents(max(widths), gen) for _ in range(bs)]
            tokens = torch.randint(0, vocab, (bs, max(widths)), generator=gen)
            for w in widths:
                fb, loc, uses_graph = _verify_batch(mr, batch, parents, tokens, spec.context_len, w)
                graph_used.add(uses_graph)
                for _ in range(spec.warmup):
                    mr.forward(fb)
                samples = []
                for _ in range(spec.repeats):
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    mr.forward(fb)
                    end.record()
                    end.synchronize()
                    samples.append(float(start.elapsed_time(end)))
                mr.token_to_kv_pool_allocator.free(loc)
                points.append(PointResult.from_samples(bs, w, samples, expert_union=0.0))
                bar.update(1)
    bar.close()
    import sglang

    versions = library_versions()
    versions["sglang"] = getattr(sglang, "__version__", "unknown")
    experts, top_k = moe_shape(cfg)
    meta = {
        "model_id": spec.model_id or model_id_for(spec.model_path, cfg),
        "model_config_hash": model_config_hash(cfg),
        "model_type": cfg.get("model_type"),
        "device": torch.cuda.get_device_name(0),
        "dtype": spec.dtype,
        "tp_size": 1,
        "ep_size": 1,
        "backend": "sglang",
        "implementation": "sglang ModelRunner TARGET_VERIFY",
        "cuda_graph": "yes" if graph_used == {True} else ("no (eager)" if graph_used == {False} else "mixed"),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "context_len": spec.context_len,
        "repeats": spec.repeats,
        "warmup": spec.warmup,
        "tokens": "random",
        "seed": spec.seed,
        "num_experts": experts,
        "top_k": top_k,
        "num_layers": cfg.get("num_hidden_layers"),
        "notes": "expert_union not measured by the sglang backend (zeros); see --backend torch",
    }
    return ProfileResult(points=points, meta=meta)
