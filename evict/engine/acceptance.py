"""Tree acceptance: greedy (follow the target argmax) and sampling (SGLang's target-only rule).

Why these rules are lossless for *any* ancestor-closed tree (so EVICT's truncation cannot change
the output distribution):

- Greedy: the walk accepts a child only if its token equals the target argmax at its parent, and
  the bonus is the target argmax at the last accepted node, so every emitted token is exactly what
  target-only greedy decoding would emit.
- Sampling (``tree_speculative_sampling_target_only`` in sgl-kernel, threshold 1): at the current
  node with target distribution p, one coin u ~ U(0,1); children are tried in order (ascending
  verify index) with a running sum ``acc += p(child)``; the first child with ``u <= acc`` is
  accepted. Child i is therefore accepted with probability exactly p(x_i) (sibling tokens are
  distinct). If none is accepted, the token is drawn from p with the children's tokens removed
  (renormalized) with a fresh coin, which has probability ``1 - sum_i p(x_i)`` times
  ``p(y) / (1 - sum_i p(x_i))`` = p(y). Every emitted token is a draw from the target's
  conditional distribution; the drafter only decides how many come out per step. This equals
  SpecInfer multi-candidate rejection sampling with a deterministic draft (q = point mass on
  each proposed child), which is the right q here: EAGLE/SGLang pick children by top-k, not by
  sampling.

Shapes: ``bs`` batch, ``m`` verify width (root = column 0), ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample_from_probs

__all__ = ["AcceptResult", "greedy_accept", "sampling_accept"]


@dataclass
class AcceptResult:
    """Outcome of one verify step for every request."""

    path: torch.Tensor  # [bs, m] long verify indices root, accepted..., padded with -1
    num_accepted: torch.Tensor  # [bs] long, accepted candidates (root excluded)
    bonus: torch.Tensor  # [bs] long, the extra token emitted after the accepted ones
    emitted: torch.Tensor  # [bs, m] long tokens emitted (accepted then bonus), padded with -1

    @property
    def num_emitted(self) -> torch.Tensor:
        """[bs] tokens emitted this step (accepted + bonus)."""
        return self.num_accepted + 1


def _finish(
    tokens: torch.Tensor, path: torch.Tensor, num_acc: torch.Tensor, bonus: torch.Tensor
) -> AcceptResult:
    bs, m = tokens.shape
    cols = torch.arange(m, device=tokens.device).view(1, m)
    # emitted[t] = token at path[t+1] for t < num_acc, bonus at t == num_acc
    nxt = torch.cat([path[:, 1:], torch.full((bs, 1), -1, dtype=torch.long, device=tokens.device)], dim=1)
    acc_tok = tokens.gather(1, nxt.clamp(min=0))
    emitted = torch.where(cols < num_acc.view(bs, 1), acc_tok, torch.full_like(acc_tok, -1))
    emitted = torch.where(cols == num_acc.view(bs, 1), bonus.view(bs, 1), emitted)
    return AcceptResult(path=path, num_accepted=num_acc, bonus=bonus, emitted=emitted)


class _Walk:
    """The state of walking down the verify tree, one request per row: the current node, the
    accepted path so far, and whether the walk is still going (shared by greedy and sampling)."""

    def __init__(self, bs: int, m: int, device: torch.device) -> None:
        self.cur = torch.zeros(bs, dtype=torch.long, device=device)  # [bs] current node
        self.alive = torch.ones(bs, dtype=torch.bool, device=device)  # [bs]
        self.num_acc = torch.zeros(bs, dtype=torch.long, device=device)  # [bs]
        self.path = torch.full((bs, m), -1, dtype=torch.long, device=device)  # [bs, m] node per depth
        self.path[:, 0] = 0

    def advance(self, d: int, has: torch.Tensor, child: torch.Tensor) -> bool:
        """Move rows with an accepted child (``has``) to it at depth d; False once no row is alive."""
        self.cur = torch.where(has, child, self.cur)
        self.path[:, d] = torch.where(has, child, self.path[:, d])
        self.num_acc += has.long()
        self.alive &= has
        return bool(self.alive.any())


def greedy_accept(tokens: torch.Tensor, parent: torch.Tensor, target_pred: torch.Tensor) -> AcceptResult:
    """Greedy tree acceptance (SGLang ``verify_tree_greedy``).

    tokens, parent: [bs, m] verify tree; target_pred: [bs, m] target argmax at each node.
    """
    bs, m = tokens.shape
    device = tokens.device
    rows = torch.arange(bs, device=device)
    w = _Walk(bs, m, device)
    for d in range(1, m):
        want = target_pred[rows, w.cur]  # [bs]
        match = (parent == w.cur.view(bs, 1)) & (tokens == want.view(bs, 1)) & w.alive.view(bs, 1)
        has = match.any(dim=1)
        child = match.float().argmax(dim=1)  # first (lowest index) match
        if not w.advance(d, has, child):
            break
    bonus = target_pred[rows, w.cur]
    return _finish(tokens, w.path, w.num_acc, bonus)


def sampling_accept(
    tokens: torch.Tensor,
    parent: torch.Tensor,
    probs: torch.Tensor,
    coins: torch.Tensor,
    final_coins: torch.Tensor,
) -> AcceptResult:
    """Sampling tree acceptance, SGLang's target-only rule (see the module docstring).

    tokens, parent: [bs, m]; probs: [bs, m, V] target sampling distribution at each node (after
    temperature / top-p); coins: [bs, m] one uniform per node (read only at the nodes the walk
    visits); final_coins: [bs] the uniform for the bonus / correction draw.
    """
    bs, m = tokens.shape
    device = tokens.device
    rows = torch.arange(bs, device=device)
    w = _Walk(bs, m, device)
    for d in range(1, m):
        p_cur = probs[rows, w.cur]  # [bs, V]
        is_child = (parent == w.cur.view(bs, 1)) & w.alive.view(bs, 1)  # [bs, m]
        pc = torch.where(is_child, p_cur.gather(1, tokens), torch.zeros((), dtype=p_cur.dtype, device=device))
        acc = pc.cumsum(dim=1)  # running sum over children in verify order
        u = coins[rows, w.cur].view(bs, 1).to(acc.dtype)
        ok = is_child & (u <= acc) & (pc > 0)  # never a zero-probability token, even for u == 0
        has = ok.any(dim=1)
        child = ok.float().argmax(dim=1)
        if not w.advance(d, has, child):
            break
    # residual at the last accepted node: its distribution without its children's tokens
    p_cur = probs[rows, w.cur]  # [bs, V]
    is_child = parent == w.cur.view(bs, 1)
    removed = torch.zeros_like(p_cur).scatter_add_(1, tokens, is_child.to(p_cur.dtype))
    residual = torch.where(removed > 0, torch.zeros_like(p_cur), p_cur)
    bonus = sample_from_probs(residual, final_coins)
    empty = residual.sum(dim=1) <= 0  # rounding pushed u past all mass: measure-zero, no crash
    bonus = torch.where(empty, p_cur.argmax(dim=1), bonus)
    return _finish(tokens, w.path, w.num_acc, bonus)
