"""Clustered FL (FedMLLM): cluster clients by how their adapter updates point, then federate per cluster.

"Leveraging Federated Learning for Multilingual and Private Language Models
via Model Clustering". Until round ``cluster_round`` this is FedIT. In that
round every client trains, from the global adapter x; the server takes each
client's update u_i = y_i − x over the tensors chosen by ``cluster_on``
(LoRA ``B``, ``A`` or ``both``) and ``cluster_layers`` (``last``: the
alphabetically last such tensor, as the seed does; ``all``), and clusters
the clients (:mod:`fedtune.clustering`: Ward on the cosine similarities of
the u_i, or with ``center`` of the u_i's directions less their mean;
``n_clusters`` fixed, or ``auto`` by silhouette). Cluster k's model
starts as the FedIT average of its members' y_i; from then on each client
trains from and is evaluated with its cluster's model, and each cluster
averages its own members only (weighted by data size)::

    x_k ← Σ_{i ∈ S ∩ C_k} p_i y_i,    p_i = n_i / Σ_{j ∈ S ∩ C_k} n_j

A cluster without clients in a round keeps its model. With ``server`` set to
a server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad), each cluster's
model (and the global one before clustering) takes a step of its own
optimiser, with moments of its own, on its members' pseudo-gradient
x̄_k − x_k instead of becoming x̄_k; every clustering round starts the
moments afresh, as it starts the clusters. A client absent at the
clustering round trains from x when it first takes part and joins the
cluster whose mean update (centroid) is most similar to its own update.
``recluster_every`` clusters again every that many rounds, from fresh
updates of every client against the model it started from.

Reference variants (``assign``): ``similarity`` (the method), ``random``
(the same cluster sizes, clients shuffled; seeded by the round), ``oracle``
(clusters = the clients' true groups, ``partition.by``); ``n_clusters: 1`` is
FedIT.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedtune.aggregation import Tensors, weighted_mean
from fedtune.algorithms.base import ClientUpdate, LoraSetup, NoOptions, Payload, ServerState
from fedtune.algorithms.fedit import FedIT
from fedtune.algorithms.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.clustering import (
    agreement, centre, centred_directions, cluster_clients, cosine_similarity_matrix, nearest_cluster, update_vector,
)
from fedtune.errors import FedtuneError

CENTROID = "clustered/centroid/"
SERVER = "clustered/server/"
GLOBAL = "global"
SERVERS = {cls.name: cls for cls in (FedIT, FedAvgM, FedAdam, FedYogi, FedAdagrad)}
MEAN_DIRECTION = "clustered/mean_direction"


class ClusteredOptions(NoOptions):
    cluster_round: int = Field(default=1, ge=1)
    """The round in which every client trains and the clients are clustered (FedIT before it)."""
    n_clusters: int | Literal["auto"] = "auto"
    """How many clusters; ``auto``: the best silhouette over 2 … n − 1 (one cluster below ``min_silhouette``)."""
    min_silhouette: float = Field(default=0.1, ge=-1, le=1)
    """``auto``: below this best silhouette the clients stay one cluster."""
    cluster_on: Literal["B", "A", "both"] = "B"
    """Which LoRA factors the update vectors are made of."""
    cluster_layers: Literal["last", "all"] = "last"
    """``last``: only the alphabetically last LoRA module's factors (the seed's choice); ``all``: every module."""
    assign: Literal["similarity", "random", "oracle"] = "similarity"
    """``similarity``: the method; ``random``: the same cluster sizes, clients shuffled; ``oracle``: the true groups."""
    center: bool = False
    """Compare the clients' update directions less their mean direction, which clients of one task share; the
    seed compares the raw updates."""
    recluster_every: int | None = Field(default=None, ge=1)
    """Cluster again every this many rounds after ``cluster_round`` (default: never)."""
    server: Literal["fedit", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "fedit"
    """How each cluster's model takes its members' average: as it is (FedIT), or as a server optimiser's step."""
    server_options: dict[str, Any] = Field(default_factory=dict)
    """Options of ``server``, e.g. ``{server_lr: 0.01}`` (``fedtune algorithms`` lists them)."""


def cluster_tensor_names(tensors: Tensors, cluster_on: str, cluster_layers: str) -> list[str]:
    """The LoRA tensors an update vector is made of: factors ``B``, ``A`` or ``both``, of the alphabetically
    ``last`` adapted module or of ``all``."""
    keys = {"B": ("lora_B",), "A": ("lora_A",), "both": ("lora_A", "lora_B")}[cluster_on]
    names = sorted(n for n in tensors if any(k in n for k in keys))
    if not names:
        raise FedtuneError("algorithm 'clustered' found no LoRA tensors to cluster on")
    if cluster_layers == "last":
        last_module = max(n.split(".lora_")[0] for n in names)
        names = [n for n in names if n.split(".lora_")[0] == last_module]
    return names


def cluster_name(k: int) -> str:
    return f"cluster_{k}"


class Clustered(FedIT):
    name = "clustered"
    summary = "clustered FL (FedMLLM): Ward clusters of the clients' update directions, FedIT within each cluster"
    Options = ClusteredOptions
    adapters = ("lora",)
    requires = ("one LoRA rank for every client; assign=oracle needs a partition by a group column "
                "(natural or group_clusters); per-client evaluation (eval.per_client) scores each client's cluster")

    def __init__(self, options=None, lora: LoraSetup | None = None):
        super().__init__(options, lora)
        if self.lora.client_ranks is not None:
            raise FedtuneError("algorithm 'clustered' needs every client at one LoRA rank; remove lora.client_ranks "
                               "/ rank_tiers")
        o = self.options
        if isinstance(o.n_clusters, int) and o.n_clusters < 1:
            raise FedtuneError("algorithm.options.n_clusters must be a positive integer or 'auto'")
        try:
            self.server = SERVERS[o.server].create(o.server_options, self.lora)
        except FedtuneError as e:
            raise FedtuneError(str(e).replace("algorithm.options", "algorithm.options.server_options")) from None

    def bind(self, facts):
        self.server.bind(facts)
        return super().bind(facts)

    def clusters_in(self, rnd: int) -> bool:
        """Whether round ``rnd`` clusters the clients."""
        o = self.options
        if rnd == o.cluster_round:
            return True
        return o.recluster_every is not None and rnd > o.cluster_round and (rnd - o.cluster_round) % o.recluster_every == 0

    def participants(self, rnd: int, sampled: list[int]) -> list[int]:
        if self.clusters_in(rnd):
            if self.num_clients is None:
                raise FedtuneError("algorithm 'clustered' needs the number of clients to cluster them all")
            return list(range(self.num_clients))
        return sampled

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        return {cid: Payload(tensors=state.model_of(cid)) for cid in client_ids}

    # ------------------------------------------------------------------ aggregation
    def _names(self, tensors: Tensors) -> list[str]:
        return cluster_tensor_names(tensors, self.options.cluster_on, self.options.cluster_layers)

    def _labels(self, rnd: int, sim: np.ndarray, cids: list[int]) -> tuple[list[int], dict]:
        o = self.options
        found = cluster_clients(sim, o.n_clusters, o.min_silhouette)
        info: dict = {"silhouettes": {str(k): round(v, 4) for k, v in found.silhouettes.items()}}
        if o.assign == "similarity":
            return found.labels, info
        if o.assign == "random":
            labels = list(found.labels)
            np.random.default_rng([rnd, 1610]).shuffle(labels)
            return labels, info
        if self.client_groups is None:
            raise FedtuneError("algorithm.options.assign=oracle needs the clients' true groups: partition by a "
                               "group column (partition.by, e.g. language or task)")
        groups = [self.client_groups[c] for c in cids]
        order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        return [order[g] for g in groups], info

    def _step(self, rnd: int, scope: str, members: list[ClientUpdate], model: Tensors, extra: Tensors) -> Tensors:
        """``model`` (a cluster's, or the global one) after a round of its ``members``: ``server``'s aggregate,
        with that server's state for ``scope`` kept in ``extra`` (updated in place) under ``clustered/server/``."""
        prefix = f"{SERVER}{scope}/"
        own = {k[len(prefix):]: extra.pop(k) for k in [k for k in extra if k.startswith(prefix)]}
        new = self.server.aggregate(rnd, members, ServerState(round=rnd, global_tensors=model, extra=own))
        extra.update({prefix + k: v for k, v in new.extra.items()})
        return new.global_tensors

    def _cluster(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        cids = [u.client_id for u in updates]
        names = self._names(updates[0].tensors)
        vectors = [update_vector(u.tensors, state.model_of(u.client_id), names) for u in updates]
        extra = {k: v for k, v in state.extra.items()
                 if not k.startswith((CENTROID, SERVER)) and k != MEAN_DIRECTION}  # clusters and moments start anew
        if self.options.center:
            vectors, mean = centred_directions(vectors)
            extra[MEAN_DIRECTION] = mean.float()
        sim = cosine_similarity_matrix(vectors)
        labels, info = self._labels(rnd, sim, cids)
        models, assignment = {}, {}
        for k in sorted(set(labels)):
            members = [i for i, lab in enumerate(labels) if lab == k]
            models[cluster_name(k)] = weighted_mean([updates[i].tensors for i in members],
                                                    [updates[i].num_examples for i in members])
            extra[CENTROID + cluster_name(k)] = torch.stack([vectors[i] for i in members]).mean(0).float()
            assignment.update({cids[i]: cluster_name(k) for i in members})
        metrics = {"clusters": len(models), "cluster_of": {str(c): assignment[c] for c in cids},
                   "similarity_clients": cids, "similarity": np.round(sim, 4).tolist(), **info}
        if self.client_groups is not None:
            metrics.update(agreement(labels, [self.client_groups[c] for c in cids]))
        global_tensors = weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
        return ServerState(round=rnd, global_tensors=global_tensors, extra=extra, models=models,
                           assignment={**state.assignment, **assignment}, metrics=metrics)

    def decisions(self, rnd: int, metrics: dict[str, Any]) -> list[str]:
        """A clustering round: how many clusters and why (the best silhouette against ``min_silhouette`` under
        ``auto``), each cluster's clients with their groups, and the ARI / NMI against the groups when known.
        A later round: the clients that joined a cluster."""
        if "cluster_of" not in metrics:
            joined = metrics.get("joined") or {}
            return [f"round {rnd}: " + "; ".join(f"client {c} joined {name} (the nearest centroid)"
                                                 for c, name in joined.items())] if joined else []
        o, cluster_of = self.options, metrics["cluster_of"]
        k = len(set(cluster_of.values()))
        scores = {int(n): float(v) for n, v in (metrics.get("silhouettes") or {}).items()}
        if o.assign != "similarity":
            why = {"oracle": "assign=oracle: the clients' true groups",
                   "random": "assign=random: the found cluster sizes, clients shuffled"}[o.assign]
        elif o.n_clusters != "auto":
            why = f"n_clusters={o.n_clusters}"
        elif not scores:
            why = "auto: fewer than 3 clients to compare"
        else:
            best = max(scores, key=lambda n: (scores[n], -n))
            verdict = "below" if scores[best] < o.min_silhouette else "≥"
            why = f"auto: best silhouette {scores[best]:.3f} at k={best}, {verdict} min_silhouette {o.min_silhouette:g}"
        members: dict[str, list[int]] = {}
        for c, name in cluster_of.items():
            members.setdefault(name, []).append(int(c))
        parts = []
        for name in sorted(members):
            clients = sorted(members[name])
            groups = Counter(self.client_groups[c] for c in clients) if self.client_groups else {}
            held = f" ({', '.join(f'{g} ×{n}' for g, n in sorted(groups.items()))})" if groups else ""
            parts.append(f"{name} = client{'s' * (len(clients) != 1)} {', '.join(map(str, clients))}{held}")
        line = (f"round {rnd}: clustered {len(cluster_of)} clients into {k} cluster{'s' * (k != 1)} ({why}): "
                + "; ".join(parts))
        if "ari" in metrics:
            line += f"; ARI {metrics['ari']:.2f}, NMI {metrics['nmi']:.2f} against their groups"
        return [line]

    def aggregate(self, rnd: int, updates, state: ServerState) -> ServerState:
        updates = sorted(updates, key=lambda u: u.client_id)  # clustering compares them all, in client order
        if self.clusters_in(rnd):
            return self._cluster(rnd, updates, state)
        extra = dict(state.extra)
        if not state.models:
            new = self._step(rnd, GLOBAL, updates, state.global_tensors, extra)
            return ServerState(round=rnd, global_tensors=new, extra=extra)
        assignment, joined = dict(state.assignment), {}
        centroids = {name[len(CENTROID):]: v for name, v in state.extra.items() if name.startswith(CENTROID)}
        for u in updates:
            if u.client_id not in assignment:  # a late client: it trained from the global model
                names = self._names(u.tensors)
                vec = update_vector(u.tensors, state.global_tensors, names)
                if MEAN_DIRECTION in state.extra:
                    vec = centre(vec, state.extra[MEAN_DIRECTION])
                assignment[u.client_id] = joined[str(u.client_id)] = nearest_cluster(vec, centroids)
        models = dict(state.models)
        for name in sorted(set(assignment[u.client_id] for u in updates)):
            members = [u for u in updates if assignment[u.client_id] == name]
            models[name] = self._step(rnd, name, members, models[name], extra)
        metrics = {"joined": joined} if joined else {}
        return ServerState(round=rnd, global_tensors=state.global_tensors, extra=extra, models=models,
                           assignment=assignment, metrics=metrics)
