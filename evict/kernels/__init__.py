"""Triton kernels for EVICT's width decision, with the torch rule as fallback.

``choose_width_triton`` makes the whole decision on device (no host sync); ``keep_top_triton``
writes the kept indices for a width already chosen (lagged mode). Triton is optional: without it,
or on CPU without ``TRITON_INTERPRET=1``, both call :mod:`evict.truncation`'s torch rule.
"""

from .width import (
    DeviceWidthDecision,
    choose_width_triton,
    keep_top_triton,
    triton_available,
    triton_usable,
)

__all__ = [
    "DeviceWidthDecision",
    "choose_width_triton",
    "keep_top_triton",
    "triton_available",
    "triton_usable",
]
