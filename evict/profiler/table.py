"""Cost table: profiled step latency by batch size and verify width (JSON, schema version 1).

The table is EVICT's only source of cost: ``T(bs, m) = fixed_ms(bs) + latency_ms.median(bs, m)``.
A table measured on another model, device, dtype or parallel layout silently gives wrong widths,
so loading validates everything and :meth:`CostTable.check_compatible` compares the metadata with
the running model.  Every error names the file, the field and the fix.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "metadata": {"model_id": str, "model_config_hash": str, "device": str, "dtype": str,
                   "tp_size": int, "ep_size": int, "backend": str,
                   "versions": {"torch": str, "transformers": str, "sglang": str, "evict": str},
                   "date": str, "context_len": int, "repeats": int, "notes": str,
                   "num_threads": int, "draft_steps": int, "draft_topk": int},
      "batch_sizes": [ascending ints >= 1],
      "widths": [ascending ints >= 1],
      "latency_ms": {"median": [[...]], "p10": [[...]], "p90": [[...]]},   # [len(bs)][len(widths)]
      "fixed_ms": [...],            # optional [len(bs)]: draft + overhead per step
      "expert_union": [[...]],      # optional [len(bs)][len(widths)]: mean experts per MoE layer
      "draft_ms": {"<topk>": [[...]]}  # optional, per draft topk: [len(bs)][steps + 1] drafting
                                    # cost (draft extend included) at depth d = 0..steps
    }

Required metadata: ``model_id``, ``device``, ``dtype``, ``tp_size``; the rest is optional but kept,
as are unknown top-level fields (a newer writer's additions survive a load/save round trip).
``draft_steps`` / ``draft_topk`` name the EAGLE tree whose drafting ``fixed_ms`` measured.
``draft_ms`` prices the whole-step decision (how deep to draft, chain or tree): row ``b``, column
``d`` is what drafting ``d`` steps costs at batch size ``b`` (``d = 0``: no tree, only the draft
extend that keeps the drafter's cache warm), so ``T(bs, shape, m) = fixed_ms - draft_ms[tree][S] +
draft_ms[shape] + verify(bs, m)``; it must hold the row of the table's own ``draft_topk``.

Every front end goes the same route from a file to a policy: :meth:`CostTable.open` (read, validate,
check against the running setup), :func:`checkpoint_config_hash` (the model's identity) and
:func:`resolve_widths` (the verify widths, always including the full tree N).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evict.boundary import current_umask

__all__ = [
    "SCHEMA_VERSION",
    "CostTable",
    "CostTableError",
    "model_config_hash",
    "checkpoint_config_hash",
    "resolve_widths",
    "REGENERATE_HINT",
]

logger = logging.getLogger("evict")

SCHEMA_VERSION = 1
REGENERATE_HINT = "regenerate it with `evict-profile --model PATH --out FILE`"
REQUIRED_METADATA = ("model_id", "device", "dtype", "tp_size")
_KNOWN_FIELDS = frozenset(
    (
        "schema_version",
        "metadata",
        "batch_sizes",
        "widths",
        "latency_ms",
        "fixed_ms",
        "expert_union",
        "draft_ms",
    )
)

# Config fields that change the verify cost of a model (architecture, not tokenizer or dtype).
_ARCH_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "decoder_sparse_step",
    "mlp_only_layers",
    "first_k_dense_replace",
    "moe_layer_freq",
    "norm_topk_prob",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "sliding_window",
    "tie_word_embeddings",
)


class CostTableError(ValueError):
    """A cost table is missing, malformed or does not match the running model."""


# Names that different libraries (and transformers versions) use for the same quantity: transformers 5
# writes Qwen3-MoE's ``num_experts`` as ``num_local_experts`` in ``to_dict()``, DeepSeek calls it
# ``n_routed_experts``. Hashing the canonical name keeps one checkpoint's hash the same whether it is
# read from config.json or from a loaded config object.
_FIELD_ALIASES = {"num_local_experts": "num_experts", "n_routed_experts": "num_experts"}


def model_config_hash(config: Mapping[str, Any] | Any) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of the architecture fields.

    Accepts a dict or an HF config object (anything with ``to_dict()``).  Only fields that change
    the cost of a forward pass are hashed, so a renamed checkpoint keeps its table; if none of the
    known fields is present the whole dict is hashed.
    """
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"config must be a dict or have to_dict(), got {type(config).__name__}")
        config = to_dict()
    picked: dict[str, Any] = {}
    for k in _ARCH_FIELDS:  # the canonical name comes first in _ARCH_FIELDS and wins over aliases
        if k in config:
            picked.setdefault(_FIELD_ALIASES.get(k, k), config[k])
    if not picked:
        picked = dict(config)
    text = json.dumps(picked, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def checkpoint_config_hash(model_path: str | os.PathLike[str], revision: str | None = None) -> str | None:
    """:func:`model_config_hash` of a checkpoint's raw ``config.json`` (a directory or a hub id).

    The one way EVICT names a model: the profiler, the start-up calibration, the reference engine,
    the benchmark and the plugin all hash the file's JSON, never a loaded config object (transformers
    renames fields in ``to_dict()`` and SGLang adds derived ones, either of which would change the
    hash). Hub ids are looked up in the local Hugging Face cache; ``None`` (with a warning) when no
    config.json can be found, in which case callers skip the architecture check.
    """
    path = Path(model_path).expanduser()
    cfg_file: Path | None = path / "config.json" if path.is_dir() else None
    if cfg_file is None:
        try:
            from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

            cached = try_to_load_from_cache(str(model_path), "config.json", revision=revision)
            cfg_file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a hub id, or no huggingface_hub
            cfg_file = None
    if cfg_file is None or not cfg_file.is_file():
        logger.warning(
            "evict: no config.json found for %s; the cost table's model hash is not checked", model_path
        )
        return None
    try:
        return model_config_hash(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CostTableError(
            f"cannot read {cfg_file} to identify the model for the cost table ({exc}); fix the checkpoint"
        ) from exc


def resolve_widths(
    num_draft_tokens: int,
    requested: Sequence[int] | None = None,
    table_widths: Sequence[int] | None = None,
    *,
    default: Sequence[int] | None = None,
    within_table: bool = False,
) -> tuple[int, ...]:
    """The verify widths a policy may choose: ascending, each in ``[1, N]``, always including ``N``.

    ``N`` (the draft tree's size, root included) is the full tree: the fallback for bad scores and
    the kill switch, and the baseline EVICT must be able to keep. Without ``requested`` widths the
    set is ``default`` (the plugin's, where each width costs a CUDA graph) or else the table's widths
    below N (the reference engine, where a width costs nothing). ``within_table`` refuses widths
    outside the table's profiled range instead of letting :meth:`CostTable.step_cost` clamp them
    (the server captures a graph per width, so an unprofiled one is a configuration error there).
    Raises :class:`CostTableError` naming the problem and the fix.
    """
    n = int(num_draft_tokens)
    if n < 2:
        raise CostTableError(f"draft tree of {n} token(s): EVICT needs a tree of at least 2 tokens to cut")
    if requested is not None:
        too_big = [int(w) for w in requested if int(w) > n]
        if too_big:
            raise CostTableError(
                f"widths {too_big} exceed the draft tree's {n} tokens; widths count verified tokens, "
                f"so keep them <= {n}"
            )
        widths = {int(w) for w in requested if int(w) >= 1}
    elif default is not None:
        widths = {int(w) for w in default if 1 <= int(w) < n}
    else:
        widths = {int(w) for w in (table_widths or ()) if 1 <= int(w) < n}
    widths.add(n)
    out = tuple(sorted(widths))
    if within_table and table_widths:
        lo, hi = min(table_widths), max(table_widths)
        outside = [w for w in out if w < lo or w > hi]
        if outside:
            raise CostTableError(
                f"the cost table covers widths {lo}..{hi} but EVICT would use {list(out)} "
                f"({outside} outside); measure the table up to width {n} or choose widths inside "
                "the measured range"
            )
    return out


def _candidates(steps: int, topk: int) -> int:
    """SGLang's flat candidate count K of a (steps, topk) tree (0 for steps 0)."""
    return 0 if steps <= 0 else topk + (steps - 1) * topk * topk


def _interp_list(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear y(x) over ascending xs, x inside the range."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return float(y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.0))
    return float(ys[-1])


def _draft_grid(raw: Any, meta: Mapping[str, Any], nb: int, err: Any) -> dict[int, list[list[float]]]:
    """Validate ``draft_ms``: ``{"<topk>": [len(bs)][steps + 1] non-negative ms}``, non-decreasing
    in depth (a deeper draft runs every shallower step), holding the table's own ``draft_topk``."""
    if not isinstance(raw, Mapping) or not raw:
        raise err("draft_ms", 'must be an object {"<topk>": [[ms at depth 0..steps] per batch size]}')
    out: dict[int, list[list[float]]] = {}
    for key, rows in raw.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
            raise err("draft_ms", f'keys are draft topk values ("1", "4", ...), got {key!r}')
        name = f"draft_ms.{key}"
        if not isinstance(rows, list) or len(rows) != nb:
            raise err(name, f"must have one row per batch size ({nb} rows)")
        depths = len(rows[0]) if isinstance(rows[0], list) else 0
        if depths < 2:
            raise err(name, "each row needs depths 0..steps (at least two values)")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != depths:
                raise err(f"{name}[{i}]", f"must have {depths} values like the first row (ragged grid)")
            for j, v in enumerate(row):
                if not _is_num(v) or not math.isfinite(v) or v < 0:
                    raise err(f"{name}[{i}][{j}]", f"must be a non-negative finite number, got {v!r}")
        out[int(key)] = [[float(v) for v in row] for row in rows]
    topk, steps = meta.get("draft_topk"), meta.get("draft_steps")
    if not (_is_int(topk) and _is_int(steps)):
        raise err("metadata.draft_steps", "draft_ms needs draft_steps and draft_topk (the tree in fixed_ms)")
    if topk not in out or len(out[topk][0]) < steps + 1:
        raise err("draft_ms", f"must price the table's own tree: topk {topk} at depths 0..{steps}")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _norm_str(v: Any) -> str:
    s = str(v).strip().lower()
    return s[len("torch.") :] if s.startswith("torch.") else s


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class CostTable:
    """Validated cost table; build with :meth:`load` or :meth:`from_dict`."""

    batch_sizes: list[int]
    widths: list[int]
    median: list[list[float]]
    p10: list[list[float]]
    p90: list[list[float]]
    metadata: dict[str, Any]
    fixed_ms: list[float] | None = None
    expert_union: list[list[float]] | None = None
    draft_ms: dict[int, list[list[float]]] | None = None  # topk -> [len(bs)][steps + 1]
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level fields, kept on save
    source: str = field(default="<dict>", compare=False)
    _warned: bool = field(default=False, init=False, repr=False, compare=False)
    _grid: Any = field(default=None, init=False, repr=False, compare=False)

    # -- construction and validation --------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> CostTable:
        """Validate ``d`` (the parsed JSON) and build a table; ``source`` names it in errors."""

        def err(fld: str, problem: str, fix: str = REGENERATE_HINT) -> CostTableError:
            return CostTableError(f"cost table {source}: field '{fld}': {problem}; {fix}")

        if not isinstance(d, Mapping):
            raise err("<top level>", f"expected a JSON object, got {type(d).__name__}")
        for key in ("schema_version", "metadata", "batch_sizes", "widths", "latency_ms"):
            if key not in d:
                raise err(key, "missing required field")
        if d["schema_version"] != SCHEMA_VERSION:
            raise err(
                "schema_version",
                f"version {d['schema_version']!r} is not supported (this EVICT reads version {SCHEMA_VERSION})",
            )

        meta = d["metadata"]
        if not isinstance(meta, Mapping):
            raise err("metadata", "must be an object")
        for key in REQUIRED_METADATA:
            if key not in meta:
                raise err(f"metadata.{key}", "missing required field")
        for key in ("model_id", "device", "dtype"):
            if not isinstance(meta[key], str) or not meta[key]:
                raise err(f"metadata.{key}", f"must be a non-empty string, got {meta[key]!r}")
        int_fields = (
            ("tp_size", 1),
            ("ep_size", 1),
            ("context_len", 0),
            ("repeats", 0),
            ("draft_steps", 1),
            ("draft_topk", 1),
        )
        for key, low in int_fields:
            if key in meta and not (_is_int(meta[key]) and meta[key] >= low):
                raise err(f"metadata.{key}", f"must be an integer >= {low}, got {meta[key]!r}")
        if "versions" in meta and not isinstance(meta["versions"], Mapping):
            raise err("metadata.versions", "must be an object of library versions")

        def axis(name: str) -> list[int]:
            vals = d[name]
            if not isinstance(vals, list) or not vals:
                raise err(name, "must be a non-empty list of integers >= 1 (empty grid)")
            if not all(_is_int(v) and v >= 1 for v in vals):
                raise err(name, f"must hold integers >= 1, got {vals!r}")
            if any(b <= a for a, b in zip(vals, vals[1:])):
                raise err(name, f"must be strictly ascending without duplicates, got {vals!r}")
            return list(vals)

        batch_sizes = axis("batch_sizes")
        widths = axis("widths")
        nb, nw = len(batch_sizes), len(widths)

        def grid(name: str, rows: Any, positive: bool = True) -> list[list[float]]:
            if not isinstance(rows, list) or len(rows) != nb:
                got = len(rows) if isinstance(rows, list) else type(rows).__name__
                raise err(name, f"must have one row per batch size ({nb} rows), got {got}")
            out = []
            for i, row in enumerate(rows):
                if not isinstance(row, list) or len(row) != nw:
                    got = len(row) if isinstance(row, list) else type(row).__name__
                    raise err(
                        f"{name}[{i}]", f"must have one value per width ({nw}), got {got} (ragged grid)"
                    )
                for j, v in enumerate(row):
                    if not _is_num(v) or not math.isfinite(v) or (v <= 0 if positive else v < 0):
                        kind = "positive" if positive else "non-negative"
                        raise err(f"{name}[{i}][{j}]", f"must be a {kind} finite number, got {v!r}")
                out.append([float(v) for v in row])
            return out

        lat = d["latency_ms"]
        if not isinstance(lat, Mapping):
            raise err("latency_ms", "must be an object with median, p10 and p90 grids")
        for key in ("median", "p10", "p90"):
            if key not in lat:
                raise err(f"latency_ms.{key}", "missing required field")
        median = grid("latency_ms.median", lat["median"])
        p10 = grid("latency_ms.p10", lat["p10"])
        p90 = grid("latency_ms.p90", lat["p90"])
        for i in range(nb):
            for j in range(nw):
                if not p10[i][j] <= median[i][j] <= p90[i][j]:
                    raise err(
                        f"latency_ms[{i}][{j}]",
                        f"needs p10 <= median <= p90, got {p10[i][j]} / {median[i][j]} / {p90[i][j]}",
                    )

        fixed = None
        if d.get("fixed_ms") is not None:
            vals = d["fixed_ms"]
            if not isinstance(vals, list) or len(vals) != nb:
                raise err("fixed_ms", f"must have one value per batch size ({nb})")
            for i, v in enumerate(vals):
                if not _is_num(v) or not math.isfinite(v) or v < 0:
                    raise err(f"fixed_ms[{i}]", f"must be a non-negative finite number, got {v!r}")
            fixed = [float(v) for v in vals]
        union = None
        if d.get("expert_union") is not None:
            union = grid("expert_union", d["expert_union"], positive=False)
        draft = None
        if d.get("draft_ms") is not None:
            draft = _draft_grid(d["draft_ms"], meta, nb, err)

        return cls(
            batch_sizes=batch_sizes,
            widths=widths,
            median=median,
            p10=p10,
            p90=p90,
            metadata=copy.deepcopy(dict(meta)),
            fixed_ms=fixed,
            expert_union=union,
            draft_ms=draft,
            schema_version=SCHEMA_VERSION,
            extra={k: copy.deepcopy(v) for k, v in d.items() if k not in _KNOWN_FIELDS},
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostTable:
        """Read and validate a JSON cost table."""
        p = Path(path)
        if not p.is_file():
            raise CostTableError(
                f"cost table {p}: file not found; give the path of an existing table or {REGENERATE_HINT}"
            )
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CostTableError(
                f"cost table {p}: field '<file>': invalid JSON at line {exc.lineno} column {exc.colno} "
                f"({exc.msg}); fix the file or {REGENERATE_HINT}"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise CostTableError(f"cost table {p}: cannot read the file ({exc}); {REGENERATE_HINT}") from exc
        return cls.from_dict(d, source=str(p))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        model_id: str | None = None,
        config_hash: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        tp_size: int | None = None,
        num_threads: int | None = None,
        allow_mismatch: bool = False,
    ) -> CostTable:
        """Read, validate and check a table against the running setup: the one opener.

        Every front end (``evict generate``, ``evict-bench``, ``evict-profile --check``, the SGLang
        plugin and its start-up calibration cache) opens tables here, so "which table fits" means
        the same everywhere. ``None`` arguments are not compared, nor are the optional
        ``model_config_hash`` / ``num_threads`` when the table does not record them (a hand-made
        table cannot be checked for what it does not say). A mismatch raises
        :class:`CostTableError`, or with ``allow_mismatch`` logs a warning.
        """
        table = cls.load(path)
        meta = table.metadata
        table.check_compatible(
            model_id=model_id,
            config_hash=config_hash if meta.get("model_config_hash") else None,
            device=device,
            tp_size=tp_size,
            dtype=dtype,
            num_threads=num_threads if meta.get("num_threads") is not None else None,
            allow_mismatch=allow_mismatch,
        )
        return table

    @property
    def draft_tree(self) -> tuple[int, int] | None:
        """``(steps, topk)`` of the EAGLE tree whose drafting ``fixed_ms`` measured, if recorded."""
        steps, topk = self.metadata.get("draft_steps"), self.metadata.get("draft_topk")
        if _is_int(steps) and _is_int(topk):
            return int(steps), int(topk)
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (what :meth:`save` writes and :meth:`from_dict` reads)."""
        d: dict[str, Any] = {
            "schema_version": self.schema_version,
            "metadata": copy.deepcopy(self.metadata),
            "batch_sizes": list(self.batch_sizes),
            "widths": list(self.widths),
            "latency_ms": {
                "median": [list(r) for r in self.median],
                "p10": [list(r) for r in self.p10],
                "p90": [list(r) for r in self.p90],
            },
        }
        if self.fixed_ms is not None:
            d["fixed_ms"] = list(self.fixed_ms)
        if self.expert_union is not None:
            d["expert_union"] = [list(r) for r in self.expert_union]
        if self.draft_ms is not None:
            d["draft_ms"] = {str(k): [list(r) for r in rows] for k, rows in sorted(self.draft_ms.items())}
        for k, v in self.extra.items():
            d.setdefault(k, copy.deepcopy(v))
        return d

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write pretty JSON atomically (temp file in the same folder, then rename).

        An interrupted save leaves the previous file intact. The file gets the permissions of any
        file the user creates (``0666 & ~umask``), not ``mkstemp``'s private 0600: a table is
        usually written by one user and read by a server running as another.
        """
        p = Path(path)
        if p.is_dir():
            raise CostTableError(
                f"cost table {p}: is a directory; give a file path such as {p / 'cost_table.json'}"
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -- costs --------------------------------------------------------------------------------
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._grid is None:
            bs = torch.tensor(self.batch_sizes, dtype=torch.float64)
            w = torch.tensor(self.widths, dtype=torch.float64)
            total = torch.tensor(self.median, dtype=torch.float64)
            if self.fixed_ms is not None:
                total = total + torch.tensor(self.fixed_ms, dtype=torch.float64).unsqueeze(-1)
            self._grid = (bs, w, total)
        return self._grid

    @staticmethod
    def _interp_weights(
        x: torch.Tensor, grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices lo, hi and weight t so that value = (1-t) * v[lo] + t * v[hi] (x pre-clamped)."""
        n = grid.numel()
        hi = torch.searchsorted(grid, x).clamp(max=n - 1)
        lo = (hi - 1).clamp(min=0)
        span = grid[hi] - grid[lo]
        t = torch.where(span > 0, (x - grid[lo]) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
        return lo, hi, t

    def step_cost(self, batch_size: int, widths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Full step time ``T(bs, m)`` in ms, float32 ``[W]``: fixed + verify latency.

        Linear interpolation in width and in batch size; outside the profiled grid the value is
        clamped to the edge and one warning per table is logged (extrapolating a staircase is
        worse than admitting the table does not cover the request).
        """
        bs_grid, w_grid, total = self._tensors()
        w = torch.as_tensor(widths, dtype=torch.float64).detach().cpu().reshape(-1)
        b = torch.tensor([float(batch_size)], dtype=torch.float64)
        outside = bool(b[0] < bs_grid[0] or b[0] > bs_grid[-1]) or bool(
            (w < w_grid[0]).any() or (w > w_grid[-1]).any()
        )
        if outside and not self._warned:
            self._warned = True
            logger.warning(
                "evict: cost table %s covers batch sizes %s..%s and widths %s..%s; batch size %s / widths %s "
                "are clamped to the edge (profile a wider grid to remove this warning)",
                self.source,
                self.batch_sizes[0],
                self.batch_sizes[-1],
                self.widths[0],
                self.widths[-1],
                batch_size,
                [int(v) for v in w.tolist()],
            )
        b = b.clamp(bs_grid[0], bs_grid[-1])
        w = w.clamp(w_grid[0], w_grid[-1])
        blo, bhi, bt = self._interp_weights(b, bs_grid)
        row = (1 - bt) * total[blo[0]] + bt * total[bhi[0]]  # [len(widths)]
        wlo, whi, wt = self._interp_weights(w, w_grid)
        return ((1 - wt) * row[wlo] + wt * row[whi]).to(torch.float32)

    @property
    def draft_shapes(self) -> dict[int, int]:
        """``{topk: deepest priced depth}`` of ``draft_ms`` (empty without it)."""
        return {k: len(rows[0]) - 1 for k, rows in (self.draft_ms or {}).items()}

    def draft_cost(self, batch_size: int, topk: int, depth: int) -> float:
        """ms of drafting ``depth`` steps with ``topk`` at ``batch_size`` (interpolated, clamped)."""
        if self.draft_ms is None or topk not in self.draft_ms:
            raise CostTableError(
                f"cost table {self.source}: field 'draft_ms': no drafting costs for topk {topk} "
                f"(has {sorted(self.draft_ms or {})}); {REGENERATE_HINT} --draft-model DRAFTER"
            )
        rows = self.draft_ms[topk]
        if not 0 <= depth < len(rows[0]):
            raise CostTableError(
                f"cost table {self.source}: field 'draft_ms': topk {topk} is priced for depths "
                f"0..{len(rows[0]) - 1}, not {depth}; profile with --draft-steps {depth} or more"
            )
        b = min(max(float(batch_size), self.batch_sizes[0]), self.batch_sizes[-1])
        return _interp_list(b, self.batch_sizes, [r[depth] for r in rows])

    def shape_cost(
        self, batch_size: int, widths: torch.Tensor | Sequence[int], topk: int, depth: int
    ) -> torch.Tensor:
        """Whole-step time in ms, float32 ``[W]``, when drafting ``depth`` steps of ``topk`` and
        verifying each width (clamped to the candidates that depth drafts, plus the root).

        The table's own step (``fixed_ms`` + verify) with its drafting swapped for this shape's:
        ``step_cost(bs, w) - draft(bs, draft_topk, draft_steps) + draft(bs, topk, depth)``.
        """
        tree = self.draft_tree
        if tree is None:
            raise CostTableError(
                f"cost table {self.source}: field 'metadata.draft_steps': missing, so the drafting "
                f"inside fixed_ms is unknown; {REGENERATE_HINT} --draft-model DRAFTER"
            )
        steps, own_topk = tree
        cap = 1 + (own_topk and _candidates(depth, topk))
        w = torch.as_tensor(widths, dtype=torch.float64).detach().cpu().reshape(-1).clamp(max=cap)
        own = self.draft_cost(batch_size, own_topk, steps) if self.fixed_ms is not None else 0.0
        delta = self.draft_cost(batch_size, topk, depth) - own
        return (self.step_cost(batch_size, w).double() + delta).clamp(min=1e-6).to(torch.float32)

    # -- compatibility --------------------------------------------------------------------------
    def check_compatible(
        self,
        model_id: str | None = None,
        config_hash: str | None = None,
        device: str | None = None,
        tp_size: int | None = None,
        dtype: str | None = None,
        allow_mismatch: bool = False,
        num_threads: int | None = None,
    ) -> list[str]:
        """Compare the table's metadata with the running setup; ``None`` arguments are not checked.

        A mismatch raises :class:`CostTableError` naming each differing field and how to
        re-profile, or, with ``allow_mismatch``, logs a warning.  Returns the mismatch messages.
        """
        meta = self.metadata
        wanted = {
            "model_id": model_id,
            "model_config_hash": config_hash,
            "device": device,
            "tp_size": tp_size,
            "dtype": dtype,
            "num_threads": num_threads,
        }
        problems = []
        for key, want in wanted.items():
            if want is None:
                continue
            have = meta.get(key)
            if key in ("tp_size", "num_threads"):
                same = want == have
            else:  # strings: case- and space-insensitive; dtypes with or without "torch."
                same = _norm_str(want) == _norm_str(have)
            if not same:
                problems.append(f"metadata.{key} is {have!r} in the table but {want!r} here")
        if problems:
            msg = (
                f"cost table {self.source} was profiled for another setup: "
                + "; ".join(problems)
                + f". Re-profile on this setup ({REGENERATE_HINT}; or give no table and let EVICT measure "
                "this machine's), or use it anyway with --allow-table-mismatch (evict generate, evict-bench, "
                "evict-profile --check) or EVICT_ALLOW_TABLE_MISMATCH=1 (the SGLang plugin); costs, hence "
                "widths, may then be wrong"
            )
            if not allow_mismatch:
                raise CostTableError(msg)
            logger.warning("evict: %s", msg)
        return problems

    # -- ablation helpers ---------------------------------------------------------------------
    def _derived(self, median, p10, p90, fixed, note: str, draft_factor: float = 1.0) -> CostTable:
        meta = copy.deepcopy(self.metadata)
        meta["notes"] = (str(meta.get("notes", "")) + " " + note).strip()
        d = self.to_dict()
        d["metadata"] = meta
        d["latency_ms"] = {"median": median, "p10": p10, "p90": p90}
        if fixed is not None:
            d["fixed_ms"] = fixed
        if "draft_ms" in d:
            d["draft_ms"] = {
                k: [[v * draft_factor for v in r] for r in rows] for k, rows in d["draft_ms"].items()
            }
        return CostTable.from_dict(d, source=f"{self.source} ({note})")

    def scaled(self, factor: float) -> CostTable:
        """A new table with every latency (and fixed_ms) multiplied by ``factor`` > 0."""
        if not (_is_num(factor) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale factor must be a positive finite number, got {factor!r}")

        def sc(g):
            return [[v * factor for v in r] for r in g]

        fixed = [v * factor for v in self.fixed_ms] if self.fixed_ms is not None else None
        return self._derived(
            sc(self.median), sc(self.p10), sc(self.p90), fixed, f"[scaled x{factor}]", draft_factor=factor
        )

    def shifted(self, ms: float) -> CostTable:
        """A new table with ``ms`` added to every verify latency (may be negative if all stay > 0)."""
        if not (_is_num(ms) and math.isfinite(ms)):
            raise ValueError(f"shift must be a finite number of ms, got {ms!r}")

        def sh(g):
            return [[v + ms for v in r] for r in g]

        try:
            return self._derived(
                sh(self.median), sh(self.p10), sh(self.p90), self.fixed_ms, f"[shifted {ms:+g} ms]"
            )
        except CostTableError as exc:
            raise ValueError(f"shift by {ms} ms makes a latency non-positive: {exc}") from exc
