"""Local-only training: every client trains its own adapters and never shares them.

The lower reference for personalisation: client i keeps θ_i across rounds
(in its persistent state), starting from the common initialisation; nothing
is sent in either direction, and evaluation is per client on its own test
shard.
"""

from __future__ import annotations

from fedtune.algorithms.base import Algorithm, ClientContext, ClientUpdate, Expected, Payload, ServerState
from fedtune.models.lora import trainable_state


class LocalOnly(Algorithm):
    name = "local"
    summary = "each client trains alone (no communication; per-client evaluation)"
    personalized = True
    sends_model = False

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        return {cid: Payload() for cid in client_ids}

    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        self.load(ctx, ctx.state or self.initial_at_rank(ctx))

    def update(self, ctx: ClientContext) -> ClientUpdate:
        ctx.state.update(self.at_client_rank(ctx.client_id, trainable_state(ctx.model)))
        return ClientUpdate(ctx.client_id, {}, ctx.num_examples)

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        return {}  # nothing leaves a client

    def aggregate(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        return ServerState(round=rnd, global_tensors=state.global_tensors, extra=state.extra)

    def personal_tensors(self, ctx: ClientContext):
        return ctx.state or self.initial_at_rank(ctx)
