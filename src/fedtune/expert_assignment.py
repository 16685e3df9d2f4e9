"""Reverse-selection expert assignment (RSEA, FedAMoLE): experts choose their clients, as an integer program.

For one adapted module with E experts and C clients, given each expert's embedding ē_e (the mean of A_e x
over its holders' auxiliary tokens) and each client's token embedding t̄_c (the mean of W_t x)::

    S = Ē T̄ᵀ / √r                        (E × C)
    P_e· = softmax_c(S_e·)                each expert's preference over the clients

    max  Σ_ec P_ec x_ec
    s.t. Σ_c x_ec = k                     every expert goes to k clients (expert_choices)
         m ≤ Σ_e x_ec ≤ M                 every client holds between m and M experts (min/max_experts)
         x_ec ∈ {0, 1}

solved with ``scipy.optimize.milp`` (HiGHS). The program is feasible exactly when k ≤ C, m ≤ M, M ≥ 1 and
C·m ≤ E·k ≤ C·M (with at most E experts per client): dealing each expert to k consecutive clients, round
robin, gives every client ⌊E·k/C⌋ or ⌈E·k/C⌉ experts.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from fedtune.errors import FedtuneError


def check_assignment(num_experts: int, num_clients: int, expert_choices: int, min_experts: int,
                     max_experts: int) -> None:
    """A one-line error when no assignment satisfies the constraints (see the module docstring)."""
    e, c, k, lo, hi = num_experts, num_clients, expert_choices, min_experts, max_experts
    if k > c:
        raise FedtuneError(f"expert_choices={k} exceeds the {c} clients: each expert goes to k distinct clients")
    if lo > hi or hi > e:
        raise FedtuneError(f"min_experts={lo} and max_experts={hi} must satisfy min ≤ max ≤ num_experts={e}")
    if e * k < c * lo:
        raise FedtuneError(f"num_experts · expert_choices = {e * k} expert places cannot give {c} clients at least "
                           f"min_experts={lo} each ({c * lo}); raise num_experts or expert_choices, or lower min_experts")
    if e * k > c * hi:
        raise FedtuneError(f"num_experts · expert_choices = {e * k} expert places exceed {c} clients × max_experts={hi} "
                           f"({c * hi}); lower num_experts or expert_choices, or raise max_experts")


def preferences(expert_embeddings: np.ndarray, token_embeddings: np.ndarray) -> np.ndarray:
    """P = softmax over clients of Ē T̄ᵀ / √r: (E × r), (C × r) → (E × C), each row summing to 1."""
    scores = np.asarray(expert_embeddings, np.float64) @ np.asarray(token_embeddings, np.float64).T
    scores /= np.sqrt(expert_embeddings.shape[1])
    scores -= scores.max(axis=1, keepdims=True)
    p = np.exp(scores)
    return p / p.sum(axis=1, keepdims=True)


def assign_experts(preference: np.ndarray, expert_choices: int, min_experts: int, max_experts: int) -> np.ndarray:
    """The binary E × C assignment maximising Σ P_ec x_ec under the module docstring's constraints."""
    p = np.asarray(preference, np.float64)
    e, c = p.shape
    check_assignment(e, c, expert_choices, min_experts, max_experts)
    var = np.arange(e * c).reshape(e, c)  # x_ec is variable e·C + c
    rows = np.concatenate([np.repeat(np.arange(e), c), e + np.tile(np.arange(c), e)])
    cols = np.concatenate([var.ravel(), var.ravel()])
    a = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(e + c, e * c)).tocsr()
    lower = np.concatenate([np.full(e, expert_choices), np.full(c, min_experts)])
    upper = np.concatenate([np.full(e, expert_choices), np.full(c, max_experts)])
    res = milp(-p.ravel(), constraints=LinearConstraint(a, lower, upper), integrality=np.ones(e * c),
               bounds=Bounds(0, 1))
    if res.x is None:  # feasibility was checked: HiGHS failing here is a solver problem, not a config one
        raise FedtuneError(f"the expert-assignment program found no solution ({res.message})")
    return np.round(res.x).reshape(e, c).astype(bool)
