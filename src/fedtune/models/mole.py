"""AMoLE (FedAMoLE's adaptive mixture of LoRA experts) on a linear layer.

With the frozen weight W₀, E domain experts (A_e ∈ R^{r×d_in}, B_e ∈ R^{d_out×r}), one shared
expert (A_s, B_s), scale s = α / r and a router projection W_t ∈ R^{r×d_in}, per token x::

    y = W₀x + s·B_s A_s x + Σ_{e ∈ top-k} p̃_e · s · B_e A_e x
    score_e = ⟨A_e x, W_t x⟩ / √r            for the client's local experts L only
    p = softmax_{e ∈ L}(score),  p̃_e = p_e / Σ_{e' ∈ top-k} p_e'   (top-k of p, renormalised)

An expert outside L (one the client does not hold) takes no part in routing and gets no weight, so its
tensors receive no gradient. Dropout acts on the experts' input, not on the router's.

Load balancing over L (|L| = N), from the last forward pass, as FedAMoLE's code computes it::

    loss = N · Σ_{e ∈ L} f_e P_e
    f_e = the share of the T·k routing choices (each of the T tokens picks k experts) that go to e,
    P_e = the mean of p_e over the tokens

(Σ_e f_e = 1; every position of the batch counts, padding included; with top-1 this is the Switch
Transformer loss). Training runs each batch through the model in one forward pass, so the loss sees every
position of it (a causal LM's shared prompt prefix is not run apart: :attr:`Mole.shares_prompt_prefix`).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.models.kinds.mole import MoleConfig
from fedtune.errors import FedtuneError
from fedtune.models.lora import HEAD_NAMES, check_targets, trainable_state


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

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float, top_k: int,
                 balance_weight: float = 0.0):
        super().__init__()
        self.balance_weight = balance_weight
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
            share = chosen.sum(0) / chosen.sum()  # f_e: e's share of the T·k choices
            self.balance_loss = len(self.local) * (share * p.reshape(-1, len(self.local)).mean(0)).sum()
        a = torch.stack([self.experts[e].A for e in self.local])
        b = torch.stack([self.experts[e].B for e in self.local])  # N × d_out × r
        weighted = weights.unsqueeze(-1) * torch.einsum("...d,nrd->...nr", h, a)
        return out + self.scale * torch.einsum("...nr,nor->...o", weighted, b)


# --------------------------------------------------------------------------- a model with mixtures

def apply_mole(model: nn.Module, cfg: MoleConfig, task: str = "classification") -> nn.Module:
    """Put a :class:`MoleLinear` on every target linear module of ``model`` (in place, initialised from the
    current torch RNG state); everything else is frozen but a classifier's head (``cfg.train_head``)."""
    targets = set(check_targets(model, cfg.target_modules, "mole.target_modules"))
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    for name, module in found:
        if not isinstance(module, nn.Linear):
            raise FedtuneError(f"mole.target_modules: '{name}' is a {type(module).__name__}, not a Linear layer")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                MoleLinear(module, cfg.num_experts, cfg.r, cfg.alpha, cfg.dropout, cfg.top_k, cfg.balance_weight))
    if task == "classification" and cfg.train_head:
        for name, p in model.named_parameters():
            if any(name.startswith(h + ".") or f".{h}." in name for h in HEAD_NAMES):
                p.requires_grad_(True)
    return model


def mole_layers(model: nn.Module) -> dict[str, MoleLinear]:
    """The model's mixtures by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoleLinear)}


EXPERT = re.compile(r"^(?P<module>.+)\.experts\.(?P<e>\d+)\.(?:A|B)$")
"""The parameter name of a domain expert's factor: ``<module>.experts.<e>.A`` / ``.B``."""


def expert_names(module: str, e: int) -> tuple[str, str]:
    """The names of expert ``e``'s A and B in ``module``."""
    return f"{module}.experts.{e}.A", f"{module}.experts.{e}.B"


def held_experts(names) -> dict[str, list[int]]:
    """Module → the sorted experts whose factors are among the tensor ``names``."""
    held: dict[str, set[int]] = {}
    for n in names:
        m = EXPERT.match(n)
        if m:
            held.setdefault(m["module"], set()).add(int(m["e"]))
    return {k: sorted(v) for k, v in held.items()}


def is_expert(name: str) -> bool:
    return EXPERT.match(name) is not None


def held_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors the model holds now: every one but the experts its mixtures do not route among."""
    local = {n: set(layer.local) for n, layer in mole_layers(model).items()}
    return {n: t for n, t in trainable_state(model).items()
            if (m := EXPERT.match(n)) is None or int(m["e"]) in local[m["module"]]}


def set_local_experts(model: nn.Module, held: dict[str, list[int]]) -> None:
    """Route each mixture among the experts ``held[module]`` (a module not listed: none but the shared one)."""
    for name, layer in mole_layers(model).items():
        layer.set_local(held.get(name, []))


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Σ over the mixtures of balance_weight · their load-balancing loss in the last training forward pass."""
    losses = [m.balance_weight * m.balance_loss for m in mole_layers(model).values() if m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
