"""FedAMoLE: personalised federated fine-tuning with data-driven heterogeneous architectures.

Zhang et al., "Personalized Federated Fine-Tuning for LLMs via Data-Driven Heterogeneous Model
Architectures". Every client's model is AMoLE (``model.finetune: mole``, :mod:`fedtune.models.mole`): on
each target module a shared LoRA expert, a router W_t and the subset of the E domain experts the server
assigns it, routed per token. Each round, per module::

    server → client c    its experts {e : X_ec = 1}, the shared expert, W_t (and the head)
    client c             local training: task loss + balance_weight · load-balancing loss; then, on its
                         auxiliary split (≤ aux_examples rows), t̄_c = mean W_t x and ē_ec = mean A_e x
                         over its tokens, for each e it holds; it uploads its tensors, t̄_c, ē_·c, its ids
    server               expert e ← the unweighted mean over the round's clients that held it;
                         the shared expert, W_t and the head ← the mean over the round's clients;
                         Ē_e ← the mean of ē_ec over its holders; RSEA (:mod:`fedtune.expert_assignment`)
                         on P = softmax_c(Ē T̄ᵀ / √r) gives the next X

Round 1's X is the same program on softmax of scores drawn uniformly from [0, 1) (the reference code's
``torch.rand``). A client's last token embedding is kept for rounds it misses (one never seen scores 0
against every expert). Evaluation is personalised: each client's model as it left its last local training
(kept in its state), on its own test shard; the reference code's headline is the clients' unweighted mean
at the best round (``client_eval_unweighted/`` and ``summary.json``'s ``best``).

Ablations (the reference code's): ``static_arch`` keeps round 1's X (FedAMoLE-R) and so computes and uploads
no embeddings; ``homo_arch`` gives every client the same number of experts, E·k / C; ``random_dispatch``
draws X from random scores every round; ``embedding_noise`` ε noises every uploaded embedding v ∈ R^r
(``embedding_noise_form``): ``radial`` adds ρ·u, ρ ~ Gamma(r, 1/ε) and u uniform on the unit sphere (density
∝ exp(−ε‖z‖), metric differential privacy of the embeddings); ``per_coordinate``, the reference code's
(``model/mole/util.py``), adds z_j = ρ_j·s_j, ρ_j ~ Gamma(r, 1/ε), s_j ~ U(−1, 1), then scales v + z down to
the largest clean norm c when it is longer: c = max(‖first aux row's mean‖, ‖each later row's token sum‖), the
statistics the reference code's accumulator keeps over aux batches of one row.
That ε is not accounted: it is a per-embedding metric-DP parameter, composed over no rounds, layers or rows,
at no δ, so fedtune claims no (ε, δ) for FedAMoLE runs (``fedtune algorithms`` and the model card say so);
``privacy`` (the ``dp`` wrapper, DP-SGD) does not apply to FedAMoLE.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import Algorithm, ClientContext, ClientUpdate, Expected, NoOptions, Payload, ServerState
from fedtune.errors import FedtuneError
from fedtune.device import to_device
from fedtune.expert_assignment import assign_experts, check_assignment, preferences
from fedtune.models.base import body_and_head
from fedtune.models.lora import load_trainable
from fedtune.models.mole import (balance_loss, expert_names, held_experts, held_state, is_expert, mole_layers,
                                 set_local_experts)
from fedtune.seeds import derive_seed

RSEA = "rsea/"
"""Prefix of the routing embeddings a client uploads: ``rsea/token/<module>`` (r), ``rsea/expert/<module>``
(its experts × r) and ``rsea/ids/<module>`` (its experts' ids)."""
_ASSIGN, _TOKENS, _EXPERTS = "assign/", "tokens/", "experts/"  # server state: X (E × C), T̄ (C × r), Ē (E × r)
_SEED = 48_611
_AUX_BATCH = 32
"""Auxiliary rows per forward pass when measuring the embeddings (the means do not depend on it)."""


class FedAMoLEOptions(NoOptions):
    expert_choices: int = Field(default=2, ge=1)
    """The clients each expert is assigned to (k), every round."""
    min_experts: int = Field(default=2, ge=0)
    """The fewest domain experts a client holds per module."""
    max_experts: int = Field(default=8, ge=1)
    """The most domain experts a client holds per module."""
    aux_examples: int = Field(default=200, ge=1)
    """At most this many rows of a client's auxiliary split give its routing embeddings."""
    static_arch: bool = False
    """FedAMoLE-R: keep round 1's assignment for the whole run."""
    homo_arch: bool = False
    """Every client holds the same number of experts, E · expert_choices / C (min = max)."""
    random_dispatch: bool = False
    """Assign experts from random scores every round, not from the embeddings."""
    embedding_noise: float | None = Field(default=None, gt=0)
    """ε of the Gamma noise on the uploaded embeddings (smaller: more noise); null: none. Unaccounted:
    a per-embedding metric-DP parameter, not an (ε, δ) of the run; fedtune claims no ε for it."""
    embedding_noise_form: Literal["radial", "per_coordinate"] = "radial"
    """``radial``: one Gamma(r, 1/ε) radius on a uniform direction (metric DP); ``per_coordinate``: the reference
    code's Gamma(r, 1/ε)·U(−1, 1) on every coordinate, scaled down to the largest clean norm."""

    @model_validator(mode="after")
    def _no_option_is_ignored(self) -> "FedAMoLEOptions":
        given = self.model_fields_set
        if self.static_arch and self.random_dispatch:
            raise ValueError("static_arch keeps round 1's assignment and random_dispatch redraws it each round; "
                             "choose one")
        if self.static_arch and given & {"embedding_noise", "aux_examples"}:
            raise ValueError(f"static_arch measures and uploads no embeddings; remove "
                             f"{', '.join(sorted(given & {'embedding_noise', 'aux_examples'}))}")
        if self.random_dispatch and self.embedding_noise is not None:
            raise ValueError("random_dispatch assigns experts without the embeddings, so their noise changes "
                             "nothing; remove embedding_noise")
        if "embedding_noise_form" in given and self.embedding_noise is None:
            raise ValueError("embedding_noise_form shapes the noise of embedding_noise; set embedding_noise (ε) too")
        if self.homo_arch and given & {"min_experts", "max_experts"}:
            raise ValueError(f"homo_arch gives every client E · expert_choices / C experts; remove "
                             f"{', '.join(sorted(given & {'min_experts', 'max_experts'}))}")
        return self


class FedAMoLE(Algorithm):
    name = "fedamole"
    summary = "FedAMoLE: per-client mixtures of LoRA experts, experts assigned to clients by reverse selection"
    Options = FedAMoLEOptions
    personalized = True
    adapters = ("mole",)
    uses_aux_split = True
    loss_reads_batch = True  # the load-balancing term counts the batch's routing

    # ------------------------------------------------------------------ server side
    def _layout(self, tensors: Tensors) -> None:
        """The modules with mixtures, E and r, read from the model's tensors (at init, or on resuming)."""
        self.modules = sorted(held_experts(tensors))
        if not self.modules:
            raise FedtuneError("algorithm 'fedamole' found no mixtures of experts; set model.finetune=mole")
        first = self.modules[0]
        self.num_experts = len(held_experts(tensors)[first])
        self.r = tensors[expert_names(first, 0)[0]].shape[0]

    def init(self, initial: Tensors) -> ServerState:
        state = super().init(initial)
        self._layout(initial)
        lo, hi = self._bounds()
        check_assignment(self.num_experts, self.num_clients, self.options.expert_choices, lo, hi)
        for m in self.modules:
            state.extra[_TOKENS + m] = torch.zeros(self.num_clients, self.r, dtype=torch.float64)
            state.extra[_EXPERTS + m] = torch.zeros(self.num_experts, self.r, dtype=torch.float64)
            state.extra[_ASSIGN + m] = self._random_assignment(0, m)
        return state

    def _bounds(self) -> tuple[int, int]:
        o = self.options
        if not o.homo_arch:
            return o.min_experts, o.max_experts
        places = self.num_experts * o.expert_choices
        if places % self.num_clients:
            raise FedtuneError(f"homo_arch gives every client E · expert_choices / C experts, but {places} places do "
                               f"not split evenly over {self.num_clients} clients; change num_experts or expert_choices")
        return places // self.num_clients, places // self.num_clients

    def _random_assignment(self, rnd: int, module: str) -> torch.Tensor:
        rng = np.random.default_rng(derive_seed(self.seed, rnd, self.modules.index(module), _SEED))
        scores = rng.random(size=(self.num_experts, self.num_clients))
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        return torch.from_numpy(assign_experts(p / p.sum(axis=1, keepdims=True), self.options.expert_choices,
                                               *self._bounds()))

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        if not hasattr(self, "modules"):  # a resumed run: init did not run in this process
            self._layout(state.global_tensors)
        shared = {n: t for n, t in state.global_tensors.items() if not is_expert(n)}
        payloads = {}
        for cid in client_ids:
            tensors = dict(shared)
            for m in self.modules:
                for e in torch.nonzero(state.extra[_ASSIGN + m][:, cid]).flatten().tolist():
                    for name in expert_names(m, e):
                        tensors[name] = state.global_tensors[name]
            payloads[cid] = Payload(tensors=tensors)
        return payloads

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        """The tensors the client received (its experts, the shared expert, router and head), and per mixture
        the routing embeddings: t̄ (r), ē of each held expert (n_held × r) and the held experts' ids (none under
        ``static_arch``)."""
        expected = {n: Expected(tuple(t.shape), start=t) for n, t in payload.tensors.items()}
        if self.options.static_arch:  # a kept assignment: no embeddings
            return expected
        held = held_experts(payload.tensors)
        for m in self.modules:
            ids = held.get(m, [])
            expected[RSEA + "token/" + m] = Expected((self.r,))
            expected[RSEA + "expert/" + m] = Expected((len(ids), self.r))
            expected[RSEA + "ids/" + m] = Expected((len(ids),), integer=True, equals=torch.tensor(ids, dtype=torch.int64))
        return expected

    def aggregate(self, rnd: int, updates, state: ServerState) -> ServerState:
        # each expert is averaged over its holders, and RSEA needs every embedding: all held, in client order
        updates = sorted(updates, key=lambda u: u.client_id)
        new = dict(state.global_tensors)
        extra = dict(state.extra)
        models = [{n: t for n, t in u.tensors.items() if not n.startswith(RSEA)} for u in updates]
        for name in (n for n in new if not is_expert(n)):
            new[name] = _mean([t[name] for t in models])
        for m in self.modules:
            tokens, experts = extra[_TOKENS + m].clone(), extra[_EXPERTS + m].clone()
            for e in range(self.num_experts):
                a, b = expert_names(m, e)
                holders = [t for t in models if a in t]
                if holders:
                    new[a], new[b] = _mean([t[a] for t in holders]), _mean([t[b] for t in holders])
            uploaded: dict[int, list[torch.Tensor]] = {}
            for u in (u for u in updates if RSEA + "token/" + m in u.tensors):  # static_arch: none uploaded
                tokens[u.client_id] = u.tensors[RSEA + "token/" + m].double()
                for e, emb in zip(u.tensors[RSEA + "ids/" + m].tolist(), u.tensors[RSEA + "expert/" + m]):
                    uploaded.setdefault(e, []).append(emb.double())
            for e, embs in uploaded.items():
                experts[e] = torch.stack(embs).mean(0)
            extra[_TOKENS + m], extra[_EXPERTS + m] = tokens, experts
            extra[_ASSIGN + m] = self._next_assignment(rnd, m, experts, tokens, state.extra[_ASSIGN + m])
        held = torch.stack([extra[_ASSIGN + m].sum(0) for m in self.modules]).double()
        return ServerState(round=rnd, global_tensors=new, extra=extra,
                           metrics={"mean_experts_per_client": float(held.mean())})

    def _next_assignment(self, rnd: int, module: str, experts: torch.Tensor, tokens: torch.Tensor,
                         current: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.static_arch:
            return current
        if o.random_dispatch:
            return self._random_assignment(rnd, module)
        p = preferences(experts.numpy(), tokens.numpy())
        return torch.from_numpy(assign_experts(p, o.expert_choices, *self._bounds()))

    # ------------------------------------------------------------------ client side
    def load(self, ctx: ClientContext, tensors: Tensors) -> None:
        """Route among the experts ``tensors`` holds and load them (the model's other experts are never used)."""
        set_local_experts(ctx.model, held_experts(tensors))
        load_trainable(ctx.model, tensors)

    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        self.load(ctx, payload.tensors)

    def loss(self, ctx: ClientContext, batch, outputs) -> torch.Tensor:
        return outputs.loss + balance_loss(ctx.model)

    def update(self, ctx: ClientContext) -> ClientUpdate:
        tensors = held_state(ctx.model)
        ctx.state.clear()
        ctx.state.update(tensors)  # the client's own model, as it left local training: its personal model
        if not self.options.static_arch:  # a kept assignment needs no embeddings
            tensors.update(self._embeddings(ctx))
        return ClientUpdate(ctx.client_id, tensors, ctx.num_examples)

    @torch.no_grad()
    def _embeddings(self, ctx: ClientContext) -> Tensors:
        """t̄ and ē of every mixture, means over the tokens of the client's auxiliary rows (padding aside), noised."""
        rows = np.asarray(ctx.aux)[: self.options.aux_examples]
        if not len(rows):
            raise FedtuneError(f"client {ctx.client_id} has no auxiliary rows; raise partition.client_aux_fraction")
        layers = mole_layers(ctx.model)
        inputs: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, layer in layers.items()]
        token_rows = {n: [] for n in layers}  # per aux row, in order: Σ_t W_t x_t (r) and Σ_t A_e x_t (experts × r)
        expert_rows = {n: [] for n in layers}
        counts = []
        body = _body(ctx.model)
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            for start in range(0, len(rows), _AUX_BATCH):
                batch = to_device(ctx.examples.collate(rows[start:start + _AUX_BATCH]), ctx.device)
                mask = batch["attention_mask"].to(torch.float32)
                body(**{k: v for k, v in batch.items() if k != "labels"})
                for n, layer in layers.items():
                    x = inputs[n]  # rows × tokens × d_in
                    mask = mask.to(x.dtype)
                    token_rows[n].append(torch.einsum("btr,bt->br", layer.token_proj(x), mask).double().cpu())
                    a = (torch.stack([layer.experts[e].A for e in layer.local]) if layer.local
                         else x.new_zeros(0, layer.r, x.shape[-1]))
                    expert_rows[n].append(torch.einsum("btd,nrd,bt->bnr", x, a.to(x.dtype), mask).double().cpu())
                counts.append(mask.sum(1).double().cpu())
        finally:
            for h in hooks:
                h.remove()
            ctx.model.train(was_training)
        count = torch.cat(counts)
        noise = self._noise(ctx)
        out: Tensors = {}
        for n, layer in layers.items():
            out[RSEA + "token/" + n] = noise(torch.cat(token_rows[n]), count).float()
            out[RSEA + "expert/" + n] = noise(torch.cat(expert_rows[n]), count).float()
            out[RSEA + "ids/" + n] = torch.tensor(layer.local, dtype=torch.int64)
        return out

    def _noise(self, ctx: ClientContext):
        """f(row sums, token counts) → the mean over the tokens, noised (``embedding_noise``, module docstring)."""
        eps, form = self.options.embedding_noise, self.options.embedding_noise_form
        rng = np.random.default_rng(derive_seed(self.seed, ctx.round, ctx.client_id, _SEED))

        def noised(row_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            mean = row_sums.sum(0) / counts.sum()
            if eps is None:
                return mean
            if form == "per_coordinate":
                return per_coordinate_noise(mean, largest_clean_norm(row_sums, counts), eps, rng)
            direction = torch.from_numpy(rng.normal(size=mean.shape))
            direction /= direction.norm(dim=-1, keepdim=True)
            radius = torch.from_numpy(rng.gamma(mean.shape[-1], 1.0 / eps, size=mean.shape[:-1] + (1,)))
            return mean + radius * direction

        return noised

    def personal_tensors(self, ctx: ClientContext) -> Tensors:
        """The client's model after its last local training; before any, the base model (shared expert only)."""
        return ctx.state or {n: t for n, t in ctx.initial.items() if not is_expert(n)}


def largest_clean_norm(row_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference code's clamp bound (TempAccumulator over aux batches of one row): the norm of the first row's
    mean embedding, or of a later row's token sum, whichever is largest; per vector (rows × … × r → … × 1)."""
    norms = row_sums.norm(dim=-1, keepdim=True)
    first = (row_sums[0] / counts[0]).norm(dim=-1, keepdim=True)
    return torch.cat([first[None], norms[1:]]).amax(0)


def per_coordinate_noise(mean: torch.Tensor, bound: torch.Tensor, eps: float, rng: np.random.Generator
                         ) -> torch.Tensor:
    """The reference code's noise (``sample_noise`` and the clamp of ``mean_token_embs``): v + z with
    z_j = ρ_j·s_j, ρ_j ~ Gamma(r, 1/ε), s_j ~ U(−1, 1), times min(1, bound / ‖v + z‖) per vector."""
    rho = torch.from_numpy(rng.gamma(mean.shape[-1], 1.0 / eps, size=mean.shape))
    noisy = mean + rho * torch.from_numpy(rng.uniform(-1.0, 1.0, size=mean.shape))
    return noisy * (bound / noisy.norm(dim=-1, keepdim=True)).clamp(max=1.0)


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The unweighted mean, accumulated in float64, in the tensors' dtype."""
    return (torch.stack([t.double() for t in tensors]).sum(0) / len(tensors)).to(tensors[0].dtype)


def _body(model: torch.nn.Module):
    """What computes the mixtures' inputs: a causal LM's transformer (no vocabulary projection), else the model."""
    return body_and_head(model)[0] if model.get_output_embeddings() is not None else model

