"""Process-wide test settings.

Triton reads ``TRITON_INTERPRET`` when a kernel is first decorated or launched, and several modules
(EVICT's kernels, SGLang's tree kernels) decorate theirs at import time. Without a GPU the
interpreter is the only way Triton kernels run, so it is switched on here, before any test module
imports them, rather than in whichever module happens to be collected first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
