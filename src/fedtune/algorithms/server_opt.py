"""Server optimisers over FedIT's average: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification" (2019); Reddi et al., "Adaptive Federated
Optimization" (ICLR 2021).

The round's FedIT average x̄ (each tensor separately, weighted by client data
size, zero-padded under heterogeneous ranks) defines the pseudo-gradient
Δ = x̄ − x, which a server optimiser applies to the global tensors x::

    FedAvgM     v ← β v + Δ                          x ← x + η v
    FedAdam     m ← β₁ m + (1 − β₁) Δ,  v ← β₂ v + (1 − β₂) Δ²
    FedYogi     m as Adam,              v ← v − (1 − β₂) Δ² sign(v − Δ²)
    FedAdagrad  m as Adam,              v ← v + Δ²
                x ← x + η m̂ / (√v̂ + τ)

m and v start at 0; m̂ = m / (1 − β₁ᵗ) and, for Adam and Yogi, v̂ = v / (1 − β₂ᵗ)
at server step t (Adam's bias correction, which Reddi et al. omit; it only
changes the first rounds). FedAvgM with β = 0, η = 1 is FedIT. With one local
step of ``train.optimizer: sgd`` (lr 1), Δ is minus the round's union-batch
gradient, and FedAdam is Adam on that batch. The moments live in the server
state (``extra``), so they are checkpointed and resumed with the run.

The step size η_r of round r follows ``schedule``: ``constant``; ``cosine``
from η to ``min_lr_ratio``·η at the last round; or ``cooldown``: constant,
then over the last ``cooldown_fraction`` of the rounds linearly down to
``min_lr_ratio``·η. Schedule η here rather than the clients' lr: under the
adaptive optimisers a client lr schedule rescales Δ over time, which v turns
into a step-size change of its own (about lr_r / RMS of the past lrs).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import ClientUpdate, ServerState
from fedtune.algorithms.fedit import FedIT
from fedtune.errors import FedtuneError

STEP = "server_opt/step"


def _moment(kind: str, name: str) -> str:
    return f"server_opt/{kind}/{name}"


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    schedule: Literal["constant", "cosine", "cooldown"] = "constant"
    """The server step size over the rounds: constant; cosine down to ``min_lr_ratio``; or constant, then a
    linear ``cooldown`` over the last ``cooldown_fraction`` of the rounds."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Where ``cosine`` and ``cooldown`` end, as a fraction of ``server_lr``."""
    cooldown_fraction: float = Field(default=0.2, gt=0, le=1)
    """``cooldown``: the last fraction of the rounds, over which η decays linearly."""


class FedAvgMOptions(_Schedule):
    server_lr: float = Field(default=1.0, gt=0)
    """η: the step along the momentum (1 with momentum 0 is FedIT)."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """β: server momentum."""


class AdagradOptions(_Schedule):
    server_lr: float = Field(default=1e-2, gt=0)
    """η: the server step size (each coordinate moves about η per round)."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """β₁: decay of the first moment m (0: no momentum)."""
    tau: float = Field(default=1e-3, ge=0)
    """τ: the adaptivity floor added to √v (Reddi et al. tune it in 1e-6 … 1e-1)."""


class AdamOptions(AdagradOptions):
    beta2: float = Field(default=0.99, gt=0, lt=1)
    """β₂: decay of the second moment v."""


class _ServerOptimizer(FedIT):
    """FedIT's average, then one step of a server optimiser on the pseudo-gradient Δ."""

    def aggregate(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        average = super().aggregate(rnd, updates, state).global_tensors
        x = state.global_tensors
        extra = dict(state.extra)
        t = int(extra.get(STEP, torch.tensor(0)).item()) + 1
        extra[STEP] = torch.tensor(t)
        eta = self.options.server_lr * self.schedule_factor(rnd)
        new = {}
        for name, mean in average.items():
            delta = mean.float() - x[name].float()
            new[name] = (x[name].float() + eta * self.direction(name, delta, extra, t)).to(mean.dtype)
        return ServerState(round=rnd, global_tensors=new, extra=extra, metrics={"server_lr": eta})

    def schedule_factor(self, rnd: int) -> float:
        """η_r / η for round ``rnd`` (1-based) of ``self.rounds``."""
        o = self.options
        if o.schedule == "constant":
            return 1.0
        if self.rounds is None:
            raise FedtuneError(f"algorithm '{self.name}' with schedule '{o.schedule}' needs the run's number of rounds")
        progress = (rnd - 1) / max(self.rounds - 1, 1)
        if o.schedule == "cosine":
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        start = 1 - o.cooldown_fraction
        return 1.0 if progress <= start else 1 - (1 - o.min_lr_ratio) * (progress - start) / o.cooldown_fraction

    @abstractmethod
    def direction(self, name: str, delta: torch.Tensor, extra: Tensors, t: int) -> torch.Tensor:
        """The change applied to tensor ``name`` at server step t, per unit of η; updates its moments in ``extra``."""


class FedAvgM(_ServerOptimizer):
    name = "fedavgm"
    summary = "FedIT average as a pseudo-gradient, applied with server momentum (Hsu et al. 2019)"
    Options = FedAvgMOptions

    def direction(self, name, delta, extra, t):
        v = self.options.momentum * extra.get(_moment("v", name), torch.zeros_like(delta)) + delta
        extra[_moment("v", name)] = v
        return v


class _Adaptive(_ServerOptimizer):
    second_moment: ClassVar[Literal["adam", "yogi", "adagrad"]]

    def advice(self, train):
        if train.lr_schedule == "constant":
            return []
        return [f"train.lr_schedule: {train.lr_schedule} under {self.name} shrinks Δ over the rounds, which v turns "
                f"into a server step of about lr_r / RMS(past lr); to decay the step, set "
                f"algorithm.options.schedule instead"]

    def direction(self, name, delta, extra, t):
        o = self.options
        m = o.beta1 * extra.get(_moment("m", name), torch.zeros_like(delta)) + (1 - o.beta1) * delta
        v = extra.get(_moment("v", name), torch.zeros_like(delta))
        sq = delta * delta
        if self.second_moment == "adam":
            v = o.beta2 * v + (1 - o.beta2) * sq
        elif self.second_moment == "yogi":
            v = v - (1 - o.beta2) * sq * torch.sign(v - sq)
        else:
            v = v + sq
        extra[_moment("m", name)], extra[_moment("v", name)] = m, v
        m_hat = m / (1 - o.beta1**t) if o.beta1 > 0 else m
        v_hat = v if self.second_moment == "adagrad" else v / (1 - o.beta2**t)
        return m_hat / (v_hat.sqrt() + o.tau)


class FedAdam(_Adaptive):
    name = "fedadam"
    summary = "Adam on the FedIT pseudo-gradient (Reddi et al. 2021)"
    second_moment = "adam"
    Options = AdamOptions


class FedYogi(_Adaptive):
    name = "fedyogi"
    summary = "Yogi on the FedIT pseudo-gradient: additive, sign-controlled second moment (Reddi et al. 2021)"
    second_moment = "yogi"
    Options = AdamOptions


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    summary = "Adagrad on the FedIT pseudo-gradient: accumulated second moment (Reddi et al. 2021)"
    second_moment = "adagrad"
    Options = AdagradOptions
