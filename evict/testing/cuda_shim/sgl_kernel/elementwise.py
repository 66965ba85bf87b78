"""``sgl_kernel.elementwise`` of the evict cuda shim: names SGLang 0.5.23 imports from it (never called on the served path)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr("sgl_kernel.elementwise", {}, ("copy_to_gpu_no_ce",))
