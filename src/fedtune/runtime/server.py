"""The round loop every runtime drives: sample, configure, train, aggregate, evaluate, log.

A runtime supplies a :class:`ClientPool` — how payloads reach clients and
updates come back — and the loop does the rest identically: the same client
sampling, learning-rate schedule, byte accounting and run log rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from fedtune.aggregation import Tensors, tensor_bytes
from fedtune.algorithms import ClientUpdate, Payload, ServerState
from fedtune.evaluation import evaluate_classifier, mean_metrics
from fedtune.experiment import Experiment, clients_per_round, derive_seed
from fedtune.models.lora import load_trainable
from fedtune.runlog import RunLog
from fedtune.training import eval_batches, round_lr


class ClientPool(Protocol):
    """How a runtime reaches its clients."""

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
        """Deliver each payload, train, and return the updates that arrived."""

    def evaluate(self, state: ServerState) -> dict[int, dict[str, float]]:
        """Each client's metrics on its own test shard."""


def sample_clients(seed: int, rnd: int, num_clients: int, k: int) -> list[int]:
    """The round's clients: k of num_clients drawn without replacement, seeded by (seed, round)."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, rnd, 7919))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def evaluate_global(exp: Experiment, tensors: Tensors) -> dict[str, float]:
    load_trainable(exp.model, tensors)
    return evaluate_classifier(exp.model, eval_batches(exp.eval, None, exp.cfg.eval.batch_size))


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k != "n"}


class RoundHooks(Protocol):
    def on_round_start(self, rnd: int, clients: list[int]) -> None: ...
    def on_round_end(self, row: dict) -> None: ...


def run_rounds(exp: Experiment, pool: ClientPool, log: RunLog, hooks: RoundHooks | None = None,
               now: Callable[[], float] = time.perf_counter) -> tuple[ServerState, dict]:
    """Run every round of ``exp`` through ``pool``, logging one row per round (round 0: the initial model).

    Returns the final server state and the last row.
    """
    cfg, algo = exp.cfg, exp.algorithm
    rounds = cfg.federation.rounds
    k = 1 if algo.pools_data else clients_per_round(cfg, exp.num_clients)
    state = algo.init(exp.initial)
    every = cfg.eval.every
    per_client = algo.personalized or cfg.eval.per_client
    cum_up = cum_down = 0

    def evaluation(rnd: int, state: ServerState) -> dict[str, float]:
        if not (rnd == rounds or (every and rnd % every == 0)):
            return {}
        out: dict[str, float] = {}
        if exp.eval is not None and not algo.personalized:
            out.update(_prefixed("eval", evaluate_global(exp, state.global_tensors)))
        if per_client:
            out.update(_prefixed("client_eval", mean_metrics(pool.evaluate(state))))
        return out

    t0 = now()
    row0 = {"round": 0, "lr": 0.0, "clients": [], "num_clients": 0, "train_loss": None, "train_examples": 0,
            "bytes_up": 0, "bytes_down": 0, "cum_bytes_up": 0, "cum_bytes_down": 0,
            "time_train_s": 0.0, "time_aggregate_s": 0.0}
    row0.update(evaluation(0, state))
    row0["time_eval_s"] = row0["time_round_s"] = now() - t0
    log.log_round(row0)
    if hooks:
        hooks.on_round_end(row0)

    for rnd in range(1, rounds + 1):
        t_start = now()
        clients = sample_clients(cfg.seed, rnd, exp.num_clients, k)
        if hooks:
            hooks.on_round_start(rnd, clients)
        lr = round_lr(cfg.train, rnd, rounds)
        payloads = algo.configure(rnd, clients, state)
        bytes_down = sum(tensor_bytes(p.tensors) for p in payloads.values())
        updates = pool.train(rnd, payloads, lr)
        bytes_up = sum(tensor_bytes(u.tensors) for u in updates)
        t_trained = now()
        state = algo.aggregate(rnd, updates, state)
        t_aggregated = now()
        metrics = evaluation(rnd, state)
        t_end = now()
        cum_up += bytes_up
        cum_down += bytes_down
        n_seen = sum(u.metrics.get("examples_seen", 0) for u in updates)
        loss = (sum(u.metrics["train_loss"] * u.metrics.get("examples_seen", 0) for u in updates) / n_seen
                if n_seen else math.nan)
        row = {"round": rnd, "lr": lr, "clients": [u.client_id for u in updates], "num_clients": len(updates),
               "train_loss": loss, "train_examples": int(n_seen),
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cum_bytes_up": cum_up, "cum_bytes_down": cum_down,
               "time_train_s": t_trained - t_start, "time_aggregate_s": t_aggregated - t_trained,
               "time_eval_s": t_end - t_aggregated, "time_round_s": t_end - t_start, **metrics}
        log.log_round(row)
        if hooks:
            hooks.on_round_end(row)
    return state, row
