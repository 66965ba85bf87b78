"""Process start-up patches for serving SGLang 0.5.23 on a CPU without AMX (launcher and workers).

Python imports ``sitecustomize`` at start-up from ``sys.path``; ``evict.testing.cpu_server`` puts
this directory on ``PYTHONPATH``, so the launcher and every process SGLang spawns (scheduler,
detokenizer) run this before anything else. It only acts when ``SGLANG_USE_CPU_ENGINE=1``.

It installs an import hook (nothing is imported eagerly) that, once SGLang's module is loaded:

* ``sglang.srt.arg_groups.overrides``: stops ``_attention_backend_platform_fallbacks`` from
  swapping ``--attention-backend intel_amx`` for ``torch_native`` on CPUs without AMX. The swap
  exists because the real intel_amx kernels need AMX; the stand-ins do not, and ``torch_native``
  has no multi-step draft backend, so EAGLE cannot run on it. Likewise lets
  ``_deterministic_attention_backend`` accept intel_amx, so ``--enable-deterministic-inference``
  (which per-request ``seed`` needs) runs on CPU.
* ``sglang.srt.arg_groups.choices``: lists intel_amx among the backends whose deterministic
  inference keeps the radix cache (SGLang otherwise turns the cache off), so the servers under
  test share prefixes as default servers do. The stand-in attention reads a cached prefix exactly
  as it reads a freshly computed one.
* ``sglang.srt.model_executor.model_runner``: skips ``maybe_enable_batch_invariant_mode`` on CPU,
  where SGLang has no batch-invariant kernels to register (it raises); deterministic inference
  then means per-request seeded sampling, without batch invariance.
* ``sglang.srt.speculative.eagle_utils`` (only with ``CPU_SERVER_SAMPLING_VERIFY=1``, which the
  launcher sets unless told otherwise): lifts the ``is_cpu`` term of ``_verify_uses_greedy`` and
  installs ``evict.testing.cpu_ops``' ports of ``tree_speculative_sampling_target_only`` and the
  top-k / top-p renormalizations (None on CPU), so sampled requests are verified by rejection
  sampling over the tree, as on a GPU, instead of greedily.

A previously installed ``sitecustomize`` (shadowed by this one) is not chained; the launcher's
environment is meant for the server only.
"""

from __future__ import annotations

import os


def _keep_intel_amx(module, name: str) -> None:
    """Wrap pass ``name`` so that it leaves ``--attention-backend intel_amx`` on CPU alone."""
    original = getattr(module, name, None)
    passes = getattr(module, "POST_PROCESS_PASSES", None)
    if original is None or passes is None:
        raise RuntimeError(
            f"evict.testing shim: sglang.srt.arg_groups.overrides has no {name} / POST_PROCESS_PASSES; "
            "this shim targets sglang 0.5.23"
        )

    def patched(view):
        if view.attention_backend == "intel_amx" and view.device == "cpu":
            return {}  # the stand-in operators need no AMX, and are deterministic
        return original(view)

    patched.__qualname__ = original.__qualname__
    patched.__module__ = original.__module__
    patched.__name__ = original.__name__
    passes[:] = [patched if p is original else p for p in passes]
    setattr(module, name, patched)


def _patch_overrides(module) -> None:
    _keep_intel_amx(module, "_attention_backend_platform_fallbacks")
    # --enable-deterministic-inference (per-request sampling seeds) accepts only GPU backends
    _keep_intel_amx(module, "_deterministic_attention_backend")


def _patch_choices(module) -> None:
    radix_ok = getattr(module, "RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND", None)
    if not isinstance(radix_ok, list):
        raise RuntimeError(
            "evict.testing shim: sglang.srt.arg_groups.choices has no "
            "RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND list; this shim targets sglang 0.5.23"
        )
    if "intel_amx" not in radix_ok:
        radix_ok.append("intel_amx")  # the same list object every importer holds


def _patch_model_runner(module) -> None:
    runner = getattr(module, "ModelRunner", None)
    original = getattr(runner, "maybe_enable_batch_invariant_mode", None)
    if original is None:
        raise RuntimeError(
            "evict.testing shim: ModelRunner.maybe_enable_batch_invariant_mode is missing; "
            "this shim targets sglang 0.5.23"
        )

    def maybe_enable_batch_invariant_mode(self):
        if str(getattr(self, "device", "")) == "cpu":
            return  # SGLang registers batch-invariant kernels for accelerators only (raises on CPU)
        return original(self)

    runner.maybe_enable_batch_invariant_mode = maybe_enable_batch_invariant_mode


def _patch_eagle_utils(module) -> None:
    from evict.testing import cpu_ops

    original = getattr(module, "_verify_uses_greedy", None)
    if original is None or not hasattr(module, "tree_speculative_sampling_target_only"):
        raise RuntimeError(
            "evict.testing shim: sglang.srt.speculative.eagle_utils has no _verify_uses_greedy / "
            "tree_speculative_sampling_target_only; this shim targets sglang 0.5.23"
        )

    def _verify_uses_greedy(*, is_all_greedy, is_cpu, is_hip, is_xpu, use_rejection_sampling):
        return original(
            is_all_greedy=is_all_greedy,
            is_cpu=False,  # sampled requests take the sampling verify path, as on a GPU
            is_hip=is_hip,
            is_xpu=is_xpu,
            use_rejection_sampling=use_rejection_sampling,
        )

    module._verify_uses_greedy = _verify_uses_greedy
    module.tree_speculative_sampling_target_only = cpu_ops.tree_speculative_sampling_target_only
    module.top_k_renorm_prob = cpu_ops.top_k_renorm_prob
    module.top_p_renorm_prob = cpu_ops.top_p_renorm_prob


_PATCHES = {
    "sglang.srt.arg_groups.choices": _patch_choices,
    "sglang.srt.arg_groups.overrides": _patch_overrides,
    "sglang.srt.model_executor.model_runner": _patch_model_runner,
}
if os.environ.get("CPU_SERVER_SAMPLING_VERIFY", "0") == "1":
    _PATCHES["sglang.srt.speculative.eagle_utils"] = _patch_eagle_utils

if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
    from evict.testing.import_patch import install

    install(_PATCHES)
