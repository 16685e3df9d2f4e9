"""Clustered FL (FedMLLM): cluster clients by how their adapter updates point, then federate per cluster.

"Leveraging Federated Learning for Multilingual and Private Language Models
via Model Clustering". Until round ``cluster_round`` this is FedIT. In that
round every client trains, from the global adapter x; the server takes each
client's update u_i = y_i − x over the tensors chosen by ``cluster_on``
(LoRA ``B``, ``A`` or ``both``) and ``cluster_layers`` (``last``: the last
adapted module, layer numbers compared as numbers, as the reference code
takes it; ``all``), and clusters the clients (:mod:`fedtune.clustering`:
Ward on the rows of their cosine-similarity matrix, or on the unit updates,
``ward_on``; optionally of the u_i's directions less their mean, ``center``;
``n_clusters`` fixed, reached by the reference code's threshold sweep, or
``auto`` by silhouette). The clusters' first models (``cluster_models_from``):

- ``next_round`` (the reference code): the clustering round aggregates as
  FedIT; in the round after, every client trains from the global model, and
  cluster k's model is the mean of its members' latest models (that round's,
  or the clustering round's for a member not sampled);
- ``cluster_round``: cluster k's model is the mean of its members' y_i of the
  clustering round itself, one round earlier.

From then on each client trains from and is evaluated with its cluster's
model, and each cluster averages its own members only::

    x_k ← Σ_{i ∈ S ∩ C_k} p_i y_i,   p_i = 1 / |S ∩ C_k|   (``cluster_means: unweighted``, the reference code)
                                     p_i = n_i / Σ_{j ∈ S ∩ C_k} n_j   (``weighted``, by data size)

A cluster without clients in a round keeps its model. With ``server`` set to
a server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad), each cluster's
model (and the global one before clustering) takes a step of its own
optimiser, with moments of its own, on its members' pseudo-gradient
x̄_k − x_k instead of becoming x̄_k; the clusters' first models start the
moments afresh. A client absent at the clustering round trains from x when
it first takes part and joins the cluster whose mean update (centroid) is
most similar to its own update. ``recluster_every`` (with
``cluster_models_from: cluster_round``) clusters again every that many
rounds, from fresh updates of every client against the model it started from.

Reference variants (``assign``): ``similarity`` (the method), ``random``
(uniform random labels over the k clusters, the reference code's
``clustered_random``), ``shuffled`` (the similarity clustering's cluster
sizes, clients shuffled), ``oracle`` (clusters = the clients' true groups,
``partition.by``); all seeded by the round. ``n_clusters: 1`` is FedIT
(with ``cluster_means: weighted``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedtune.aggregation import Tensors, weighted_mean
from fedtune.algorithms.base import ClientUpdate, LoraSetup, NoOptions, Payload, Rule, ServerState
from fedtune.algorithms.fedit import FedIT
from fedtune.algorithms.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.clustering import (
    agreement, centre, centred_directions, cluster_clients, cosine_similarity_matrix, nearest_cluster, update_vector,
)
from fedtune.errors import FedtuneError
from fedtune.models.kinds import kinds_with

CENTROID = "clustered/centroid/"
SERVER = "clustered/server/"
GLOBAL = "global"
SERVERS = {cls.name: cls for cls in (FedIT, FedAvgM, FedAdam, FedYogi, FedAdagrad)}
MEAN_DIRECTION = "clustered/mean_direction"
PENDING = "clustered/pending/"
"""``cluster_models_from: next_round``, between the clustering round and the next: ``labels`` and ``clients`` (the
clustering), and each clustered client's model and data size of the clustering round (``<client>/...``)."""


class ClusteredOptions(NoOptions):
    cluster_round: int = Field(default=1, ge=1)
    """The round in which every client trains and the clients are clustered (FedIT before it)."""
    n_clusters: int | Literal["auto"] = "auto"
    """How many clusters (a fixed k is cut as the reference code cuts it); ``auto``: the best silhouette over
    2 … n − 1 (one cluster below ``min_silhouette``)."""
    min_silhouette: float = Field(default=0.1, ge=-1, le=1)
    """``n_clusters: auto``: below this best silhouette the clients stay one cluster."""
    ward_on: Literal["similarity_rows", "unit_updates"] = "similarity_rows"
    """What Ward's method clusters: each client's row of the cosine-similarity matrix (the reference code), or the
    unit update vectors (distance √(2 − 2 cos))."""
    cluster_on: Literal["B", "A", "both"] = "B"
    """Which LoRA factors the update vectors are made of."""
    cluster_layers: Literal["last", "all"] = "last"
    """``last``: only the last adapted module's factors (the reference code's choice); ``all``: every module."""
    cluster_means: Literal["unweighted", "weighted"] = "unweighted"
    """How a cluster averages its members: each counts once (the reference code), or weighted by data size."""
    cluster_models_from: Literal["next_round", "cluster_round"] = "next_round"
    """The clusters' first models: the members' models of the round after the clustering, which trains from the
    global model (the reference code), or of the clustering round itself."""
    assign: Literal["similarity", "random", "shuffled", "oracle"] = "similarity"
    """``similarity``: the method; ``random``: uniform random labels over the k clusters (the reference code's
    control); ``shuffled``: the similarity clusters' sizes, clients shuffled; ``oracle``: the true groups."""
    center: bool = False
    """Compare the clients' update directions less their mean direction, which clients of one task share; the
    reference code compares the raw updates."""
    recluster_every: int | None = Field(default=None, ge=1)
    """Cluster again every this many rounds after ``cluster_round`` (default: never; needs
    ``cluster_models_from: cluster_round``)."""
    server: Literal["fedit", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "fedit"
    """How each cluster's model takes its members' average: as it is (FedIT), or as a server optimiser's step."""
    server_options: dict[str, Any] = Field(default_factory=dict)
    """Options of ``server``, e.g. ``{server_lr: 0.01}`` (``fedtune algorithms`` lists them)."""

    @model_validator(mode="after")
    def _no_option_is_ignored(self) -> "ClusteredOptions":
        given = self.model_fields_set
        if "min_silhouette" in given and self.n_clusters != "auto":
            raise ValueError("min_silhouette applies to n_clusters: auto; remove it, or set n_clusters: auto")
        if self.assign == "oracle" and given & {"n_clusters", "min_silhouette", "ward_on"}:
            raise ValueError(f"assign: oracle takes the clusters from the true groups; remove "
                             f"{', '.join(sorted(given & {'n_clusters', 'min_silhouette', 'ward_on'}))}")
        if self.recluster_every is not None and self.cluster_models_from == "next_round":
            raise ValueError("recluster_every clusters again within a run of clusters; set cluster_models_from: "
                             "cluster_round with it")
        return self


def _natural(name: str) -> list:
    """Sort key comparing the numbers in a name as numbers (``layers.10`` after ``layers.9``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def cluster_tensor_names(tensors: Tensors, cluster_on: str, cluster_layers: str) -> list[str]:
    """The LoRA tensors an update vector is made of: factors ``B``, ``A`` or ``both``, of the ``last`` adapted
    module (the highest layer; within it the last target by name, e.g. value after query) or of ``all``."""
    keys = {"B": ("lora_B",), "A": ("lora_A",), "both": ("lora_A", "lora_B")}[cluster_on]
    names = sorted((n for n in tensors if any(k in n for k in keys)), key=_natural)
    if not names:
        raise FedtuneError("algorithm 'clustered' found no LoRA tensors to cluster on")
    if cluster_layers == "last":
        last_module = max((n.split(".lora_")[0] for n in names), key=_natural)
        names = [n for n in names if n.split(".lora_")[0] == last_module]
    return names


def cluster_name(k: int) -> str:
    return f"cluster_{k}"


class Clustered(FedIT):
    name = "clustered"
    summary = "clustered FL (FedMLLM): Ward clusters of the clients' update directions, FedIT within each cluster"
    Options = ClusteredOptions
    adapters = kinds_with("factorised")
    mean_of_changes = False  # it clusters on each client's own update
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
        self.server.reducer = self.reducer

    @property
    def reducer(self):
        """The run's reducer, shared with ``server``: each cluster's model is reduced by the run's rule."""
        return self._reducer

    @reducer.setter
    def reducer(self, value) -> None:
        self._reducer = value
        if "server" in self.__dict__:
            self.server.reducer = value

    def bind(self, facts):
        """Also: a fixed ``n_clusters`` must not exceed the clients there are to cluster (known once the
        partition is drawn, e.g. one client per group under ``partition.method: natural``)."""
        k, n = self.options.n_clusters, facts.num_clients
        if isinstance(k, int) and n is not None and k > n:
            raise FedtuneError(f"algorithm.options.n_clusters={k} but the federation has {n} clients to cluster; "
                               f"set n_clusters to at most {n}, or 'auto'")
        self.server.bind(facts)
        return super().bind(facts)

    def extra_rules(self) -> list[Rule]:
        """The clusters must be made within the run: in round ``cluster_round`` (``cluster_models_from:
        cluster_round``) or the one after (``next_round``), at most ``federation.rounds``."""
        o = self.options
        later = o.cluster_models_from == "next_round"

        def past_the_end(cfg) -> str | None:
            last = cfg.federation.rounds - later
            if o.cluster_round <= last:
                return None
            return (f"the clusters are {'decided in' if later else 'made in'} round cluster_round={o.cluster_round}, "
                    f"but the run's last round to make them is {last} (federation.rounds={cfg.federation.rounds}); "
                    "lower cluster_round or raise federation.rounds")

        return [Rule(None, past_the_end)]

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
        if o.assign == "oracle":
            if self.client_groups is None:
                raise FedtuneError("algorithm.options.assign=oracle needs the clients' true groups: partition by a "
                                   "group column (partition.by, e.g. language or task)")
            groups = [self.client_groups[c] for c in cids]
            order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
            return [order[g] for g in groups], {}
        found = cluster_clients(sim, o.n_clusters, o.min_silhouette, ward_on=o.ward_on)
        info: dict = {"silhouettes": {str(k): round(v, 4) for k, v in found.silhouettes.items()}}
        rng = np.random.default_rng([rnd, 1610])
        if o.assign == "random":  # the reference code: np.random.randint(1, n_clusters + 1, size=num_clients)
            k = o.n_clusters if isinstance(o.n_clusters, int) else found.k
            drawn = rng.integers(k, size=len(cids))
            order = {}
            return [order.setdefault(int(x), len(order)) for x in drawn], info
        labels = list(found.labels)
        if o.assign == "shuffled":
            rng.shuffle(labels)
        return labels, info

    def _weights(self, members: list[ClientUpdate]) -> list[float]:
        return [1.0 if self.options.cluster_means == "unweighted" else float(u.num_examples) for u in members]

    def _step(self, rnd: int, scope: str, members: list[ClientUpdate], model: Tensors, extra: Tensors) -> Tensors:
        """``model`` (a cluster's, or the global one) after a round of its ``members``: ``server``'s aggregate,
        with that server's state for ``scope`` kept in ``extra`` (updated in place) under ``clustered/server/``.
        A cluster's members count once each with ``cluster_means: unweighted``; the global model weighs by data."""
        if scope != GLOBAL:
            members = [replace(u, num_examples=w) for u, w in zip(members, self._weights(members))]
        prefix = f"{SERVER}{scope}/"
        own = {k[len(prefix):]: extra.pop(k) for k in [k for k in extra if k.startswith(prefix)]}
        new = self.server.aggregate(rnd, members, ServerState(round=rnd, global_tensors=model, extra=own))
        extra.update({prefix + k: v for k, v in new.extra.items()})
        return new.global_tensors

    def _cluster(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        cids = [u.client_id for u in updates]
        names = self._names(updates[0].tensors)
        vectors = [update_vector(u.tensors, state.model_of(u.client_id), names) for u in updates]
        extra = {k: v for k, v in state.extra.items()  # the clusters start anew; the global model's moments go on
                 if not k.startswith((CENTROID, PENDING)) and k != MEAN_DIRECTION
                 and (not k.startswith(SERVER) or k.startswith(f"{SERVER}{GLOBAL}/"))}
        if self.options.center:
            vectors, mean = centred_directions(vectors)
            extra[MEAN_DIRECTION] = mean.float()
        sim = cosine_similarity_matrix(vectors)
        labels, info = self._labels(rnd, sim, cids)
        for k in sorted(set(labels)):
            members = [i for i, lab in enumerate(labels) if lab == k]
            extra[CENTROID + cluster_name(k)] = torch.stack([vectors[i] for i in members]).mean(0).float()
        metrics = {"clusters": len(set(labels)), "cluster_of": {str(c): cluster_name(k) for c, k in zip(cids, labels)},
                   "similarity_clients": cids, "similarity": np.round(sim, 4).tolist(),
                   "ward_on": self.options.ward_on, **info}
        if self.client_groups is not None:
            metrics.update(agreement(labels, [self.client_groups[c] for c in cids]))
        if self.options.cluster_models_from == "next_round":  # this round aggregates as the ones before it
            new = self._step(rnd, GLOBAL, updates, state.global_tensors, extra)
            extra[PENDING + "clients"], extra[PENDING + "labels"] = torch.tensor(cids), torch.tensor(labels)
            for u in updates:
                extra.update({f"{PENDING}{u.client_id}/{n}": t for n, t in u.tensors.items()})
                extra[f"{PENDING}{u.client_id}/num_examples"] = torch.tensor(u.num_examples)
            return ServerState(round=rnd, global_tensors=new, extra=extra, models={}, assignment={}, metrics=metrics)
        extra = {k: v for k, v in extra.items() if not k.startswith(SERVER)}  # the clusters' moments start anew
        models, assignment = self._first_models(labels, updates, cids)
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
                   "random": "assign=random: uniform random labels",
                   "shuffled": "assign=shuffled: the found cluster sizes, clients shuffled"}[o.assign]
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
        if o.cluster_models_from == "next_round":
            line += f"; their models are made from round {rnd + 1}'s updates"
        return [line]

    def _first_models(self, labels: list[int], members: list[ClientUpdate], cids: list[int]
                      ) -> tuple[dict[str, Tensors], dict[int, str]]:
        """Each cluster's first model, the mean of its members' ``members`` (``cluster_means``), and the assignment."""
        models, assignment = {}, {}
        for k in sorted(set(labels)):
            own = [m for m, lab in zip(members, labels) if lab == k]
            models[cluster_name(k)] = self.reduce((m.client_id, m.tensors, w) for m, w in zip(own, self._weights(own)))
            assignment.update({c: cluster_name(k) for c, lab in zip(cids, labels) if lab == k})
        return models, assignment

    def _form_pending(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        """``next_round``: the round after the clustering makes each cluster's first model from its members' latest
        models (this round's, else the clustering round's); clients the clustering did not see join by centroid."""
        extra = {k: v for k, v in state.extra.items() if not k.startswith((PENDING, SERVER))}
        cids = state.extra[PENDING + "clients"].tolist()
        labels = dict(zip(cids, state.extra[PENDING + "labels"].tolist()))
        fresh = {u.client_id: u for u in updates}
        latest = []
        for c in cids:
            if c in fresh:
                latest.append(fresh[c])
                continue
            prefix = f"{PENDING}{c}/"
            tensors = {k[len(prefix):]: v for k, v in state.extra.items() if k.startswith(prefix)}
            latest.append(ClientUpdate(c, tensors, int(tensors.pop("num_examples"))))
        models, assignment = self._first_models([labels[c] for c in cids], latest, cids)
        joined = self._join(updates, {**state.assignment, **assignment}, state, extra)
        for name in sorted(set(joined.values())):  # a newcomer's update counts in its cluster's first model
            members = [m for m in latest if assignment[m.client_id] == name]
            members += [u for u in updates if joined.get(str(u.client_id)) == name]
            models[name] = self.reduce((m.client_id, m.tensors, w) for m, w in zip(members, self._weights(members)))
        assignment.update({int(c): n for c, n in joined.items()})
        return ServerState(round=rnd, global_tensors=state.global_tensors, extra=extra, models=models,
                           assignment={**state.assignment, **assignment},
                           metrics={"joined": joined} if joined else {})

    def _join(self, updates: list[ClientUpdate], assignment: dict[int, str], state: ServerState,
              extra: Tensors) -> dict[str, str]:
        """{client: cluster} for the round's clients without a cluster: each trained from the global model and joins
        the cluster whose centroid its update points to most."""
        centroids = {name[len(CENTROID):]: v for name, v in extra.items() if name.startswith(CENTROID)}
        joined = {}
        for u in updates:
            if u.client_id not in assignment:
                vec = update_vector(u.tensors, state.global_tensors, self._names(u.tensors))
                if MEAN_DIRECTION in extra:
                    vec = centre(vec, extra[MEAN_DIRECTION])
                joined[str(u.client_id)] = nearest_cluster(vec, centroids)
        return joined

    def aggregate(self, rnd: int, updates, state: ServerState) -> ServerState:
        updates = sorted(updates, key=lambda u: u.client_id)  # clustering compares them all, in client order
        if self.clusters_in(rnd):
            return self._cluster(rnd, updates, state)
        if PENDING + "labels" in state.extra:
            return self._form_pending(rnd, updates, state)
        extra = dict(state.extra)
        if not state.models:
            new = self._step(rnd, GLOBAL, updates, state.global_tensors, extra)
            return ServerState(round=rnd, global_tensors=new, extra=extra)
        joined = self._join(updates, state.assignment, state, extra)
        assignment = {**state.assignment, **{int(c): n for c, n in joined.items()}}
        models = dict(state.models)
        for name in sorted(set(assignment[u.client_id] for u in updates)):
            members = [u for u in updates if assignment[u.client_id] == name]
            models[name] = self._step(rnd, name, members, models[name], extra)
        metrics = {"joined": joined} if joined else {}
        return ServerState(round=rnd, global_tensors=state.global_tensors, extra=extra, models=models,
                           assignment=assignment, metrics=metrics)
