"""On-device width decision: ``TritonDecider`` (``make_decider``), ``choose_width_triton``, ``keep_top_triton``.

Why: at high batch sizes and short steps the width decision must cost a few microseconds of GPU
time and must not copy the ``[bs, K]`` scores to the host in the step's critical path. The Triton
path makes the whole decision on device (two launches, static shapes, no host sync, so it can sit
inside a CUDA graph); only the caller decides when to read the chosen width back (one int, through
:meth:`DeviceWidthDecision.to_width_decision`), or never (a lagged decision keeps the index on device).

The rule itself lives in :mod:`evict.truncation.rule`; the kernels reproduce it exactly (same
sanitizing, same stable tie-breaking, same clamping, same fallback) and implement its
:class:`evict.truncation.Decider` contract. There is no torch fallback here: where a kernel cannot
run (no triton, a CPU without ``TRITON_INTERPRET=1``, a shape it does not take) it raises
:class:`KernelUnavailable`, and ``TruncationPolicy`` uses the torch rule from then on. This module
imports only public names of :mod:`evict.truncation`; the truncation package never imports it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evict.truncation import (
    TORCH_RULE,
    Decider,
    WidthDecision,
    validate_scores,
    validate_step_cost,
    validate_widths,
)

__all__ = [
    "BACKENDS",
    "DeviceWidthDecision",
    "KernelUnavailable",
    "TritonDecider",
    "choose_width_triton",
    "keep_top_triton",
    "make_decider",
    "triton_available",
    "triton_usable",
]

logger = logging.getLogger("evict")

BACKENDS = ("torch", "triton")  # what EVICT_BACKEND and --backend offer: make_decider's names
MAX_K = 1024  # the pairwise ranking is O(K^2) per request; SGLang trees have K <= a few hundred


class KernelUnavailable(ValueError, NotImplementedError):
    """The kernels cannot run on these inputs; the message says how to make them run.

    A ``NotImplementedError``, as the :class:`evict.truncation.Decider` contract asks: the policy
    then switches to the torch rule with one warning.
    """


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional dependency)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``.

    CUDA tensors need a compiled Triton; CPU tensors need Triton's interpreter
    (``TRITON_INTERPRET=1``, set before the first kernel use) -- slow, but exact: the CI path.
    """
    if not triton_available():
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and _interpret_requested()


@dataclass
class DeviceWidthDecision:
    """A width decision that lives on the scores' device (nothing here forced a host sync).

    ``kept`` has a static shape ``[bs, K]``: row r holds the ``width - 1`` kept flat indices in
    ascending order (SGLang's ``organize_draft_results`` order), then ``-1`` padding.
    """

    width: torch.Tensor  # 0-d long: effective width m* (root included, clamped to K + 1)
    width_index: torch.Tensor  # 0-d long: index of m* in widths (own choice, or the forced index)
    best_index: torch.Tensor  # 0-d long: this step's own choice, argmax or fallback (lagged carries it)
    kept: torch.Tensor  # long [bs, K], -1 padded
    objective: torch.Tensor  # float32 [W]: sum_r B_r(m) / T(bs, m)
    expected_accepted: torch.Tensor  # float32 [bs]: B_r(m*)
    fallback: torch.Tensor  # bool [bs]: rows with NaN/inf/negative scores

    def to_width_decision(self, index: int | None = None, width: int | None = None) -> WidthDecision:
        """Convert to the host-facing :class:`evict.truncation.WidthDecision`.

        Without arguments this reads two ints (index and width) back in one copy: the only sync,
        and the caller chooses where it happens.  A caller that forced the index already knows both
        (lagged and off decisions) and passes them: then nothing is read.
        """
        if index is None or width is None:
            idx, width = (int(v) for v in torch.stack([self.width_index, self.width]).tolist())
        else:
            idx, width = int(index), int(width)
        return WidthDecision(
            width=width,
            width_index=idx,
            kept=self.kept[:, : width - 1],
            objective=self.objective,
            expected_accepted=self.expected_accepted,
            fallback=self.fallback,
            best_index=self.best_index,
        )


class TritonDecider:
    """The Triton kernels as a :class:`evict.truncation.Decider` (``make_decider("triton")``)."""

    backend = "triton"

    def __call__(
        self,
        scores: torch.Tensor,
        step_cost: torch.Tensor | Sequence[float],
        widths: torch.Tensor | Sequence[int],
        *,
        index: int | None = None,
        check: bool = True,
    ) -> WidthDecision:
        """:func:`choose_width_triton`, read back as :func:`evict.truncation.choose_width` returns it.

        With ``index`` the width is known on the host from ``widths`` (pass host widths, e.g. a
        tuple, as ``TruncationPolicy`` does): nothing is read from the device.
        """
        d = choose_width_triton(scores, step_cost, widths, index=index, check=check)
        if index is None:
            return d.to_width_decision()
        values = widths.tolist() if isinstance(widths, torch.Tensor) else widths
        return d.to_width_decision(index, min(int(values[index]), scores.shape[1] + 1))


def make_decider(backend: str) -> Decider:
    """The decider behind a backend name, chosen once when a policy is built.

    ``TruncationPolicy(cost, widths, decider=make_decider(name))`` is how the engine CLI, the bench
    (``--backend``) and the plugin (``EVICT_BACKEND``) turn the name into an implementation.
    ``"triton"`` without the triton package logs one warning and gives the torch rule.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return TORCH_RULE
    if not triton_available():
        logger.warning(
            "evict: Triton width kernel unavailable (the triton package is not installed); using the torch rule"
        )
        return TORCH_RULE
    return TritonDecider()


def _check_runnable(scores: torch.Tensor) -> None:
    """Raise :class:`KernelUnavailable`, with the fix, when the kernels cannot take ``scores``."""
    if not triton_available():
        raise KernelUnavailable("the Triton kernels need the triton package: pip install 'evict[triton]'")
    if not triton_usable(scores.device):
        raise KernelUnavailable(
            f"the Triton kernels cannot run on {scores.device} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 (before the first call) to run them on CPU in Triton's interpreter"
        )
    if not (0 < scores.shape[0] and 0 < scores.shape[1] <= MAX_K):
        raise KernelUnavailable(
            f"the Triton kernels take 1 <= bs and 1 <= K <= {MAX_K}, got scores of shape "
            f"{tuple(scores.shape)}; use the torch rule (evict.truncation.choose_width)"
        )


def _kernels():  # noqa: ANN202 (the module is optional: no annotation that imports triton)
    from . import _triton_width as tw  # noqa: PLC0415 (triton is optional; import on first use)

    if tw.INTERPRETED != tw.interpreting():
        raise RuntimeError(
            "TRITON_INTERPRET changed after the EVICT kernels were first used in this process; "
            "set it once, before the first call (tests: at the top of the module)"
        )
    return tw


# No multiply-add contraction: the arithmetic must round exactly as the torch rule's (there is no
# a*b+c in the kernels today; this keeps it so and states it instead of relying on the default).
_LAUNCH = {"enable_fp_fusion": False}


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _tiles(bs: int, k: int) -> dict[str, int]:
    """Tile sizes: K (row), J (ranking column tile), R (rows per program).

    On a GPU one program per request (R=1) spreads the batch over the SMs. Triton's CPU
    interpreter pays per operation, not per element, so there a program takes as many rows as fit
    a 64k-element [R, K, J] comparison tile.
    """
    block_k = _pow2(k, 16)
    block_j = max(1, min(block_k, 4096 // block_k))  # whole row up to K=64, then 4k-element tiles
    block_r = 1
    if _kernels().INTERPRETED:
        block_r = min(_pow2(bs), max(1, 65536 // (block_k * block_j)))
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_J": block_j}


def _check_index(index: int | torch.Tensor, num_widths: int) -> int | torch.Tensor:
    """A forced width index: an int in range (kept on the host) or a 0-d tensor (clamped on device)."""
    if isinstance(index, torch.Tensor):
        if index.numel() != 1:
            raise ValueError(f"index must be a 0-d tensor or an int, got shape {tuple(index.shape)}")
        return index.reshape(()).to(dtype=torch.long)
    if isinstance(index, bool) or int(index) != index or not 0 <= int(index) < num_widths:
        raise ValueError(f"index must be an int in [0, {num_widths}) (a position in widths), got {index!r}")
    return int(index)


@functools.lru_cache(maxsize=64)
def _widths_on(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _device_widths(widths: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """``widths`` as a contiguous long tensor on ``device``.

    Host widths are copied once per (values, device), not per step: a per-step copy from pageable
    host memory would wait for the GPU.
    """
    if isinstance(widths, torch.Tensor) and widths.device == device:
        return widths.to(dtype=torch.long).contiguous()
    values = widths.tolist() if isinstance(widths, torch.Tensor) else widths
    return _widths_on(tuple(int(v) for v in values), device)


def choose_width_triton(
    scores: torch.Tensor,
    step_cost: torch.Tensor | Sequence[float],
    widths: torch.Tensor | Sequence[int],
    *,
    index: int | torch.Tensor | None = None,
    check: bool = True,
) -> DeviceWidthDecision:
    """EVICT's width decision for one step, on the scores' device, without a host sync.

    Same rule and results as :func:`evict.truncation.choose_width` (global argmax over widths of
    ``sum_r B_r(m) / T(m)``, ties to the smaller width, widths above K+1 clamped, any NaN/inf/
    negative row -> largest allowed width), returned as a :class:`DeviceWidthDecision`.

    Args:
        scores: ``[bs, K]`` cumulative drafter probabilities (any float dtype; read as float32).
        step_cost: ``[W]`` step times ``T(bs, m)`` for this batch size (``CostTable.step_cost``).
        widths: ``[W]`` allowed widths, strictly ascending.
        index: use this width index, as given, instead of this step's own choice (lagged:
            the previous step's ``best_index``; ``"off"``: ``W - 1``). Rows with bad scores
            are then cut on their ramp (ancestor-closed, so still lossless) and ``best_index``
            still reports this step's own choice, fallback included, for the next step.
        check: validate ``widths``/``step_cost`` (reads them on the host: pass ``False`` in the
            step loop once they were validated, as ``TruncationPolicy`` does).

    Raises :class:`KernelUnavailable` where the kernels cannot run (see :func:`triton_usable`,
    and ``1 <= bs``, ``1 <= K <= 1024``).
    """
    validate_scores(scores)
    dev = scores.device
    if check:
        widths = validate_widths(widths)
        step_cost = validate_step_cost(step_cost, widths.numel())
    w = _device_widths(widths, dev)
    c = torch.as_tensor(step_cost, dtype=torch.float32).to(dev).contiguous()
    num_w = w.numel()
    forced = None if index is None else _check_index(index, num_w)
    _check_runnable(scores)
    idx_t = None
    if forced is not None:  # a launch argument on device: filled, not copied, so no sync
        idx_t = forced.to(dev) if isinstance(forced, torch.Tensor) else torch.full((), forced, device=dev)

    tw = _kernels()
    bs, k = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    t = _tiles(bs, k)
    grid = (-(-bs // t["BLOCK_R"]),)
    block_w = _pow2(num_w, 16)
    benefit = torch.empty((bs, num_w), dtype=torch.float32, device=dev)
    rank = torch.empty((bs, k), dtype=torch.int32, device=dev)
    bad = torch.empty((bs,), dtype=torch.int8, device=dev)
    tw.rank_kernel[grid](
        scores,
        scores.stride(0),
        w,
        w,
        benefit,
        rank,
        bad,
        rank,
        bs,
        k,
        num_w,
        KEEP_ONLY=False,
        BLOCK_W=block_w,
        **t,
        **_LAUNCH,
    )
    objective = torch.empty((num_w,), dtype=torch.float32, device=dev)
    best = torch.empty((), dtype=torch.long, device=dev)
    chosen = torch.empty((), dtype=torch.long, device=dev)
    width = torch.empty((), dtype=torch.long, device=dev)
    expected = torch.empty((bs,), dtype=torch.float32, device=dev)
    kept = torch.empty((bs, k), dtype=torch.long, device=dev)
    tw.decide_kernel[grid](
        benefit,
        bad,
        c,
        w,
        rank,
        chosen if idx_t is None else idx_t,
        objective,
        best,
        chosen,
        width,
        expected,
        kept,
        bs,
        k,
        num_w,
        HAS_INDEX=idx_t is not None,
        BLOCK_R=t["BLOCK_R"],
        BLOCK_K=t["BLOCK_K"],
        BLOCK_W=block_w,
        BLOCK_B=min(64, _pow2(bs)),
        **_LAUNCH,
    )
    return DeviceWidthDecision(
        width=width,
        width_index=chosen,
        best_index=best,
        kept=kept,
        objective=objective,
        expected_accepted=expected,
        fallback=bad.bool(),
    )


def keep_top_triton(scores: torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """Kept flat indices for a width that is already known (a lagged decision), on device.

    Same result as :func:`evict.truncation.keep_top`. With an int ``width`` the shape is
    ``[bs, min(width, K+1) - 1]`` (exactly ``keep_top``'s); with a 0-d device tensor (e.g. the
    previous step's chosen width, never read on the host) it is ``[bs, K]`` with -1 padding.
    """
    validate_scores(scores)
    bs, k = scores.shape
    if isinstance(width, torch.Tensor):
        if width.numel() != 1:
            raise ValueError(f"width must be an int or a 0-d tensor, got shape {tuple(width.shape)}")
        width_t = width.reshape(()).to(device=scores.device, dtype=torch.long)
        n = None
    else:
        if isinstance(width, bool) or int(width) != width or width < 1:
            raise ValueError(f"width m must be an int >= 1 (it counts the root), got {width!r}")
        width_t = torch.full((), int(width), dtype=torch.long, device=scores.device)
        n = min(int(width), k + 1) - 1
    _check_runnable(scores)
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    kept = torch.empty((bs, k), dtype=torch.long, device=scores.device)
    tw = _kernels()
    t = _tiles(bs, k)
    tw.rank_kernel[(-(-bs // t["BLOCK_R"]),)](
        scores,
        scores.stride(0),
        width_t,
        width_t,
        kept,
        kept,
        kept,
        kept,
        bs,
        k,
        1,
        KEEP_ONLY=True,
        BLOCK_W=16,
        **t,
        **_LAUNCH,
    )
    return kept if n is None else kept[:, :n]
