"""Pure tensor math shared by algorithms: weighted means and exact byte counts.

``Tensors`` is a flat mapping from parameter name to tensor, the unit every
payload and update is made of.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Exact size on the wire of the tensor data: Σ numel · element size."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """p_i = w_i / Σ_j w_j (error when the total is not positive)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return [float(w) / total for w in weights]


def weighted_mean(tensor_sets: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Σ_i p_i · T_i per name, with p = normalized ``weights``; every set must hold the same names and shapes.

    Accumulates in float64 and casts back, so the result does not depend on client order beyond rounding.
    """
    if not tensor_sets:
        raise ValueError("cannot average an empty list of updates")
    names = tensor_sets[0].keys()
    for ts in tensor_sets[1:]:
        if ts.keys() != names:
            raise ValueError("updates to average hold different tensor names")
    p = normalized_weights(weights)
    out: Tensors = {}
    for name in names:
        acc = torch.zeros_like(tensor_sets[0][name], dtype=torch.float64)
        for pi, ts in zip(p, tensor_sets):
            acc.add_(ts[name].to(torch.float64), alpha=pi)
        out[name] = acc.to(tensor_sets[0][name].dtype)
    return out
