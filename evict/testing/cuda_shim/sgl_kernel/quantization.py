"""``sgl_kernel.quantization`` of the evict cuda shim: names SGLang 0.5.23 imports from it (GGUF kernels; never called on the served path)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr(
    "sgl_kernel.quantization",
    {},
    ("ggml_dequantize", "ggml_moe_a8", "ggml_moe_a8_vec", "ggml_mul_mat_a8", "ggml_mul_mat_vec_a8"),
)
