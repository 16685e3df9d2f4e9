"""AMoLE (FedAMoLE's adaptive mixture of LoRA experts) on a linear layer.

With the frozen weight W₀, E domain experts (A_e ∈ R^{r×d_in}, B_e ∈ R^{d_out×r}), one shared
expert (A_s, B_s), scale s = α / r and a router projection W_t ∈ R^{r×d_in}, per token x::

    y = W₀x + s·B_s A_s x + Σ_{e ∈ top-k} p̃_e · s · B_e A_e x
    score_e = ⟨A_e x, W_t x⟩ / √r            for the client's local experts L only
    p = softmax_{e ∈ L}(score),  p̃_e = p_e / Σ_{e' ∈ top-k} p_e'   (top-k of p, renormalised)

An expert outside L (one the client does not hold) takes no part in routing and gets no weight, so its
tensors receive no gradient. Dropout acts on the experts' input, not on the router's.

Load balancing over L (|L| = N), from the last forward pass::

    loss = N · Σ_{e ∈ L} f_e P_e
    f_e = the fraction of tokens whose top-k holds e,  P_e = the mean of p_e over the tokens

(every position of the batch counts, padding included; with top-1 this is the Switch Transformer loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraExpert(nn.Module):
    """One LoRA expert: ``A`` (r × d_in, Kaiming-uniform like peft's LoRA) and ``B`` (d_out × r, zero), so a
    fresh expert adds nothing."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class MoleLinear(nn.Module):
    """A frozen ``base`` linear layer with AMoLE beside it (module docstring); ``local`` lists the experts the
    client holds (set with :meth:`set_local`)."""

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float, top_k: int):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.r, self.scale, self.top_k = r, alpha / r, top_k
        self.experts = nn.ModuleList(LoraExpert(d_in, d_out, r) for _ in range(num_experts))
        self.shared = LoraExpert(d_in, d_out, r)
        self.token_proj = nn.Linear(d_in, r, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.local: list[int] = list(range(num_experts))
        self.balance_loss: torch.Tensor | None = None
        """The load-balancing loss of the last forward pass in training mode (None before one)."""

    def set_local(self, experts: list[int]) -> None:
        """Route among ``experts`` only (the ones this client holds)."""
        if any(not 0 <= e < len(self.experts) for e in experts):
            raise ValueError(f"experts {experts} outside 0..{len(self.experts) - 1}")
        self.local = sorted(experts)

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, p̃) over the local experts for every token of ``x`` (... × d_in → ... × N each)."""
        a = torch.stack([self.experts[e].A for e in self.local])  # N × r × d_in
        ax = torch.einsum("...d,nrd->...nr", x, a)
        scores = torch.einsum("...nr,...r->...n", ax, self.token_proj(x)) / math.sqrt(self.r)
        p = scores.softmax(dim=-1)
        top, idx = p.topk(min(self.top_k, len(self.local)), dim=-1)
        weights = torch.zeros_like(p).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True))
        return p, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        out = out + self.scale * F.linear(F.linear(h, self.shared.A), self.shared.B)
        if not self.local:
            return out
        p, weights = self.routing(x)
        if self.training:
            chosen = (weights > 0).to(p.dtype).reshape(-1, len(self.local))
            self.balance_loss = len(self.local) * (chosen.mean(0) * p.reshape(-1, len(self.local)).mean(0)).sum()
        a = torch.stack([self.experts[e].A for e in self.local])
        b = torch.stack([self.experts[e].B for e in self.local])  # N × d_out × r
        weighted = weights.unsqueeze(-1) * torch.einsum("...d,nrd->...nr", h, a)
        return out + self.scale * torch.einsum("...nr,nor->...o", weighted, b)
