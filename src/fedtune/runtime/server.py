"""The round loop every runtime drives: sample, configure, train, aggregate, evaluate, log.

A runtime supplies a :class:`ClientPool` — how payloads reach clients and
updates come back — and the loop does the rest identically: the same client
sampling, learning-rate schedule, byte accounting and run log rows.
"""

from __future__ import annotations

import math
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from fedtune.aggregation import Tensors, tensor_bytes
from fedtune.algorithms import ClientUpdate, Payload, ServerState
from fedtune.errors import FedtuneError
from fedtune.evaluation import mean_metrics
from fedtune.experiment import Experiment, clients_per_round, derive_seed
from fedtune.runlog import RunLog
from fedtune.training import round_lr


logger = logging.getLogger("fedtune.server")


class ClientPool(Protocol):
    """How a runtime reaches its clients, and where their persistent state (:attr:`ClientContext.state
    <fedtune.algorithms.ClientContext>`: control variates, personal adapters) lives."""

    failures: dict[int, str]
    """{client id: reason} for the clients of the last :meth:`train` that sent no update."""
    round_bytes: tuple[int, int, int, int] | None
    """(bytes_up, bytes_down, wire_bytes_up, wire_bytes_down) measured on the wire by the last :meth:`train`;
    None where nothing crossed a wire (the loop counts the tensors' bytes)."""

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
        """Deliver each payload, train, and return the updates that arrived."""

    def evaluate(self, state: ServerState) -> dict[int, dict[str, float]]:
        """Each client's metrics on its own test shard."""

    def held_client_states(self) -> dict[int, Tensors] | None:
        """Every client's state, where this process holds it (for checkpoints); None where the clients do."""

    def restore_client_states(self, states: dict[int, Tensors]) -> None:
        """Resume from the states a checkpoint took from :meth:`held_client_states`."""

    def clients_with_state_on_nodes(self) -> list[int]:
        """Clients whose non-empty state lives only where they run, out of a checkpoint's reach."""

    def final_client_states(self) -> dict[int, Tensors]:
        """Every client's state after the last round (personalised adapters are saved from it)."""


def sample_clients(seed: int, rnd: int, num_clients: int, k: int) -> list[int]:
    """The round's clients: k of num_clients drawn without replacement, seeded by (seed, round)."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, rnd, 7919))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def evaluate_global(exp: Experiment, tensors: Tensors) -> dict[str, float]:
    exp.load(tensors)
    return exp.evaluate(exp.eval)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k != "n"}


class RoundHooks(Protocol):
    """What :func:`run_rounds` tells its watcher (a progress display): rounds begin, evaluations begin, rounds end."""

    def on_round_start(self, rnd: int, clients: list[int]) -> None: ...
    def on_eval_start(self, rnd: int, what: str, n_examples: int) -> None:
        """An evaluation of round ``rnd`` begins on ``n_examples`` examples of ``what`` (e.g. 'the eval split')."""
    def on_round_end(self, row: dict) -> None: ...


def finite(update: ClientUpdate) -> bool:
    """Every floating-point tensor of the update is finite (no NaN or inf)."""
    return all(bool(torch.isfinite(t).all()) for t in update.tensors.values() if t.is_floating_point())


def run_rounds(exp: Experiment, pool: ClientPool, log: RunLog, hooks: RoundHooks | None = None,
               now: Callable[[], float] = time.perf_counter,
               start: tuple[ServerState, dict] | None = None,
               on_state: Callable[[ServerState, dict], None] | None = None) -> tuple[ServerState, dict]:
    """Run every round of ``exp`` through ``pool``, logging one row per round (round 0: the initial model).

    ``start``: continue from the (state, row) of a completed round instead of
    initialising (resume). ``on_state(state, row)`` is called after each logged
    round (checkpointing). A round aggregates the finite updates that arrived;
    its row lists the sampled clients that sent none (``missing``) and those
    whose tensors were not finite (``rejected``). With fewer than
    ``federation.min_clients_per_round`` usable updates the run stops with an error.
    Returns the final server state and the last row.
    """
    cfg, algo = exp.cfg, exp.algorithm
    rounds = cfg.federation.rounds
    k = 1 if algo.pools_data else clients_per_round(cfg, exp.num_clients)
    min_clients = 1 if algo.pools_data else cfg.federation.min_clients_per_round
    if min_clients > k:
        raise FedtuneError(f"federation.min_clients_per_round={min_clients} exceeds the {k} clients sampled per round")
    every = cfg.eval.every
    per_client = algo.personalized or cfg.eval.per_client

    def evaluation(rnd: int, state: ServerState) -> dict[str, Any]:
        """The round's ``eval/`` metrics, the clients' ``client_eval/`` means (and spread), and each client's
        own metrics as ``client_metrics: {"<client id>": {...}}``; nothing on rounds that are not evaluated."""
        if not cfg.eval.enabled or not (rnd == rounds or (every and rnd % every == 0)):
            return {}
        out: dict[str, Any] = {}
        if exp.eval is not None and not algo.personalized:
            if hooks:
                hooks.on_eval_start(rnd, "the eval split", len(exp.eval))
            out.update(_prefixed("eval", evaluate_global(exp, state.global_tensors)))
        if per_client:
            if hooks:
                tested = [len(t) for t in exp.client_tests if len(t)]
                what = f"the test shards of {len(tested)} client" + "s" * (len(tested) != 1)
                hooks.on_eval_start(rnd, what, sum(tested))
            clients = pool.evaluate(state)
            out.update(_prefixed("client_eval", mean_metrics(clients)))
            out["client_metrics"] = {str(c): clients[c] for c in sorted(clients)}
        return out

    def record(state: ServerState, row: dict) -> None:
        log.log_round(row)
        if on_state:
            on_state(state, row)
        if hooks:
            hooks.on_round_end(row)

    if start is not None:
        state, row = start
    else:
        state = algo.init(exp.initial)
        t0 = now()
        row = {"round": 0, "lr": 0.0, "clients": [], "num_clients": 0, "train_loss": None, "train_examples": 0,
               "bytes_up": 0, "bytes_down": 0, "cum_bytes_up": 0, "cum_bytes_down": 0,
               "time_train_s": 0.0, "time_aggregate_s": 0.0}
        row.update(evaluation(0, state))
        row["time_eval_s"] = row["time_round_s"] = now() - t0
        record(state, row)
    cum_up, cum_down = row["cum_bytes_up"], row["cum_bytes_down"]

    for rnd in range(row["round"] + 1, rounds + 1):
        t_start = now()
        clients = sample_clients(cfg.seed, rnd, exp.num_clients, k)
        if hooks:
            hooks.on_round_start(rnd, clients)
        lr = round_lr(cfg.train, rnd, rounds)
        payloads = algo.configure(rnd, clients, state)
        bytes_down = sum(tensor_bytes(p.tensors) for p in payloads.values())
        received = pool.train(rnd, payloads, lr)
        bytes_up = sum(tensor_bytes(u.tensors) for u in received)
        wire = {}
        if pool.round_bytes is not None:  # measured on the wire by the runtime
            bytes_up, bytes_down, wire_up, wire_down = pool.round_bytes
            wire = {"wire_bytes_up": wire_up, "wire_bytes_down": wire_down}
        updates = [u for u in received if finite(u)]
        rejected = sorted(u.client_id for u in received if not finite(u))
        missing = sorted(set(clients) - {u.client_id for u in received})
        if rejected:
            logger.warning("round %d: rejected non-finite updates of clients %s", rnd, rejected)
        if len(updates) < min_clients:
            why = "; ".join(f"client {c}: {pool.failures[c][-300:]}" for c in missing if c in pool.failures)
            raise FedtuneError(
                f"round {rnd}: only {len(updates)} usable updates from {len(clients)} sampled clients "
                f"(federation.min_clients_per_round={min_clients}); missing {missing}, rejected as non-finite "
                f"{rejected}" + (f"; {why}" if why else "")
            )
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
               "missing": missing, "rejected": rejected,
               "train_loss": loss, "train_examples": int(n_seen),
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cum_bytes_up": cum_up, "cum_bytes_down": cum_down,
               **wire,
               "time_train_s": t_trained - t_start, "time_aggregate_s": t_aggregated - t_trained,
               "time_eval_s": t_end - t_aggregated, "time_round_s": t_end - t_start,
               **{f"agg/{k}": v for k, v in state.metrics.items()}, **metrics}
        record(state, row)
    return state, row
