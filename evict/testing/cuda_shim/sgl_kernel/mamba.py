"""``sgl_kernel.mamba`` of the evict cuda shim: names SGLang 0.5.23 imports from it (CPU mamba kernels; never called on the served path)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr(
    "sgl_kernel.mamba", {}, ("causal_conv1d_fn_cpu", "causal_conv1d_update_cpu", "chunk_gated_delta_rule_cpu")
)
