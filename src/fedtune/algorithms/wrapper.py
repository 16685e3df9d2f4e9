"""Wrappers: an algorithm around an algorithm, e.g. norm bounding or differential privacy around FedAdam.

:class:`Wrapper` forwards every hook to the algorithm it wraps (``inner``) and
answers every capability for it, so a wrapper overrides only the hooks its
method changes, as an algorithm overrides only what differs from FedAvg. The
run's facts reach ``inner`` through :meth:`Wrapper.bind`; its state lives in
the same :class:`~fedtune.algorithms.ServerState` as ``inner``'s, under a
prefix of its own. ``algorithm.wrappers`` in the config lists wrappers from
the innermost out::

    algorithm:
      name: fedadam
      wrappers:
        - name: clip
          options: {bound: median}

A wrapper refuses an algorithm it cannot wrap (:meth:`Wrapper.refuses`) with
one line saying why, before anything is loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Expected,
    LoraSetup,
    Payload,
    Rule,
    RunFacts,
    ServerState,
)
from fedtune.config import TrainConfig
from fedtune.errors import FedtuneError
from fedtune.server_context import ServerContext


class Wrapper(Algorithm):
    """An algorithm that wraps another (``inner``): every hook and capability is ``inner``'s unless overridden."""

    options_key = "algorithm.wrappers options"
    wraps: ClassVar[str] = "any algorithm"
    """What it can wrap, as ``fedtune algorithms`` says it (:meth:`refuses` is the check)."""

    def __init__(self, inner: Algorithm, options: dict[str, Any] | None = None):
        self.inner = inner
        reducer = inner.reducer
        super().__init__(options, inner.lora)
        self.reducer = reducer  # the base's default must not replace what the inner algorithm reduces with
        why = self.refuses(inner)
        if why:
            raise FedtuneError(f"algorithm.wrappers: '{self.name}' cannot wrap '{inner.label}': {why}")

    def refuses(self, inner: Algorithm) -> str | None:
        """Why this wrapper cannot wrap ``inner`` (one line), or None."""
        return None

    @property
    def label(self) -> str:
        return f"{self.inner.label}+{self.name}"

    # ------------------------------------------------------------------ what is inner's
    @property
    def lora(self) -> LoraSetup:
        return self.inner.lora

    @lora.setter
    def lora(self, value: LoraSetup) -> None:
        pass  # always inner's

    @property
    def reducer(self):
        return self.inner.reducer

    @reducer.setter
    def reducer(self, value) -> None:
        self.inner.reducer = value

    def reduce(self, items) -> Tensors:
        return self.inner.reduce(items)

    personalized = property(lambda self: self.inner.personalized)
    pools_data = property(lambda self: self.inner.pools_data)
    uses_base_weights = property(lambda self: self.inner.uses_base_weights)
    adapters = property(lambda self: self.inner.adapters)
    uses_aux_split = property(lambda self: self.inner.uses_aux_split)
    trains_on_server = property(lambda self: self.inner.trains_on_server)
    combines_factors = property(lambda self: self.inner.combines_factors)
    sends_model = property(lambda self: self.inner.sends_model)
    mean_of_changes = property(lambda self: self.inner.mean_of_changes)
    aggregates_empty_round = property(lambda self: self.inner.aggregates_empty_round)
    loss_reads_batch = property(lambda self: self.inner.loss_reads_batch)

    def bind(self, facts: RunFacts) -> Algorithm:
        self.inner.bind(facts)
        return super().bind(facts)

    def rules(self) -> list[Rule]:
        return [*self.inner.rules(), *self.extra_rules()]

    def advice(self, train: TrainConfig) -> list[str]:
        return self.inner.advice(train)

    # ------------------------------------------------------------------ server side
    def setup_server(self, server: ServerContext) -> None:
        self.inner.setup_server(server)

    def evaluate_on_server(self, state: ServerState) -> dict[str, dict[str, float]]:
        return self.inner.evaluate_on_server(state)

    def init(self, initial: Tensors) -> ServerState:
        return self.inner.init(initial)

    def participants(self, rnd: int, sampled: list[int]) -> list[int]:
        return self.inner.participants(rnd, sampled)

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        return self.inner.configure(rnd, client_ids, state)

    def aggregate(self, rnd: int, updates, state: ServerState) -> ServerState:
        return self.inner.aggregate(rnd, updates, state)

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        return self.inner.expected_update(client_id, payload, state)

    def configure_evaluate(self, client_ids: list[int], state: ServerState) -> dict[int, Tensors]:
        return self.inner.configure_evaluate(client_ids, state)

    def evaluation_models(self, state: ServerState) -> dict[str, Tensors]:
        return self.inner.evaluation_models(state)

    def evaluation_weights(self, state: ServerState) -> dict[str, float]:
        return self.inner.evaluation_weights(state)

    def decisions(self, rnd: int, metrics: dict[str, Any]) -> list[str]:
        return self.inner.decisions(rnd, metrics)

    # ------------------------------------------------------------------ client side
    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        self.inner.prepare(ctx, payload)

    def loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return self.inner.loss(ctx, batch, outputs)

    def after_step(self, ctx: ClientContext) -> None:
        self.inner.after_step(ctx)

    def update(self, ctx: ClientContext) -> ClientUpdate:
        return self.inner.update(ctx)

    def personal_tensors(self, ctx: ClientContext) -> Tensors | None:
        return self.inner.personal_tensors(ctx)

    def at_client_rank(self, client_id: int, tensors: Tensors) -> Tensors:
        return self.inner.at_client_rank(client_id, tensors)

    def load(self, ctx: ClientContext, tensors: Tensors) -> None:
        self.inner.load(ctx, tensors)

    def initial_at_rank(self, ctx: ClientContext) -> Tensors:
        return self.inner.initial_at_rank(ctx)
