"""Decoding modes compared by the benchmark, and the static-tree sweep grid.

A static EAGLE tree is SGLang's ``(steps, topk, N)``: ``steps`` drafter forwards, ``topk``
branches per node, ``N`` verified tokens per request (root included, so ``N - 1`` candidates are
kept by cumulative score). With ``topk = 1`` it is a chain of ``steps`` tokens and ``N = steps + 1``.
SGLang 0.5.23 picks ``(3, 1, 4)`` for Qwen3-MoE when no speculative flags are given
(``_auto_choose_speculative_params``), and ``(5, 4, 8)`` for Llama.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from evict.truncation.tree import num_candidates

__all__ = [
    "ModeSpec",
    "SGLANG_QWEN3_MOE_DEFAULT",
    "SGLANG_LLAMA_DEFAULT",
    "num_candidates",
    "static_mode",
    "sweep_grid",
    "parse_tree",
]

SGLANG_QWEN3_MOE_DEFAULT = (3, 1, 4)
SGLANG_LLAMA_DEFAULT = (5, 4, 8)


def parse_tree(text: str) -> tuple[int, int, int]:
    """Parse ``"steps,topk,N"`` and check it is a valid SGLang tree (clear error otherwise)."""
    try:
        steps, topk, n = (int(x) for x in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"tree {text!r} must be three integers 'steps,topk,N', e.g. '3,1,4'") from None
    check_tree(steps, topk, n)
    return steps, topk, n


def check_tree(steps: int, topk: int, n: int) -> None:
    """Raise ``ValueError`` unless ``(steps, topk, N)`` is a tree SGLang would accept."""
    if steps < 1 or topk < 1 or n < 2:
        raise ValueError(f"tree ({steps}, {topk}, {n}) needs steps >= 1, topk >= 1 and N >= 2")
    if topk == 1 and n > steps + 1:
        raise ValueError(
            f"a chain ({steps}, 1, N) verifies at most steps + 1 = {steps + 1} tokens, got N = {n}"
        )
    k = num_candidates(steps, topk)
    if n > k + 1:
        raise ValueError(f"tree ({steps}, {topk}, {n}) has only {k} candidates: N must be <= {k + 1}")


@dataclass(frozen=True)
class ModeSpec:
    """One decoding mode of the comparison.

    ``kind``: ``ar`` (target only), ``static`` (fixed tree), ``evict`` (tree drafted with
    ``(steps, topk, N)`` then cut to the cost-effective width), ``oracle`` (the same tree cut to
    exactly the path the target accepts: the ceiling of any cut, found by an untimed look-ahead) or
    ``moe-spec`` (static tree with the lossy expert budget ``budget`` during verification).
    ``acceptance``: EVICT ranks nodes by ``raw`` drafter scores or ``calibrated`` ones (the online
    acceptance estimator). ``cost`` names the cost table variant for
    EVICT (``profiled`` or an ablation, see ``evict.bench.runner.cost_variant``). ``role`` tags
    rows for the report: ``baseline``, ``chain``, ``sglang-default``, ``static``, ``best-static``,
    ``evict``, ``evict-cal`` (EVICT with the estimator next to raw EVICT), ``evict-off``, ``oracle``,
    ``ablation``, ``lossy``, ``evict-pr`` (per-request widths), ``evict-gpu`` (EVICT deciding from
    the modeled GPU table, ``cost="modeled"``), ``evict-step`` (EVICT deciding the whole step:
    ``whole_step``), ``sglang-adaptive`` (kind ``adaptive``: SGLang 0.5.23's own adaptive chain,
    ``--speculative-adaptive``, run by the reference engine with SGLang's controller). ``per_request``: each request keeps its own number
    of nodes under a batch-wide budget within the batch width (padding fills the rest).
    """

    name: str
    kind: str
    steps: int = 0
    topk: int = 0
    num_draft: int = 1
    cost: str = "profiled"
    budget: int = 0
    role: str = "static"
    decision: str | None = None  # EVICT's decision mode; None = the run's --decision
    acceptance: str = "raw"  # EVICT's node scores: raw drafter probabilities or calibrated
    per_request: bool = False  # EVICT: per-request widths under a batch budget (padded slots)
    whole_step: bool = False  # EVICT: also decide the draft shape (depth 0..steps, chain or tree)

    @property
    def lossy(self) -> bool:
        """Only the MoE-Spec peer changes the output distribution."""
        return self.kind == "moe-spec"

    @property
    def tree(self) -> tuple[int, int, int]:
        return (self.steps, self.topk, self.num_draft)

    def with_tree(self, tree: tuple[int, int, int], name: str | None = None) -> ModeSpec:
        return replace(self, steps=tree[0], topk=tree[1], num_draft=tree[2], name=name or self.name)


def static_mode(tree: tuple[int, int, int], role: str = "static", name: str | None = None) -> ModeSpec:
    """A static-tree mode named after its configuration, e.g. ``static(3,1,4)``."""
    check_tree(*tree)
    s, k, n = tree
    return ModeSpec(
        name=name or f"static({s},{k},{n})", kind="static", steps=s, topk=k, num_draft=n, role=role
    )


def sweep_grid(quick: bool = False) -> list[tuple[int, int, int]]:
    """Static configurations tried by the sweep for the best static tree.

    Chains of 1-6 steps, and trees of 3, 4 and 6 steps with topk 2, 4, 8 and N in 8, 16, 32 (those
    with enough candidates). ``quick`` keeps a handful spanning the same range.
    """
    if quick:
        grid = [(2, 1, 3), (3, 1, 4), (5, 1, 6), (4, 2, 8), (5, 4, 16)]
    else:
        grid = [(s, 1, s + 1) for s in range(1, 7)]
        grid += [(s, k, n) for s in (3, 4, 6) for k in (2, 4, 8) for n in (8, 16, 32)]
    out = []
    for t in grid:
        try:
            check_tree(*t)
        except ValueError:
            continue
        out.append(t)
    return out
