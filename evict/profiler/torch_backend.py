"""Timing tree-masked verification with plain PyTorch (CPU or CUDA).

Why: EVICT's width choice divides expected accepted tokens by the step time T(bs, m), so the cost
table must describe the verification forward that will actually run. For Qwen3-MoE checkpoints
that is the reference engine's own target (`evict.models.Qwen3MoeTarget`); other MoE
architectures (Mixtral, DeepSeek-style, ...) are timed through `transformers.AutoModelForCausalLM`
with a 4D tree mask and a KV cache.

Procedure, per batch size: prefill a real KV context of ``context_len`` tokens once, then for each
width w verify a tree of w tokens (the root included) against that context: a random tree of w
nodes (deterministic seed; trees are nested, so the width-w tree is the first w nodes of the
largest one, as EVICT's prefix cut keeps them), positions ``context_len + depth``, and a mask where
each node sees the context, its ancestors and itself. Each point gets warm-up forwards, then
``repeats`` timed forwards (CUDA events on GPU, ``time.perf_counter`` on CPU), reported as median
and p10/p90 in milliseconds, plus the mean per-layer union of experts the verified tokens routed to
(counted in one extra, untimed forward through the router hook / ``output_router_logits``).

Tokens (``tokens="draft"``, the default): the context is held-out text (Python standard library
source, the testbed's domain) tokenized with the model's own tokenizer when it has one, and every
tree node carries one of the model's own top predictions at its depth (rank = the node's index
among its siblings). That routes like real drafts. ``tokens="random"`` draws uniform ids, which
DESIGN.md notes overstates expert unions on some models.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evict.corpus import heldout_files, read_source
from evict.machine import cpu_model
from evict.profiler.experts import ExpertRecorder, mean_union, topk_from_router_logits
from evict.profiler.timing import CLOCKS, percentile, time_call


class ProfileError(RuntimeError):
    """A profiling run cannot proceed; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class PointResult:
    """One grid point: latency statistics of verifying ``width`` tokens for ``batch_size`` requests."""

    batch_size: int
    width: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: list[float]
    expert_union: float

    @classmethod
    def from_samples(
        cls, batch_size: int, width: int, samples_ms: Sequence[float], expert_union: float
    ) -> PointResult:
        """Summarize repeated timings the same way for every backend (median and p10/p90)."""
        return cls(
            batch_size=batch_size,
            width=width,
            median_ms=float(statistics.median(samples_ms)),
            p10_ms=percentile(samples_ms, 10),
            p90_ms=percentile(samples_ms, 90),
            samples_ms=[round(float(x), 4) for x in samples_ms],
            expert_union=float(expert_union),
        )


@dataclass
class ProfileResult:
    """Everything a profiling run measured, before it is turned into a cost table."""

    points: list[PointResult]
    meta: dict
    fixed_ms: dict[int, float] = field(default_factory=dict)
    draft_ms: dict[int, dict[int, list[float]]] = field(default_factory=dict)  # topk -> bs -> per depth

    def point(self, batch_size: int, width: int) -> PointResult:
        """The measured point for (batch_size, width); KeyError if it was not measured."""
        for p in self.points:
            if p.batch_size == batch_size and p.width == width:
                return p
        raise KeyError((batch_size, width))


# ----------------------------------------------------------------------------------------------
# Trees


def random_tree_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    """Parents of a random recursive tree: node 0 is the root (-1), node i>0 picks a parent < i.

    Parents always precede children (SGLang's flat layout), and the first w nodes of the tree are
    themselves a tree, so one tree per row serves every width.
    """
    parents = [-1]
    for i in range(1, num_nodes):
        parents.append(int(torch.randint(0, i, (1,), generator=generator)))
    return parents


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (root 0)."""
    depth: list[int] = []
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        if p >= i:
            raise ValueError(f"node {i} has parent {p}; parents must precede children")
    return depth


def sibling_ranks(parents: Sequence[int]) -> list[int]:
    """Index of each node among its parent's children, in flat order (root 0)."""
    seen: dict[int, int] = {}
    ranks = []
    for p in parents:
        if p < 0:
            ranks.append(0)
            continue
        ranks.append(seen.get(p, 0))
        seen[p] = seen.get(p, 0) + 1
    return ranks


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:
    """BoolTensor [n, n]: ``mask[i, j]`` is True when j is i or an ancestor of i (i may attend j)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
    return mask


# ----------------------------------------------------------------------------------------------
# Model inspection


def read_model_config(model_path: Path) -> dict:
    """Read and validate ``config.json`` of a checkpoint directory (clear errors, no tracebacks)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise ProfileError(
            f"model directory {model_path} does not exist; pass --model with a checkpoint directory"
        )
    if not model_path.is_dir():
        raise ProfileError(f"--model {model_path} is not a directory; pass the checkpoint directory")
    cfg_file = model_path / "config.json"
    if not cfg_file.is_file():
        raise ProfileError(
            f"{model_path} has no config.json; pass a Hugging Face checkpoint directory "
            "(config.json + *.safetensors)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{cfg_file} is not valid JSON ({exc}); fix or regenerate the checkpoint") from exc
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ProfileError(f"{cfg_file} has no 'model_type'; it is not a Hugging Face model config")
    if not list(model_path.glob("*.safetensors")):
        raise ProfileError(
            f"{model_path} has no *.safetensors weights; the profiler loads safetensors only "
            "(convert pickled .bin checkpoints first)"
        )
    return cfg


def moe_shape(cfg: dict) -> tuple[int, int]:
    """(num_experts, top_k) from an HF config dict; (0, 0) for a dense model."""
    experts = 0
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            experts = cfg[key]
            break
    top_k = 0
    for key in ("num_experts_per_tok", "moe_topk", "top_k"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            top_k = cfg[key]
            break
    return experts, top_k


def model_id_for(model_path: Path, cfg: dict) -> str:
    """A readable model id for the table: the package-relative path for models shipped inside
    ``evict`` (``evict/testbed/target``), else the config's ``_name_or_path`` or the directory name."""
    import evict

    resolved = Path(model_path).resolve()
    pkg = Path(evict.__file__).resolve().parent
    if resolved.is_relative_to(pkg):
        return resolved.relative_to(pkg.parent).as_posix()
    name = cfg.get("_name_or_path")
    if isinstance(name, str) and name and not Path(name).is_absolute():
        return name
    return resolved.name


def device_name(device: torch.device) -> str:
    """Human-readable accelerator / CPU name stored in (and checked against) the table metadata."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{cpu_model()}"


def _evict_version(module) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("evict")
    except Exception:
        return "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose kernels the timing depends on."""
    import numpy
    import transformers

    import evict

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "evict": _evict_version(evict),
    }
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    return versions


# ----------------------------------------------------------------------------------------------
# Runners: one prefill per batch size, then repeated tree verifications against it


class _Runner:
    """Interface of a timed model: ``prefill`` once per batch size, then ``verify`` many times."""

    impl = "base"
    num_experts = 0
    top_k = 0

    def prefill(self, ids: torch.Tensor, context_len: int, max_width: int) -> torch.Tensor:
        """Run ``ids [bs, L]`` (L >= context_len), keep the first ``context_len`` tokens as the
        committed context and return the logits of positions context_len-1 .. L-1 as fp32."""
        raise NotImplementedError

    def verify(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, record: bool = False
    ) -> list[torch.Tensor] | None:
        """One tree verification (``ids/positions [bs, w]``, ``mask [bs, w, ctx+w]`` bool); with
        ``record`` return each MoE layer's ``topk_ids [bs*w, k]``. Leaves the context unchanged."""
        raise NotImplementedError


class EngineRunner(_Runner):
    """The reference engine's ``Qwen3MoeTarget`` (the forward that EVICT's reference engine runs)."""

    impl = "evict.engine.Qwen3MoeTarget"

    def __init__(self, model_path: Path, dtype: torch.dtype, device: torch.device, cfg: dict) -> None:
        from evict.models import Qwen3MoeTarget

        self.model = Qwen3MoeTarget.from_pretrained(model_path, dtype=dtype, device=str(device))
        self.model.eval()
        self.num_experts, self.top_k = moe_shape(cfg)
        self.cache = None
        self.context_len = 0
        self.recorder = ExpertRecorder(max(self.num_experts, 1))

    def prefill(self, ids: torch.Tensor, context_len: int, max_width: int) -> torch.Tensor:
        bs, length = ids.shape
        self.cache = None
        self.cache = self.model.new_cache(bs, max(length, context_len + max_width))
        positions = torch.arange(length, device=ids.device).unsqueeze(0).expand(bs, length)
        out = self.model.forward(ids, positions, self.cache)
        # Commit exactly the context; whatever was written past it is overwritten by verification.
        self.cache.lengths.fill_(context_len)
        self.context_len = context_len
        return out.logits[:, context_len - 1 :].float()

    def verify(self, ids, positions, mask, record=False):
        hook = None
        if record:
            self.recorder.reset()
            hook = self.recorder
        self.model.forward(ids, positions, self.cache, attn_mask=mask, router_hook=hook)
        return self.recorder.per_layer() if record else None


class HFRunner(_Runner):
    """Any ``transformers`` causal LM, verified with a 4D additive tree mask and a DynamicCache."""

    impl = "transformers.AutoModelForCausalLM"

    def __init__(self, model_path: Path, dtype: torch.dtype, device: torch.device, cfg: dict) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_path),
                dtype=dtype,
                attn_implementation="sdpa",
                local_files_only=True,
                use_safetensors=True,
                output_loading_info=True,
            )
        except Exception as exc:  # any loader failure becomes a clear message
            raise ProfileError(
                f"could not load {model_path} with transformers.AutoModelForCausalLM: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
        if missing:
            raise ProfileError(
                f"{model_path} is missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "timing a partly random-initialised model would give a misleading table"
            )
        self.model = model.to(device).eval()
        self.num_experts, self.top_k = moe_shape(cfg)
        self.past = None
        self.context_len = 0
        self.dtype = dtype

    def _crop(self) -> None:
        extra = self.past.get_seq_length() - self.context_len
        if extra > 0:
            self.past.crop(-extra)

    def prefill(self, ids: torch.Tensor, context_len: int, max_width: int) -> torch.Tensor:
        self.past = None
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=ids.shape[1] - context_len + 1)
        self.past = out.past_key_values
        self.context_len = context_len
        self._crop()
        return out.logits.float()

    def verify(self, ids, positions, mask, record=False):
        neg = torch.finfo(self.dtype).min
        add_mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
        add_mask.masked_fill_(~mask, neg)
        args = dict(
            input_ids=ids,
            position_ids=positions,
            attention_mask=add_mask.unsqueeze(1),
            past_key_values=self.past,
            use_cache=True,
        )
        if record and self.num_experts:
            # The decoder alone: the causal-LM head would add a load-balancing loss that cannot
            # handle a 4D mask. Recording forwards are not timed.
            out = self.model.get_decoder()(output_router_logits=True, **args)
        else:
            out = self.model(**args)  # logits of every verified token, as verification needs
        self._crop()
        if not record:
            return None
        logits = getattr(out, "router_logits", None) or ()
        return [topk_from_router_logits(r.reshape(-1, r.shape[-1]), self.top_k).cpu() for r in logits]


def engine_available() -> bool:
    """True when the reference engine's Qwen3MoeTarget can be imported."""
    try:
        from evict.models import Qwen3MoeTarget  # noqa: F401
    except Exception:
        return False
    return True


def make_runner(model_path: Path, cfg: dict, impl: str, dtype: torch.dtype, device: torch.device) -> _Runner:
    """Pick the implementation: the reference engine for Qwen3-MoE (``auto``), else transformers."""
    if impl not in ("auto", "engine", "hf"):
        raise ProfileError(f"unknown implementation {impl!r}; use auto, engine or hf")
    use_engine = impl == "engine" or (impl == "auto" and cfg.get("model_type") == "qwen3_moe")
    if use_engine:
        if cfg.get("model_type") != "qwen3_moe":
            raise ProfileError(
                f"--impl engine needs a qwen3_moe checkpoint, {model_path} is {cfg.get('model_type')!r}"
            )
        if not engine_available():
            if impl == "engine":
                raise ProfileError("evict.models.Qwen3MoeTarget is not importable; use --impl hf")
            print(
                "evict-profile: evict.models.Qwen3MoeTarget unavailable, timing the transformers model",
                file=sys.stderr,
            )
            return HFRunner(model_path, dtype, device, cfg)
        try:
            return EngineRunner(model_path, dtype, device, cfg)
        except ProfileError:
            raise
        except Exception as exc:
            raise ProfileError(
                f"could not load {model_path} with Qwen3MoeTarget: {type(exc).__name__}: {exc}"
            ) from exc
    return HFRunner(model_path, dtype, device, cfg)


# ----------------------------------------------------------------------------------------------
# Inputs


TOKEN_POOL = 128  # tokens drawn per request beyond the context, so inputs do not depend on the grid


def _text_tokens(model_path: Path, needed: int, seed: int) -> list[int] | None:
    """``needed`` token ids of held-out Python standard library source, tokenized with the model's
    own ``tokenizer.json``; None when the model has no tokenizer or the text is too short."""
    tok_file = model_path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
    except Exception:
        return None
    files = heldout_files()
    random.Random(seed).shuffle(files)
    ids: list[int] = []
    for f in files:
        try:
            ids.extend(tok.encode(read_source(f)).ids)
        except OSError:
            continue
        if len(ids) >= needed:
            return ids[:needed]
    return None


@dataclass
class BatchInputs:
    """Per-batch-size inputs: prefill ids and, per row, a tree with a token for every node."""

    prefill_ids: torch.Tensor  # [bs, L]
    parents: list[list[int]]  # per row, max_width nodes
    tokens: torch.Tensor  # [bs, max_width] token of each tree node (node 0 = root)
    text_context: bool


def _build_inputs(
    runner: _Runner,
    bs: int,
    context_len: int,
    max_width: int,
    vocab: int,
    tokens_mode: str,
    seed: int,
    model_path: Path,
    device: torch.device,
) -> BatchInputs:
    """Seeded prefill ids and tree tokens for one batch size; runs the prefill (sets the context).

    Request b gets the same tree, context and tokens at every batch size and for every max width
    (per-request generators, nested trees, fixed text windows), so ``--check`` re-measures exactly
    the inputs of the table's points.
    """
    # separate streams for tree shapes and tokens: the number of draws of one must not shift the other
    tree_gens = [torch.Generator().manual_seed(seed * 1000003 + 2 * b) for b in range(bs)]
    gens = [torch.Generator().manual_seed(seed * 1000003 + 2 * b + 1) for b in range(bs)]
    parents = [random_tree_parents(max_width, g) for g in tree_gens]
    depths = [tree_depths(p) for p in parents]
    ranks = [sibling_ranks(p) for p in parents]
    max_depth = max(max(d) for d in depths)
    if tokens_mode == "random":
        n_tok = max(max_width, TOKEN_POOL)
        rows = [torch.randint(0, vocab, (context_len + n_tok,), generator=g) for g in gens]
        ctx = torch.stack([r[:context_len] for r in rows])
        tree = torch.stack([r[context_len : context_len + max_width] for r in rows])
        runner.prefill(ctx.to(device), context_len, max_width)
        return BatchInputs(ctx, parents, tree, text_context=False)
    # draft: context text + the model's own top predictions at each depth
    per_row = context_len + max_depth + 1
    stride = context_len + max(TOKEN_POOL, max_depth + 1)
    text = _text_tokens(model_path, (bs - 1) * stride + per_row, seed)
    if text is not None and max(text) < vocab:
        ids = torch.tensor([text[b * stride : b * stride + per_row] for b in range(bs)], dtype=torch.long)
        text_context = True
    else:
        ids = torch.stack([torch.randint(0, vocab, (stride,), generator=g)[:per_row] for g in gens])
        text_context = False
    logits = runner.prefill(ids.to(device), context_len, max_width)  # [bs, max_depth + 2, V]
    top_r = max(max(r) for r in ranks) + 1
    top = torch.topk(logits[..., :vocab], min(top_r, vocab), dim=-1).indices.cpu()  # [bs, D+2, R]
    tree = torch.empty(bs, max_width, dtype=torch.long)
    for b in range(bs):
        tree[b, 0] = ids[b, context_len]  # the root: the last verified (text) token
        for i in range(1, max_width):
            # prediction for position context_len + depth, given the text up to the position before
            tree[b, i] = top[b, depths[b][i], min(ranks[b][i], top.shape[-1] - 1)]
    return BatchInputs(ids, parents, tree, text_context)


def _verify_args(inp: BatchInputs, width: int, context_len: int, device: torch.device):
    """ids, positions and boolean mask [bs, w, ctx+w] for the first ``width`` nodes of each tree."""
    bs = len(inp.parents)
    ids = inp.tokens[:, :width]
    pos = torch.tensor([[context_len + d for d in tree_depths(p[:width])] for p in inp.parents])
    mask = torch.ones(bs, width, context_len + width, dtype=torch.bool)
    for b, p in enumerate(inp.parents):
        mask[b, :, context_len:] = ancestor_mask(p[:width])
    return ids.to(device), pos.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# Timing


@dataclass
class ProfileSpec:
    """What to measure (the CLI fills it from its arguments)."""

    model_path: Path
    batch_sizes: list[int]
    widths: list[int]
    context_len: int = 256
    repeats: int = 10
    warmup: int = 2
    tokens: str = "draft"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    impl: str = "auto"
    clock: str = "wall"
    model_id: str | None = None
    progress: bool = True
    points: list[tuple[int, int]] | None = None  # explicit (bs, w) subset, e.g. for --check


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for and absent."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ProfileError(f"unknown device {name!r}; use cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ProfileError(f"device {name!r} is not supported by the torch backend; use cpu or cuda")
    return device


def check_clock(clock: str, device: torch.device) -> None:
    """``cpu`` clock only for CPU runs with one intra-op thread (see :func:`time_call`)."""
    if clock not in CLOCKS:
        raise ProfileError(f"unknown --clock {clock!r}; use wall or cpu")
    if clock == "cpu" and device.type != "cpu":
        raise ProfileError("--clock cpu is for CPU runs; CUDA runs are timed with CUDA events")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise ProfileError(
            f"--clock cpu needs one intra-op thread (torch uses {torch.get_num_threads()}): "
            "set OMP_NUM_THREADS=1, or use --clock wall"
        )


def clock_name(clock: str, device: torch.device) -> str:
    """How latencies were taken, for the table metadata."""
    if device.type == "cuda":
        return "cuda events"
    return "time.process_time (CPU time, 1 thread)" if clock == "cpu" else "time.perf_counter (wall)"


def profile(spec: ProfileSpec) -> ProfileResult:
    """Measure the grid described by ``spec`` and return the raw result (see module docstring)."""
    from tqdm.auto import tqdm

    from evict.profiler.table import model_config_hash

    if spec.tokens not in ("draft", "random"):
        raise ProfileError(f"unknown --tokens {spec.tokens!r}; use draft or random")
    if spec.dtype not in DTYPES:
        raise ProfileError(f"unknown dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    device = resolve_device(spec.device)
    check_clock(spec.clock, device)
    dtype = DTYPES[spec.dtype]
    cfg = read_model_config(spec.model_path)
    vocab = int(cfg.get("vocab_size") or 0)
    if vocab <= 0:
        raise ProfileError(f"{spec.model_path}/config.json has no positive vocab_size")
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and spec.context_len + max(spec.widths) + 1 > max_pos:
        raise ProfileError(
            f"context {spec.context_len} + width {max(spec.widths)} exceeds the model's "
            f"max_position_embeddings {max_pos}; lower --context-len"
        )
    runner = make_runner(spec.model_path, cfg, spec.impl, dtype, device)

    if spec.points is not None:
        grid = sorted(set(spec.points))
    else:
        grid = [(bs, w) for bs in sorted(set(spec.batch_sizes)) for w in sorted(set(spec.widths))]
    torch.manual_seed(spec.seed)
    points: list[PointResult] = []
    text_context = True
    bar = tqdm(
        total=len(grid) * spec.repeats,
        desc="evict-profile (timed forwards)",
        unit="fwd",
        disable=not spec.progress,
        file=sys.stderr,
    )
    with torch.inference_mode():
        for bs in sorted({b for b, _ in grid}):
            widths = [w for b, w in grid if b == bs]
            inp = _build_inputs(
                runner,
                bs,
                spec.context_len,
                max(widths),
                vocab,
                spec.tokens,
                spec.seed,
                spec.model_path,
                device,
            )
            text_context = text_context and inp.text_context
            # Repeats are interleaved across widths (round r times every width once), so a change
            # in machine load during the run shifts all widths alike instead of bending the curve.
            calls = {}
            for w in widths:
                ids, pos, mask = _verify_args(inp, w, spec.context_len, device)
                calls[w] = functools.partial(runner.verify, ids, pos, mask)
                for _ in range(spec.warmup):
                    calls[w]()
            samples: dict[int, list[float]] = {w: [] for w in widths}
            for _ in range(spec.repeats):
                for w in widths:
                    samples[w].append(time_call(calls[w], device, spec.clock))
                    bar.update(1)
            bar.set_postfix(bs=bs, refresh=False)
            for w in widths:
                routed = calls[w](record=True) if runner.num_experts else []
                union = mean_union(routed or [], max(runner.num_experts, 1))
                points.append(PointResult.from_samples(bs, w, samples[w], union))
    bar.close()

    meta = {
        "model_id": spec.model_id or model_id_for(spec.model_path, cfg),
        "model_config_hash": model_config_hash(cfg),
        "model_type": cfg.get("model_type"),
        "device": device_name(device),
        "dtype": spec.dtype,
        "tp_size": 1,
        "ep_size": 1,
        "backend": "torch",
        "implementation": runner.impl,
        "versions": library_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "context_len": spec.context_len,
        "repeats": spec.repeats,
        "warmup": spec.warmup,
        "order": "repeats interleaved across widths",
        "clock": clock_name(spec.clock, device),
        "tokens": spec.tokens if spec.tokens == "random" or text_context else "draft (random context)",
        "seed": spec.seed,
        "num_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "num_experts": runner.num_experts,
        "top_k": runner.top_k,
        "num_layers": cfg.get("num_hidden_layers"),
        "tree": "random recursive tree (seeded), nested across widths",
    }
    return ProfileResult(points=points, meta=meta)


def result_to_table(result: ProfileResult, source: str = "<profile>"):
    """Turn a measured grid into a validated :class:`~evict.profiler.table.CostTable`.

    Every (batch size, width) pair of the grid must have been measured; ``fixed_ms`` is written
    only when every batch size has a drafting cost.
    """
    from evict.profiler.table import CostTable

    bss = sorted({p.batch_size for p in result.points})
    ws = sorted({p.width for p in result.points})
    grid = {(p.batch_size, p.width): p for p in result.points}
    missing = [(b, w) for b in bss for w in ws if (b, w) not in grid]
    if missing:
        raise ProfileError(f"grid points {missing} were not measured; the table needs a full grid")

    def rows(attr: str) -> list[list[float]]:
        return [[round(float(getattr(grid[b, w], attr)), 4) for w in ws] for b in bss]

    d = {
        "schema_version": 1,
        "metadata": dict(result.meta),
        "batch_sizes": bss,
        "widths": ws,
        "latency_ms": {"median": rows("median_ms"), "p10": rows("p10_ms"), "p90": rows("p90_ms")},
        "expert_union": rows("expert_union"),
    }
    if result.fixed_ms and all(b in result.fixed_ms for b in bss):
        d["fixed_ms"] = [round(float(result.fixed_ms[b]), 4) for b in bss]
    if result.draft_ms and all(b in rows_ for rows_ in result.draft_ms.values() for b in bss):
        d["draft_ms"] = {
            str(k): [[round(float(v), 4) for v in by_bs[b]] for b in bss]
            for k, by_bs in result.draft_ms.items()
        }
    return CostTable.from_dict(d, source=source)


def draft_cost_note(draft_path: Path, steps: int, topk: int) -> str:
    """Metadata note for ``fixed_ms``; the benchmark parses "S forwards x K tokens" from it."""
    return (
        f"EAGLE-3 drafter {model_id_for(Path(draft_path), {})}: {steps} forwards x {topk} tokens per request "
        f"(speculative_num_steps={steps}, topk={topk}: one draft-extend forward of {steps + 1} tokens "
        f"+ {steps - 1} tree forwards of {topk} tokens, each with a top-{topk})"
    )


def add_draft_costs(
    result: ProfileResult, spec: ProfileSpec, draft_path: Path, steps: int, topk: int
) -> None:
    """Price drafting into ``result``: ``fixed_ms`` (the ``(steps, topk)`` tree's whole draft) and
    ``draft_ms`` per depth for that topk and for a chain (topk 1), which the whole-step decision
    needs to weigh shallower drafts, chains and plain decoding. The one route of ``evict-profile
    --draft-model`` and the zero-config measurement."""
    families = sorted({int(topk), 1}, reverse=True)
    result.draft_ms = measure_draft_depths(spec, Path(draft_path), steps, families)
    result.fixed_ms = {bs: row[steps] for bs, row in result.draft_ms[int(topk)].items()}
    result.meta["fixed_ms"] = draft_cost_note(Path(draft_path), steps, topk)
    result.meta["draft_steps"] = int(steps)
    result.meta["draft_topk"] = int(topk)


def measure_draft_cost(spec: ProfileSpec, draft_path: Path, steps: int, topk: int) -> dict[int, float]:
    """Median ms of the fixed per-step drafting work for each batch size (the table's ``fixed_ms``):
    depth ``steps`` of :func:`measure_draft_depths`."""
    return {
        bs: row[steps] for bs, row in measure_draft_depths(spec, draft_path, steps, (topk,))[topk].items()
    }


def measure_draft_depths(
    spec: ProfileSpec, draft_path: Path, steps: int, topks: Sequence[int]
) -> dict[int, dict[int, list[float]]]:
    """``{topk: {batch size: [median ms at depth 0..steps]}}``: the table's ``draft_ms``.

    Depth ``d`` mirrors one decode step of the reference engine's EAGLE-3 drafting with
    ``speculative_num_steps = d``: the draft extend over the accepted tokens (``d + 1`` per request,
    projected from the target's three aux layers by the drafter's fc; one token at depth 0, which
    drafts nothing but keeps the drafter's cache warm), a top-k of its last position, then ``d - 1``
    tree forwards of ``topk`` tokens per request, each followed by a top-k over the draft
    vocabulary, against a ``context_len`` draft KV context. Scheduler and sampling overhead are not
    included; on a GPU server they belong in fixed_ms too.
    """
    from tqdm.auto import tqdm

    try:
        from evict.models import Eagle3Drafter, Qwen3MoeTarget
    except Exception as exc:
        raise ProfileError(
            f"--draft-model needs evict.models.Eagle3Drafter, which is not importable ({exc})"
        ) from exc
    draft_path = Path(draft_path)
    if not (draft_path / "config.json").is_file():
        raise ProfileError(
            f"--draft-model {draft_path} has no config.json; pass an EAGLE-3 drafter directory"
        )
    device = resolve_device(spec.device)
    check_clock(spec.clock, device)
    dtype = DTYPES[spec.dtype]
    try:
        target = Qwen3MoeTarget.from_pretrained(spec.model_path, dtype=dtype, device=str(device))
        drafter = Eagle3Drafter.from_pretrained(draft_path, target, dtype=dtype, device=str(device)).eval()
    except Exception as exc:
        raise ProfileError(f"could not load drafter {draft_path}: {type(exc).__name__}: {exc}") from exc
    hidden = int(target.config.hidden_size)
    vocab = int(target.config.vocab_size)
    ctx = spec.context_len
    ext = steps + 1
    out: dict[int, dict[int, list[float]]] = {int(k): {} for k in topks}
    gen = torch.Generator().manual_seed(spec.seed)
    points = [(bs, k) for bs in sorted(set(spec.batch_sizes)) for k in out]
    with torch.inference_mode():
        for bs, topk in tqdm(points, desc="drafter", disable=not spec.progress, file=sys.stderr):
            cache = drafter.new_cache(bs, ctx + ext + topk * steps)
            ids = torch.randint(0, vocab, (bs, ctx), generator=gen).to(device)
            pos = torch.arange(ctx).unsqueeze(0).expand(bs, ctx).to(device)
            h = torch.randn(bs, ctx, hidden, generator=gen).to(device, dtype)
            drafter.forward(ids, h, pos, cache)
            cache.lengths.fill_(ctx)
            aux = torch.randn(bs, ext, 3 * hidden, generator=gen).to(device, dtype)
            ext_ids = torch.randint(0, vocab, (bs, ext), generator=gen).to(device)
            ext_pos = (ctx + torch.arange(ext)).unsqueeze(0).expand(bs, ext).to(device)
            step_ids = torch.randint(0, vocab, (bs, topk), generator=gen).to(device)

            def one_step(
                depth: int,
                bs=bs,
                topk=topk,
                cache=cache,
                aux=aux,
                ext_ids=ext_ids,
                ext_pos=ext_pos,
                step_ids=step_ids,
            ) -> None:
                n = depth + 1 if depth > 0 else 1
                logits, hid = drafter.forward(
                    ext_ids[:, :n], drafter.project(aux[:, :n]), ext_pos[:, :n], cache
                )
                if depth == 0:
                    return
                torch.topk(logits[:, -1].float(), topk, dim=-1)
                hid = hid[:, -1:].expand(bs, topk, hidden)
                for s in range(1, depth):
                    p = torch.full((bs, topk), ctx + ext + s - 1, dtype=torch.long, device=device)
                    logits, hid = drafter.forward(step_ids, hid, p, cache)
                    torch.topk(logits.float(), topk, dim=-1)

            row = []
            for depth in range(steps + 1):
                for _ in range(spec.warmup):
                    one_step(depth)
                samples = [
                    time_call(lambda d=depth: one_step(d), device, spec.clock) for _ in range(spec.repeats)
                ]
                row.append(float(statistics.median(samples)))
            # a deeper draft runs every shallower step: keep the row monotone against timing noise
            out[topk][bs] = [max(row[: i + 1]) for i in range(len(row))]
    return out
