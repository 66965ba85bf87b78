"""Triton kernels for EVICT's width decision: an implementation of ``evict.truncation.Decider``.

``make_decider("triton")`` gives the policy its kernel (``TritonDecider``): the whole decision on
device, no host sync. ``choose_width_triton`` and ``keep_top_triton`` are the kernels' own entry
points. Triton is optional, and the kernels have no torch fallback of their own: where they cannot
run they raise ``KernelUnavailable`` and ``TruncationPolicy`` uses the torch rule.
"""

from .width import (
    BACKENDS,
    DeviceWidthDecision,
    KernelUnavailable,
    TritonDecider,
    choose_width_triton,
    keep_top_triton,
    make_decider,
    triton_available,
    triton_usable,
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
