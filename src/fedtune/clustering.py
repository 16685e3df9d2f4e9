"""Clustering clients by the direction of their updates (FedMLLM's model clustering).

Each client's update is flattened into one vector u_i (its trained tensors
minus the ones it started from, restricted to the tensors chosen). The
cosine similarity S_ij = ⟨u_i, u_j⟩ / (‖u_i‖ ‖u_j‖) compares directions only.
Ward's hierarchical clustering (scipy) then runs on one of two Euclidean
pictures of S (``ward_on``):

- ``similarity_rows`` (the reference code, ``fed_clustered.make_clusters``:
  ``linkage(pdist(S), 'ward')``): client i is the point S_i· ∈ R^n, its row
  of similarities; two clients are close when they agree with the same
  clients (a second-order similarity). Clients whose updates are noise have
  rows near their own unit vector, all at about √2 from each other, so they
  form a group of their own;
- ``unit_updates`` (fedtune's): client i is its unit update u_i / ‖u_i‖; the
  distance √(2 − 2 S_ij) is a monotone function of S itself.

A fixed number of clusters k is reached as the reference code reaches it
(:func:`threshold_cut`): of 5,000 evenly spaced distance thresholds between
the first and the last merge, the largest that leaves exactly k clusters cuts
the tree (none does: one cluster); k ≥ n gives every client its own. With
``n_clusters = "auto"`` (fedtune's) k is the one with the best silhouette (on
the same distances) over k = 2 … n − 1; when even that silhouette is below
``min_silhouette``, there is one cluster (no structure worth splitting).
Fewer than three clients: one cluster.

Centering (optional): ũ_i = u_i/‖u_i‖ − m, m = mean_j u_j/‖u_j‖. Updates of
clients doing one task share a large common direction (learning the task),
which raw cosines are dominated by; what is left after removing the mean
direction is what tells groups apart. A client compared later (a late
joiner) is centred by the same m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from fedtune.aggregation import Tensors


def update_vector(trained: Tensors, start: Tensors, names: list[str]) -> torch.Tensor:
    """u = concat over ``names`` of (trained − start), flattened, in float64."""
    return torch.cat([(trained[n].double() - start[n].double()).flatten() for n in names])


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return v / n if n > 0 else torch.zeros_like(v)


def centred_directions(vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(ũ_i = u_i/‖u_i‖ − m, m): the unit update directions less their mean m."""
    unit = [_unit(v.double()) for v in vectors]
    mean = torch.stack(unit).mean(0)
    return [u - mean for u in unit], mean


def centre(vector: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """A further client's ũ = u/‖u‖ − m, with the clustering round's mean direction m."""
    return _unit(vector.double()) - mean.double()


def cosine_similarity_matrix(vectors: list[torch.Tensor]) -> np.ndarray:
    """S_ij = cos(u_i, u_j); a zero vector is similar to nothing (0) but itself (1)."""
    u = torch.stack([v.double() for v in vectors])
    norms = u.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, u / norms.clamp_min(1e-300), torch.zeros_like(u))
    sim = (unit @ unit.T).clamp(-1.0, 1.0).numpy()
    np.fill_diagonal(sim, 1.0)
    return sim


WARD_ON = ("similarity_rows", "unit_updates")
"""What Ward's method clusters (module docstring)."""

SWEEP = 5000
"""Distance thresholds :func:`threshold_cut` tries (the reference code's ``np.linspace(min, max, 5000)``)."""


def distances(sim: np.ndarray, ward_on: str) -> np.ndarray:
    """The n × n Euclidean distances Ward's method clusters: between the rows of ``sim`` (``similarity_rows``), or
    √(2 − 2 S), between unit vectors with cosines S (``unit_updates``)."""
    if ward_on == "similarity_rows":
        return squareform(pdist(np.asarray(sim, dtype=np.float64)))
    if ward_on != "unit_updates":
        raise ValueError(f"unknown ward_on '{ward_on}' (choose one of: {', '.join(WARD_ON)})")
    d = np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def ward_linkage(sim: np.ndarray, ward_on: str) -> np.ndarray:
    """scipy's linkage matrix of Ward clustering on :func:`distances`."""
    return linkage(squareform(distances(sim, ward_on), checks=False), method="ward")


def threshold_cut(z: np.ndarray, k: int) -> np.ndarray:
    """The reference code's cut of the tree ``z`` into k clusters: of :data:`SWEEP` thresholds evenly spaced from
    the first merge's distance to the last's, the largest leaving exactly k flat clusters; none: the last (one
    cluster). Returns scipy's labels 1 … k."""
    chosen = z[-1, 2]
    for t in np.linspace(z[0, 2], z[-1, 2], SWEEP):
        if len(np.unique(fcluster(z, t, "distance"))) == k:
            chosen = t
    return fcluster(z, chosen, "distance")


@dataclass
class Clustering:
    labels: list[int]
    """Cluster of each client, 0 … k − 1, numbered by each cluster's first client."""
    silhouettes: dict[int, float]
    """The silhouette of each k tried (``auto`` only)."""

    @property
    def k(self) -> int:
        return len(set(self.labels))


def _renumber(raw: np.ndarray) -> list[int]:
    order: dict[int, int] = {}
    return [order.setdefault(int(x), len(order)) for x in raw]


def cluster_clients(sim: np.ndarray, n_clusters: int | str = "auto", min_silhouette: float = 0.1, *,
                    ward_on: str) -> Clustering:
    """Ward clusters of the clients whose cosine similarities are ``sim`` (n × n), on ``ward_on``'s distances."""
    n = len(sim)
    if n_clusters != "auto":
        k = int(n_clusters)
        if k <= 1 or n < 2:
            return Clustering([0] * n, {})
        if k >= n:  # the reference code: one cluster per client
            return Clustering(list(range(n)), {})
        return Clustering(_renumber(threshold_cut(ward_linkage(sim, ward_on), k)), {})
    if n < 3:
        return Clustering([0] * n, {})
    z, d = ward_linkage(sim, ward_on), distances(sim, ward_on)
    scores: dict[int, float] = {}
    cuts: dict[int, np.ndarray] = {}
    for k in range(2, n):
        raw = fcluster(z, t=k, criterion="maxclust")
        if len(set(raw)) < 2 or len(set(raw)) == n:
            continue
        cuts[k] = raw
        scores[k] = float(silhouette_score(d, raw, metric="precomputed"))
    if not scores or max(scores.values()) < min_silhouette:
        return Clustering([0] * n, scores)
    best = max(scores, key=lambda k: (scores[k], -k))
    return Clustering(_renumber(cuts[best]), scores)


def nearest_cluster(vector: torch.Tensor, centroids: dict[str, torch.Tensor]) -> str:
    """The cluster whose mean update is most similar (cosine) to ``vector`` (ties: the first name in order)."""
    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        na, nb = a.norm(), b.norm()
        return float(a.double() @ b.double() / (na * nb)) if na > 0 and nb > 0 else -1.0

    return max(sorted(centroids), key=lambda k: cos(vector, centroids[k]))


def agreement(found: list[int], truth: list[str]) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information of the found clusters against the true groups."""
    return {"ari": float(adjusted_rand_score(truth, found)), "nmi": float(normalized_mutual_info_score(truth, found))}
