"""EVICT plugin configuration from ``EVICT_*`` environment variables (pure, no sglang import).

SGLang's ``ServerArgs`` is a sealed struct (a plugin cannot add CLI flags), so the plugin reads its
settings from the environment.  Everything is parsed and validated here, once, at start-up: an
unknown ``EVICT_*`` name (usually a typo) or a bad value is a clear error instead of a silently
ignored setting, and a missing or mismatched cost table stops the server with the command that
makes one.  This module is importable without sglang so it can be unit-tested anywhere.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_VARS",
    "DEFAULT_WIDTHS",
    "DEFAULT_LOG_INTERVAL",
    "EvictConfig",
    "EvictConfigError",
    "parse_env",
    "resolve_widths",
    "missing_table_message",
    "load_cost_table",
    "target_config_hash",
]

# name -> (default shown in docs, meaning).  docs/serving.md carries the same table.
ENV_VARS: dict[str, tuple[str, str]] = {
    "EVICT_COST_TABLE": ("(required)", "path of the JSON cost table made by `evict-profile`"),
    "EVICT_WIDTHS": (
        "2,4,8,16,32,64 below N, plus N",
        "comma-separated verify widths (root included) to capture one CUDA graph state each; "
        "N = --speculative-num-draft-tokens is always added (it is the fallback)",
    ),
    "EVICT_DECISION": (
        "immediate",
        "`immediate` (width from this step's draft scores; one host sync) or `lagged` (from the "
        "previous step's, read from pinned memory: the host never waits for this step's drafter)",
    ),
    "EVICT_DISABLE": ("0", "1 = kill switch: verify the full tree every step (A/B runs); no table needed"),
    "EVICT_ALLOW_TABLE_MISMATCH": (
        "0",
        "1 = warn instead of stopping when the table was profiled for another model/device/TP/dtype",
    ),
    "EVICT_BACKEND": ("torch", "`torch` or `triton`: implementation of the per-step width choice"),
    "EVICT_LOG_INTERVAL": ("100", "log EVICT metrics every N decode steps (0 = never)"),
}

logger = logging.getLogger(__name__)

DEFAULT_WIDTHS: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
DEFAULT_LOG_INTERVAL = 100
_DECISIONS = ("immediate", "lagged")
_BACKENDS = ("torch", "triton")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

PROFILE_HINT = (
    "make one on this machine with `evict-profile --model <target model path> --backend sglang "
    "--out <table.json>` (same GPU type, --tp-size and dtype as the server), then start the server "
    "with EVICT_COST_TABLE=<table.json>; or set EVICT_DISABLE=1 to serve the full EAGLE-3 tree"
)


class EvictConfigError(ValueError):
    """A bad ``EVICT_*`` setting; the message names the variable and the fix."""


@dataclass(frozen=True)
class EvictConfig:
    """Validated plugin settings (widths are resolved later, once N is known)."""

    cost_table: Path | None
    widths: tuple[int, ...] | None  # None = default set
    decision: str  # "immediate" | "lagged"
    disable: bool
    allow_table_mismatch: bool
    backend: str  # "torch" | "triton"
    log_interval: int

    @property
    def policy_mode(self) -> str:
        """The ``TruncationPolicy`` mode: ``off`` under the kill switch, else the decision mode."""
        return "off" if self.disable else self.decision


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise EvictConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0 (also true/false, yes/no, on/off)")


def _choice(name: str, raw: str, choices: Sequence[str]) -> str:
    v = raw.strip().lower()
    if v not in choices:
        raise EvictConfigError(f"{name}={raw!r} is not valid; use one of: {', '.join(choices)}")
    return v


def _parse_widths(raw: str) -> tuple[int, ...]:
    parts = [p.strip() for p in raw.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise EvictConfigError(
            "EVICT_WIDTHS is empty; give comma-separated widths such as 2,4,8,16 or unset it"
        )
    out = []
    for p in parts:
        try:
            w = int(p)
        except ValueError:
            raise EvictConfigError(
                f"EVICT_WIDTHS={raw!r}: {p!r} is not an integer; give comma-separated widths such as 2,4,8,16"
            ) from None
        if w < 1:
            raise EvictConfigError(f"EVICT_WIDTHS={raw!r}: width {w} < 1 (a width counts the root, so >= 1)")
        out.append(w)
    if len(set(out)) != len(out):
        raise EvictConfigError(f"EVICT_WIDTHS={raw!r} repeats a width; list each width once")
    return tuple(sorted(out))


def parse_env(environ: Mapping[str, str] | None = None) -> EvictConfig:
    """Parse and validate the ``EVICT_*`` variables of ``environ`` (default ``os.environ``).

    Raises :class:`EvictConfigError` for an unknown ``EVICT_*`` name (with the closest known name)
    or a malformed value.  Whether a table is *required* is decided by the caller
    (:func:`missing_table_message`), because the kill switch does not need one.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(k for k in env if k.startswith("EVICT_") and k not in ENV_VARS)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, ENV_VARS, n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise EvictConfigError(
            f"unknown EVICT_* environment variable(s): {', '.join(hints)}; known: {', '.join(ENV_VARS)}"
        )

    table_raw = env.get("EVICT_COST_TABLE", "").strip()
    widths_raw = env.get("EVICT_WIDTHS", "").strip()
    log_raw = env.get("EVICT_LOG_INTERVAL", str(DEFAULT_LOG_INTERVAL)).strip()
    try:
        log_interval = int(log_raw)
    except ValueError:
        raise EvictConfigError(
            f"EVICT_LOG_INTERVAL={log_raw!r} is not an integer; give a step count such as 100 (0 = never)"
        ) from None
    if log_interval < 0:
        raise EvictConfigError(f"EVICT_LOG_INTERVAL={log_interval} is negative; use 0 to turn logging off")

    return EvictConfig(
        cost_table=Path(table_raw).expanduser() if table_raw else None,
        widths=_parse_widths(widths_raw) if widths_raw else None,
        decision=_choice("EVICT_DECISION", env.get("EVICT_DECISION", "immediate"), _DECISIONS),
        disable=_bool("EVICT_DISABLE", env.get("EVICT_DISABLE", "0")),
        allow_table_mismatch=_bool("EVICT_ALLOW_TABLE_MISMATCH", env.get("EVICT_ALLOW_TABLE_MISMATCH", "0")),
        backend=_choice("EVICT_BACKEND", env.get("EVICT_BACKEND", "torch"), _BACKENDS),
        log_interval=log_interval,
    )


def missing_table_message() -> str:
    """The start-up error when EVICT runs (not disabled) without ``EVICT_COST_TABLE``."""
    return (
        "EVICT needs a cost table (verify latency by batch size and width) and EVICT_COST_TABLE is not "
        "set; " + PROFILE_HINT
    )


def resolve_widths(
    requested: Sequence[int] | None,
    num_draft_tokens: int,
    table_widths: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The widths to capture: ascending, each in ``[1, N]``, always including ``N``.

    ``N`` (``--speculative-num-draft-tokens``) is added when missing because it is the full tree:
    the fallback for bad scores and the kill switch.  With a table, every width must lie inside the
    table's profiled range (outside it the cost would be extrapolated, which picks wrong widths).
    """
    n = int(num_draft_tokens)
    if n < 2:
        raise EvictConfigError(
            f"--speculative-num-draft-tokens={n}: EVICT needs a draft tree of at least 2 tokens to cut"
        )
    if requested is None:
        widths = {w for w in DEFAULT_WIDTHS if w < n}
    else:
        too_big = [w for w in requested if w > n]
        if too_big:
            raise EvictConfigError(
                f"EVICT_WIDTHS has {too_big} above --speculative-num-draft-tokens={n}; "
                f"widths count verified tokens, so keep them <= {n}"
            )
        widths = {int(w) for w in requested if int(w) >= 1}
    widths.add(n)
    out = tuple(sorted(widths))
    if table_widths:
        lo, hi = min(table_widths), max(table_widths)
        outside = [w for w in out if w < lo or w > hi]
        if outside:
            raise EvictConfigError(
                f"the cost table covers widths {lo}..{hi} but EVICT would capture {list(out)} "
                f"({outside} outside); re-profile up to width {n} "
                f"(`evict-profile --model <target> --backend sglang --out <table.json>`) "
                "or set EVICT_WIDTHS inside the profiled range"
            )
    return out


def load_cost_table(
    config: EvictConfig,
    *,
    model_id: str | None = None,
    config_hash: str | None = None,
    device: str | None = None,
    tp_size: int | None = None,
    dtype: str | None = None,
) -> Any:
    """Load ``EVICT_COST_TABLE`` and check it against the running setup.

    Returns the ``CostTable``.  A missing variable, missing/malformed file or a metadata mismatch
    raises :class:`EvictConfigError` with how to make a matching table (a mismatch only warns under
    ``EVICT_ALLOW_TABLE_MISMATCH=1``).  ``None`` arguments are not compared.
    """
    from evict.profiler.table import CostTable, CostTableError  # noqa: PLC0415 (keep import light)

    if config.cost_table is None:
        raise EvictConfigError(missing_table_message())
    try:
        table = CostTable.load(config.cost_table)
    except CostTableError as exc:
        raise EvictConfigError(
            f"EVICT_COST_TABLE={config.cost_table}: {exc}. To fix: {PROFILE_HINT}"
        ) from exc
    try:
        table.check_compatible(
            model_id=model_id,
            config_hash=config_hash,
            device=device,
            tp_size=tp_size,
            dtype=dtype,
            allow_mismatch=config.allow_table_mismatch,
        )
    except CostTableError as exc:
        raise EvictConfigError(
            f"EVICT_COST_TABLE={config.cost_table}: {exc}. To fix: {PROFILE_HINT}. If you know the table "
            "fits this setup, EVICT_ALLOW_TABLE_MISMATCH=1 turns this error into a warning"
        ) from exc
    return table


def target_config_hash(model_path: str, revision: str | None = None) -> str | None:
    """``model_config_hash`` of the target's raw ``config.json``, as ``evict-profile`` computes it.

    The profiler hashes the file's JSON, not a loaded config object (SGLang's ``ModelConfig``
    adds derived fields such as ``v_head_dim`` to its ``hf_config``, which would change the hash).
    Hub ids are looked up in the local Hugging Face cache; ``None`` (with a warning) if the file
    cannot be found, in which case the architecture check is skipped.
    """
    from evict.profiler.table import model_config_hash  # noqa: PLC0415

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
            "EVICT: no config.json found for %s; the cost table's model hash is not checked", model_path
        )
        return None
    try:
        return model_config_hash(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvictConfigError(
            f"cannot read the target's {cfg_file} to check the cost table ({exc})"
        ) from exc
