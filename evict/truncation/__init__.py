"""Cost-aware draft-tree truncation (pure torch, no sglang import).

Public API, shared by the SGLang plugin, the reference engine and the benchmark (see
``docs/ARCHITECTURE.md``).
"""

from .acceptance import ACCEPTANCE_CHOICES, AcceptanceEstimator, AcceptanceFeatures, flat_outcomes
from .counters import DecisionCounters
from .policy import DECISIONS, USER_DECISIONS, CostSource, HeldIndex, StepCostTable, TruncationPolicy
from .rule import (
    TORCH_RULE,
    Decider,
    WidthDecision,
    choose_width,
    choose_widths_batch_budget,
    choose_widths_per_request,
    expected_accepted_lengths,
    keep_top,
    sanitize_scores,
    sort_candidates,
    validate_scores,
    validate_step_cost,
    validate_widths,
)
from .tree import is_ancestor_closed, validate_parents

__all__ = [
    "ACCEPTANCE_CHOICES",
    "AcceptanceEstimator",
    "AcceptanceFeatures",
    "flat_outcomes",
    "DECISIONS",
    "USER_DECISIONS",
    "CostSource",
    "DecisionCounters",
    "Decider",
    "HeldIndex",
    "StepCostTable",
    "TORCH_RULE",
    "TruncationPolicy",
    "WidthDecision",
    "choose_width",
    "choose_widths_batch_budget",
    "choose_widths_per_request",
    "expected_accepted_lengths",
    "is_ancestor_closed",
    "keep_top",
    "sanitize_scores",
    "sort_candidates",
    "validate_parents",
    "validate_scores",
    "validate_step_cost",
    "validate_widths",
]
