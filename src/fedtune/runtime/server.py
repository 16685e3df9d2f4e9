"""The round loop every runtime drives: sample, configure, train, aggregate, evaluate, log.

A runtime supplies a :class:`ClientPool` — how payloads reach clients and
updates come back — and the loop does the rest identically: the same client
sampling, learning-rate schedule, byte accounting and run log rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from fedtune.aggregation import Tensors, tensor_bytes
from fedtune.algorithms import ClientUpdate, Payload, ServerState
from fedtune.errors import FedtuneError
from fedtune.evaluation import mean_metrics, unweighted_mean_metrics
from fedtune.experiment import Experiment, evaluated_round
from fedtune.runtime.client import FT
from fedtune.runlog import RunLog
from fedtune.runtime.diagnostics import cosines, sketch
from fedtune.runtime.update_check import change, check_update, over_reference, oversized, reference_change
from fedtune.sampling import clients_per_round, sample_clients, sampling_rate
from fedtune.training import round_lr
from fedtune.usage import round_usage


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

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> Iterator[ClientUpdate]:
        """Deliver each payload and yield each update as it arrives (a client's training finished, its reply
        received); ``failures``, ``dropped`` and ``round_bytes`` hold once the iterator is exhausted."""

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


def evaluate_global(exp: Experiment, tensors: Tensors) -> dict[str, float]:
    exp.load(tensors)
    return exp.evaluate(exp.eval)


def weighted_model_metrics(metrics: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, float]:
    """Each metric that every model reports, as Σ w_k m_k / Σ w_k over the models k (``n`` aside)."""
    names = list(weights)
    total = sum(weights[k] for k in names)
    shared = [m for m in metrics[names[0]] if m != "n" and all(m in metrics[k] for k in names)]
    return {m: sum(weights[k] * metrics[k][m] for k in names) / total for m in shared}


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
        advice = ("set federation.tolerate_client_failures: true to leave failing clients out of their round "
                  "instead")
        raise ClientFailed(f"round {rnd}: client {cid} failed in {phase}: {reason} ({advice})" if "\n" not in reason
                           else f"round {rnd}: client {cid} failed in {phase} ({advice}):\n{reason}")
    return [{"round": rnd, "client": cid, "phase": phase, "kind": kind, "reason": reason[-500:]}
            for kind, lost in (("failed", pool.failures), ("dropped", pool.dropped))
            for cid, reason in sorted(lost.items())]


class ClientRejected(FedtuneError):
    """A client's update failed the server's check, and the run does not tolerate client failures."""


class RoundIntake:
    """A round's updates as they arrive: each checked (:mod:`fedtune.runtime.update_check`), the accepted ones
    passed on, one at a time, to the algorithm's aggregate (:meth:`accepted`), and what the round's row needs
    kept as scalars, so that a round holds a constant number of updates whatever the number of clients.

    The update guard judges an update as it arrives against the previous round's accepted changes; with fewer
    than three of those (the first round) the round's valid updates are held and judged together, unless the
    guard is off (``federation.max_update_ratio: 0``), when nothing needs holding.
    """

    def __init__(self, exp: Experiment, rnd: int, payloads: dict[int, Payload], state: ServerState,
                 previous_norms: list[float], tolerate: bool, now: Callable[[], float]):
        self.exp, self.rnd, self.payloads, self.state = exp, rnd, payloads, state
        self.previous, self.tolerate, self.now = previous_norms, tolerate, now
        self.reference = reference_change(previous_norms)
        self.ratio = exp.cfg.federation.max_update_ratio
        self.received: list[int] = []
        self.accepted_ids: list[int] = []
        self.rejected: dict[int, str] = {}
        self.norms: dict[int, float] = {}
        self.sketches: dict[int, torch.Tensor] = {}
        """Client → the count sketch of its accepted change (:mod:`fedtune.runtime.diagnostics`)."""
        self.weights: dict[int, float] = {}
        self.bytes_up = 0
        self.client_metrics: dict[int, dict[str, float]] = {}
        self.wait_s = 0.0
        """Seconds spent waiting for updates (the clients training, or their replies travelling)."""
        self._source = None

    def accepted(self, received) -> Iterator[ClientUpdate]:
        """The accepted updates of ``received`` (an iterator, taken in one pass), in arrival order."""
        self._source = iter(received)
        return self._accepted()

    def _accepted(self) -> Iterator[ClientUpdate]:
        held: list[tuple[ClientUpdate, float, torch.Tensor]] = []
        for u in self._arrivals():
            measured = self._measure(u)
            if measured is None:
                continue
            norm, sketched = measured
            if self.ratio > 0 and self.reference is None:  # nothing to judge against yet: judged with the others
                held.append((u, norm, sketched))
                continue
            why = over_reference(norm, self.reference, self.ratio)
            if why:
                self._reject(u.client_id, why)
                continue
            yield self._accept(u, norm, sketched)
        if held:
            verdicts = oversized({u.client_id: n for u, n, _ in held}, self.ratio, self.previous)
            for u, norm, sketched in held:
                if u.client_id in verdicts:
                    self._reject(u.client_id, verdicts[u.client_id])
                else:
                    yield self._accept(u, norm, sketched)

    def drain(self) -> None:
        """Take every update the aggregate did not (an algorithm that ignores them), checking each."""
        for _ in self._accepted():
            pass

    def _arrivals(self) -> Iterator[ClientUpdate]:
        while True:
            t0 = self.now()
            try:
                u = next(self._source)
            except StopIteration:
                self.wait_s += self.now() - t0
                return
            self.wait_s += self.now() - t0
            self.received.append(u.client_id)
            self.bytes_up += tensor_bytes(u.tensors)
            yield u

    def _measure(self, u: ClientUpdate) -> tuple[float, torch.Tensor] | None:
        """A valid update's change norm and sketch; None (and the update rejected) for an invalid one."""
        if u.client_id not in self.payloads:
            self._reject(u.client_id, "it sent an update it was not asked for")
            return None
        expected = self.exp.algorithm.expected_update(u.client_id, self.payloads[u.client_id], self.state)
        why = check_update(u, expected, self.exp.client_sizes[u.client_id][0])
        if why:
            self._reject(u.client_id, why)
            return None
        delta = change(u, expected)
        return math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values())), sketch(delta)

    def _reject(self, cid: int, why: str) -> None:
        logger.warning("round %d: rejected the update of client %d: %s", self.rnd, cid, why)
        if not self.tolerate:
            raise ClientRejected(f"round {self.rnd}: the update of client {cid} was rejected: {why} (set "
                                 "federation.tolerate_client_failures: true to leave such clients out of their round "
                                 "instead)")
        self.rejected[cid] = why

    def _accept(self, u: ClientUpdate, norm: float, sketched: torch.Tensor) -> ClientUpdate:
        self.accepted_ids.append(u.client_id)
        self.norms[u.client_id] = norm
        self.sketches[u.client_id] = sketched
        self.weights[u.client_id] = float(u.num_examples)
        self.client_metrics[u.client_id] = dict(u.metrics)
        return u

    # ------------------------------------------------------------ the row, from scalars kept in client order
    def train_loss(self) -> tuple[float, int]:
        """The round's training loss (weighted by the examples each client saw) and those examples."""
        ms = [self.client_metrics[c] for c in sorted(self.client_metrics)]
        seen = sum(m.get("examples_seen", 0) for m in ms)
        loss = sum(m["train_loss"] * m.get("examples_seen", 0) for m in ms) / seen if seen else math.nan
        return loss, int(seen)

    def trained_metrics(self) -> dict[int, dict[str, float]]:
        """Each accepted client's metrics measured right after its training (``eval.after_local_training``)."""
        return {c: {k[len(FT):]: v for k, v in m.items() if k.startswith(FT)} for c, m in self.client_metrics.items()}


def run_rounds(exp: Experiment, pool: ClientPool, log: RunLog, hooks: RoundHooks | None = None,
               now: Callable[[], float] = time.perf_counter,
               start: tuple[ServerState, dict] | None = None,
               on_state: Callable[[ServerState, dict], None] | None = None) -> tuple[ServerState, dict]:
    """Run every round of ``exp`` through ``pool``, logging one row per round (round 0: the initial model).

    ``start``: continue from the (state, row) of a completed round instead of
    initialising (resume). ``on_state(state, row)`` is called after each logged
    round (checkpointing). A round aggregates the updates that arrive and pass
    the server's check, as they arrive (:class:`RoundIntake`); its row lists the sampled
    clients that sent none (``missing``), those whose update was rejected
    (``rejected``), each accepted update's change norm (``update_norms``), and
    every client lost in training or evaluation with the reason
    (``client_problems``, see :func:`lost_clients`). A client whose code raises,
    or whose update is rejected, stops the run with one line naming it unless
    ``federation.tolerate_client_failures``; with fewer than
    ``federation.min_clients_per_round`` usable updates the run stops with an
    error. The centralized reference (``pools_data``) logs zero bytes: nothing
    is communicated. A round whose sampling drew no client (``federation.sampling:
    poisson``) keeps the state, unless the algorithm aggregates empty rounds
    (:attr:`~fedtune.algorithms.Algorithm.aggregates_empty_round`: the ``dp``
    wrapper's noise); its row lists no clients. With differential privacy
    (``exp.privacy``) each round composes its mechanism's uses, logs ε
    (``privacy/epsilon``) and carries the accountant's state in ``state.extra``;
    ``privacy.target_epsilon`` with ``on_target: stop`` ends the run before the
    round that would exceed it. Returns the final server state and the last row.
    """
    cfg, algo, privacy = exp.cfg, exp.algorithm, exp.privacy
    rounds = cfg.federation.rounds
    k = 1 if algo.pools_data else clients_per_round(cfg, exp.num_clients)
    rate = None if algo.pools_data else sampling_rate(cfg, exp.num_clients)
    min_clients = 1 if algo.pools_data else cfg.federation.min_clients_per_round
    if min_clients > k:
        raise FedtuneError(f"federation.min_clients_per_round={min_clients} exceeds the {k} clients sampled per round")
    per_client = algo.personalized or cfg.eval.per_client
    tolerate = cfg.federation.tolerate_client_failures

    def evaluation(rnd: int, state: ServerState) -> tuple[dict[str, Any], list[dict]]:
        """The round's ``eval/`` metrics (``eval/<model>/`` for several models), the clients' ``client_eval/``
        means over their test rows (and spread) and ``client_eval_unweighted/`` means over the clients, and each
        client's own metrics as ``client_metrics: {"<client id>": {...}}``;
        nothing on rounds that are not evaluated. Also the clients lost while evaluating."""
        if not evaluated_round(cfg, rnd):
            return {}, []
        out: dict[str, Any] = {}
        lost: list[dict] = []
        if exp.eval is not None and not algo.personalized:
            scored = {}
            for name, tensors in algo.evaluation_models(state).items():
                if hooks:
                    hooks.on_eval_start(rnd, f"the eval split ({name})" if name else "the eval split", len(exp.eval))
                scored[name] = evaluate_global(exp, tensors)
                out.update(_prefixed(f"eval/{name}" if name else "eval", scored[name]))
            weights = algo.evaluation_weights(state)
            if weights:
                out.update(_prefixed("eval", weighted_model_metrics({k: scored[k] for k in weights}, weights)))
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
            out.update(_prefixed("client_eval_unweighted", unweighted_mean_metrics(clients)))
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
        if privacy is not None:
            privacy.restore(state.extra)
    else:
        state = algo.init(exp.initial)
        t0 = now()
        metrics, lost = evaluation(0, state)
        t_end = now()
        row = round_row(0, times=(0.0, 0.0, t_end - t0), metrics=metrics, problems=lost)
        record(state, row)

    for rnd in range(row["round"] + 1, rounds + 1):
        t_start = now()
        secret = privacy.dp.sampling(state, rnd) if privacy is not None and privacy.dp is not None else None
        clients = algo.participants(rnd, sample_clients(cfg.seed, rnd, exp.num_clients, k, rate, secret))
        sizes = [tr for tr, _ in exp.client_sizes]
        stop = privacy.stops_before(rnd, clients, sizes) if privacy is not None else None
        if stop:
            exp.note(stop)
            break
        if hooks:
            hooks.on_round_start(rnd, clients)
        lr = round_lr(cfg.train, rnd, rounds)
        payloads = algo.configure(rnd, clients, state)
        bytes_down = sum(tensor_bytes(p.tensors) for p in payloads.values())
        algo.reducer.begin_round()
        intake = RoundIntake(exp, rnd, payloads, state, list(row.get("update_norms", {}).values()), tolerate, now)
        least = min(min_clients, len(clients))  # a Poisson round may sample fewer
        t_trained = now()
        try:
            if clients or algo.aggregates_empty_round:
                new_state = algo.aggregate(rnd, intake.accepted(pool.train(rnd, payloads, lr) if clients else iter(())),
                                           state)
                intake.drain()
            else:  # no client sampled: nothing to aggregate
                new_state = state
        except ClientRejected:
            raise
        except Exception:
            lost_clients(rnd, "train", pool, tolerate)  # a client that failed first is the one to name
            if len(intake.accepted_ids) < least:
                raise _too_few(rnd, clients, intake, pool, min_clients) from None
            raise
        lost = lost_clients(rnd, "train", pool, tolerate) if clients else []
        if len(intake.accepted_ids) < least:
            raise _too_few(rnd, clients, intake, pool, min_clients)
        state = new_state
        private = {}
        if privacy is not None:
            privacy.spend(clients, sizes)
            state.extra = {**state.extra, **privacy.state()}
            private = privacy.row(sizes)
        bytes_up, wire = intake.bytes_up, {}
        if pool.round_bytes is not None and clients:  # measured on the wire by the runtime
            bytes_up, bytes_down, wire_up, wire_down = pool.round_bytes
            wire = {"wire_bytes_up": wire_up, "wire_bytes_down": wire_down}
        if algo.pools_data:  # the centralized reference stands for pooled data: nothing is communicated
            bytes_up = bytes_down = 0
            wire = {}
        lost += [{"round": rnd, "client": c, "phase": "train", "kind": "rejected", "reason": why}
                 for c, why in sorted(intake.rejected.items())]
        t_aggregated = now()
        metrics, lost_eval = evaluation(rnd, state)
        trained = intake.trained_metrics()
        if any(trained.values()):
            scored = {c: m for c, m in trained.items() if m}
            metrics.update(_prefixed("client_ft", mean_metrics(scored)))
            metrics.update(_prefixed("client_ft_unweighted", unweighted_mean_metrics(scored)))
        t_end = now()
        loss, n_seen = intake.train_loss()
        reduced = algo.reducer.round_report()
        row = round_row(rnd, lr=lr, clients=sorted(intake.accepted_ids), missing=sorted(set(clients) - set(intake.received)),
                        rejected=sorted(intake.rejected), norms=intake.norms,
                        cosines=cosines(intake.sketches, intake.weights), problems=lost + lost_eval,
                        train_loss=loss, train_examples=n_seen, traffic=(bytes_up, bytes_down), previous=row,
                        wire=wire, times=((t_trained - t_start) + intake.wait_s,
                                          (t_aggregated - t_trained) - intake.wait_s, t_end - t_aggregated),
                        metrics={**{f"agg/{k}": v for k, v in state.metrics.items()},
                                 **({"reducer": reduced} if reduced else {}),
                                 **round_usage([intake.client_metrics[c] for c in sorted(intake.client_metrics)]),
                                 **private, **metrics})
        record(state, row)
    return state, row


def _too_few(rnd: int, clients: list[int], intake: RoundIntake, pool: ClientPool, min_clients: int) -> FedtuneError:
    """The one-line error of a round with fewer usable updates than ``federation.min_clients_per_round``."""
    missing = sorted(set(clients) - set(intake.received))
    reasons = {**pool.dropped, **pool.failures, **intake.rejected}
    why = "; ".join(f"client {c}: {reasons[c][-300:]}" for c in sorted({*missing, *intake.rejected}) if c in reasons)
    return FedtuneError(f"round {rnd}: only {len(intake.accepted_ids)} usable updates from {len(clients)} sampled "
                        f"clients (federation.min_clients_per_round={min_clients}); missing {missing}, rejected "
                        f"{sorted(intake.rejected)}" + (f"; {why}" if why else ""))


def round_row(rnd: int, *, times: tuple[float, float, float], metrics: dict[str, Any], problems: list[dict],
              lr: float = 0.0, clients: list[int] = (), missing: list[int] = (), rejected: list[int] = (),
              norms: dict[int, float] | None = None, cosines: dict[int, float] | None = None, train_loss: float | None = None, train_examples: int = 0,
              traffic: tuple[int, int] = (0, 0), previous: dict | None = None, wire: dict | None = None) -> dict:
    """One row of ``metrics.jsonl``: the round's clients, loss, bytes (and running totals after ``previous``),
    seconds training / aggregating / evaluating, and its metrics. Round 0 (the initial model) has no training."""
    up, down = traffic
    row = {"round": rnd, "lr": lr, "clients": list(clients), "num_clients": len(clients)}
    if rnd:
        row.update(missing=list(missing), rejected=list(rejected),
                   update_norms={str(c): v for c, v in sorted((norms or {}).items())},
                   update_cosines={str(c): v for c, v in sorted((cosines or {}).items())})
    row.update(client_problems=problems, train_loss=train_loss, train_examples=train_examples,
               bytes_up=up, bytes_down=down,
               cum_bytes_up=(previous or {}).get("cum_bytes_up", 0) + up,
               cum_bytes_down=(previous or {}).get("cum_bytes_down", 0) + down, **(wire or {}),
               time_train_s=times[0], time_aggregate_s=times[1], time_eval_s=times[2], time_round_s=sum(times))
    row.update(metrics)
    return row
