"""``SpecEngine``: batched EAGLE-3 tree speculative decoding with AR / static / EVICT verification.

One decode step (all requests of the batch together, as SGLang's ``EAGLEWorkerV2``):

1. draft: an SGLang-layout tree of K candidates per request (``drafting.draft_tree``);
2. choose the verified subtree: ``static`` keeps the top N-1 by score (``organize_draft_results``);
   ``evict`` calls ``policy.decide(scores)`` once and keeps its m-1 nodes (one width for the
   batch); ``ar`` verifies the root only and never runs the drafter;
3. verify: one target forward over the tree with a prefix + ancestor mask (``verify``);
4. accept: greedy or SGLang's target-only sampling rule (``acceptance``), commit the accepted K/V;
5. draft extend: the drafter runs over the emitted tokens with the target's aux hidden states,
   which yields the next root distribution.

Finished requests (max_new_tokens or eos) leave the batch at the end of the step (their rows are
dropped from both KV caches), as in a serving system: the batch size that the width decision and
the cost table see is the number of requests still generating.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evict.truncation import AcceptanceEstimator, TruncationPolicy, flat_outcomes, keep_top
from evict.truncation.depth import DepthController, DraftShape

from .acceptance import AcceptResult, greedy_accept, sampling_accept
from .drafting import draft_tree
from .masks import causal_window, window_mask
from .sampling import sample_from_probs, target_probs, validate_sampling
from .tree_layout import num_candidates, select_verify_tree
from .verify import commit_path, verify_forward

__all__ = ["MODES", "SpecEngine", "StepStats", "GenerationResult"]

MODES = ("ar", "static", "evict", "oracle")


@dataclass
class StepStats:
    """Measurements of one decode step (one verify forward) of the batch."""

    width: int  # verified width m, root included (1 for ar)
    active: list[int]  # indices of the requests still generating at the start of the step
    accepted: list[int]  # tokens the verify produced per active request (accepted + bonus)
    emitted: list[int]  # tokens actually appended per active request (after eos / max cut)
    draft_s: float = 0.0
    decision_s: float = 0.0
    verify_s: float = 0.0  # verify forward + acceptance + commit
    extend_s: float = 0.0  # draft extend (drafter forward over the emitted tokens)
    predicted_accepted: list[float] | None = None  # EVICT: B_r(m*) per active request
    predicted_step_ms: float | None = None  # EVICT: T(bs, m*) from the policy's cost
    fallback: int = 0  # EVICT: requests whose scores were not finite (full tree used)
    lookahead_s: float = 0.0  # oracle: the full-tree verify that finds the accepted path (not charged)
    lookahead_cpu_s: float = 0.0  # oracle: the same, in this process's CPU time
    kept_counts: list[int] | None = None  # per-request widths: real candidates kept per request
    depth: int | None = None  # drafting steps this step ran (0 = plain decoding; None = ar)
    topk: int | None = None  # the draft family's topk (1 = chain)


@dataclass
class GenerationResult:
    """Output of :meth:`SpecEngine.generate`: new tokens per request and per-step statistics."""

    mode: str
    tokens: list[list[int]]  # new tokens per request (prompt excluded)
    steps: list[StepStats] = field(default_factory=list)
    prefill_s: float = 0.0
    wall_s: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)  # "length" or "eos"

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def request_steps(self) -> int:
        return sum(len(s.active) for s in self.steps)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per request per step, bonus included (1.0 for ar)."""
        n = self.request_steps
        return sum(sum(s.accepted) for s in self.steps) / n if n else float("nan")

    @property
    def lookahead_s(self) -> float:
        """Oracle mode: seconds spent finding the accepted path, to leave out of its timing."""
        return sum(s.lookahead_s for s in self.steps)

    @property
    def lookahead_cpu_s(self) -> float:
        return sum(s.lookahead_cpu_s for s in self.steps)

    @property
    def mean_width(self) -> float:
        return sum(s.width for s in self.steps) / len(self.steps) if self.steps else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: the fields, the per-step stats and the derived means."""
        d = asdict(self)
        d.update(
            new_tokens=self.new_tokens,
            tokens_per_s=self.tokens_per_s,
            mean_accepted_length=self.mean_accepted_length,
            mean_width=self.mean_width,
        )
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpecEngine:
    """Reference speculative decoding engine over a ``Qwen3MoeTarget`` and an ``Eagle3Drafter``.

    Args:
        target, drafter: the model pair (docs/ARCHITECTURE.md model contract); ``drafter`` may be
            None for ``mode="ar"``.
        mode: ``"ar"`` (target only), ``"static"`` (top N-1 candidates), ``"evict"``
            (``policy.decide`` picks the width m <= N and the kept nodes each step) or ``"oracle"``
            (greedy only, a benchmark ceiling: an untimed full-tree look-ahead finds the path the
            target accepts, then the step verifies just that path, padded to one batch width with
            the best-scored other nodes; ``GenerationResult.lookahead_s`` is what to leave out).
        steps, topk, num_draft_tokens: SGLang's ``speculative_num_steps``,
            ``speculative_eagle_topk`` and ``speculative_num_draft_tokens`` (N, root included;
            default the whole tree, K + 1).
        policy: a ``TruncationPolicy`` (required for ``evict``); its widths, clamped to K + 1, must
            not exceed N. With ``per_request=True`` each request keeps its own number of nodes
            under a batch-wide budget; the unused slots of the batch width are padding (root
            token, linked to nothing: never accepted, attended by no other node, never committed).
        acceptance: an ``AcceptanceEstimator`` (``evict`` only): the policy ranks the draft tree by
            calibrated scores learned from past verifications (None or disabled: raw drafter scores).
            It persists across ``generate`` calls, so it keeps learning like a server's would.
        temperature, top_p: 0 = greedy; otherwise SGLang's sampling acceptance.
        seed: seeds the generator of all coins (reproducible sampling).
        eos_token_id: stops a request after it emits this token (None: only max_new_tokens).
        router_hook: passed to every verify forward of the target (expert counting, MoE-Spec).
        depth: a ``DepthController`` (``evict`` only): the whole-step decision. Each step drafts the
            shape it plans (depth 0: no draft, the root is verified alone, and the draft extend still
            runs so the drafter's cache stays warm), then the policy cuts that tree at the width
            priced for that shape (``policy.shape_costs``). Each step's measured time, draft to
            draft extend, goes back to ``depth.record_step``, which corrects that shape's price.
            The engine's ``steps`` / ``topk`` stay the deepest tree's (buffer sizes). Without it:
            always ``steps`` of ``topk``.
        adaptive: ``static`` mode with ``topk=1`` only: an object with SGLang's adaptive-steps
            protocol (``get_steps_for_batch(bs) -> steps``, ``on_verify_complete(correct drafts per
            request, batch_size)``), e.g. 0.5.23's ``AdaptiveSpeculativeParams``: each step drafts
            the chain length it names and verifies all of it (``steps = 0``: plain decoding).
    """

    def __init__(
        self,
        target: Any,
        drafter: Any = None,
        mode: str = "static",
        steps: int = 3,
        topk: int = 1,
        num_draft_tokens: int | None = None,
        policy: TruncationPolicy | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        router_hook: Any = None,
        acceptance: AcceptanceEstimator | None = None,
        depth: DepthController | None = None,
        adaptive: Any = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        validate_sampling(temperature, top_p)
        for name, v in (("steps", steps), ("topk", topk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.k_total = num_candidates(steps, topk)
        n = self.k_total + 1 if num_draft_tokens is None else num_draft_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.k_total + 1:
            raise ValueError(
                f"num_draft_tokens must be an int in [1, K+1 = {self.k_total + 1}] for steps={steps}, "
                f"topk={topk} (K = topk + (steps-1)*topk^2), got {num_draft_tokens!r}"
            )
        if mode != "ar" and drafter is None:
            raise ValueError(f"mode {mode!r} needs a drafter; pass drafter=... or use mode='ar'")
        if mode == "evict":
            if policy is None or not hasattr(policy, "decide"):
                raise ValueError(
                    "mode 'evict' needs policy=TruncationPolicy(cost_table) (evict.truncation); "
                    "make a cost table with evict-profile"
                )
            biggest = int(policy.widths.clamp(max=self.k_total + 1).max())
            if biggest > n:
                raise ValueError(
                    f"policy widths go up to {biggest} but num_draft_tokens is {n}; build the policy "
                    f"with widths <= {n} (TruncationPolicy(cost, widths=[w for w in widths if w <= {n}]))"
                )
        self.target, self.drafter, self.mode = target, drafter, mode
        self.steps, self.topk, self.num_draft_tokens = steps, topk, n
        self.policy = policy
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.eos_token_id = eos_token_id
        self.router_hook = router_hook
        if acceptance is not None and mode != "evict":
            raise ValueError(f"acceptance= calibrates EVICT's scores; mode {mode!r} does not use it")
        if acceptance is not None and acceptance.topk != topk:
            raise ValueError(
                f"the acceptance estimator was built for topk {acceptance.topk}, the engine drafts {topk}"
            )
        if mode == "oracle" and temperature != 0.0:
            raise ValueError("mode 'oracle' is a greedy benchmark ceiling; use temperature 0")
        self.acceptance = acceptance
        if depth is not None:
            if mode != "evict":
                raise ValueError(f"depth= is EVICT's whole-step decision; mode {mode!r} does not use it")
            deepest = max(num_candidates(s.depth, s.topk) for s in depth.shapes)
            if deepest > self.k_total:
                raise ValueError(
                    f"the depth controller's deepest shape has {deepest} candidates, more than the "
                    f"engine's ({steps}, {topk}) tree ({self.k_total}); build the engine with the deepest tree"
                )
            if not policy.prices_shapes:
                raise ValueError(
                    "depth= needs a policy whose cost table prices drafting per depth (draft_ms); "
                    "measure one with evict-profile --draft-model"
                )
        if adaptive is not None and (mode != "static" or topk != 1):
            raise ValueError("adaptive= emulates SGLang's adaptive chain: mode 'static' with topk 1 only")
        self.depth = depth
        self.adaptive = adaptive
        self._generation = 0  # generate() calls so far
        # Called after every decode step with (draft tree, kept, acceptance, step stats), untimed:
        # analysis tools read what the step verified and accepted (evict.bench.oracle_gap).
        self.observer: Callable[[Any, torch.Tensor | None, AcceptResult, StepStats], None] | None = None

    # -- helpers --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _validate_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        vocab = int(self.target.config.vocab_size)
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids")
            if not all(isinstance(t, int) and 0 <= t < vocab for t in p):
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) or non-int entries")

    def _pick(self, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Next token [N] from target logits [N, V]: argmax, or a sample from the processed probs."""
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = target_probs(logits, self.temperature, self.top_p)
        coins = torch.rand(logits.shape[0], generator=gen, device=gen.device)
        return sample_from_probs(probs, coins)

    def _accept(self, tree, logits: torch.Tensor, gen: torch.Generator) -> AcceptResult:
        if self.greedy:
            return greedy_accept(tree.tokens, tree.parent, logits.argmax(dim=-1))
        bs, m = tree.tokens.shape
        probs = target_probs(logits, self.temperature, self.top_p)  # [bs, m, V]
        coins = torch.rand((bs, m), generator=gen, device=gen.device)
        final = torch.rand(bs, generator=gen, device=gen.device)
        return sampling_accept(tree.tokens, tree.parent, probs, coins, final)

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> GenerationResult:
        """Generate up to ``max_new_tokens`` new tokens for each prompt (one batch)."""
        self._validate_prompts(prompts, max_new_tokens)
        device = self.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        bs = len(prompts)
        rows = torch.arange(bs, device=device)
        plen = torch.tensor([len(p) for p in prompts], device=device)
        tp = int(plen.max())
        draft_slots = (self.steps - 1) * self.topk
        max_len = tp + max_new_tokens + self.num_draft_tokens + draft_slots + self.steps + 2
        res = GenerationResult(mode=self.mode, tokens=[[] for _ in prompts], finish_reasons=[""] * bs)
        self._generation += 1  # a request's id for the depth controller: (call, row)
        _sync(device)
        t0 = time.perf_counter()

        # -- prefill: target over the prompts, first token, drafter over the shifted prompts
        ids = torch.zeros((bs, tp), dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, device=device)
        pos = torch.arange(tp, device=device).expand(bs, tp)
        zeros = torch.zeros(bs, dtype=torch.long, device=device)
        mask = window_mask(zeros, causal_window(bs, tp, device), tp)
        st = _State(req=list(range(bs)), tcache=self.target.new_cache(bs, max_len))
        out = self.target(ids, pos, st.tcache, attn_mask=mask, logits_at=plen - 1)
        st.tcache.commit(pos, plen)
        st.root = self._pick(out.logits[:, 0], gen)  # [bs]
        if self._calibrating:
            st.recent = self.acceptance.initial_recent(bs, device)
        if self.mode != "ar":
            st.dcache = self.drafter.new_cache(bs, max_len)
            dids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            dids[rows, plen - 1] = st.root
            hidden = self.drafter.project(out.aux_hidden)
            dlogits, dhid = self.drafter(dids, hidden, pos, st.dcache, attn_mask=mask, logits_at=plen - 1)
            st.dcache.commit(pos, plen)
            st.root_logits, st.root_hidden = dlogits[:, 0], dhid[rows, plen - 1]
        ones = torch.ones(bs, dtype=torch.long, device=device)
        self._emit(res, st.req, st.root.view(bs, 1), ones, max_new_tokens)
        st = st.compact(res)
        _sync(device)
        res.prefill_s = time.perf_counter() - t0

        # -- decode steps: every row of the (compacted) batch is an unfinished request
        while st.req:
            res.steps.append(self._step(st, res, gen, max_new_tokens))
            st = st.compact(res)
        _sync(device)
        res.wall_s = time.perf_counter() - t0
        return res

    def _step(
        self, st: _State, res: GenerationResult, gen: torch.Generator, max_new_tokens: int
    ) -> StepStats:
        """One decode step of the batch: draft, choose, verify, accept, commit, extend."""
        device = st.root.device
        stats = StepStats(width=1, active=list(st.req), accepted=[], emitted=[])
        t1 = time.perf_counter()
        tree = kept = None
        if self.depth is not None:
            self.depth.on_requests([(self._generation, r) for r in st.req])
        shape = self._plan(len(st.req))
        if shape is not None:
            stats.depth, stats.topk = shape.depth, shape.topk
            if shape.depth > 0:
                tree = draft_tree(
                    self.drafter, st.dcache, st.root_logits, st.root_hidden, shape.depth, shape.topk
                )
            _sync(device)
        t2 = time.perf_counter()
        stats.draft_s = t2 - t1
        feats = None
        if self.mode == "static" and tree is not None:
            kept = keep_top(tree.scores, min(self.num_draft_tokens, tree.scores.shape[1] + 1))
        elif self.mode == "evict" and tree is not None:
            scores = tree.scores
            if self._calibrating and shape.topk == self.topk:  # rank by calibrated scores; same rule
                scores, feats = self.acceptance.calibrate(scores, tree.parents, st.recent)
            kept = self._decide(scores, stats, shape)
            if self.depth is not None:
                self.depth.observe(shape, scores)
            _sync(device)
        elif self.mode == "oracle":
            kept = self._oracle_kept(st, tree, stats)
        t3 = time.perf_counter()
        stats.decision_s = t3 - t2 - stats.lookahead_s  # the oracle's look-ahead is not a decision cost

        vtree = select_verify_tree(tree, kept, st.root)
        stats.width = vtree.width
        base = st.tcache.lengths.clone()  # [bs]
        out = verify_forward(self.target, st.tcache, vtree, self.router_hook)
        acc = self._accept(vtree, out.logits, gen)
        commit_path(st.tcache, base, acc)
        _sync(device)
        t4 = time.perf_counter()
        stats.verify_s = t4 - t3

        produced = acc.num_emitted  # [bs]
        stats.accepted = produced.tolist()
        stats.emitted = self._emit(res, st.req, acc.emitted, produced, max_new_tokens)
        if self.adaptive is not None:  # SGLang's protocol: accepted draft tokens, bonus excluded
            self.adaptive.on_verify_complete([a - 1 for a in stats.accepted], len(stats.accepted))
        if self.depth is not None and tree is not None and stats.predicted_accepted:
            self.depth.record_outcome(
                shape,
                sum(stats.predicted_accepted) / len(stats.predicted_accepted),
                sum(stats.accepted) / len(stats.accepted),
            )
        if self.mode == "evict":
            self.policy.counters.record_accepted(stats.accepted)
            if feats is not None:  # learn from this step's outcomes (used from the next step on)
                verified, accepted = flat_outcomes(kept, acc.path, tree.scores.shape[1])
                st.recent = self.acceptance.update(feats, verified, accepted, st.recent)
        if self.mode != "ar":
            st.root_logits, st.root_hidden = self._extend(st.dcache, base, out.aux_hidden, acc)
            _sync(device)
        st.root = acc.bonus
        t5 = time.perf_counter()
        stats.extend_s = t5 - t4
        if self.depth is not None and shape is not None:  # what this shape's step really costs
            self.depth.record_step(shape, len(st.req), self._priced_ms(shape, stats), 1e3 * (t5 - t1))
        if self.observer is not None:
            self.observer(tree, kept, acc, stats)
        return stats

    def _plan(self, batch_size: int) -> DraftShape | None:
        """What this step drafts: None for ar; the depth controller's or the adaptive emulation's
        plan; otherwise the engine's own tree."""
        if self.mode == "ar":
            return None
        if self.depth is not None:
            return self.depth.plan(batch_size)
        if self.adaptive is not None:
            return DraftShape(1, int(self.adaptive.get_steps_for_batch(batch_size)))
        return DraftShape(self.topk, self.steps)

    @property
    def _calibrating(self) -> bool:
        return self.mode == "evict" and self.acceptance is not None and self.acceptance.enabled

    def _oracle_kept(self, st: _State, tree: Any, stats: StepStats) -> torch.Tensor:
        """Oracle cut: the target's accepted path in the full tree, padded to one batch width.

        A full-tree verify forward (no router hook, no commit: the real verify overwrites its K/V
        slots) finds each request's greedy path; the kept set is that path plus, to fill the
        batch's width ``max path length + 1``, the best-scored other nodes.  Path nodes rank
        in (0.5, 1], the others in [0, 0.49], each by score, so every prefix of the ranking is
        ancestor-closed and the path always fits.
        """
        c0, t0 = time.process_time(), time.perf_counter()
        k = tree.scores.shape[1]
        full = torch.arange(k, device=tree.scores.device).expand(tree.scores.shape[0], k)
        vfull = select_verify_tree(tree, full, st.root)
        out = verify_forward(self.target, st.tcache, vfull)
        acc = greedy_accept(vfull.tokens, vfull.parent, out.logits.argmax(dim=-1))
        _, on_path = flat_outcomes(full, acc.path, k)
        width = int(acc.num_accepted.max()) + 1
        s = tree.scores.float().clamp(0.0, 1.0)
        kept = keep_top(torch.where(on_path, 0.5 + 0.5 * s, 0.49 * s), width)
        _sync(st.root.device)
        stats.lookahead_s = time.perf_counter() - t0
        stats.lookahead_cpu_s = time.process_time() - c0
        return kept

    def _decide(
        self, scores: torch.Tensor, stats: StepStats, shape: DraftShape | None = None
    ) -> torch.Tensor:
        """Exactly one ``policy.decide`` call per step; returns kept [bs, m-1]."""
        bs = int(scores.shape[0])
        cost = None
        if self.depth is not None and shape is not None:  # priced as the shape actually drafted
            cost = self.policy.shape_costs(bs, self.depth.shapes, scores.device)[self.depth.index[shape]]
        decision = self.policy.decide(scores) if cost is None else self.policy.decide(scores, cost=cost)
        stats.predicted_accepted = decision.expected_accepted.float().cpu().tolist()
        stats.fallback = int(decision.fallback.sum())
        cost = self.policy.step_cost(bs) if cost is None else cost.cpu()
        i = int(decision.width_index)
        stats.predicted_step_ms = float(cost[i])
        if decision.kept_counts is not None:  # per-request widths: padding costs pad_cost of a node
            j = i if decision.budget_index is None else int(decision.budget_index)
            pad = float(getattr(self.policy, "pad_cost", 1.0))
            stats.predicted_step_ms = float(cost[j] + pad * (cost[i] - cost[j]))
            stats.kept_counts = decision.kept_counts.cpu().tolist()
        return decision.kept.to(scores.device).long()

    def _priced_ms(self, shape: DraftShape, stats: StepStats) -> float:
        """The cost source's (uncorrected) ms for this step: the width rule's price of the width it
        verified, or the plain row for a step that drafted nothing."""
        if stats.predicted_step_ms is not None:
            return stats.predicted_step_ms
        row = self.policy.shape_costs(len(stats.active), self.depth.shapes)[self.depth.index[shape]]
        return float(row[0])

    def _extend(self, dcache: Any, base: torch.Tensor, aux_hidden: torch.Tensor, acc: AcceptResult):
        """Draft extend: the drafter over (emitted token t, target hidden of path node t).

        Entry t of request b is (token emitted t-th this step, aux hidden of the path node it
        follows) at position ``base_b + t``; returns the root logits [bs, Vd] and hidden [bs, H]
        for the next step (the drafter output at the bonus token's entry).
        """
        bs = acc.path.shape[0]
        n_e = acc.num_emitted  # [bs]
        te = int(n_e.max())
        ids = acc.emitted[:, :te].clamp(min=0)  # [bs, te]; padding entries are masked garbage
        path = acc.path[:, :te].clamp(min=0)  # [bs, te] verify index of the hidden source
        aux = aux_hidden.gather(1, path.unsqueeze(2).expand(bs, te, aux_hidden.shape[2]))
        hidden = self.drafter.project(aux)
        pos = base.view(bs, 1) + torch.arange(te, device=base.device).view(1, te)
        mask = window_mask(base, causal_window(bs, te, base.device), int(base.max()) + te)
        dlogits, dhid = self.drafter(ids, hidden, pos, dcache, attn_mask=mask, logits_at=n_e - 1)
        dcache.commit(pos, n_e)
        rows = torch.arange(bs, device=base.device)
        return dlogits[:, 0], dhid[rows, n_e - 1]

    def _emit(
        self, res: GenerationResult, req: list[int], emitted, produced, max_new_tokens: int
    ) -> list[int]:
        """Append each row's produced tokens to its request, stopping at eos / max_new_tokens.

        emitted: [bs, A] tokens; produced: [bs] how many are valid; req: row -> request index.
        Sets ``res.finish_reasons`` for requests that finish; returns the count appended per row.
        """
        appended = []
        em = emitted.cpu().tolist()
        pr = produced.cpu().tolist()
        for row, r in enumerate(req):
            out = res.tokens[r]
            n = 0
            for tok in em[row][: pr[row]]:
                out.append(int(tok))
                n += 1
                if self.eos_token_id is not None and tok == self.eos_token_id:
                    res.finish_reasons[r] = "eos"
                    break
                if len(out) >= max_new_tokens:
                    res.finish_reasons[r] = "length"
                    break
            appended.append(n)
        return appended


@dataclass
class _State:
    """Per-row decoding state of the running batch; rows are compacted when requests finish."""

    req: list[int]  # row -> request index
    tcache: Any
    dcache: Any = None
    root: torch.Tensor | None = None  # [bs] last emitted token (not yet in the target cache)
    root_logits: torch.Tensor | None = None  # [bs, Vd] drafter logits after the root
    root_hidden: torch.Tensor | None = None  # [bs, H] drafter hidden state at the root's entry
    recent: torch.Tensor | None = None  # [bs] recent acceptance per request (acceptance estimator)

    def compact(self, res: GenerationResult) -> _State:
        """Drop the rows of finished requests (as a server's batch shrinks)."""
        keep = [i for i, r in enumerate(self.req) if not res.finish_reasons[r]]
        if len(keep) == len(self.req):
            return self
        idx = torch.tensor(keep, dtype=torch.long, device=self.root.device)

        def sel(x):
            return None if x is None else x.index_select(0, idx)

        return _State(
            req=[self.req[i] for i in keep],
            tcache=select_rows(self.tcache, idx) if keep else None,
            dcache=select_rows(self.dcache, idx) if keep and self.dcache is not None else None,
            root=sel(self.root),
            root_logits=sel(self.root_logits),
            root_hidden=sel(self.root_hidden),
            recent=sel(self.recent),
        )


def select_rows(cache: Any, idx: torch.Tensor) -> Any:
    """A cache holding only rows ``idx`` of ``cache`` (``KVCache.select_rows`` when it has one).

    Falls back to the documented ``KVCache`` layout: ``k_all`` / ``v_all`` [n_layers, bs, ...],
    per-layer views ``k`` / ``v``, ``lengths`` [bs] and ``batch_size``.
    """
    if hasattr(cache, "select_rows"):
        return cache.select_rows(idx)
    missing = [a for a in ("k_all", "v_all", "lengths") if not hasattr(cache, a)]
    if missing:
        raise TypeError(
            f"{type(cache).__name__} lacks {missing}: give it select_rows(idx) so finished requests "
            "can leave the batch"
        )
    new = copy.copy(cache)
    # only the committed prefix is copied: the slots past every row's length are garbage by
    # contract, and copying all of max_len (sized for the widest verify) made a shrinking batch
    # pay for the deepest tree's buffers
    used = int(cache.lengths.max()) if cache.lengths.numel() else 0
    for name in ("k_all", "v_all"):
        old = getattr(cache, name)
        # zeros, not empty: masked slots still enter attention's matmuls, and 0 * NaN is NaN
        buf = torch.zeros(
            (old.shape[0], int(idx.numel()), *old.shape[2:]), dtype=old.dtype, device=old.device
        )
        buf[:, :, :, :used] = old[:, :, :, :used].index_select(1, idx)
        setattr(new, name, buf)
    new.k = list(new.k_all.unbind(0))
    new.v = list(new.v_all.unbind(0))
    new.lengths = cache.lengths.index_select(0, idx)
    new.batch_size = int(idx.numel())
    return new
