"""``sgl_kernel.speculative`` of the evict cuda shim: names SGLang 0.5.23 imports from it (NGRAM tree reconstruction, routed to SGLang's Triton twin)."""

from sgl_kernel._stub import make_getattr

__getattr__ = make_getattr(
    "sgl_kernel.speculative", {"reconstruct_indices_from_tree_mask": "reconstruct_indices_from_tree_mask"}, ()
)
