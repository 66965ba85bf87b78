"""The acceptance walk on hand-built trees, checked value by value.

Losslessness (``tests/test_lossless_exact.py``) holds for a walk that accepts too little, so these
tests pin how much is accepted: a greedy walk follows the argmax chain to its end, rows of a batch
stop at their own depth without disturbing each other, the sampling rule's boundary ``u <= acc``
is inclusive (in the probabilities' precision), and a residual with no mass left falls back to the
current node's argmax in its own row. Paths and emitted tokens are padded with -1.
"""

from __future__ import annotations

import torch

from evict.engine.acceptance import greedy_accept, sampling_accept

# verify tree shared by the tests: root 0 -> 1, 2; 1 -> 3; 3 -> 4
PARENT = [-1, 0, 0, 1, 3]


def test_greedy_follows_the_argmax_chain_to_the_end_and_rows_stop_independently():
    tokens = torch.tensor([[7, 10, 11, 12, 13], [7, 10, 11, 12, 13], [7, 10, 11, 12, 13]])
    parent = torch.tensor([PARENT] * 3)
    target_pred = torch.tensor(
        [
            [10, 12, 0, 13, 99],  # the whole chain 0 -> 1 -> 3 -> 4, then bonus 99
            [11, 0, 50, 0, 0],  # node 2 (token 11), whose argmax 50 is not in the tree
            [42, 12, 0, 13, 99],  # nothing accepted at the root: bonus 42
        ]
    )
    res = greedy_accept(tokens, parent, target_pred)
    assert res.path.tolist() == [[0, 1, 3, 4, -1], [0, 2, -1, -1, -1], [0, -1, -1, -1, -1]]
    assert res.num_accepted.tolist() == [3, 1, 0]
    assert res.bonus.tolist() == [99, 50, 42]
    assert res.emitted.tolist() == [[10, 12, 13, 99, -1], [11, 50, -1, -1, -1], [42, -1, -1, -1, -1]]
    assert res.num_emitted.tolist() == [4, 2, 1]


def test_greedy_root_only_tree_emits_the_bonus():
    res = greedy_accept(torch.tensor([[5]]), torch.tensor([[-1]]), torch.tensor([[8]]))
    assert res.path.tolist() == [[0]] and res.num_accepted.tolist() == [0]
    assert res.emitted.tolist() == [[8]]


def _sampling_case(prob_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Three rows over V = 4 on the tree root 0 -> 1 (token 0), 2 (token 1); 1 -> 3 (token 2)."""
    tokens = torch.tensor([[3, 0, 1, 2]] * 3)
    parent = torch.tensor([[-1, 0, 0, 1]] * 3)
    probs = torch.zeros(3, 4, 4, dtype=torch.float64)
    # row 0: the coin at the root equals p(token 0) exactly -> child 1; then child 3; bonus token 3
    probs[0, 0] = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    probs[0, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    probs[0, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    # row 1: the coin is past both children (0.25 + 0.25): no child, bonus from the residual
    probs[1, 0] = torch.tensor([0.25, 0.25, 0.3, 0.2], dtype=torch.float64)
    # row 2: the children hold all the mass left (rounding lost the rest): the residual is empty
    probs[2, 0] = torch.tensor([0.2, 0.3, 0.0, 0.0], dtype=torch.float64)
    coins = torch.full((3, 4), 0.5, dtype=torch.float64)
    coins[0, 0] = 0.7  # == p(token 0); as float32 probabilities 0.7 rounds down, the coin with it
    coins[1, 0] = 0.9
    coins[2, 0] = 0.9
    final = torch.tensor([0.5, 0.1, 0.5], dtype=torch.float64)
    return tokens, parent, probs.to(prob_dtype), coins, final


def _check_sampling(res) -> None:
    assert res.path.tolist() == [[0, 1, 3, -1], [0, -1, -1, -1], [0, -1, -1, -1]]
    assert res.num_accepted.tolist() == [2, 0, 0]
    # row 1: residual [0, 0, 0.3, 0.2], coin 0.1 -> token 2; row 2: empty -> argmax of its own p = 1
    assert res.bonus.tolist() == [3, 2, 1]
    assert res.emitted.tolist() == [[0, 2, 3, -1], [2, -1, -1, -1], [1, -1, -1, -1]]


def test_sampling_walk_boundary_is_inclusive_and_rows_are_independent():
    _check_sampling(sampling_accept(*_sampling_case(torch.float64)))


def test_sampling_compares_the_coin_in_the_probabilities_precision():
    # float32 0.7 is 0.69999998...: the float64 coin 0.7 is compared after rounding to float32,
    # so it still lands on the boundary and accepts the child
    _check_sampling(sampling_accept(*_sampling_case(torch.float32)))
