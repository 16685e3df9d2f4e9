"""Per-round diagnostics of the clients' changes, in constant memory per client: how far each moved, and
whether it points with the others.

``update_cosines`` in a round's row: client i's cosine to the round's aggregate change, the weighted mean
Δ̄ = Σ_i p_i Δ_i of the accepted changes (the FedAvg direction; p_i ∝ n_i), where Δ_i = θ_i − θ_i⁰ over
the update's model tensors. A round folds its updates as they arrive and keeps none, so the inner products
are estimated from a count sketch (Charikar, Chen and Farach-Colton, 2002) of each change: K buckets, each
coordinate hashed to a bucket with a random sign; sketches are linear, so the sketch of Δ̄ is Σ p_i S(Δ_i),
and ⟨S(x), S(y)⟩ is an unbiased estimate of ⟨x, y⟩ with a standard deviation of about ‖x‖‖y‖/√K (≈ 0.03
in cosine at K = 1,024). Sign-flipped or scaled attackers show as clients with a cosine near −1, or far
from the others'.
"""

from __future__ import annotations

import math

import torch

from fedtune.aggregation import Tensors

BUCKETS = 1024
"""K: the count sketch's buckets."""
_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply–xorshift rounds) of int64 ``x``, in int64."""
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


def sketch(delta: Tensors, buckets: int = BUCKETS) -> torch.Tensor:
    """The count sketch (float64, ``buckets``) of the change ``delta``, its tensors concatenated in name order."""
    out = torch.zeros(buckets, dtype=torch.float64)
    offset = 0
    for name in sorted(delta):
        x = delta[name].reshape(-1).to(torch.float64)
        j = torch.arange(offset, offset + x.numel(), dtype=torch.int64)
        bucket = _mix(j) % buckets
        sign = 1.0 - 2.0 * (_mix(j ^ 0x9E3779B9) & 1).to(torch.float64)
        out.index_add_(0, bucket, sign * x)
        offset += x.numel()
    return out


def cosines(sketches: dict[int, torch.Tensor], weights: dict[int, float]) -> dict[int, float]:
    """Each client's estimated cosine to the weighted mean of the changes the sketches stand for."""
    total = sum(weights.values())
    if not sketches or total <= 0:
        return {}
    mean = sum(sketches[c] * (weights[c] / total) for c in sketches)
    norm_mean = float(mean.norm())
    out = {}
    for c, s in sorted(sketches.items()):
        denominator = float(s.norm()) * norm_mean
        out[c] = float(s @ mean) / denominator if denominator > 0 else math.nan
    return out
