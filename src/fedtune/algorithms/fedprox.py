"""FedProx: FedAvg whose clients are held near the model they received.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020).

Client i, starting the round from the global tensors w_g, minimises its task
loss plus a proximal term over the trainable tensors (LoRA factors and head)::

    F_i(w) + μ/2 · ‖w − w_g‖²

and the server averages as FedIT does (weighted by client data size). μ = 0
is FedIT exactly: the term is not even computed. The logged ``train_loss``
includes the proximal term.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from fedtune.algorithms.base import ClientContext, NoOptions
from fedtune.algorithms.fedit import FedIT


class FedProxOptions(NoOptions):
    mu: float = Field(default=0.01, ge=0)
    """μ: the weight of the proximal term (the paper tunes it in 0.001 … 1)."""


class FedProx(FedIT):
    name = "fedprox"
    summary = "FedIT whose clients add μ/2 ‖w − w_global‖² to their loss"
    Options = FedProxOptions

    def loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        if self.options.mu == 0:
            return outputs.loss
        start = ctx.on_device("start", lambda: ctx.start)
        prox = sum(((p - start[n]) ** 2).sum() for n, p in ctx.model.named_parameters() if p.requires_grad)
        return outputs.loss + 0.5 * self.options.mu * prox
