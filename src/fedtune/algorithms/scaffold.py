"""SCAFFOLD: control variates correct each client's drift towards its own optimum.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020), over the trainable tensors (LoRA factors and head).

The server holds the model x and a control variate c; client i holds its own
c_i (zero at first, in its persistent state: checkpointed in-process, kept on
its node under Flower). In a round, client i receives x and c, starts from
y = x and after every optimiser step applies the correction::

    y ← y − η (c − c_i)

(η: the round's learning rate; K: its local steps). Then (option II)::

    c_i⁺ = c_i − c + (x − y) / (K η),    Δc_i = c_i⁺ − c_i

and it sends y and Δc_i. The server, over the round's clients S of N::

    x ← x + η_g Σ_{i∈S} p_i (y_i − x)        p_i = n_i / Σ_j n_j  (η_g = ``server_lr``; 1: FedIT's average)
    c ← c + (1/N) Σ_{i∈S} Δc_i

c travels down and Δc_i up with the tensors, so the bytes count them.

**Under AdamW.** The paper's step is SGD's, y ← y − η (g − c_i + c). fedtune
applies the correction after the optimiser's step, decoupled from it as AdamW
decouples weight decay, so that Adam's normalisation never rescales it; with
``train.optimizer: sgd`` (no momentum) this is the paper's step exactly. Then
(x − y)/(K η) is the mean of the applied per-step directions (Adam's
normalised ones plus the corrections), so c_i estimates the client's mean
*update* direction rather than its mean gradient. OpenFedLLM's code applies
the same decoupled correction after each step, but with the configured
learning rate rather than the scheduled one, and averages x by FedAvg without
a server step size; here η is the round's (scheduled) rate in both the
correction and c_i⁺, and η_g is an option. Under LoRA+ the B factors train at
a multiple of η; the correction uses η for every tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field

from fedtune.aggregation import StreamingMean, Tensors
from fedtune.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Expected,
    NoOptions,
    Payload,
    Rule,
    ServerState,
)
from fedtune.errors import FedtuneError
from fedtune.models.lora import trainable_state

C = "scaffold/c/"
"""Prefix of the server control variate c: in the server state's ``extra`` and in each payload."""
DELTA_C = "scaffold/delta_c/"
"""Prefix of a client's Δc_i in its update."""


class ScaffoldOptions(NoOptions):
    server_lr: float = Field(default=1.0, gt=0)
    """η_g: the global step size on the averaged model change (1: FedIT's average)."""


def _with_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {prefix + k: v for k, v in tensors.items()}


def _strip(prefix: str, tensors: Tensors) -> Tensors:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class Scaffold(Algorithm):
    name = "scaffold"
    summary = "SCAFFOLD: server and client control variates correct client drift (option II)"
    Options = ScaffoldOptions
    requires = "one LoRA rank for every client (no lora.client_ranks / rank_tiers)"

    def extra_rules(self) -> list[Rule]:
        return [Rule(None, lambda cfg: None if not cfg.lora.ranks(cfg.partition.num_clients) else (
            "algorithm 'scaffold' needs every client at one LoRA rank; remove lora.client_ranks / rank_tiers (or "
            "use fedit, flora, florist, flexlora)"))]

    # ------------------------------------------------------------------ server
    def init(self, initial: Tensors) -> ServerState:
        state = super().init(initial)
        state.extra = _with_prefix(C, {k: torch.zeros_like(v) for k, v in initial.items()})
        return state

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        down = {**state.global_tensors, **{k: v for k, v in state.extra.items() if k.startswith(C)}}
        return {cid: Payload(tensors=down) for cid in client_ids}

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        """y (model tensors, from x) and Δc_i (a side channel) for every trainable tensor."""
        model = super().expected_update(client_id, payload, state)
        return {**model, **{DELTA_C + n: Expected(e.shape) for n, e in model.items()}}

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        """x ← x + η_g (reduce(y_i) − x) and c ← c + Σ Δc_i / N, in one pass over the updates."""
        if self.num_clients is None:
            raise FedtuneError("algorithm 'scaffold' needs the number of clients (N in c ← c + Σ Δc_i / N)")
        x = state.global_tensors
        deltas = StreamingMean()  # Σ Δc_i = k · (their mean): folded, never held

        def models():
            for u in updates:
                deltas.add(_strip(DELTA_C, u.tensors), 1.0)
                yield u.client_id, {k: v for k, v in u.tensors.items() if k in x}, u.num_examples

        mean_y = self.reduce(models())
        eta_g = self.options.server_lr
        new_x = {k: (x[k].double() + eta_g * (mean_y[k].double() - x[k].double())).to(x[k].dtype) for k in x}
        c = _strip(C, state.extra)
        mean_delta, k = deltas.result_float64(), deltas.count
        new_c = {n: (c[n].double() + mean_delta[n] * k / self.num_clients).to(c[n].dtype) for n in c}
        return ServerState(round=rnd, global_tensors=new_x, extra={**state.extra, **_with_prefix(C, new_c)})

    # ------------------------------------------------------------------ client
    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        self.load(ctx, {k: v for k, v in payload.tensors.items() if not k.startswith(C)})
        if not ctx.state:
            ctx.state.update({k: torch.zeros_like(v) for k, v in _strip(C, payload.tensors).items()})

    def after_step(self, ctx: ClientContext) -> None:
        """y ← y − η (c − c_i) on every trainable tensor (c and c_i are fixed while the round trains)."""
        correction = ctx.on_device("scaffold/correction", lambda: {
            n: ctx.lr * (c - ctx.state[n]) for n, c in _strip(C, ctx.payload.tensors).items()})
        with torch.no_grad():
            for n, p in ctx.model.named_parameters():
                if p.requires_grad:
                    p.sub_(correction[n])

    def update(self, ctx: ClientContext) -> ClientUpdate:
        """c_i⁺ = c_i − c + (x − y)/(K η); sends y and Δc_i = c_i⁺ − c_i."""
        if ctx.steps < 1 or ctx.lr <= 0:
            raise FedtuneError("algorithm 'scaffold' needs at least one local step at a positive learning rate")
        y = trainable_state(ctx.model)
        c = _strip(C, ctx.payload.tensors)
        delta_c = {}
        for n, y_n in y.items():
            c_new = ctx.state[n] - c[n] + (ctx.start[n] - y_n) / (ctx.steps * ctx.lr)
            delta_c[n] = c_new - ctx.state[n]
            ctx.state[n] = c_new
        return ClientUpdate(ctx.client_id, {**y, **_with_prefix(DELTA_C, delta_c)}, ctx.num_examples)
