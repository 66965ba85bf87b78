"""``sgl_kernel.kvcacheio`` of the evict cuda shim: names SGLang 0.5.23 imports from it (host KV transfer; never called on the served path)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr(
    "sgl_kernel.kvcacheio",
    {},
    (
        "transfer_embedding_ranges_direct",
        "transfer_kv_all_layer",
        "transfer_kv_all_layer_direct_lf_pf",
        "transfer_kv_all_layer_lf_pf",
        "transfer_kv_all_layer_lf_ph",
        "transfer_kv_all_layer_mla",
        "transfer_kv_all_layer_mla_lf_pf",
        "transfer_kv_direct",
        "transfer_kv_per_layer",
        "transfer_kv_per_layer_direct_pf_lf",
        "transfer_kv_per_layer_mla",
        "transfer_kv_per_layer_mla_pf_lf",
        "transfer_kv_per_layer_pf_lf",
        "transfer_kv_per_layer_ph_lf",
    ),
)
