"""Simulated attacks, to measure defences against (``federation.attack``).

The attacking clients run the honest client half, then change what they send
(:meth:`Attack.apply`, called by :func:`~fedtune.runtime.client.client_round`
after the algorithm's ``update``) or, for a label flip, what they train on
(:meth:`Attack.training_examples`, when a process builds its experiment). Both
happen where a client's own code runs, so the in-process engine and a Flower
node run the same attack, seeded like the rest of the run; no algorithm knows.

With θ⁰ what the client started the round from (``ClientContext.start``, cut
to the client's LoRA rank) and θ its trained tensors, Δ = θ − θ⁰ is its honest
change. Only the update's model tensors change: those named in θ⁰ with θ⁰'s
shape. Side channels (SCAFFOLD's ``scaffold/delta_c/…``, FedAMoLE's
``rsea/…``) are sent as the algorithm made them.

=========== ===================================================================
kind        what the attacker sends, per model tensor
=========== ===================================================================
sign_flip   θ⁰ − s·Δ  (s = ``scale``, default 1)
scale       θ⁰ + s·Δ
noise       θ + ε, ε ~ N(0, σ²) per coordinate (σ = ``std``): a torch Generator
            seeded with derive_seed(run seed, round, client, :data:`_SEED`)
            draws float64 normals for the tensors in sorted name order
boost       θ⁰ + γ·Δ, model replacement (below)
label_flip  its honest update, trained on labels C − 1 − y (C classes) of its
            training rows; its test rows keep their labels
=========== ===================================================================

**Boost** (Bagdasaryan et al., "How to backdoor federated learning", AISTATS
2020, §3.2, model replacement). The paper's server takes
G⁺ = G + (η/n) Σ_{i=1..m} (L_i − G) over the m clients of a round, and the
attacker sends L̃ = γ(X − G) + G with γ = n/η, so that its model X replaces G
when the honest changes cancel; for FedAvg (η/n = 1/m) that is γ = m. The
reference code (``training.py``, lines 266–273 of ebagdasa/
backdoor_federated_learning) divides γ among the round's a attackers:
L̃ = G + (γ/a)(X − G). fedtune's FedAvg weights client i by its training
rows, p_i = n_i / Σ_{j ∈ round} n_j, so the same replacement needs
γ = 1/(p_att · a). An attacker knows every client's size but not who else is
sampled in a round of K of the N clients, so it takes the expected values:
p̂ = n_att / (n_att + (K − 1)·n̄), n̄ the mean training rows of the other
clients, and â = 1 + (A − 1)(K − 1)/(N − 1) of the A attackers. This is
exact when every client trains every round, and the paper's γ = m for one
attacker and equal shards. ``scale`` gives γ instead (e.g. under a server
optimiser, whose own step the paper's γ divides by).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms import Algorithm, ClientUpdate
from fedtune.config import AttackConfig, RunConfig
from fedtune.errors import FedtuneError
from fedtune.seeds import derive_seed
from fedtune.training import Encoded

_SEED = 73_013  # the noise attack's seeds: (run seed, round, client, _SEED)


@dataclass(frozen=True)
class Attack:
    """A run's attack as the clients apply it: ``federation.attack`` with the run seed and, per attacker, the
    factor of its change (sign_flip, scale, boost)."""

    config: AttackConfig
    seed: int
    algorithm: str
    factors: dict[int, float] = field(default_factory=dict)
    """Attacker → the factor k of θ⁰ + k·Δ it sends (−s, s or γ); empty for noise and label_flip."""

    def applies_to(self, client_id: int) -> bool:
        return client_id in self.config.clients

    def apply(self, update: ClientUpdate, start: Tensors, rnd: int) -> ClientUpdate:
        """``update`` as an attacker sends it in round ``rnd`` (module docstring), ``start`` being θ⁰ at the
        client's rank; an honest client's update, or a label flipper's, comes back as it is."""
        kind = self.config.kind
        if not self.applies_to(update.client_id) or kind == "label_flip":
            return update
        names = sorted(n for n, t in update.tensors.items()
                       if n in start and start[n].shape == t.shape and t.is_floating_point())
        if not names:
            raise FedtuneError(f"federation.attack.kind={kind} changes the model tensors client {update.client_id} "
                               f"sends, but algorithm '{self.algorithm}' sends none; choose another algorithm or "
                               "federation.attack.kind=label_flip")
        tensors = dict(update.tensors)
        if kind == "noise":
            g = torch.Generator().manual_seed(derive_seed(self.seed, rnd, update.client_id, _SEED))
            for n in names:
                t = tensors[n]
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * float(self.config.std)
                tensors[n] = (t.to(torch.float64) + noise).to(t.dtype)
        else:
            k = self.factors[update.client_id]
            for n in names:
                t, t0 = tensors[n].to(torch.float64), start[n].to(torch.float64)
                tensors[n] = (t0 + k * (t - t0)).to(tensors[n].dtype)
        return replace(update, tensors=tensors)

    def training_examples(self, client_id: int, examples: Encoded, rows: np.ndarray, num_classes: int) -> Encoded:
        """The examples client ``client_id`` trains on: a label flipper's ``rows`` relabelled C − 1 − y (a copy:
        other clients may share ``examples``), anyone else's as they are."""
        if self.config.kind != "label_flip" or not self.applies_to(client_id):
            return examples
        labels = np.array(examples.labels, dtype=np.int64)
        labels[rows] = num_classes - 1 - labels[rows]
        return replace(examples, labels=labels)

    def record(self) -> dict[str, Any]:
        """What ``partition.json`` and ``summary.json`` say of the attack: kind, clients, options, factors."""
        out: dict[str, Any] = {"kind": self.config.kind, "clients": list(self.config.clients)}
        out.update({k: getattr(self.config, k) for k in ("scale", "std") if getattr(self.config, k) is not None})
        if self.factors:
            out["factors"] = {str(c): k for c, k in sorted(self.factors.items())}
        return out


def boost_factor(client_id: int, sizes: Sequence[int], per_round: int, attackers: int = 1) -> float:
    """γ = 1 / (p̂ · â) for client ``client_id`` (module docstring): p̂ = n_att / (n_att + (K − 1)·n̄) its expected
    weight share in a round of K = ``per_round`` clients, n̄ the mean of the other clients' ``sizes`` (training
    rows), and â = 1 + (A − 1)(K − 1)/(N − 1) the expected number of the A = ``attackers`` in its round."""
    n_att, n = sizes[client_id], len(sizes)
    others = (sum(sizes) - n_att) / (n - 1) if n > 1 else 0.0
    share = n_att / (n_att + (per_round - 1) * others)
    in_round = 1 + (attackers - 1) * (per_round - 1) / (n - 1) if n > 1 else 1.0
    return 1 / (share * in_round)


def check_attack(cfg: RunConfig, algorithm: Algorithm, num_clients: int | None) -> None:
    """One line on what in the rest of the config rules ``federation.attack`` out; ``num_clients`` None (a
    natural partition not yet drawn): the client ids are not checked."""
    attack = cfg.federation.attack
    kind = attack.kind
    if kind == "none":
        return
    if algorithm.pools_data:
        raise FedtuneError(f"algorithm '{algorithm.name}' pools every client's data into one: there is no client "
                           "to attack; remove federation.attack or choose a federated algorithm")
    if num_clients is not None and max(attack.clients) >= num_clients:
        raise FedtuneError(f"federation.attack.clients names client {max(attack.clients)}, but the run has clients "
                           f"0..{num_clients - 1}; give ids of existing clients")
    if kind == "label_flip" and cfg.model.task != "classification":
        raise FedtuneError("federation.attack.kind=label_flip relabels classes, which model.task=sft has none of (a "
                           "response has no flipped counterpart); use a classification task or another kind")
    if kind == "boost" and attack.scale is None and cfg.partition.method == "files":
        raise FedtuneError("federation.attack.kind=boost computes γ from every client's size, which node-local data "
                           "(partition.method=files) keeps on the nodes; set federation.attack.scale (γ)")


def attack_for(cfg: RunConfig, algorithm: Algorithm, num_clients: int, sizes: Sequence[int],
               per_round: int) -> Attack:
    """The run's attack (``federation.attack.kind`` is not none), checked (:func:`check_attack`); ``sizes``: every
    client's training rows (empty where the clients hold their own data, which rules out a computed boost),
    ``per_round``: the clients sampled each round."""
    check_attack(cfg, algorithm, num_clients)
    attack = cfg.federation.attack
    kind = attack.kind
    factors: dict[int, float] = {}
    if kind == "boost" and attack.scale is None:
        factors = {c: boost_factor(c, sizes, per_round, len(attack.clients)) for c in attack.clients}
    elif kind in ("sign_flip", "scale", "boost"):
        factors = {c: -attack.scale if kind == "sign_flip" else attack.scale for c in attack.clients}
    return Attack(attack, cfg.seed, algorithm.name, factors)
