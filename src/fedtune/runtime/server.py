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
from fedtune.experiment import Experiment, clients_per_round, derive_seed, evaluated_round
from fedtune.runtime.client import FT
from fedtune.runlog import RunLog
from fedtune.training import round_lr


logger = logging.getLogger("fedtune.server")


class ClientPool(Protocol):
    """How a runtime reaches its clients, and where their persistent state (:attr:`ClientContext.state
    <fedtune.algorithms.ClientContext>`: control variates, personal adapters) lives."""

    failures: dict[int, str]
    """{client id: the error} for the clients whose own code raised in the last :meth:`train` or :meth:`evaluate`
    (the reason holds the client's traceback where the runtime has it)."""
    dropped: dict[int, str]
    """{client id: why} for the clients of the last call that could not answer: unreachable, gone, or later than
    ``federation.round_timeout_s``. Dropped clients are expected in deployments; failed ones are bugs."""
    round_bytes: tuple[int, int, int, int] | None
    """(bytes_up, bytes_down, wire_bytes_up, wire_bytes_down) measured on the wire by the last :meth:`train`;
    None where nothing crossed a wire (the loop counts the tensors' bytes)."""

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
        """Deliver each payload, train, and return the updates that arrived."""

    def evaluate(self, models: dict[int, Tensors]) -> dict[int, dict[str, float]]:
        """Each listed client's metrics on its own test shard, with the model ``models[client]`` (or its personal
        one); ``failures``/``dropped`` name those that gave none."""

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


class ClientFailed(FedtuneError):
    """A client's own code raised, and the run does not tolerate client failures."""


def lost_clients(rnd: int, phase: str, pool: ClientPool, tolerate: bool) -> list[dict]:
    """The clients the pool's last call lost, as run-log entries; a failed one stops the run unless ``tolerate``.

    Each entry: ``{"round", "client", "phase": "train" | "evaluate", "kind": "failed" | "dropped", "reason"}``.
    """
    if pool.failures and not tolerate:
        cid, reason = min(pool.failures.items())
        raise ClientFailed(
            f"round {rnd}: client {cid} failed in {phase} (set federation.tolerate_client_failures: true to leave "
            f"failing clients out of their round instead):\n{reason}"
        )
    return [{"round": rnd, "client": cid, "phase": phase, "kind": kind, "reason": reason[-500:]}
            for kind, lost in (("failed", pool.failures), ("dropped", pool.dropped))
            for cid, reason in sorted(lost.items())]


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
    its row lists the sampled clients that sent none (``missing``), those
    whose tensors were not finite (``rejected``), and every client lost in
    training or evaluation with the reason (``client_problems``, see
    :func:`lost_clients`). A client whose code raises stops the run unless
    ``federation.tolerate_client_failures``; with fewer than
    ``federation.min_clients_per_round`` usable updates the run stops with an error.
    The centralized reference (``pools_data``) logs zero bytes: nothing is communicated.
    Returns the final server state and the last row.
    """
    cfg, algo = exp.cfg, exp.algorithm
    rounds = cfg.federation.rounds
    k = 1 if algo.pools_data else clients_per_round(cfg, exp.num_clients)
    min_clients = 1 if algo.pools_data else cfg.federation.min_clients_per_round
    if min_clients > k:
        raise FedtuneError(f"federation.min_clients_per_round={min_clients} exceeds the {k} clients sampled per round")
    per_client = algo.personalized or cfg.eval.per_client
    tolerate = cfg.federation.tolerate_client_failures

    def evaluation(rnd: int, state: ServerState) -> tuple[dict[str, Any], list[dict]]:
        """The round's ``eval/`` metrics (``eval/<model>/`` for several models), the clients' ``client_eval/``
        means (and spread), and each client's own metrics as ``client_metrics: {"<client id>": {...}}``;
        nothing on rounds that are not evaluated. Also the clients lost while evaluating."""
        if not evaluated_round(cfg, rnd):
            return {}, []
        out: dict[str, Any] = {}
        lost: list[dict] = []
        if exp.eval is not None and not algo.personalized:
            for name, tensors in algo.evaluation_models(state).items():
                if hooks:
                    hooks.on_eval_start(rnd, f"the eval split ({name})" if name else "the eval split", len(exp.eval))
                out.update(_prefixed(f"eval/{name}" if name else "eval", evaluate_global(exp, tensors)))
            for name, metrics in algo.evaluate_on_server(state).items():
                out.update(_prefixed(f"eval/{name}", metrics))
        if per_client:
            cids = [cid for cid in range(exp.num_clients) if exp.client_sizes[cid][1]]
            if hooks:
                tested = [exp.client_sizes[c][1] for c in cids]
                what = f"the test shards of {len(tested)} client" + "s" * (len(tested) != 1)
                hooks.on_eval_start(rnd, what, sum(tested))
            clients = pool.evaluate(algo.configure_evaluate(cids, state))
            lost = lost_clients(rnd, "evaluate", pool, tolerate)
            out.update(_prefixed("client_eval", mean_metrics(clients)))
            out["client_metrics"] = {str(c): clients[c] for c in sorted(clients)}
        return out, lost

    def record(state: ServerState, row: dict) -> None:
        log.log_round(row)
        if on_state:
            on_state(state, row)
        if hooks:
            hooks.on_round_end(row)

    if algo.trains_on_server:
        algo.setup_server(exp.server_context(log.run_dir))
    if start is not None:
        state, row = start
    else:
        state = algo.init(exp.initial)
        t0 = now()
        row = {"round": 0, "lr": 0.0, "clients": [], "num_clients": 0, "train_loss": None, "train_examples": 0,
               "bytes_up": 0, "bytes_down": 0, "cum_bytes_up": 0, "cum_bytes_down": 0,
               "time_train_s": 0.0, "time_aggregate_s": 0.0}
        metrics, lost = evaluation(0, state)
        row.update(metrics, client_problems=lost)
        row["time_eval_s"] = row["time_round_s"] = now() - t0
        record(state, row)
    cum_up, cum_down = row["cum_bytes_up"], row["cum_bytes_down"]

    for rnd in range(row["round"] + 1, rounds + 1):
        t_start = now()
        clients = algo.participants(rnd, sample_clients(cfg.seed, rnd, exp.num_clients, k))
        if hooks:
            hooks.on_round_start(rnd, clients)
        lr = round_lr(cfg.train, rnd, rounds)
        payloads = algo.configure(rnd, clients, state)
        bytes_down = sum(tensor_bytes(p.tensors) for p in payloads.values())
        received = pool.train(rnd, payloads, lr)
        lost = lost_clients(rnd, "train", pool, tolerate)
        bytes_up = sum(tensor_bytes(u.tensors) for u in received)
        wire = {}
        if pool.round_bytes is not None:  # measured on the wire by the runtime
            bytes_up, bytes_down, wire_up, wire_down = pool.round_bytes
            wire = {"wire_bytes_up": wire_up, "wire_bytes_down": wire_down}
        if algo.pools_data:  # the centralized reference stands for pooled data: nothing is communicated
            bytes_up = bytes_down = 0
            wire = {}
        updates = [u for u in received if finite(u)]
        rejected = sorted(u.client_id for u in received if not finite(u))
        missing = sorted(set(clients) - {u.client_id for u in received})
        if rejected:
            logger.warning("round %d: rejected non-finite updates of clients %s", rnd, rejected)
            lost += [{"round": rnd, "client": c, "phase": "train", "kind": "rejected",
                      "reason": "non-finite tensors in its update"} for c in rejected]
        if len(updates) < min_clients:
            reasons = {**pool.dropped, **pool.failures}
            why = "; ".join(f"client {c}: {reasons[c][-300:]}" for c in missing if c in reasons)
            raise FedtuneError(
                f"round {rnd}: only {len(updates)} usable updates from {len(clients)} sampled clients "
                f"(federation.min_clients_per_round={min_clients}); missing {missing}, rejected as non-finite "
                f"{rejected}" + (f"; {why}" if why else "")
            )
        t_trained = now()
        state = algo.aggregate(rnd, updates, state)
        t_aggregated = now()
        metrics, lost_eval = evaluation(rnd, state)
        trained = {u.client_id: {k[len(FT):]: v for k, v in u.metrics.items() if k.startswith(FT)} for u in updates}
        if any(trained.values()):
            metrics.update(_prefixed("client_ft", mean_metrics({c: m for c, m in trained.items() if m})))
        t_end = now()
        cum_up += bytes_up
        cum_down += bytes_down
        n_seen = sum(u.metrics.get("examples_seen", 0) for u in updates)
        loss = (sum(u.metrics["train_loss"] * u.metrics.get("examples_seen", 0) for u in updates) / n_seen
                if n_seen else math.nan)
        row = {"round": rnd, "lr": lr, "clients": [u.client_id for u in updates], "num_clients": len(updates),
               "missing": missing, "rejected": rejected, "client_problems": lost + lost_eval,
               "train_loss": loss, "train_examples": int(n_seen),
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cum_bytes_up": cum_up, "cum_bytes_down": cum_down,
               **wire,
               "time_train_s": t_trained - t_start, "time_aggregate_s": t_aggregated - t_trained,
               "time_eval_s": t_end - t_aggregated, "time_round_s": t_end - t_start,
               **{f"agg/{k}": v for k, v in state.metrics.items()}, **metrics}
        record(state, row)
    return state, row
