"""Heterogeneous-rank LoRA aggregation: FLoRA, FLoRIST and FlexLoRA (FedIT zero-padding is :class:`FedIT`).

Client i trains LoRA of rank r_i (``lora.client_ranks`` / ``rank_tiers``):
A_i is r_i × d_in, B_i is d_out × r_i, and every client uses the scale
s = alpha / r. Per module, with p_i = n_i / Σ_j n_j over the round's clients,
the exact aggregate is ΔW = s Σ_i p_i B_i A_i, which averaging A and B
separately does not give.

- **FLoRA** (Wang et al., NeurIPS 2024): stack A_st = [p_1 A_1; …; p_N A_N],
  B_st = [B_1 … B_N], so B_st A_st = Σ p_i B_i A_i exactly. Every client merges
  s B_st A_st into its base weights and starts a fresh LoRA next round; the
  download is the stacked factors (rank R = Σ r_i).
- **FLoRIST** (Ramesh et al., 2025): thin SVDs of the stacked factors give
  ΔW's SVD without forming it (:func:`~fedtune.aggregation.florist`); the
  smallest k holding a fraction τ of the energy Σσ² is kept, per module.
  ``merge``: clients merge s B_g A_g (rank k) and start fresh; ``truncate``:
  client i continues from (A_g, B_g) cut or zero-padded to r_i, and the server
  model is W + s B_g A_g.
- **FlexLoRA** (Bai et al., NeurIPS 2024): the dense ΔW = Σ p_i B_i A_i, then a
  truncated SVD to each client's rank r_i: client i's model is W + s B_g[:, :r_i] A_g[:r_i]. As the
  reference code scores it (``evaluate: clients``), every client's own model is scored on the eval split
  and ``eval/`` is their mean weighted by the round's clients' data (each rank's as ``eval/rank_<r>/``);
  ``evaluate: server_model`` scores only the server's model, the rank-r_max truncation.

Merged updates reach a client that missed rounds: the server keeps each
round's merge factors until every client has them, and a client receives the
rounds it has not yet merged (its state records the last one), so nothing is
lost under partial participation or failures and bytes are counted as sent.
The task head, when trained, is averaged as in FedIT.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.aggregation import (
    Tensors,
    dense_svd_factors,
    fit_rank,
    florist,
    stack_factors,
    weighted_product_sum,
)
from fedtune.algorithms.base import Algorithm, ClientContext, ClientUpdate, NoOptions, Payload, ServerState
from fedtune.models.kinds import kinds_with
from fedtune.models.lora import MERGED, base_weight_name, lora_factor_names, lora_modules

_SYNCED = "synced"
"""Client state: the last round whose merge the client has applied (a 0-d tensor)."""


def _history_key(rnd: int, module: str, factor: str) -> str:
    return f"round/{rnd}/{module}/{factor}"


class _FactorAggregation(Algorithm):
    """Shared parts: split updates into per-module factors and the rest; the server model holds dense merges."""

    adapters = kinds_with("factorised")
    uses_base_weights = True
    combines_factors = True
    requires = "meant for heterogeneous ranks: lora.client_ranks or lora.rank_tiers (runs with one rank too)"

    def _split(self, updates: Iterable[ClientUpdate]) -> tuple[dict[str, tuple[list, list]], list[float], Tensors]:
        """Per module (As, Bs) over the updates (all held: stacking and SVD need them), their weights n_i, and
        the reduction (:meth:`reduce`) of the other tensors (the head)."""
        updates = sorted(updates, key=lambda u: u.client_id)  # in client order, whatever the arrival order
        weights = [float(u.num_examples) for u in updates]
        modules = lora_modules(updates[0].tensors)
        factors = {m: ([u.tensors[a] for u in updates], [u.tensors[b] for u in updates])
                   for m, (a, b) in modules.items()}
        lora_names = {n for pair in modules.values() for n in pair}
        rest = [{k: v for k, v in u.tensors.items() if k not in lora_names} for u in updates]
        head = self.reduce((u.client_id, r, w) for u, r, w in zip(updates, rest, weights)) if rest[0] else {}
        return factors, weights, head

    @abstractmethod
    def module_factors(self, As: list[torch.Tensor], Bs: list[torch.Tensor],
                       weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's factors (A, B) of one module from the clients' factors and weights n_i."""

    def _fresh(self, initial: Tensors, head: Tensors) -> Tensors:
        """The global trainable tensors when the update lives in the base weights: the initial LoRA (B = 0), the head."""
        lora = {k: initial[k] for m in lora_modules(initial) for k in lora_factor_names(m)}
        return {**lora, **head}


class _MergeEachRound(_FactorAggregation):
    """Clients merge each round's aggregate s·B·A (:meth:`module_factors`, B·A ≈ Σ p_i B_i A_i) into their
    base weights and restart LoRA from the initialisation."""

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        trainable = {k: v for k, v in state.global_tensors.items() if not k.startswith(MERGED)}
        head = {k: v for k, v in trainable.items() if "lora_" not in k}
        payloads = {}
        for cid in client_ids:
            synced = int(state.extra.get(f"{_SYNCED}/{cid}", torch.tensor(0)))
            history = {k: v for k, v in state.extra.items()
                       if k.startswith("round/") and int(k.split("/")[1]) > synced}
            payloads[cid] = Payload(tensors={**head, **history})
        return payloads

    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        synced = int(ctx.state.get(_SYNCED, torch.tensor(0)))
        rounds = sorted({int(k.split("/")[1]) for k in payload.tensors if k.startswith("round/")})
        for t in rounds:
            if t <= synced:
                continue
            for key in [k for k in payload.tensors if k.startswith(f"round/{t}/") and k.endswith("/A")]:
                module = key[len(f"round/{t}/"):-2]
                A, B = payload.tensors[key], payload.tensors[_history_key(t, module, "B")]
                name = MERGED + base_weight_name(module)
                delta = self.lora.scale * (B.double() @ A.double())
                ctx.state[name] = (ctx.state[name].double() + delta if name in ctx.state else delta).float()
            synced = t
        ctx.state[_SYNCED] = torch.tensor(synced)
        head = {k: v for k, v in payload.tensors.items() if not k.startswith("round/")}
        merged = {k: v for k, v in ctx.state.items() if k.startswith(MERGED)}
        self.load(ctx, {**self.initial_at_rank(ctx), **head, **merged})

    def aggregate(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        factors, weights, head = self._split(updates)
        merged = {k: v for k, v in state.global_tensors.items() if k.startswith(MERGED)}
        extra = dict(state.extra)
        ranks = []
        for module, (As, Bs) in factors.items():
            A, B = self.module_factors(As, Bs, weights)
            ranks.append(A.shape[0])
            extra[_history_key(rnd, module, "A")], extra[_history_key(rnd, module, "B")] = A, B
            name = MERGED + base_weight_name(module)
            delta = self.lora.scale * (B.double() @ A.double())
            merged[name] = (merged[name].double() + delta).float() if name in merged else delta.float()
        for u in updates:  # these clients applied every merge before this round
            extra[f"{_SYNCED}/{u.client_id}"] = torch.tensor(rnd - 1)
        self._prune(extra)
        initial = {k: v for k, v in state.global_tensors.items() if not k.startswith(MERGED)}
        return ServerState(round=rnd, global_tensors={**self._fresh(initial, head), **merged}, extra=extra,
                           metrics=_rank_metrics(ranks))

    def _prune(self, extra: Tensors) -> None:
        """Drop the merges every client has applied (known only when the number of clients is)."""
        if self.lora.client_ranks is None:
            return
        synced = [int(extra.get(f"{_SYNCED}/{cid}", torch.tensor(0))) for cid in range(len(self.lora.client_ranks))]
        for k in [k for k in extra if k.startswith("round/") and int(k.split("/")[1]) <= min(synced)]:
            del extra[k]


def _rank_metrics(ranks: list[int]) -> dict:
    return {"kept_rank_mean": sum(ranks) / len(ranks), "kept_rank_min": min(ranks), "kept_rank_max": max(ranks),
            "kept_ranks": ranks} if ranks else {}


class FLoRA(_MergeEachRound):
    name = "flora"
    summary = "stack clients' LoRA factors (exact Σ p_i B_i A_i); merge into the base each round"

    def module_factors(self, As, Bs, weights):
        return stack_factors(As, Bs, weights)


class FLoRISTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    tau: float = Field(default=0.9, gt=0, le=1)
    """Energy threshold: keep the fewest singular directions holding this fraction of Σσ²."""
    mode: Literal["merge", "truncate"] = "merge"
    """``merge``: clients merge the rank-k update and restart LoRA; ``truncate``: clients continue from it at their rank."""


class _FloristFactors:
    """FLoRIST's factors, in either mode: the rank-k SVD of the stacked factors holding τ of the energy."""

    options: FLoRISTOptions

    def module_factors(self, As, Bs, weights):
        A, B, _ = florist(*stack_factors(As, Bs, weights), self.options.tau)
        return A, B


class FLoRIST(_FloristFactors, _MergeEachRound):
    """FLoRIST, ``merge`` mode; :meth:`create` gives :class:`FLoRISTTruncate` for ``mode: truncate``."""

    name = "florist"
    summary = "SVD of the stacked factors via thin SVDs; keep the directions holding τ of the energy"
    Options = FLoRISTOptions

    @classmethod
    def create(cls, options=None, lora=None) -> Algorithm:
        algo = cls(options, lora)
        return FLoRISTTruncate(options, lora) if algo.options.mode == "truncate" else algo


class _ContinueFromGlobal(_FactorAggregation):
    """Clients continue from the round's global factors (:meth:`module_factors`), cut or zero-padded to their
    rank; no merging."""

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        """Each client gets the global factors at its own rank, and the head; before round 1, the initial tensors."""
        trainable = {k: v for k, v in state.global_tensors.items() if not k.startswith(MERGED)}
        payloads = {}
        for cid in client_ids:
            tensors = dict(trainable)
            for key in [k for k in state.extra if k.startswith("global/") and k.endswith("/A")]:
                module = key[len("global/"):-2]
                a_name, b_name = lora_factor_names(module)
                tensors[a_name], tensors[b_name] = state.extra[key], state.extra[f"global/{module}/B"]
            payloads[cid] = Payload(tensors=self.at_client_rank(cid, tensors))
        return payloads

    def aggregate(self, rnd: int, updates: list[ClientUpdate], state: ServerState) -> ServerState:
        """The server model W + s·B·A per module (dense, for evaluation) and the factors to send (in ``extra``)."""
        factors, weights, head = self._split(updates)
        merged, extra, ranks = {}, {}, []
        for module, (As, Bs) in factors.items():
            A, B = self.module_factors(As, Bs, weights)
            ranks.append(A.shape[0])
            merged[MERGED + base_weight_name(module)] = (self.lora.scale * (B.double() @ A.double())).float()
            extra[f"global/{module}/A"], extra[f"global/{module}/B"] = A, B
        initial = {k: v for k, v in state.global_tensors.items() if not k.startswith(MERGED)}
        return ServerState(round=rnd, global_tensors={**self._fresh(initial, head), **merged}, extra=extra,
                           metrics=_rank_metrics(ranks))


class FLoRISTTruncate(_FloristFactors, _ContinueFromGlobal):
    """FLoRIST, ``truncate`` mode: the rank-k global factors are the model, cut to each client's rank."""

    name = FLoRIST.name
    summary = FLoRIST.summary
    Options = FLoRISTOptions


class FlexLoRAOptions(NoOptions):
    evaluate: Literal["clients", "server_model"] = "clients"
    """``clients``: each client's own model (the global factors cut to its rank) scored on the eval split, their
    mean weighted by the round's clients' data as ``eval/`` (the reference code); ``server_model``: the server's
    model at the largest rank only."""


_EVAL_WEIGHT = "eval_weight/"
"""Server state: the data size of the round's clients at each rank (``eval_weight/<r>``), the weights of ``eval/``."""


class FlexLoRA(_ContinueFromGlobal):
    name = "flexlora"
    summary = "dense Σ p_i B_i A_i, then a truncated SVD to each client's rank"
    Options = FlexLoRAOptions

    def module_factors(self, As, Bs, weights):
        delta = weighted_product_sum(As, Bs, weights)
        r_keep = self.lora.max_rank or max(A.shape[0] for A in As)
        return dense_svd_factors(delta, min(r_keep, *delta.shape))

    def _rank(self, client_id: int, state: ServerState) -> int:
        """Client ``client_id``'s rank (one rank for all: the global factors')."""
        rank = self.lora.rank(client_id)
        return rank if rank is not None else next(v.shape[0] for k, v in state.extra.items() if k.startswith("global/"))

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        updates = sorted(updates, key=lambda u: u.client_id)  # read twice: the SVD, and each rank's data weight
        new = super().aggregate(rnd, updates, state)
        for u in updates:
            key = f"{_EVAL_WEIGHT}{self._rank(u.client_id, new)}"
            new.extra[key] = new.extra.get(key, torch.tensor(0.0, dtype=torch.float64)) + u.num_examples
        return new

    def model_at_rank(self, state: ServerState, rank: int) -> Tensors:
        """A client's model at ``rank``: the base plus s·B_g[:, :rank] A_g[:rank] per module, and the head."""
        tensors = {k: v for k, v in state.global_tensors.items() if not k.startswith(MERGED)}
        for key in [k for k in state.extra if k.startswith("global/") and k.endswith("/A")]:
            module = key[len("global/"):-2]
            A, B = fit_rank(state.extra[key], state.extra[f"global/{module}/B"], rank)
            tensors[MERGED + base_weight_name(module)] = (self.lora.scale * (B.double() @ A.double())).float()
        return tensors

    def evaluation_weights(self, state: ServerState) -> dict[str, float]:
        if self.options.evaluate == "server_model":
            return {}
        return {f"rank_{k[len(_EVAL_WEIGHT):]}": float(v) for k, v in state.extra.items() if k.startswith(_EVAL_WEIGHT)}

    def evaluation_models(self, state: ServerState) -> dict[str, Tensors]:
        weights = self.evaluation_weights(state)
        if not weights:  # the server model; before round 1, the initial model every client holds
            return super().evaluation_models(state)
        return {name: self.model_at_rank(state, int(name[len("rank_"):])) for name in weights}

    def configure_evaluate(self, client_ids: list[int], state: ServerState) -> dict[int, Tensors]:
        """Each client is scored on its own test shard with its own model (the global factors cut to its rank)."""
        if not any(k.startswith("global/") for k in state.extra):
            return super().configure_evaluate(client_ids, state)
        return {cid: self.model_at_rank(state, self._rank(cid, state)) for cid in client_ids}
