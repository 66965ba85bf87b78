"""The lookup behind every module of the stand-in ``sgl_kernel`` package (evict cuda shim).

Why: SGLang 0.5.23 imports about a hundred names from ``sgl_kernel`` at module level on CUDA,
most for paths the served configuration never takes (quantized GEMMs, MLA, host KV transfer).
Each module of this package answers three kinds of name:

* routed: a stand-in of ``evict.testing.cuda_ops`` (the operators the served path calls);
* import-only: a placeholder whose call raises ``NotImplementedError`` naming the operator, so
  ``from sgl_kernel import X`` succeeds and only a call on an unsupported path fails;
* anything else: ``AttributeError``, so ``from sgl_kernel import X`` raises ``ImportError`` and
  SGLang's own ``try: ... except ImportError`` probes (``awq_dequantize``,
  ``fused_qk_rope_with_cos_sin_cache_inplace``, ``tree_speculative_sampling_target_only``, ...)
  take their fallbacks, as on a machine whose sgl-kernel lacks the op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def not_implemented(qualname: str) -> Callable[..., Any]:
    """A placeholder for an operator that is imported but has no stand-in."""

    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{qualname} is not available: sgl_kernel here is the evict cuda shim "
            "(evict/testing/cuda_shim), which has stand-ins only for the operators the served "
            "configuration calls (evict/testing/cuda_ops.py); this path needs the real sgl-kernel"
        )

    op.__name__ = qualname.rsplit(".", 1)[-1]
    op.__qualname__ = qualname
    return op


def make_getattr(module: str, routed: dict[str, str], import_only: Iterable[str]) -> Callable[[str], Any]:
    """``__getattr__`` for ``module``: ``routed`` maps a name to its ``cuda_ops`` attribute."""
    placeholders = frozenset(import_only)

    def __getattr__(name: str) -> Any:
        if name in routed:
            from evict.testing import cuda_ops

            return getattr(cuda_ops, routed[name])
        if name in placeholders:
            return not_implemented(f"{module}.{name}")
        raise AttributeError(
            f"module {module!r} (evict cuda shim for sglang 0.5.23) has no attribute {name!r}"
        )

    return __getattr__
