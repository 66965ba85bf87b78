"""EVICT plugin configuration from ``EVICT_*`` environment variables (pure, no sglang import).

SGLang's ``ServerArgs`` is a sealed struct (a plugin cannot add CLI flags), so the plugin reads its
settings from the environment.  Everything is parsed and validated here, once, at start-up: an
unknown ``EVICT_*`` name (usually a typo) or a bad value is a clear error instead of a silently
ignored setting, and a given but malformed or mismatched cost table stops the server with the fix.
Without ``EVICT_COST_TABLE`` the server calibrates its own table at start-up from its captured
graphs (:mod:`evict.plugin.calibration`) and caches it; with ``EVICT_LIVE_COSTS=1`` (default) every
served decode step corrects it (:mod:`evict.plugin.live_costs`), which is also how a server without
graphs (CPU) gets its costs.  Opening, checking and width resolution are
the shared route of :mod:`evict.profiler.table`; this module only names the plugin's knobs in the
errors.  Importable without sglang so it can be unit-tested anywhere.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evict.truncation.acceptance import ACCEPTANCE_CHOICES
from evict.truncation.tree import num_candidates

__all__ = [
    "ENV_VARS",
    "DEFAULT_WIDTHS",
    "DEFAULT_LOG_INTERVAL",
    "EvictConfig",
    "EvictConfigError",
    "parse_env",
    "resolve_pad_cost",
    "resolve_widths",
    "load_cost_table",
    "target_config_hash",
]

# name -> (default shown in docs, meaning).  docs/serving.md carries the same table.
ENV_VARS: dict[str, tuple[str, str]] = {
    "EVICT_COST_TABLE": (
        "(calibrated at start-up)",
        "JSON cost table to start from instead of the start-up calibration; checked against the model, "
        "device (GPU, or CPU model), TP size and dtype. Unset: the server times its own captured graphs "
        "(or, without graphs, its first served steps) and caches the table; either way every served "
        "step corrects it unless EVICT_LIVE_COSTS=0",
    ),
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
    "EVICT_ACCEPTANCE": (
        "raw",
        "`raw` (rank nodes by the drafter's cumulative probabilities) or `calibrated` (by the online "
        "acceptance estimator, learned from past verifications; same lossless rule)",
    ),
    "EVICT_PER_REQUEST": (
        "0",
        "1 = per-request widths inside the batch: the batch verifies one width, each request keeps its "
        "own best nodes under a batch-wide budget and the rest of its slots are padding (needs "
        "EVICT_DECISION=immediate)",
    ),
    "EVICT_PAD_COST": (
        "the table's measured metadata.padding_cost, else 1",
        "what a padded slot costs relative to a real node, in [0, 1] (used with EVICT_PER_REQUEST=1; "
        "1 = padding computed like a token, so one width for all; lower only where it was measured)",
    ),
    "EVICT_DEPTH": (
        "0",
        "1 = EVICT also decides how deep to draft: each decode step drafts the full tree, or the tree "
        "1..S-1 steps deep (EVICT_DECISION=immediate, raw acceptance), then cuts it to a width as usual, "
        "or drafts nothing and verifies the last token alone (SGLang's steps=0 path: plain decoding, "
        "with the draft extend keeping the drafter warm), whichever the costs and the recent draft "
        "scores say yields more tokens per second (with TP > 1 the ranks agree on the deepest plan)",
    ),
    "EVICT_DEPTH_CHAIN": (
        "1",
        "with EVICT_DEPTH=1: 1 = a chain (topk 1, drafted with the drafter's probabilities) of each depth "
        "2..S whose length fills a captured width exactly is a candidate too, so under load EVICT can "
        "draft SGLang's cheap default chain instead of the tree; 0 = tree depths only",
    ),
    "EVICT_LOG_INTERVAL": ("100", "log EVICT metrics every N decode steps (0 = never)"),
    "EVICT_LIVE_COSTS": (
        "1 (0 under --enable-deterministic-inference)",
        "1 = correct the step costs from every served decode step (median per batch-size bucket and "
        "width; without captured graphs or a table, the server times its widths on its first steps); "
        "0 = keep the start-up table as it is (widths then depend on the scores only, so seeded "
        "sampling repeats)",
    ),
    "EVICT_RECALIBRATE": ("0", "1 = ignore the cached start-up calibration and measure the table again"),
    "EVICT_CACHE_DIR": (
        "$XDG_CACHE_HOME/evict",
        "where calibrated cost tables are cached (default ~/.cache/evict when XDG_CACHE_HOME is unset)",
    ),
}

logger = logging.getLogger(__name__)

DEFAULT_WIDTHS: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
DEFAULT_LOG_INTERVAL = 100
_DECISIONS = ("immediate", "lagged")
_BACKENDS = ("torch", "triton")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

PROFILE_HINT = (
    "unset EVICT_COST_TABLE and the server calibrates its own table (timed on its captured graphs at "
    "start-up, or on its first served steps without graphs; corrected on every step and cached for "
    "the next start), or give a table made for this model, device, TP size and dtype; "
    "EVICT_DISABLE=1 serves the full EAGLE-3 tree"
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
    recalibrate: bool = False  # EVICT_RECALIBRATE: ignore a cached calibration
    acceptance: str = "raw"  # EVICT_ACCEPTANCE: "raw" | "calibrated"
    per_request: bool = False  # EVICT_PER_REQUEST: per-request widths inside the batch
    pad_cost: float | None = None  # EVICT_PAD_COST; None = the table's measured padding_cost, else 1
    # EVICT_LIVE_COSTS: correct the table from measured decode steps; None = unset (on, except under
    # deterministic inference, where widths that follow timings would change seeded samples)
    live_costs: bool | None = None
    depth: bool = False  # EVICT_DEPTH: plain decoding is a candidate each step
    depth_chain: bool = True  # EVICT_DEPTH_CHAIN: with EVICT_DEPTH, chains are candidates too

    @property
    def policy_decision(self) -> str:
        """The ``TruncationPolicy`` decision: ``off`` under the kill switch, else the user's."""
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


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    """The variable's value, or ``default`` when it is unset or blank.

    ``EVICT_X=`` (often left behind by a launch script's ``EVICT_X=$UNSET_VAR``) means "unset" for
    every variable alike, not a bad value for some and the default for others.
    """
    raw = env.get(name, "")
    return raw if raw.strip() else default


# EVICT_* names the project's tooling reads (GPU launcher, stand-ins, bundle, GPU check): they reach
# the server's environment by design, so they are not typos of plugin settings.
TOOLING_ENV_VARS: frozenset[str] = frozenset(
    {
        "EVICT_CUDA_SHIM",
        "EVICT_CUDA_SHIM_ALLOW_JIT",
        "EVICT_GPU_SITE",
        "EVICT_GPU_CHECK_WIDTHS",
        "EVICT_GPU_WHEELS",
        "EVICT_BUNDLE_PYTHON",
        "EVICT_PROBE_FAKE_CUDA",
        "EVICT_PROBE_PRELUDE",
    }
)


def parse_env(environ: Mapping[str, str] | None = None) -> EvictConfig:
    """Parse and validate the ``EVICT_*`` variables of ``environ`` (default ``os.environ``).

    Raises :class:`EvictConfigError` for an unknown ``EVICT_*`` name (with the closest known name)
    or a malformed value.  No variable is required: without ``EVICT_COST_TABLE`` the server
    calibrates at start-up.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(
        k for k in env if k.startswith("EVICT_") and k not in ENV_VARS and k not in TOOLING_ENV_VARS
    )
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
    log_raw = _get(env, "EVICT_LOG_INTERVAL", str(DEFAULT_LOG_INTERVAL)).strip()
    try:
        log_interval = int(log_raw)
    except ValueError:
        raise EvictConfigError(
            f"EVICT_LOG_INTERVAL={log_raw!r} is not an integer; give a step count such as 100 (0 = never)"
        ) from None
    if log_interval < 0:
        raise EvictConfigError(f"EVICT_LOG_INTERVAL={log_interval} is negative; use 0 to turn logging off")

    per_request = _bool("EVICT_PER_REQUEST", _get(env, "EVICT_PER_REQUEST", "0"))
    decision = _choice("EVICT_DECISION", _get(env, "EVICT_DECISION", "immediate"), _DECISIONS)
    if per_request and decision != "immediate":
        raise EvictConfigError(
            f"EVICT_PER_REQUEST=1 needs EVICT_DECISION=immediate (got {decision!r}): the batch-wide budget "
            "is chosen from this step's scores, so a lagged decision would sync the host anyway; unset "
            "EVICT_DECISION or EVICT_PER_REQUEST"
        )
    pad_raw = _get(env, "EVICT_PAD_COST", "").strip()
    pad_cost = None
    if pad_raw:
        try:
            pad_cost = float(pad_raw)
        except ValueError:
            raise EvictConfigError(
                f"EVICT_PAD_COST={pad_raw!r} is not a number; give a fraction of a node's cost in [0, 1] "
                "(0 = padding is free, 1 = it costs a token)"
            ) from None
        if not 0.0 <= pad_cost <= 1.0:  # also refuses nan
            raise EvictConfigError(
                f"EVICT_PAD_COST={pad_raw!r} is outside [0, 1]; give a fraction of a node's cost "
                "(0 = padding is free, 1 = it costs a token)"
            )

    return EvictConfig(
        cost_table=Path(table_raw).expanduser() if table_raw else None,
        widths=_parse_widths(widths_raw) if widths_raw else None,
        decision=decision,
        disable=_bool("EVICT_DISABLE", _get(env, "EVICT_DISABLE", "0")),
        allow_table_mismatch=_bool(
            "EVICT_ALLOW_TABLE_MISMATCH", _get(env, "EVICT_ALLOW_TABLE_MISMATCH", "0")
        ),
        backend=_choice("EVICT_BACKEND", _get(env, "EVICT_BACKEND", "torch"), _BACKENDS),
        log_interval=log_interval,
        recalibrate=_bool("EVICT_RECALIBRATE", _get(env, "EVICT_RECALIBRATE", "0")),
        acceptance=_choice("EVICT_ACCEPTANCE", _get(env, "EVICT_ACCEPTANCE", "raw"), ACCEPTANCE_CHOICES),
        per_request=per_request,
        pad_cost=pad_cost,
        depth=_bool("EVICT_DEPTH", _get(env, "EVICT_DEPTH", "0")),
        depth_chain=_bool("EVICT_DEPTH_CHAIN", _get(env, "EVICT_DEPTH_CHAIN", "1")),
        live_costs=(
            _bool("EVICT_LIVE_COSTS", env["EVICT_LIVE_COSTS"])
            if env.get("EVICT_LIVE_COSTS", "").strip()
            else None
        ),
    )


def _is_measured(meta: Mapping[str, Any]) -> bool:
    """Whether a table's numbers were measured (not modeled or illustrative, see configs/)."""
    if meta.get("modeled") or meta.get("illustrative"):
        return False
    return str(meta.get("backend", "")).lower() not in ("modeled", "illustrative")


def resolve_pad_cost(config: EvictConfig, table: Any = None) -> float:
    """``EVICT_PAD_COST``, else the table's *measured* ``metadata.padding_cost``, else 1.

    1: a padded slot costs what a real node costs.  Why not less by default: a padded slot holds
    the root token, which routes to experts the batch already reads only in the first MoE layer;
    after the first attention layer its hidden state depends on its position and its ancestors'
    (padded) slots, so its routing, and its cost, are its own.  A modeled table's
    ``padding_cost`` (such a model assumes the premise) is ignored with a warning.  A table value
    outside [0, 1] is a configuration error naming the table.
    """
    if config.pad_cost is not None:
        return float(config.pad_cost)
    meta = getattr(table, "metadata", None) or {}
    if "padding_cost" in meta and not _is_measured(meta):
        logger.warning(
            "EVICT: %s: metadata.padding_cost=%r is not a measurement (the table is modeled); using pad cost "
            "1 (a padded slot costs a node). Set EVICT_PAD_COST to a value measured on this GPU to override",
            config.cost_table,
            meta["padding_cost"],
        )
        return 1.0
    raw = meta.get("padding_cost", 1.0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise EvictConfigError(
            f"EVICT_COST_TABLE={config.cost_table}: metadata.padding_cost={raw!r} is not a number in [0, 1]; "
            "fix the table or set EVICT_PAD_COST"
        )
    return value


def resolve_widths(
    requested: Sequence[int] | None,
    num_draft_tokens: int,
    table_widths: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The widths to capture: ascending, each in ``[1, N]``, always including ``N``.

    :func:`evict.profiler.table.resolve_widths` with the plugin's default set
    (:data:`DEFAULT_WIDTHS` below N, since every width costs a CUDA-graph state) and, when a table is
    given, the rule that every captured width lies in its measured range; errors name the plugin's
    knobs (``EVICT_WIDTHS``, ``--speculative-num-draft-tokens``).
    """
    from evict.profiler.table import CostTableError  # noqa: PLC0415 (keep import light)
    from evict.profiler.table import resolve_widths as _resolve  # noqa: PLC0415

    try:
        return _resolve(num_draft_tokens, requested, table_widths, default=DEFAULT_WIDTHS, within_table=True)
    except CostTableError as exc:
        raise EvictConfigError(
            f"EVICT_WIDTHS={','.join(map(str, requested)) if requested else '(default)'} with "
            f"--speculative-num-draft-tokens={num_draft_tokens}: {exc}"
            + (
                " (EVICT_WIDTHS, or unset EVICT_COST_TABLE so that the start-up calibration measures "
                "exactly the captured widths)"
                if table_widths
                else ""
            )
        ) from exc


def served_widths(
    config: EvictConfig, num_draft_tokens: int, table_widths: Sequence[int] | None = None
) -> tuple[int, ...]:
    """The verify widths the server captures: ``EVICT_WIDTHS`` resolved against N and the table,
    plus width 1 under ``EVICT_DEPTH=1`` (a plain step verifies the last token alone). Shared by
    the launch-time memory reserve and the worker, so the reserve covers every width captured."""
    widths = resolve_widths(config.widths, num_draft_tokens, table_widths)
    return (1, *widths) if config.depth and 1 not in widths else widths


def depth_width(steps: int, topk: int, num_draft_tokens: int, widths: Sequence[int]) -> int:
    """``n_d``: the widest captured width a ``steps``-deep tree fills (root included)."""
    cap = min(int(num_draft_tokens), num_candidates(int(steps), int(topk)) + 1)
    return max((int(w) for w in widths if int(w) <= cap), default=1)


def served_depths(
    config: EvictConfig, steps: int, topk: int, num_draft_tokens: int, widths: Sequence[int]
) -> tuple[list[int], str]:
    """The draft depths ``EVICT_DEPTH=1`` offers besides plain decoding (the full one last), and why
    only the full one if so.

    A shallower depth needs a captured width of 2 or more that its candidates fill, and is decided
    by the plain width rule only (the per-request budget, the lagged held width and the calibrated
    estimator assume the full tree's layout). One function for the launch-time memory reserve and
    the worker's draft states, so the reserve plans exactly the states the worker builds.
    """
    if config.per_request or config.policy_decision != "immediate" or config.acceptance != "raw":
        why = "shallower trees need EVICT_DECISION=immediate, EVICT_ACCEPTANCE=raw, EVICT_PER_REQUEST=0"
        return [int(steps)], why
    shallow = [d for d in range(1, int(steps)) if depth_width(d, topk, num_draft_tokens, widths) >= 2]
    return [*shallow, int(steps)], ""


def served_chains(
    config: EvictConfig, steps: int, topk: int, num_draft_tokens: int, widths: Sequence[int]
) -> list[int]:
    """The chain lengths ``EVICT_DEPTH=1`` offers beside the tree's depths (``EVICT_DEPTH_CHAIN``).

    A chain of ``d`` drafts ``d`` tokens with one row per request (the tree drafts ``topk``), so
    under load it is the cheap shape (SGLang's MoE default is the ``(3, 1, 4)`` chain). Offered:
    ``d`` in 2..S whose ``d + 1`` tokens fill a captured width exactly (a chain cut shorter is a
    shorter chain that costs more to draft; a one-step chain is the depth-1 tree cut to width 2, at
    the same price), under the same conditions as the shallower trees (:func:`served_depths`).
    """
    if not config.depth or not config.depth_chain or int(topk) < 2:
        return []
    if served_depths(config, steps, topk, num_draft_tokens, widths)[1]:
        return []
    return [d for d in range(2, int(steps) + 1) if depth_width(d, 1, num_draft_tokens, widths) == d + 1]


def load_cost_table(
    config: EvictConfig,
    *,
    model_id: str | None = None,
    config_hash: str | None = None,
    device: str | None = None,
    tp_size: int | None = None,
    dtype: str | None = None,
) -> Any:
    """Open ``EVICT_COST_TABLE`` with :meth:`CostTable.open` and check it against the running setup.

    Returns the ``CostTable``, or ``None`` when the variable is unset: the server then calibrates
    its own table after capturing its graphs (:func:`evict.plugin.calibration.calibrate_or_load`).
    A missing/malformed file or a metadata mismatch raises :class:`EvictConfigError` with the fix
    (a mismatch only warns under ``EVICT_ALLOW_TABLE_MISMATCH=1``). ``None`` arguments are not compared.
    """
    from evict.profiler.table import CostTable, CostTableError  # noqa: PLC0415 (keep import light)

    if config.cost_table is None:
        return None
    try:
        CostTable.load(config.cost_table)
    except CostTableError as exc:
        raise EvictConfigError(
            f"EVICT_COST_TABLE={config.cost_table}: {exc}. To fix: {PROFILE_HINT}"
        ) from exc
    try:
        return CostTable.open(
            config.cost_table,
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


def target_config_hash(model_path: str, revision: str | None = None) -> str | None:
    """The target's identity for cost tables: :func:`evict.profiler.table.checkpoint_config_hash`
    (the raw ``config.json``'s architecture hash, as the profiler and the calibration cache use).

    ``None`` (with a warning) when no config.json is found; the architecture check is then skipped.
    """
    from evict.profiler.table import CostTableError, checkpoint_config_hash  # noqa: PLC0415

    try:
        return checkpoint_config_hash(model_path, revision=revision)
    except CostTableError as exc:
        raise EvictConfigError(str(exc)) from exc
