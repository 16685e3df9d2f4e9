"""FFA-LoRA: federated LoRA with A frozen at its shared initialisation; only B is trained and averaged.

Sun, Qin, Li and Wang, "Improving LoRA in Privacy-Preserving Federated Learning" (ICLR 2024). Every
client starts from the same A₀ (the run's seeded initialisation, random) and B = 0; A₀ never trains and
never travels. Client i trains B_i (and the head, when it is trained); the server averages::

    B ← Σ_i p_i B_i,    p_i = n_i / Σ_j n_j   over the round's clients (the run's ``algorithm.reducer``),

which is exact for the product: with A shared, Σ_i p_i B_i A₀ = (Σ_i p_i B_i) A₀, the average of the
clients' updates, where FedIT's separate averages of A and B are not. With heterogeneous ranks
(``lora.client_ranks``) client i holds A₀'s first r_i rows; B_i, zero-padded to r_max, still multiplies
A₀, so the average stays exact, and client i receives B's first r_i columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import ClientContext, ClientUpdate, Expected, Payload, ServerState
from fedtune.algorithms.fedit import FedIT
from fedtune.models.kinds import kinds_with
from fedtune.models.lora import trainable_state

_A, _B = ".lora_A.", ".lora_B."


def _frozen(name: str) -> bool:
    return _A in name


def fit_b(tensors: Tensors, rank: int | None) -> Tensors:
    """Every LoRA B among ``tensors`` cut to its first ``rank`` columns or zero-padded up to them (None: as is)."""
    if rank is None:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        if _B in name:
            t = t[:, :rank] if t.shape[1] >= rank else torch.nn.functional.pad(t, (0, rank - t.shape[1]))
        out[name] = t
    return out


class FFALoRA(FedIT):
    name = "ffa"
    summary = "FFA-LoRA: A frozen at its shared initialisation, B trained and averaged (exact Σ p_i B_i A₀)"
    adapters = kinds_with("factorised")

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        """B (cut to each client's rank) and the head; A₀ stays where it is, on every client."""
        sent = {k: v for k, v in state.global_tensors.items() if not _frozen(k)}
        return {cid: Payload(tensors=fit_b(sent, self.lora.rank(cid))) for cid in client_ids}

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        """What trained: B at the client's rank and the head (A₀ is never sent back)."""
        return {n: e for n, e in super().expected_update(client_id, payload, state).items() if not _frozen(n)}

    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        """Load A₀ at the client's rank and the received B and head; A stops requiring gradients."""
        a0 = {k: v for k, v in self.initial_at_rank(ctx).items() if _frozen(k)}
        self.load(ctx, {**a0, **payload.tensors})
        for name, p in ctx.model.named_parameters():
            if _frozen(name):
                p.requires_grad_(False)

    def update(self, ctx: ClientContext) -> ClientUpdate:
        """B at the client's rank and the head: what trained."""
        return ClientUpdate(ctx.client_id, fit_b(trainable_state(ctx.model), self.lora.rank(ctx.client_id)),
                            ctx.num_examples)

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        """B (zero-padded to r_max) and the head reduced as they arrive (the run's reducer: the mean above)."""
        mean = self.reduce((u.client_id, fit_b(u.tensors, self.lora.max_rank), u.num_examples) for u in updates)
        return ServerState(round=rnd, global_tensors={**state.global_tensors, **mean}, extra=state.extra)
