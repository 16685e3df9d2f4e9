"""Pure tensor math shared by algorithms: weighted means, robust aggregates and exact byte counts.

``Tensors`` is a flat mapping from parameter name to tensor, the unit every
payload and update is made of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Exact size on the wire of the tensor data: Σ numel · element size (a value that is not a tensor, which
    the server's check rejects, counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


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


class StreamingMean:
    """The weighted mean Σ_i n_i·θ_i / Σ_i n_i, folded one update at a time in constant memory.

    Per tensor it keeps S = Σ_i n_i·θ_i as a double-double (hi + lo, two float64 tensors): a term x is added
    as (s, e) = TwoSum(hi, x), (hi, lo) = TwoSum(s, e + lo), Knuth's TwoSum giving the rounding error of a
    float64 sum exactly (:func:`_two_sum`). For a float32 θ_i and an integer weight n_i < 2²⁹ the term n_i·θ_i
    is exact in float64, so S is known to about 2⁻¹⁰⁰ of Σ|n_i·θ_i| whatever the order: the float32 result of
    the same updates in any order is bit-identical (unless S lies within that distance of a rounding
    boundary). :meth:`result` is (hi + lo) / Σ n_i, cast back.
    """

    def __init__(self) -> None:
        self._hi: Tensors = {}
        self._lo: Tensors = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        """Σ n_i of the updates folded so far."""
        self.count = 0
        """How many updates were folded."""

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update θ_i with weight n_i > 0; every update must hold the first one's names and shapes."""
        if not weight > 0:
            raise ValueError(f"streaming mean: weights must be positive, got {weight}")
        if not self._hi:
            if not tensors:
                raise ValueError("streaming mean: an update holds no tensors")
            self._dtypes = {n: t.dtype for n, t in tensors.items()}
            self._hi = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in tensors.items()}
            self._lo = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in tensors.items()}
        elif tensors.keys() != self._hi.keys():
            raise ValueError("streaming mean: the update holds other tensor names than the first one")
        for name, t in tensors.items():  # all checked before any is folded
            if t.shape != self._hi[name].shape:
                raise ValueError(f"streaming mean: tensor {name!r} has shape {tuple(t.shape)}, the first update's "
                                 f"{tuple(self._hi[name].shape)}")
        for name, t in tensors.items():
            hi, lo = self._hi[name], self._lo[name]
            s, e = _two_sum(hi, t.to(torch.float64) * float(weight))
            s, e = _two_sum(s, e + lo)
            hi.copy_(s)
            lo.copy_(e)
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> Tensors:
        """(hi + lo) / Σ n_i per name, in the dtype of the first update's tensor."""
        return {n: t.to(self._dtypes[n]) for n, t in self.result_float64().items()}

    def result_float64(self) -> Tensors:
        """(hi + lo) / Σ n_i per name, in float64 (for further float64 arithmetic before the cast)."""
        if not self.count:
            raise ValueError("streaming mean: no update was added")
        return {n: (hi + self._lo[n]) / self.total_weight for n, hi in self._hi.items()}


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: s = fl(a + b) and e with s + e = a + b exactly (float64, any magnitudes):
    b' = s − a, e = (a − (s − b')) + (b − b')."""
    s = a + b
    bv = s - a
    return s, (a - (s - bv)) + (b - bv)


# ---- robust aggregation
#
# Each rule sees the clients' tensor sets (all with the same names and shapes) and is
# computed in float64, returned in the first set's dtypes. They are unweighted, as in
# their papers: a client's sample count is its own word, and a weight is what an
# attacker would inflate.


def _stacked(sets: Sequence[Mapping[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Per name, the sets' tensors stacked along a new first axis in float64 (n × shape)."""
    if not sets:
        raise ValueError(f"{what}: cannot aggregate an empty list of updates")
    names = sets[0].keys()
    for ts in sets[1:]:
        if ts.keys() != names:
            raise ValueError(f"{what}: updates hold different tensor names")
    out = {}
    for name in names:
        shapes = {tuple(ts[name].shape) for ts in sets}
        if len(shapes) > 1:
            raise ValueError(f"{what}: tensor {name!r} has different shapes across updates: {sorted(shapes)}")
        out[name] = torch.stack([ts[name].to(torch.float64) for ts in sets])
    return out


def coordinate_median(sets: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Coordinate-wise median (Yin et al., "Byzantine-robust distributed learning: towards optimal statistical
    rates", ICML 2018): θ[k] = med_i θ_i[k] for every coordinate k, unweighted.

    For an even count the median is the mean of the two middle values, as numpy's ``median`` and Flower's
    FedMedian take it (``torch.median`` would take the lower one).
    """
    out: Tensors = {}
    for name, stack in _stacked(sets, "coordinate median").items():
        ordered = stack.sort(dim=0).values
        n = ordered.shape[0]
        mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        out[name] = mid.to(sets[0][name].dtype)
    return out


def trimmed_mean(sets: Sequence[Mapping[str, torch.Tensor]], beta: float) -> Tensors:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the k = ⌊β·n⌋ largest and the
    k smallest of the n values and average the n − 2k left, unweighted (Flower's FedTrimmedAvg, scipy's
    ``trim_mean``). β ∈ [0, ½): β ≥ ½ could leave nothing.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: β must be in [0, 0.5) so that trimming ⌊β·n⌋ values from each end leaves "
                         f"some, got {beta}")
    out: Tensors = {}
    for name, stack in _stacked(sets, "trimmed mean").items():
        n = stack.shape[0]
        k = int(beta * n)
        out[name] = stack.sort(dim=0).values[k:n - k].mean(dim=0).to(sets[0][name].dtype)
    return out


def krum_scores(sets: Sequence[Mapping[str, torch.Tensor]], f: int) -> list[float]:
    """Krum's scores (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
    descent", NeurIPS 2017): with x_i the concatenation of client i's flattened tensors,
    score_i = Σ_{j ∈ N_i} ‖x_i − x_j‖², N_i the n − f − 2 clients nearest to i (i itself excluded).

    Distances are taken in float64 as ‖x_i − x_j‖² directly (Flower's ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j cancels
    for close updates). The paper's guarantee needs n > 2f + 2; n − f − 2 < 1 leaves no neighbour to score.
    """
    n = len(sets)
    if f < 0:
        raise ValueError(f"Krum: the number of Byzantine clients f must be ≥ 0, got {f}")
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"Krum scores each update by its n − f − 2 nearest others, which needs n ≥ f + 3: "
                         f"got n = {n}, f = {f}")
    stacks = _stacked(sets, "Krum")
    x = torch.cat([s.reshape(n, -1) for s in stacks.values()], dim=1)
    scores = []
    for i in range(n):
        d = (x - x[i]).pow(2).sum(dim=1)
        others = torch.cat([d[:i], d[i + 1:]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum_select(sets: Sequence[Mapping[str, torch.Tensor]], f: int, m: int = 1) -> list[int]:
    """The indices of the m updates with the lowest :func:`krum_scores`, lowest first, ties by index: Krum for
    m = 1, multi-Krum (Blanchard et al. 2017, whose aggregate is the mean of these m) for m ≥ 1."""
    if not 1 <= m <= len(sets):
        raise ValueError(f"multi-Krum selects m of the n = {len(sets)} updates: m must be in 1..{len(sets)}, got {m}")
    scores = krum_scores(sets, f)
    return sorted(range(len(sets)), key=lambda i: (scores[i], i))[:m]


def clip_change(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[Tensors, float]:
    """Norm bounding (Sun et al., "Can you really backdoor federated learning?", 2019): Δ ← Δ · min(1, C / ‖Δ‖₂),
    ‖Δ‖₂ over all of Δ's tensors together, in float64. Returns the scaled change and the factor; a change
    within the bound comes back as is, with factor 1."""
    if not bound > 0:
        raise ValueError(f"norm bound must be positive, got {bound}")
    norm = math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in delta.values()))
    if norm <= bound:
        return dict(delta), 1.0
    factor = bound / norm
    return {n: (t.to(torch.float64) * factor).to(t.dtype) for n, t in delta.items()}, factor


# ---- heterogeneous-rank LoRA factors
#
# Per LoRA module, client i holds A_i (r_i × d_in) and B_i (d_out × r_i); the
# scale α/r is equal across clients, so the math is on the unscaled ΔW = B·A.
# Everything is computed in float64 and returned in the input dtype.


def _check_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA factors need A (r × d_in) and B (d_out × r), got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )


def _check_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) -> list[float]:
    """Validate the clients' factors of one module and return p = normalized ``weights``."""
    if not As:
        raise ValueError("cannot aggregate an empty list of LoRA factors")
    if not len(As) == len(Bs) == len(weights):
        raise ValueError(f"got {len(As)} A factors, {len(Bs)} B factors and {len(weights)} weights")
    for A, B in zip(As, Bs):
        _check_pair(A, B)
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    for A, B in zip(As, Bs):
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise ValueError(
                f"clients' LoRA modules differ: d_out × d_in {d_out} × {d_in} vs {B.shape[0]} × {A.shape[1]}"
            )
    return normalized_weights(weights)


def lora_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """ΔW = B·A (d_out × d_in)."""
    _check_pair(A, B)
    return (B.to(torch.float64) @ A.to(torch.float64)).to(A.dtype)


def fit_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A[:r], B[:, :r]) when r ≤ rank, else A padded with zero rows and B with zero columns up to r."""
    _check_pair(A, B)
    if r < 1:
        raise ValueError(f"rank must be at least 1, got {r}")
    pad = r - A.shape[0]
    if pad <= 0:
        return A[:r], B[:, :r]
    return torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))


def zero_pad_mean(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedIT with zero padding: every (A_i, B_i) padded to r_max = max r_i, then A = Σ p_i A_i, B = Σ p_i B_i."""
    _check_factors(As, Bs, weights)
    r_max = max(A.shape[0] for A in As)
    padded = [dict(zip("AB", fit_rank(A, B, r_max))) for A, B in zip(As, Bs)]
    mean = weighted_mean(padded, weights)
    return mean["A"], mean["B"]


def stack_factors(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: A_st = [p_1 A_1; …; p_N A_N] (R × d_in), B_st = [B_1 … B_N] (d_out × R), R = Σ r_i.

    Then B_st A_st = Σ p_i B_i A_i exactly (up to rounding of p_i A_i).
    """
    p = _check_factors(As, Bs, weights)
    A_st = torch.cat([(pi * A.to(torch.float64)).to(A.dtype) for pi, A in zip(p, As)])
    return A_st, torch.cat(list(Bs), dim=1)


def weighted_product_sum(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Dense ΔW = Σ p_i B_i A_i (d_out × d_in): the FlexLoRA aggregate."""
    p = _check_factors(As, Bs, weights)
    acc = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64, device=As[0].device)
    for pi, A, B in zip(p, As, Bs):
        acc.addmm_(B.to(torch.float64), A.to(torch.float64), alpha=pi)
    return acc.to(As[0].dtype)


def energy_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest k ≥ 1 with Σ_{j≤k} σ_j² ≥ τ · Σ_j σ_j² (σ sorted descending, 0 < τ ≤ 1).

    The threshold is lowered by n·ε (n = len(σ), ε the machine epsilon of σ's dtype) of the
    total, so rounding in σ cannot push k past a qualifying rank: τ = 1 gives the number of
    directions holding more than that share of the energy, never len(σ) + 1. All-zero σ gives k = 1.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"energy threshold τ must be in (0, 1], got {tau}")
    if sigma.numel() == 0:
        raise ValueError("cannot pick a rank from an empty spectrum")
    cum = torch.cumsum(sigma.to(torch.float64) ** 2, dim=0)
    threshold = float(cum[-1]) * (tau - sigma.numel() * torch.finfo(sigma.dtype).eps)
    k = int(torch.searchsorted(cum, torch.tensor([threshold], dtype=torch.float64))) + 1
    return min(k, sigma.numel())


def florist(A_st: torch.Tensor, B_st: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FLoRIST (Ramesh et al. 2025): truncated SVD of ΔW = B_st A_st without forming ΔW.

    B_st = U_B S_B V_Bᵀ, A_st = U_A S_A V_Aᵀ (thin SVDs), P = S_B (V_Bᵀ U_A) S_A = U_P S_P V_Pᵀ,
    so ΔW = (U_B U_P) S_P (V_Pᵀ V_Aᵀ). With k = energy_rank(S_P, τ):
    B_g = (U_B U_P)[:, :k] diag(σ_1..σ_k), A_g = (V_Pᵀ V_Aᵀ)[:k]. Returns (A_g, B_g, S_P), S_P the full spectrum.
    """
    _check_pair(A_st, B_st)
    U_B, S_B, Vh_B = torch.linalg.svd(B_st.to(torch.float64), full_matrices=False)
    U_A, S_A, Vh_A = torch.linalg.svd(A_st.to(torch.float64), full_matrices=False)
    P = S_B[:, None] * (Vh_B @ U_A) * S_A
    U_P, S_P, Vh_P = torch.linalg.svd(P, full_matrices=False)
    k = energy_rank(S_P, tau)
    B_g = (U_B @ U_P[:, :k]) * S_P[:k]
    A_g = Vh_P[:k] @ Vh_A
    return A_g.to(A_st.dtype), B_g.to(B_st.dtype), S_P.to(A_st.dtype)


def dense_svd_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA's step: ΔW = U S Vᵀ, B = U[:, :r] diag(S[:r]), A = Vᵀ[:r] (the split FLoRIST uses)."""
    if delta.dim() != 2:
        raise ValueError(f"ΔW must be a matrix, got shape {tuple(delta.shape)}")
    if not 1 <= r <= min(delta.shape):
        raise ValueError(f"rank {r} is not in [1, {min(delta.shape)}] for a {tuple(delta.shape)} matrix")
    U, S, Vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return Vh[:r].to(delta.dtype), (U[:, :r] * S[:r]).to(delta.dtype)
