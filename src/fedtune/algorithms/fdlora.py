"""FDLoRA: personalised federated learning of LLMs with a shared and a private LoRA, fused adaptively.

Qi et al., "FDLoRA: Personalized Federated Learning of Large Language Model via Dual LoRA Tuning" (2024), as
the FedAMoLE reference code runs it as a baseline (``baselines/node.py``, ``baselines/fdlora.py``,
``baselines/trainer.py``, ``train_baselines.py`` of zyc140345/FedAMoLE):

- Each client trains the **shared** LoRA θ it receives (local steps, as FedIT) and sends it back.
- Round 1 (the reference code's "local learning" round before the federated rounds): the server takes the
  plain mean θ ← (1/n) Σ_i θ_i. Later rounds (its outer optimiser, ``Server.aggregate``): SGD with Nesterov
  momentum μ and learning rate η on the averaged change, g = θ − (1/n) Σ_i θ_i::

      b ← μ b + g,    θ ← θ − η (g + μ b)      (b: the momentum, kept between rounds; η = 1, μ = 0.5)

  Both means are unweighted, over the round's clients, as the reference code takes them.
- The **private** LoRA φ_i is the client's shared LoRA right after its local training in every
  ``sync_every``-th federated round (rounds 2, 2 + k, 2 + 2k, … here; its rounds 0, k, 2k, …); it never
  travels.
- **Adaptive fusion**, when the client is evaluated (``Client.adaptive_fusion``): two weights w = (w_s, w_p)
  in [−b, b]² (b = 1.5), from (0, 0), are searched by nevergrad's NGOpt with a budget of 5 candidates for the
  smallest score on the client's auxiliary split::

      score(w) = Σ_batches mean-loss(w_s θ + w_p φ_i) / (rows scored)  +  λ · (|w_s| + |w_p|) / 2    (λ = 0.05)

  (the LoRA factors A and B are each combined, ``get_final_adapter``); the client's model is the fused one.

Where fedtune differs, and why:

- The auxiliary rows are taken in one seeded order per client, and each candidate scores the next
  ``fusion_batches`` batches of it, from where the last candidate (of this or an earlier fusion) stopped, as the
  reference code's loader iterator goes on (``fusion_rows: fixed``: every candidate scores the same first
  batches, so that candidates are compared on the same rows).
- A classifier's head (``lora.train_head``) travels with the shared LoRA and is averaged with it; the fusion
  combines the LoRA factors only and keeps the shared head (the reference code fine-tunes causal LMs, which have
  no head).
- The fusion runs when the client is evaluated (every evaluated round, and after the last); before its first
  private LoRA (round 1) a client's model is the shared LoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedtune.aggregation import Tensors
from fedtune.algorithms.base import Algorithm, ClientContext, ClientUpdate, NoOptions, Rule, ServerState
from fedtune.errors import FedtuneError
from fedtune.models.kinds import kinds_with
from fedtune.models.lora import lora_modules, trainable_state
from fedtune.seeds import derive_seed
from fedtune.training import eval_batches

PRIVATE = "private/"
"""Key prefix of the private LoRA in a client's state (it never leaves the client)."""
NEXT_BATCH = "fusion/next_batch"
"""In a client's state: the auxiliary batch the next candidate starts at (``fusion_rows: next``)."""
MOMENTUM = "momentum/"
"""Key prefix of the outer optimiser's momentum b in the server's ``extra``."""


class FDLoRAOptions(NoOptions):
    sync_every: int = Field(default=5, ge=1)
    """The private LoRA becomes the client's freshly trained shared LoRA every this many federated rounds (the
    reference code's ``sync_freq``)."""
    server_lr: float = Field(default=1.0, gt=0)
    """η, the outer optimiser's learning rate."""
    server_momentum: float = Field(default=0.5, ge=0, lt=1)
    """μ, its Nesterov momentum."""
    fusion_budget: int = Field(default=5, ge=1)
    """Candidate weight pairs NGOpt scores per fusion."""
    fusion_bound: float = Field(default=1.5, gt=0)
    """Each fusion weight lies in [−bound, bound]."""
    fusion_penalty: float = Field(default=0.05, ge=0)
    """λ of the L1 term λ · mean(|w|)."""
    fusion_batches: int = Field(default=5, ge=1)
    """Auxiliary batches each candidate is scored on (the reference code's 5)."""
    fusion_batch_size: int = Field(default=8, ge=1)
    """Rows per auxiliary batch."""
    fusion_rows: Literal["next", "fixed"] = "next"
    """``next``: each candidate scores the next batches of the client's auxiliary rows (cycling), as the reference
    code's loader iterator does; ``fixed``: every candidate scores the same first batches."""


class FDLoRA(Algorithm):
    name = "fdlora"
    summary = ("shared LoRA federated by a Nesterov outer step, private LoRA kept by each client, fused by a "
               "gradient-free search on its auxiliary split")
    Options = FDLoRAOptions
    personalized = True
    uses_aux_split = True
    adapters = kinds_with("factorised")

    def extra_rules(self) -> list[Rule]:
        return [
            Rule("one rank for all (no lora.client_ranks / rank_tiers)",
                 lambda cfg: None if not cfg.lora.ranks(cfg.partition.num_clients) else (
                     "algorithm 'fdlora' fuses a client's shared and private LoRA of one rank; remove "
                     "lora.client_ranks / rank_tiers")),
            Rule("eval.enabled (each client's fusion runs when it is evaluated)",
                 lambda cfg: None if cfg.eval.enabled else (
                     "algorithm 'fdlora' fuses each client's LoRAs when it is evaluated; set eval.enabled=true")),
        ]

    # ------------------------------------------------------------------ server
    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        mean = self.reduce((u.client_id, u.tensors, 1.0) for u in updates)  # unweighted, as the reference code
        if rnd == 1:
            return ServerState(round=rnd, global_tensors=mean)
        o = self.options
        theta, out, extra = state.global_tensors, {}, {}
        for name, t in theta.items():
            g = t.double() - mean[name].double()
            b = o.server_momentum * state.extra[MOMENTUM + name].double() + g if MOMENTUM + name in state.extra else g
            out[name] = (t.double() - o.server_lr * (g + o.server_momentum * b)).to(t.dtype)
            extra[MOMENTUM + name] = b.to(t.dtype)
        return ServerState(round=rnd, global_tensors=out, extra=extra)

    def configure_evaluate(self, client_ids: list[int], state: ServerState) -> dict[int, Tensors]:
        return {cid: state.global_tensors for cid in client_ids}  # the shared LoRA, fused on the client

    # ------------------------------------------------------------------ client
    def update(self, ctx: ClientContext) -> ClientUpdate:
        shared = trainable_state(ctx.model)
        if ctx.round >= 2 and (ctx.round - 2) % self.options.sync_every == 0:
            ctx.state.update({PRIVATE + n: shared[n] for a_b in lora_modules(shared).values() for n in a_b})
        ctx.state.update(shared)  # the client's model until its next fusion
        return ClientUpdate(ctx.client_id, shared, ctx.num_examples)

    def load(self, ctx: ClientContext, tensors: Tensors) -> None:
        super().load(ctx, model_tensors(tensors))

    def personal_tensors(self, ctx: ClientContext) -> Tensors | None:
        """The shared LoRA the server sent, fused with the client's private LoRA (module docstring); kept in the
        client's state as its model."""
        private = {n[len(PRIVATE):]: t for n, t in ctx.state.items() if n.startswith(PRIVATE)}
        shared = ctx.payload.tensors
        if not private or not shared:
            return model_tensors(ctx.state) or None
        weights = self.fusion_weights(ctx, shared, private)
        fused = fuse(shared, private, weights)
        ctx.state.update(fused)
        return fused

    def fusion_weights(self, ctx: ClientContext, shared: Tensors, private: Tensors) -> tuple[float, float]:
        """(w_s, w_p) by NGOpt (``fusion_budget`` candidates from (0, 0) in [−bound, bound]²), seeded by the run
        seed and the client, minimising :meth:`fusion_score`."""
        import nevergrad as ng

        o = self.options
        if ctx.aux is None or not len(ctx.aux):
            raise FedtuneError(f"client {ctx.client_id} has no auxiliary rows to fuse its LoRAs on; raise "
                               "partition.client_aux_fraction")
        rows = np.random.default_rng(derive_seed(self.seed, ctx.client_id, 3)).permutation(np.asarray(ctx.aux))
        chunks = [rows[i:i + o.fusion_batch_size] for i in range(0, len(rows), o.fusion_batch_size)]

        def next_batches() -> list[np.ndarray]:
            """The next ``fusion_batches`` batches, cycling over the chunks (a loader that restarts at its end)."""
            start = int(ctx.state[NEXT_BATCH]) if o.fusion_rows == "next" and NEXT_BATCH in ctx.state else 0
            if o.fusion_rows == "next":
                ctx.state[NEXT_BATCH] = torch.tensor((start + o.fusion_batches) % len(chunks))
            return [chunks[(start + k) % len(chunks)] for k in range(o.fusion_batches)]

        params = ng.p.Array(init=[0.0, 0.0], lower=[-o.fusion_bound] * 2, upper=[o.fusion_bound] * 2)
        params.random_state = np.random.RandomState(derive_seed(self.seed, ctx.client_id, 4) % 2**32)
        optimizer = ng.optimizers.NGOpt(parametrization=params, budget=o.fusion_budget)
        with warnings.catch_warnings():  # NGOpt's inner solvers (scipy's COBYLA) warn of settings it chose
            warnings.simplefilter("ignore")
            best = optimizer.minimize(lambda w: self.fusion_score(ctx, fuse(shared, private, tuple(w)),
                                                                  next_batches(), w))
        return float(best.value[0]), float(best.value[1])

    @torch.no_grad()
    def fusion_score(self, ctx: ClientContext, tensors: Tensors, batches: list[np.ndarray], weights) -> float:
        """Σ_batches mean loss / rows scored + λ · mean(|w|) (the reference code's ``get_score``)."""
        super().load(ctx, tensors)
        was_training = ctx.model.training
        ctx.model.eval()
        try:
            total, rows = 0.0, 0
            for idx in batches:
                batch = next(eval_batches(ctx.examples, idx, len(idx)))
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                total += float(ctx.forward(ctx.model, batch).loss)
                rows += len(idx)
        finally:
            ctx.model.train(was_training)
        return total / rows + self.options.fusion_penalty * float(np.mean(np.abs(weights)))


def fuse(shared: Tensors, private: Tensors, weights: tuple[float, float]) -> Tensors:
    """w_s · θ + w_p · φ for every LoRA factor of ``private``; every other tensor of ``shared`` as it is."""
    w_s, w_p = float(weights[0]), float(weights[1])
    return {n: (w_s * t + w_p * private[n]).to(t.dtype) if n in private else t for n, t in shared.items()}


def model_tensors(tensors: Tensors) -> Tensors:
    """A client state's model tensors: without the private LoRA and the fusion's bookkeeping."""
    return {n: t for n, t in tensors.items() if not n.startswith((PRIVATE, "fusion/"))}
