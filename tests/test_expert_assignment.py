"""RSEA's integer program: constraints hold, the optimum equals brute force, infeasible settings are one line."""

import itertools

import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.expert_assignment import assign_experts, check_assignment, preferences


def _brute_force(p, k, lo, hi):
    e, c = p.shape
    rows = [r for r in itertools.product([0, 1], repeat=c) if sum(r) == k]  # each expert picks k clients
    best, best_x = -np.inf, None
    for choice in itertools.product(rows, repeat=e):
        x = np.array(choice)
        per_client = x.sum(axis=0)
        if per_client.min() >= lo and per_client.max() <= hi and (p * x).sum() > best:
            best, best_x = (p * x).sum(), x
    return best, best_x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_program_satisfies_every_constraint_and_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    p = preferences(rng.normal(size=(4, 8)), rng.normal(size=(3, 8)))
    assert np.allclose(p.sum(axis=1), 1)
    x = assign_experts(p, expert_choices=2, min_experts=2, max_experts=3)
    assert (x.sum(axis=1) == 2).all()
    assert (x.sum(axis=0) >= 2).all() and (x.sum(axis=0) <= 3).all()
    best, _ = _brute_force(p, 2, 2, 3)
    assert (p * x).sum() == pytest.approx(best)


def test_preferences_are_the_softmax_over_clients_of_scaled_dot_products():
    experts = np.array([[1.0, 0.0], [0.0, 2.0]])
    tokens = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    s = experts @ tokens.T / np.sqrt(2)
    expected = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    assert np.allclose(preferences(experts, tokens), expected)


def test_the_seed_defaults_at_scale_are_solved():
    rng = np.random.default_rng(0)
    p = preferences(rng.normal(size=(30, 8)), rng.normal(size=(10, 8)))
    x = assign_experts(p, expert_choices=2, min_experts=2, max_experts=8)
    assert (x.sum(axis=1) == 2).all() and 2 <= x.sum(axis=0).min() and x.sum(axis=0).max() <= 8


@pytest.mark.parametrize("args,match", [
    ((4, 3, 4, 1, 2), "exceeds the 3 clients"),
    ((2, 3, 1, 2, 2), "cannot give 3 clients at least"),
    ((30, 3, 2, 2, 8), "exceed 3 clients"),
    ((4, 3, 2, 3, 2), "min ≤ max"),
])
def test_infeasible_settings_are_one_line_errors(args, match):
    with pytest.raises(FedtuneError, match=match):
        check_assignment(*args)


@pytest.mark.parametrize("e,c,k,lo,hi", [(5, 3, 2, 3, 4), (7, 4, 2, 3, 4), (6, 6, 1, 1, 1), (3, 5, 5, 3, 3)])
def test_every_setting_the_check_accepts_is_solved(e, c, k, lo, hi):
    check_assignment(e, c, k, lo, hi)
    x = assign_experts(np.random.default_rng(0).random((e, c)), k, lo, hi)
    assert (x.sum(axis=1) == k).all() and lo <= x.sum(axis=0).min() and x.sum(axis=0).max() <= hi
