"""Which clients train in a round: ``federation.sampling``, seeded by (run seed, round) on every runtime.

==========  ==========================================================================================
sampling    round r's clients, of N
==========  ==========================================================================================
``fixed``   k of the N without replacement (k = ``clients_per_round``, or ``fraction`` · N rounded)
``poisson`` each client independently with probability q (q = ``fraction``, or ``clients_per_round`` / N):
            q·N on average, possibly none
==========  ==========================================================================================

Differential privacy is accounted for the sampling the run does (:mod:`fedtune.privacy`): Poisson sampling
with add/remove-one neighbours, fixed-size sampling without replacement with replace-one neighbours.
"""

from __future__ import annotations

import numpy as np

from fedtune.config import RunConfig
from fedtune.dp_noise import SecretStream
from fedtune.errors import FedtuneError
from fedtune.seeds import derive_seed

_SEED = 7919  # a round's sampling: (run seed, round, _SEED)


def clients_per_round(cfg: RunConfig, num_clients: int) -> int:
    """k: the clients a round samples (``fixed``), or the whole number nearest to the mean q·N (``poisson``)."""
    fed = cfg.federation
    if fed.clients_per_round is not None:
        if fed.clients_per_round > num_clients:
            raise FedtuneError(
                f"federation.clients_per_round={fed.clients_per_round} exceeds partition.num_clients={num_clients}"
            )
        return fed.clients_per_round
    if fed.fraction is not None:
        return max(1, round(fed.fraction * num_clients))
    return num_clients


def sampling_rate(cfg: RunConfig, num_clients: int) -> float | None:
    """q, the probability with which each client joins a round under ``poisson`` sampling; None for ``fixed``."""
    fed = cfg.federation
    if fed.sampling == "fixed":
        return None
    if fed.fraction is not None:
        return fed.fraction
    return clients_per_round(cfg, num_clients) / num_clients


def sample_clients(seed: int, rnd: int, num_clients: int, k: int, rate: float | None = None,
                   secret: SecretStream | None = None) -> list[int]:
    """Round ``rnd``'s clients in order: each with probability ``rate`` (Poisson sampling), else k of
    ``num_clients`` drawn without replacement (all of them when k ≥ N). Drawn from (``seed``, ``rnd``), or from
    ``secret`` (the dp wrapper's server key: a sample no one else can recompute), where the k of N are the k
    smallest of N uniforms."""
    if secret is not None:
        u = secret.random(num_clients)
        if rate is not None:
            return np.flatnonzero(u < rate).tolist()
        return sorted(np.argsort(u, kind="stable")[:k].tolist())
    rng = np.random.default_rng(derive_seed(seed, rnd, _SEED))
    if rate is not None:
        return np.flatnonzero(rng.random(num_clients) < rate).tolist()
    if k >= num_clients:
        return list(range(num_clients))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())
