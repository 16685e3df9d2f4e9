"""Clustering clients by the direction of their updates (FedMLLM's model clustering).

Each client's update is flattened into one vector u_i (its trained tensors
minus the ones it started from, restricted to the tensors chosen). The
cosine similarity S_ij = ⟨u_i, u_j⟩ / (‖u_i‖ ‖u_j‖) compares directions only.
Ward's hierarchical clustering (scipy) runs on the unit vectors u_i / ‖u_i‖,
whose Euclidean distance √(2 − 2 S_ij) is a monotone function of S: Ward is
defined for Euclidean distances, and on these it merges clients by how their
updates point, as clustering S itself would.

With ``n_clusters = "auto"`` the number of clusters k is the one with the
best silhouette (on the same distances) over k = 2 … n − 1; when even that
silhouette is below ``min_silhouette``, there is one cluster (no structure
worth splitting). Fewer than three clients: one cluster.

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
from scipy.spatial.distance import squareform
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


def _distances(sim: np.ndarray) -> np.ndarray:
    """√(2 − 2 S): the Euclidean distance between unit vectors with cosine S."""
    d = np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def ward_linkage(sim: np.ndarray) -> np.ndarray:
    """scipy's linkage matrix of Ward clustering on √(2 − 2 S)."""
    return linkage(squareform(_distances(sim), checks=False), method="ward")


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


def cluster_clients(sim: np.ndarray, n_clusters: int | str = "auto", min_silhouette: float = 0.1) -> Clustering:
    """Ward clusters of the clients whose cosine similarities are ``sim`` (n × n)."""
    n = len(sim)
    if n_clusters != "auto":
        k = min(int(n_clusters), n)
        if k <= 1 or n < 2:
            return Clustering([0] * n, {})
        return Clustering(_renumber(fcluster(ward_linkage(sim), t=k, criterion="maxclust")), {})
    if n < 3:
        return Clustering([0] * n, {})
    z, d = ward_linkage(sim), _distances(sim)
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
