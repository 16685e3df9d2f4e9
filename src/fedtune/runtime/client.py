"""The client half of a round, shared by every runtime: payload in, local training, update out."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientContext, ClientUpdate, Payload
from fedtune.dp_noise import SecretStream, public, round_key, secret_part
from fedtune.dp_sgd import PrivateGradient, poisson_batches
from fedtune.experiment import Experiment, derive_seed, evaluated_round
from fedtune.models.lora import trainable_state
from fedtune.training import batch_stream, local_steps, train_local
from fedtune.usage import Usage


FT = "ft/"
"""Prefix of the metrics a client measured right after its local training (``eval.after_local_training``)."""


def client_round(
    exp: Experiment,
    client_id: int,
    rnd: int,
    payload: Payload,
    state: Tensors,
    lr: float,
    on_step: Callable[[], None] = lambda: None,
) -> ClientUpdate:
    """Train client ``client_id`` for one round and return its update; ``state`` is its persistent tensors.

    Seeded by (run seed, round, client): dropout and batch order are the same on any runtime and in any client
    order. DP-SGD's row samples and noise come from the client's own secret key, kept in ``state`` beside the
    algorithm's tensors (:mod:`fedtune.dp_noise`; from the run's seed only under ``privacy.reproducible_noise``).
    """
    algo, cfg = exp.algorithm, exp.cfg
    data = exp.client(client_id)
    shard = data.train
    steps = local_steps(cfg.train, len(shard)) * exp.steps_multiplier
    ctx = ClientContext(client_id=client_id, round=rnd, model=exp.model, initial=exp.initial, state=public(state),
                        base=exp.base, payload=payload, lr=lr, steps=steps, num_examples=len(shard),
                        examples=data.examples, aux=data.aux, forward=exp.forward, secrets=secret_part(state))
    algo.prepare(ctx, payload)
    ctx.start = trainable_state(exp.model)  # detached copies
    seed = derive_seed(cfg.seed, rnd, client_id)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    private = None
    if cfg.privacy.dp_sgd.enabled:  # record-level DP: Poisson samples of the rows, privatised gradients
        mechanism = exp.privacy.record_mechanism(client_id, len(shard))
        key = round_key(ctx.secrets, algo.facts.noise_seed, client_id, rnd)
        private = PrivateGradient(cfg.privacy.dp_sgd.clip, mechanism.noise_multiplier, mechanism.rate * len(shard),
                                  SecretStream(key, "dp-sgd noise", rnd))
        batches = poisson_batches(data.examples, shard, mechanism.rate, SecretStream(key, "dp-sgd rows", rnd))
    else:
        batches = batch_stream(data.examples, shard, cfg.train.batch_size, rng)
    with Usage(exp.device) as usage:
        loss, seen = train_local(
            exp.model, usage.count(batches), steps, cfg.train, lr,
            loss_fn=lambda batch, out: algo.loss(ctx, batch, out),
            after_step=lambda: algo.after_step(ctx),
            on_step=on_step,
            forward=exp.forward,
            private=private,
        )
    ctx.train_loss = loss
    update = algo.update(ctx)
    if exp.attack is not None:  # a simulated attacker changes what it sends (federation.attack)
        update = exp.attack.apply(update, algo.at_client_rank(client_id, ctx.start), rnd)
    update.metrics.update(train_loss=loss, steps=steps, examples_seen=seen, **usage.metrics())
    if cfg.eval.after_local_training and evaluated_round(cfg, rnd) and len(data.test):
        update.metrics.update({FT + k: v for k, v in exp.evaluate(data.examples, data.test).items()})
    _keep(state, ctx)
    return update


def _keep(state: Tensors, ctx: ClientContext) -> None:
    """Put what the round left in ``ctx.state`` and ``ctx.secrets`` into the client's persistent ``state``."""
    state.clear()
    state.update(ctx.state)
    state.update(ctx.secrets)


def client_evaluate(exp: Experiment, client_id: int, tensors: Tensors, state: Tensors) -> dict[str, float]:
    """Metrics of client ``client_id``'s model on its own test shard: its personal tensors, else ``tensors``
    (what :meth:`~fedtune.algorithms.Algorithm.configure_evaluate` chose for it)."""
    data = exp.client(client_id)
    ctx = ClientContext(client_id=client_id, round=0, model=exp.model, initial=exp.initial, state=public(state),
                        base=exp.base, payload=Payload(tensors), examples=data.examples, aux=data.aux,
                        forward=exp.forward, secrets=secret_part(state))
    personal = exp.algorithm.personal_tensors(ctx)
    exp.algorithm.load(ctx, tensors if personal is None else personal)
    _keep(state, ctx)
    return exp.evaluate(data.examples, data.test)
