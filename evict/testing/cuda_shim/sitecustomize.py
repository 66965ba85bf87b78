"""Process start-up patches for serving SGLang 0.5.23 on CUDA without sgl-kernel, FlashInfer or
tvm-ffi (launcher and every process SGLang spawns). Acts only when ``EVICT_CUDA_SHIM=1``.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the launcher puts this directory
first on ``PYTHONPATH`` (which also makes its ``sgl_kernel`` stub package the one SGLang imports).
Nothing is imported eagerly: an import hook patches each SGLang module right after it executes,
before any other module can ``from``-import its names.

* JIT operators (``sglang.kernels.ops.*``): the ``_jit_*_module`` factories of the operators on
  the served path (``evict.testing.cuda_ops.JIT_FACTORIES``: activation, RoPE, KV store,
  clamp_position, draft tree, tree sampling) return ``cuda_ops.JitStandIn`` objects instead of
  compiling with nvcc and loading with tvm-ffi. SGLang's Python wrappers around them run as is.
* ``sglang.kernels.jit.utils.compile.loader.load_jit``: every other JIT build raises a
  ``RuntimeError`` naming the module. SGLang probes several optional fast paths by trying the
  build (``can_use_fused_inplace_qknorm``, ``can_use_fused_qk_norm_rope``, the rmsnorm_hf
  kernel) and takes its torch / sgl_kernel fallback on failure, which is what the served path
  wants. ``EVICT_CUDA_SHIM_ALLOW_JIT=1`` lets those builds through (a machine with nvcc and a real
  tvm-ffi can then compile them).
* ``sglang.kernels.ops.sampling.renorm``: top-k / top-p renormalization are FlashInfer's on CUDA
  (lazily imported, so the first sampled speculative verify would fail); they become SGLang's own
  Triton kernels (what it uses on ROCm), through ``cuda_ops``.
* ``sglang.srt.models.qwen3_moe``: ``Qwen3MoeAttention`` passes a fused KV-buffer write to its
  rotary embedding whenever the KV pool is bf16, but for head sizes outside {64, 128, 256, 512}
  (the testbed's 32) ``RotaryEmbedding.forward_cuda`` takes the fallback kernel, which asserts
  ``fused_set_kv_buffer_arg is None``. The patch marks such layers incompatible with the fused
  write, so the attention backend stores K/V itself (``save_kv_cache=True``), as SGLang does for
  MRoPE layers.
* ``tvm_ffi``: ``sglang.kernels.ops.communication.all_reduce`` (imported by every server
  process) does ``import tvm_ffi`` and subclasses ``tvm_ffi.Object`` at module level. When no
  ``tvm_ffi`` is installed, a minimal stand-in module is served (a finder at the end of
  ``sys.meta_path``, so a real tvm-ffi always wins); custom all-reduce needs TP > 1 and is never
  reached with one GPU. xgrammar needs the real tvm-ffi: carry both or neither.

A patch whose target is missing raises ``RuntimeError`` naming sglang 0.5.23, so a different
SGLang fails at start-up rather than serving with half the stand-ins in place.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types


def _missing(module: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"evict cuda shim: {module} has no {what}; this shim targets sglang 0.5.23 "
        "(evict/testing/cuda_shim/sitecustomize.py)"
    )


def _patch_jit_factories(module) -> None:
    from evict.testing import cuda_ops

    for name, factory in cuda_ops.JIT_FACTORIES[module.__name__].items():
        if not callable(getattr(module, name, None)):
            raise _missing(module.__name__, name)
        setattr(module, name, factory)


def _patch_loader(module) -> None:
    original = getattr(module, "load_jit", None)
    if original is None:
        raise _missing(module.__name__, "load_jit")
    if os.environ.get("EVICT_CUDA_SHIM_ALLOW_JIT", "0") == "1":
        return

    def load_jit(*args, **kwargs):
        raise RuntimeError(
            f"evict cuda shim: JIT module {args[0] if args else '?'!r} is not built here (no "
            "sgl-kernel toolchain); the served path uses the stand-ins of evict/testing/cuda_ops.py "
            "and SGLang falls back where it probes. Set EVICT_CUDA_SHIM_ALLOW_JIT=1 to compile it."
        )

    load_jit.__wrapped__ = original
    module.load_jit = load_jit


def _patch_renorm(module) -> None:
    from evict.testing import cuda_ops

    if not hasattr(module, "top_k_renorm_prob") or not hasattr(module, "top_p_renorm_prob"):
        raise _missing(module.__name__, "top_k_renorm_prob / top_p_renorm_prob")
    module.top_k_renorm_prob = cuda_ops.top_k_renorm_prob
    module.top_p_renorm_prob = cuda_ops.top_p_renorm_prob


def _patch_qwen3_moe(module) -> None:
    attention = getattr(module, "Qwen3MoeAttention", None)
    original = getattr(attention, "__init__", None)
    if attention is None or original is None:
        raise _missing(module.__name__, "Qwen3MoeAttention")

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not hasattr(self, "compatible_with_fused_kv_buffer"):
            raise _missing(module.__name__, "Qwen3MoeAttention.compatible_with_fused_kv_buffer")
        if getattr(self.rotary_emb, "use_fallback_kernel", False):
            # the fallback RoPE kernel cannot write the KV buffer (base.py forward_cuda asserts)
            self.compatible_with_fused_kv_buffer = False

    __init__.__wrapped__ = original
    attention.__init__ = __init__


def _patch_dual_gemm(module) -> None:
    """Llama MLPs (the EAGLE-3 drafter) pick a CuTe-DSL dual GEMM on CUDA, which needs the
    ``cutlass`` (nvidia-cutlass-dsl) package; without it, keep the plain gate_up/down path."""
    cls = getattr(module, "DualGemm", None)
    original = getattr(cls, "_select_mode", None)
    if original is None:
        raise RuntimeError(
            "evict cuda_shim: sglang.srt.layers.dual_gemm.DualGemm._select_mode is missing; "
            "this shim targets sglang 0.5.23"
        )

    def _select_mode(self, gate_up_proj, hidden_size):
        try:
            import cutlass  # noqa: F401
        except ImportError:
            return None  # no fused dual GEMM: DualGemm stays off (mode None)
        return original(self, gate_up_proj, hidden_size)

    cls._select_mode = _select_mode


_PATCHES = {
    "sglang.srt.layers.dual_gemm": _patch_dual_gemm,
    "sglang.kernels.jit.utils.compile.loader": _patch_loader,
    "sglang.kernels.ops.sampling.renorm": _patch_renorm,
    "sglang.srt.models.qwen3_moe": _patch_qwen3_moe,
}
for _name in (
    "sglang.kernels.ops.activation.activation",
    "sglang.kernels.ops.attention.rope",
    "sglang.kernels.ops.attention.clamp_position",
    "sglang.kernels.ops.kvcache.kvcache",
    "sglang.kernels.ops.speculative.tree",
    "sglang.kernels.ops.speculative.sampling",
):
    _PATCHES[_name] = _patch_jit_factories


class _TvmFfiStandIn(types.ModuleType):
    """What ``import tvm_ffi`` gives when tvm-ffi is not installed: enough for SGLang to import."""

    class Object:
        """Base of SGLang's tvm-ffi classes (custom all-reduce planes); never instantiated here."""

        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("evict cuda shim: tvm_ffi is not installed (custom all-reduce needs it)")

    class Module:
        """Type of a loaded JIT module (annotations only)."""

    @staticmethod
    def register_object(name=None):
        def register(cls):
            return cls

        return register(name) if isinstance(name, type) else register

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        # AttributeError, so `from tvm_ffi import X` is an ImportError, as without tvm-ffi
        raise AttributeError(f"tvm_ffi.{name}: the evict cuda shim's tvm_ffi stand-in has no {name!r}")


class _TvmFfiFallback(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`_TvmFfiStandIn`; consulted only after every other finder found nothing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tvm_ffi":
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        module = _TvmFfiStandIn(spec.name)
        module.EVICT_CUDA_SHIM = True
        return module

    def exec_module(self, module) -> None:
        pass


if os.environ.get("EVICT_CUDA_SHIM", "0") == "1":
    from evict.testing.import_patch import install

    install(_PATCHES)
    if not any(isinstance(f, _TvmFfiFallback) for f in sys.meta_path):
        sys.meta_path.append(_TvmFfiFallback())
