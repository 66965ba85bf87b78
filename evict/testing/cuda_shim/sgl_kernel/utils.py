"""``sgl_kernel.utils`` of the evict cuda shim: names SGLang 0.5.23 imports from it (the triton attention backend calls is_arch_support_pdl at init)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr("sgl_kernel.utils", {"is_arch_support_pdl": "is_arch_support_pdl"}, ())
