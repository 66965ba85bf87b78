"""Pure-PyTorch reference engine: EAGLE-3 tree drafting, tree verification, AR / static / EVICT.

The models (``Qwen3MoeTarget``, ``Eagle3Drafter``, ``load_testbed``) live in
``evict.models``; this package holds the decoding algorithm (see docs/engine.md).
"""

from .acceptance import AcceptResult, greedy_accept, sampling_accept
from .drafting import draft_tree
from .engine import MODES, GenerationResult, SpecEngine, StepStats
from .masks import causal_window, window_mask
from .sampling import sample_from_probs, target_probs
from .tree_layout import DraftTree, VerifyTree, num_candidates, select_verify_tree

__all__ = [
    "MODES",
    "AcceptResult",
    "DraftTree",
    "GenerationResult",
    "SpecEngine",
    "StepStats",
    "VerifyTree",
    "causal_window",
    "draft_tree",
    "greedy_accept",
    "num_candidates",
    "sample_from_probs",
    "sampling_accept",
    "select_verify_tree",
    "target_probs",
    "window_mask",
]
