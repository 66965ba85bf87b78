"""Server-argument resolution for ``--speculative-algorithm EVICT``: EAGLE-3's, then EVICT's checks.

SGLang resolves speculative arguments in the ``handle_speculative_decoding`` pipeline step, which
hands a plugin algorithm's ``handle_server_args`` a write-recording stand-in (EAGLE's handler
cannot declare on it) and compares the algorithm *name* with ``"EAGLE3"`` in several places
(rejection sampling, block verification, draft window size, DP prefill coordination).  To get
exactly EAGLE-3's defaults and validation, the hook below declares ``EAGLE3`` for the duration of
the built-in step and ``EVICT`` again afterwards, then applies EVICT's own checks and, when
``EVICT_COST_TABLE`` is given, opens and checks it, so a bad configuration stops ``launch_server``
before any model is loaded. Without a table nothing is required here: the scheduler calibrates
one at start-up from its captured graphs (:mod:`evict.plugin.calibration`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang.srt.arg_groups.overrides import declare_resolution, resolved_view, resolving_view

from evict.plugin.config import (
    EvictConfig,
    EvictConfigError,
    load_cost_table,
    parse_env,
    served_chains,
    served_depths,
    served_widths,
    target_config_hash,
)
from evict.plugin.spec_algo import EVICT_ALGORITHM_NAME

__all__ = [
    "handle_speculative_decoding_evict",
    "validate_evict_server_args",
    "is_evict",
    "reserve_width_graph_memory",
    "width_graph_reserve",
    "width_graph_reserve_mb",
    "WidthReserve",
]

logger = logging.getLogger(__name__)

_SOURCE = "evict.handle_speculative_decoding"


def is_evict(name: str | None) -> bool:
    """Whether a ``--speculative-algorithm`` value names EVICT (any case)."""
    return name is not None and name.upper() == EVICT_ALGORITHM_NAME


def handle_speculative_decoding_evict(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Resolution hook: run the built-in step as EAGLE3 for EVICT, then validate EVICT's settings."""
    if not is_evict(resolving_view(server_args).speculative_algorithm):
        previous(server_args)
        return
    config = parse_env()  # an EVICT_* typo stops the launch before anything heavy happens
    declare_resolution(server_args, _SOURCE, speculative_algorithm="EAGLE3")
    try:
        previous(server_args)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note("(raised while resolving --speculative-algorithm EVICT with EAGLE3's rules)")
        raise
    declare_resolution(server_args, _SOURCE, speculative_algorithm=EVICT_ALGORITHM_NAME)
    widths = validate_evict_server_args(server_args, config)
    # The kill switch captures N only; otherwise every resolved width gets a graph state, and
    # EVICT_DEPTH=1 a draft-decode state per shallower depth.
    if config.disable:
        reserve_width_graph_memory(server_args, widths[-1:])
        return
    depths: list[int] = []
    chains: list[int] = []
    if config.depth:
        view = resolved_view(server_args)
        steps, topk, n = (
            view.speculative_num_steps,
            view.speculative_eagle_topk,
            view.speculative_num_draft_tokens,
        )
        depths = served_depths(config, steps, topk, n, widths)[0][:-1]
        chains = served_chains(config, steps, topk, n, widths)
    reserve_width_graph_memory(server_args, widths, depths, chains)


def validate_evict_server_args(server_args: Any, config: EvictConfig | None = None) -> tuple[int, ...]:
    """EVICT's own checks on resolved arguments; returns the widths that will be captured.

    Raises ``EvictConfigError`` (a ``ValueError``) naming the argument and the fix.
    """
    config = parse_env() if config is None else config
    view = resolved_view(server_args)
    topk = view.speculative_eagle_topk
    n = view.speculative_num_draft_tokens
    if topk is None or topk < 2:
        raise EvictConfigError(
            f"--speculative-eagle-topk={topk}: EVICT cuts a draft *tree* ranked by the drafter's cumulative "
            "scores, and with topk 1 SGLang drafts a chain without scores. Pass e.g. --speculative-num-steps 5 "
            "--speculative-eagle-topk 8 --speculative-num-draft-tokens 32 (or use --speculative-algorithm EAGLE3)"
        )
    if view.speculative_adaptive:
        raise EvictConfigError(
            "--speculative-adaptive changes the draft steps at run time; EVICT chooses the verify width "
            "itself. Drop --speculative-adaptive"
        )
    if view.enable_multi_layer_eagle:
        raise EvictConfigError("--enable-multi-layer-eagle is not supported by EVICT; drop it or use EAGLE3")
    if view.pp_size > 1:
        raise EvictConfigError(f"--pp-size={view.pp_size}: EVICT supports pipeline parallel size 1 only")
    if view.enable_dp_attention:
        raise EvictConfigError(
            "--enable-dp-attention: DP ranks would choose different verify widths while SGLang pads them to "
            "one uniform width; EVICT does not support DP attention yet (TP and EP are supported)"
        )
    table = None
    if not config.disable:
        table = load_cost_table(config, config_hash=_config_hash(server_args), tp_size=view.tp_size)
    widths = served_widths(config, n, table.widths if table is not None else None)
    if config.disable:
        source = ", DISABLED (full tree every step)"
    elif table is None:
        source = ", no EVICT_COST_TABLE: the server calibrates its table at start-up (cached)"
    else:
        source = f", table={config.cost_table}"
    logger.info(
        "EVICT: widths %s of N=%d (topk=%d, steps=%d), decision=%s, backend=%s%s",
        list(widths),
        n,
        topk,
        view.speculative_num_steps,
        config.decision,
        config.backend,
        source,
    )
    return widths


def _config_hash(server_args: Any) -> str | None:
    """Architecture hash of the target's raw config.json (the table's ``model_config_hash``)."""
    cfg = resolving_view(server_args)
    return target_config_hash(cfg.model_path, revision=cfg.revision)


def width_graph_reserve_mb(widths: tuple[int, ...], num_draft_tokens: int, max_bs: int) -> float:
    """The fallback reserve (MB) when :func:`width_graph_reserve` cannot size the backend.

    SGLang's own heuristic for one set of decode graphs (``reserve_for_graph_mb``: ``max_bs * 2``
    MB), once per width below N.
    """
    extra = sum(1 for w in widths if w != num_draft_tokens)
    return extra * graph_set_mb(max_bs)


def graph_set_mb(max_bs: int) -> float:
    """SGLang's own heuristic for one set of decode graphs (``reserve_for_graph_mb``): ``max_bs * 2`` MB."""
    return float(max(int(max_bs), 1) * 2)


MIB = 1 << 20
FLASHINFER_INT_WORKSPACE = (
    8 * MIB
)  # flashinfer: each prefill wrapper's int workspace (GPU) and its pinned twin

_BACKEND_ALIASES = {
    "flashinfer": "flashinfer",
    "flashinferattnbackend": "flashinfer",
    "triton": "triton",
    "tritonattnbackend": "triton",
    "fa3": "fa3",
    "flashattentionbackend": "fa3",
}


@dataclass(frozen=True)
class WidthReserve:
    """What the graphs of each extra width allocate (bytes), and how it was computed."""

    gpu_bytes: dict[int, int] = field(default_factory=dict)  # width -> device memory
    pinned_bytes: dict[int, int] = field(default_factory=dict)  # width -> pinned host memory
    basis: str = ""

    @property
    def total_gpu_bytes(self) -> int:
        return sum(self.gpu_bytes.values())

    @property
    def total_gpu_mb(self) -> float:
        return self.total_gpu_bytes / MIB


def width_graph_reserve(
    backend: str,
    widths: Sequence[int],
    num_draft_tokens: int,
    capture_bs: Sequence[int],
    context_len: int,
    *,
    draft_extend: bool = True,
    num_wrappers: int = 1,
) -> WidthReserve:
    """Device memory the graphs of each width below N allocate, from SGLang 0.5.23's allocations.

    Each extra width m builds a target-verify attention backend and a draft-extend one and captures
    their graphs for every captured batch size; with ``B = max(capture_bs)``, ``S = len(capture_bs)``,
    ``C = context_len`` and ``T = B * m`` graph tokens, ``init_cuda_graph_state`` allocates, per width:

    - ``flashinfer`` (``flashinfer_backend.py``), target and draft extend alike:
      ``kv_indices`` int32 ``[T * C]`` per wrapper, the custom mask uint8 ``[T * C]``, and per captured
      batch size one ``BatchPrefillWithPagedKVCacheWrapper`` per wrapper, each with an 8 MiB int
      workspace on the GPU and an 8 MiB pinned host twin (``flashinfer/prefill.py``);
    - ``triton`` (``triton_backend.py``): ``kv_indices`` int64 ``[T * C]`` for each backend, and the
      target's FULL_MASK verify mask uint8 ``[B * m * (C + m)]`` (``verify_mask.py``); its attention
      logits scale with heads x kv splits and are left to the measurement;
    - ``fa3`` (``flashattention_backend.py``): the target's verify mask, bool ``[B * m * (C + m)]``;
      its page tables do not depend on m.

    ``widths`` may include N (skipped: its graphs are SGLang's own).  ``draft_extend=False`` when the
    draft-extend graphs are not captured.  Raises ``ValueError`` for a backend not modelled here
    (callers then use :func:`width_graph_reserve_mb`).
    """
    name = _BACKEND_ALIASES.get(str(backend).lower())
    if name is None:
        raise ValueError(
            f"no graph-memory model for attention backend {backend!r} (modelled: flashinfer, triton, fa3)"
        )
    sizes = sorted({int(b) for b in capture_bs if int(b) > 0})
    if not sizes:
        raise ValueError("no captured batch sizes")
    if int(context_len) < 1:
        raise ValueError(f"context length must be >= 1, got {context_len!r}")
    big_b, n_sizes, ctx, wrappers = sizes[-1], len(sizes), int(context_len), max(int(num_wrappers), 1)
    backends = 2 if draft_extend else 1
    gpu: dict[int, int] = {}
    pinned: dict[int, int] = {}
    for m in sorted({int(w) for w in widths}):
        if m == int(num_draft_tokens):
            continue
        tokens = big_b * m
        if name == "flashinfer":
            per_backend = (
                4 * tokens * ctx * wrappers + tokens * ctx + n_sizes * wrappers * FLASHINFER_INT_WORKSPACE
            )
            gpu[m] = backends * per_backend
            pinned[m] = backends * n_sizes * wrappers * FLASHINFER_INT_WORKSPACE
        elif name == "triton":
            gpu[m] = backends * 8 * tokens * ctx + big_b * m * (ctx + m)
            pinned[m] = 0
        else:  # fa3
            gpu[m] = big_b * m * (ctx + m)
            pinned[m] = 0
    basis = (
        f"{name}, {backends} backend(s) per width, max bs {big_b}, {n_sizes} captured sizes, context {ctx}"
    )
    return WidthReserve(gpu, pinned, basis)


def depth_graph_reserve(
    backend: str,
    depths: Sequence[int],
    topk: int,
    capture_bs: Sequence[int],
    context_len: int,
    *,
    num_wrappers: int = 1,
) -> WidthReserve:
    """Device memory the draft-decode graphs of each shallower depth allocate (``EVICT_DEPTH=1``),
    keyed by depth, from SGLang 0.5.23's multi-step draft backends.

    A depth-d state builds SGLang's multi-step draft backend for d steps (``DraftBackendFactory``)
    and captures its draft graphs for every captured batch size. With ``B = max(capture_bs)``,
    ``S = len(capture_bs)``, ``C = context_len`` and ``k = topk``, ``init_cuda_graph_state`` allocates:

    - ``flashinfer`` (``FlashInferMultiStepDraftBackend``): ``kv_indices`` int32 ``[d, B * k * C]``
      (``draft_kv_indices_buffer_width``), cloned per extra wrapper, and per step backend but the
      last and per captured size one decode wrapper with an 8 MiB int workspace and its pinned twin;
    - ``triton`` (``TritonMultiStepDraftBackend``): ``kv_indices`` int64 ``[d, B * k * C]``;
    - ``fa3`` (``FlashAttentionMultiStepBackend``): per step backend but the last, the decode and
      the topk-normal page tables, int32 ``[B, C]`` each (page size 1: the upper bound).

    The draft graphs' activations go to the shared graph pool. Raises ``ValueError`` for a backend
    not modelled here (callers then use SGLang's ``max_bs x 2`` MB per graph set).
    """
    name = _BACKEND_ALIASES.get(str(backend).lower())
    if name is None:
        raise ValueError(
            f"no graph-memory model for attention backend {backend!r} (modelled: flashinfer, triton, fa3)"
        )
    sizes = sorted({int(b) for b in capture_bs if int(b) > 0})
    if not sizes or int(context_len) < 1:
        raise ValueError("need captured batch sizes and a context length >= 1")
    big_b, n_sizes, ctx, wrappers = sizes[-1], len(sizes), int(context_len), max(int(num_wrappers), 1)
    gpu: dict[int, int] = {}
    pinned: dict[int, int] = {}
    for d in sorted({int(x) for x in depths if int(x) > 0}):
        indices = d * big_b * int(topk) * ctx
        if name == "flashinfer":
            workspaces = (d - 1) * n_sizes * wrappers * FLASHINFER_INT_WORKSPACE
            gpu[d], pinned[d] = 4 * indices * wrappers + workspaces, workspaces
        elif name == "triton":
            gpu[d], pinned[d] = 8 * indices, 0
        else:  # fa3
            gpu[d], pinned[d] = (d - 1) * 2 * 4 * big_b * ctx, 0
    return WidthReserve(
        gpu, pinned, f"{name} draft decode, max bs {big_b}, {n_sizes} captured sizes, context {ctx}"
    )


def _decode_graph_sizes(view: Any) -> list[int] | None:
    """The decode graphs' captured batch sizes, or None when none are captured (off, or not a GPU)."""
    max_bs = _decode_graph_max_bs(view)
    if max_bs is None:
        return None
    sizes = getattr(view.cuda_graph_config.decode, "bs", None)
    return sorted({int(b) for b in sizes if 0 < int(b) <= max_bs}) if sizes else [int(max_bs)]


def _context_len(view: Any) -> int | None:
    """``--context-length``, else the target's ``max_position_embeddings`` (local config.json)."""
    if getattr(view, "context_length", None):
        return int(view.context_length)
    try:
        cfg = json.loads((Path(view.model_path) / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _attention_backend(view: Any) -> str | None:
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        value = getattr(view, name, None)
        if value:
            return str(value)
    return None


def _decode_graph_max_bs(view: Any) -> int | None:
    """``max_bs`` of the decode CUDA graphs, or None when none are captured (off, or not a GPU)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend  # noqa: PLC0415

    decode = view.cuda_graph_config.decode
    if (
        str(view.device) != "cuda"
        or decode is None
        or decode.backend == Backend.DISABLED
        or view.disable_cuda_graph
    ):
        return None
    return decode.max_bs


def reserve_width_graph_memory(
    server_args: Any, widths: tuple[int, ...], depths: Sequence[int] = (), chains: Sequence[int] = ()
) -> float | None:
    """Lower an automatic ``--mem-fraction-static`` so the extra widths' graphs fit, and the
    draft graphs of the shallower ``depths`` and of the ``chains`` (``EVICT_DEPTH=1``,
    :func:`depth_graph_reserve`, at the server's topk and at topk 1).

    Why here: SGLang sizes the KV pool from ``mem_fraction_static`` before any graph is captured,
    and its automatic value leaves room for one set of decode graphs only.  The reserve is
    :func:`width_graph_reserve` for the resolved attention backend, captured batch sizes and
    context length (SGLang's ``max_bs x 2`` MB heuristic per width when the backend is not
    modelled).  A value the user gave is kept (and the start-up log shows what the widths took).
    Returns the new fraction, or None when nothing changed (user value, no graphs, no GPU, no
    extra width).
    """
    if getattr(server_args, "mem_fraction_static", None) is not None:  # the user's own value
        return None
    view = resolved_view(server_args)
    fraction = view.mem_fraction_static
    max_bs = _decode_graph_max_bs(view)
    if fraction is None or max_bs is None:
        return None
    sizes = _decode_graph_sizes(view) or [int(max_bs)]
    from sglang.srt.utils.common import get_device_memory_capacity  # noqa: PLC0415

    gpu_mem = get_device_memory_capacity(view.device)
    n = view.speculative_num_draft_tokens
    extra = sum(1 for w in widths if w != n)
    backend = _attention_backend(view) or ""
    try:
        context_len = _context_len(view)
        if context_len is None:
            raise ValueError("unknown context length (pass --context-length)")
        estimates = [width_graph_reserve(backend, widths, n, sizes, context_len)]
        if depths:
            estimates.append(
                depth_graph_reserve(backend, depths, view.speculative_eagle_topk, sizes, context_len)
            )
        if chains:
            estimates.append(depth_graph_reserve(backend, chains, 1, sizes, context_len))
        reserve = sum(e.total_gpu_mb for e in estimates)
        basis = "; ".join(e.basis for e in estimates)
        pinned = sum(sum(e.pinned_bytes.values()) for e in estimates)
        if pinned:
            basis += f"; plus {pinned / MIB:.0f} MB of pinned host memory"
    except ValueError as exc:
        reserve = width_graph_reserve_mb(widths, n, max_bs) + (len(depths) + len(chains)) * graph_set_mb(
            max_bs
        )
        basis = f"SGLang's max_bs x 2 MB per graph set ({exc})"
    if not gpu_mem or reserve <= 0:
        return None
    lowered = round(fraction - reserve / gpu_mem, 3)
    declare_resolution(server_args, _SOURCE, mem_fraction_static=lowered)
    logger.info(
        "EVICT: --mem-fraction-static %.3f -> %.3f to keep %.0f MB free for the graphs of %d extra "
        "verify widths%s (%s; pass --mem-fraction-static to choose it yourself)",
        fraction,
        lowered,
        reserve,
        extra,
        (f" and the draft graphs of depths {list(depths)}" if depths else "")
        + (f" and of chains {list(chains)}" if chains else ""),
        basis,
    )
    return lowered
