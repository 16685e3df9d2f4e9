"""The server half of the Flower runtime: the same round loop, over Flower's Message API.

:class:`FlowerPool` is the :class:`~fedtune.runtime.server.ClientPool` that
:func:`~fedtune.runtime.server.run_rounds` drives inside a ``ServerApp``: it
turns each :class:`~fedtune.algorithms.Payload` into a ``Message`` for the
node of that client, and each reply back into a
:class:`~fedtune.algorithms.ClientUpdate`. The node half, which answers with
the same client code the in-process engine runs, is
:mod:`fedtune.runtime.flower_node` (the ClientApp that calls it:
:mod:`fedtune.runtime.flower_client`). Nothing here knows which algorithm runs.

Wire format (one ``RecordDict`` per message; tensors packed by :mod:`fedtune.runtime.wire`)::

    train     server → client   "payload": ArrayRecord   Payload.tensors
                                "config":  ConfigRecord  Payload.config
                                "fedtune": ConfigRecord  round, lr, client_id, run (the resolved RunConfig, JSON)
              client → server   "update":  ArrayRecord   ClientUpdate.tensors
                                "metrics": MetricRecord  num_examples, client_id, state_tensors, ClientUpdate.metrics
    evaluate  server → client   "model":   ArrayRecord   the tensors the client is evaluated with
                                                         (Algorithm.configure_evaluate);  "fedtune" as above
              client → server   "metrics": MetricRecord  the client's test metrics
    query     server → client   "fedtune": ConfigRecord  action = "hello" (and run) | "state"
              client → server   "metrics": ConfigRecord  hello: client_id, and with node-local data its
                                                         train/test sizes and label_counts
                                "state":   ArrayRecord   (action "state") the client's persistent tensors

A reply is the node's word: one that cannot be decoded (missing records, a
malformed tensor pack, metrics of the wrong type) is that client's failure,
like an error reply, never the run's (:class:`UndecodableReply`).

Client ``i`` is the node whose node config says ``client-id=i`` (node-local
data, ``partition.method: files``; with its ``data-path``) or ``partition-id=i``
(a split dataset; the simulation engine); its persistent tensors
(``ClientContext.state``) live in that node's ``Context.state`` under
``"fedtune.state"``.

Bytes: ``bytes_up``/``bytes_down`` are the tensor bytes inside the ArrayRecords
actually sent and received (equal to the in-process accounting);
``wire_bytes_*`` are their serialised sizes (``ArrayRecord.count_bytes``:
adds the layout key, the tensors' names, dtypes and shapes).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientUpdate, Payload
from fedtune.config import RunConfig
from fedtune.device import simulation_gpus
from fedtune.errors import FedtuneError
from fedtune.experiment import Experiment
from fedtune.runtime.flower_client import clientapp
from fedtune.runtime.wire import record_tensor_bytes, record_to_tensors, tensors_to_record

log = logging.getLogger("fedtune.flower")

T = TypeVar("T")

RAISED = frozenset({ErrorCode.UNKNOWN, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION})
"""Error codes of a reply whose ClientApp raised: the client's own code failed (the others: it could not answer)."""

PULL_S = 0.1
"""Seconds between two pulls of a round's replies while none arrived (Flower's own send_and_receive waits 3 s)."""
CONNECT_TIMEOUT_S = 300.0
"""Seconds a run waits for its nodes to connect and say who they are before it stops with an error."""


class UndecodableReply(FedtuneError):
    """A node's reply that is not what fedtune's ClientApp sends."""


_WRAPPED = re.compile(r"^<class '[^']*'>:<'(.*)'>$", re.DOTALL)


def reason_line(reason: str) -> str:
    """The last line of an error reply's reason, unwrapped from Flower's ``<class 'E'>:<'message'>`` (a
    ClientApp's exception), at most 300 characters."""
    reason = str(reason).strip()
    wrapped = _WRAPPED.match(reason)
    lines = [line.strip() for line in (wrapped[1] if wrapped else reason).splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def _decode_update(cid: int, reply: Message) -> tuple[ArrayRecord, ClientUpdate, bool]:
    """The update record, the :class:`ClientUpdate` and whether the client holds state, from a train reply;
    :class:`UndecodableReply` naming what is wrong otherwise."""
    try:
        record, metrics = reply.content["update"], dict(reply.content["metrics"])
    except (KeyError, TypeError, ValueError) as e:
        raise UndecodableReply(f"the reply lacks its update or metrics record ({type(e).__name__})") from None
    if not isinstance(record, ArrayRecord):
        raise UndecodableReply("its update is not an ArrayRecord")
    tensors = record_to_tensors(record)
    n, held = metrics.get("num_examples"), metrics.get("state_tensors", 0)
    if type(n) is not int or type(held) is not int:
        raise UndecodableReply("num_examples and state_tensors must be integers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()
               if k.startswith("m.")):
        raise UndecodableReply("its metrics must be numbers")
    values = {k[2:]: float(v) for k, v in metrics.items() if k.startswith("m.")}
    return record, ClientUpdate(cid, tensors, n, values), held > 0


def _decode_metrics(reply: Message) -> dict[str, float]:
    """A client's evaluation metrics from an evaluate reply (:class:`UndecodableReply` otherwise)."""
    try:
        metrics = dict(reply.content["metrics"])
    except (KeyError, TypeError, ValueError) as e:
        raise UndecodableReply(f"the reply lacks its metrics record ({type(e).__name__})") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise UndecodableReply("its metrics must be numbers")
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- server side


class FlowerPool:
    """A :class:`~fedtune.runtime.server.ClientPool` over a Flower ``Grid``.

    After each :meth:`train`, ``round_bytes`` holds the round's measured
    ``(bytes_up, bytes_down, wire_bytes_up, wire_bytes_down)``. After each
    :meth:`train` or :meth:`evaluate`, ``failures`` maps each client whose
    ClientApp raised (error codes in :data:`RAISED`) to its error, and
    ``dropped`` each client that could not answer (node gone, message lost,
    process crashed, or no reply within the timeout) to the reason.
    """

    def __init__(self, grid: Grid, exp: Experiment, timeout_s: float | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.grid, self.exp = grid, exp
        self.timeout_s = timeout_s
        self.run_json = json.dumps(exp.cfg.to_dict(), sort_keys=True)
        self.round_bytes: tuple[int, int, int, int] | None = None
        self.failures: dict[int, str] = {}
        self.dropped: dict[int, str] = {}
        self.stateful_clients: set[int] = set()
        self.node_of = self._discover(connect_timeout_s)
        self.client_of = {nid: cid for cid, nid in self.node_of.items()}

    # ------------------------------------------------------------ plumbing
    def _meta(self, **kw: Any) -> ConfigRecord:
        return ConfigRecord({"run": self.run_json, **kw})

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=timeout))

    def _exchange_with(self, messages: list[Message], cids: list[int],
                       timeout: float | None) -> list[tuple[int, Message]]:
        """Send ``messages`` (``messages[k]`` for client ``cids[k]``); each reply with the client it answers for.

        A reply is matched to the message it answers (``reply_to_message_id``; the
        grid sets message ids when pushing), not to its sender: the error reply the
        SuperLink makes for a node that went away comes from the SuperLink's own node id.
        """
        replies = self._exchange(messages, timeout)
        by_msg = {m.metadata.message_id: cid for m, cid in zip(messages, cids)}
        out = []
        for reply in replies:
            cid = by_msg.get(reply.metadata.reply_to_message_id)
            if cid is None:
                cid = self.client_of.get(reply.metadata.src_node_id)
            if cid is None:
                log.warning("dropping a reply from node %s that answers none of this exchange's messages",
                            reply.metadata.src_node_id)
                continue
            out.append((cid, reply))
        return out

    def _discover(self, connect_timeout_s: float) -> dict[int, int]:
        """Map client id → node id: wait for the nodes, send each the run (it builds its experiment, reading its
        data afresh) and ask which client it is; with node-local data each also reports its data's sizes and
        label counts. Every node that fails to start its client is named in one error, by the client id it
        gives (its node id where it gives none)."""
        need = self.exp.num_clients
        deadline = time.monotonic() + connect_timeout_s
        while len(nodes := list(self.grid.get_node_ids())) < need:
            if time.monotonic() > deadline:
                raise FedtuneError(f"only {len(nodes)} of {need} Flower nodes connected within {connect_timeout_s:.0f}s; "
                                   f"start one SuperNode per client (partition.num_clients={need})")
            time.sleep(0.2)
        msgs = [Message(RecordDict({"fedtune": self._meta(action="hello")}), dst_node_id=n, message_type="query")
                for n in nodes]
        node_of: dict[int, int] = {}
        reports: dict[int, dict[str, Any]] = {}
        failed: list[str] = []
        for reply in self._exchange(msgs, timeout=connect_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                line = reason_line(reply.error.reason) or "no reason given"
                failed.append(line if line.startswith("client ") else f"node {node}: {line}")
                continue
            try:
                report = dict(reply.content["metrics"])
                cid = report["client_id"]
                if type(cid) is not int:
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                failed.append(f"node {node}: its reply does not say which client it is")
                continue
            if not 0 <= cid < need:
                failed.append(f"node {node} claims client {cid}, but the run has clients 0..{need - 1}")
            elif cid in node_of:
                failed.append(f"nodes {node_of[cid]} and {node} both claim client {cid}")
            else:
                node_of[cid], reports[cid] = node, report
        if failed:
            nodes = f"{len(failed)} nodes could not start their" if len(failed) > 1 else "1 node could not start its"
            raise FedtuneError(f"{nodes} client: " + "; ".join(sorted(failed)))
        missing = sorted(set(range(need)) - set(node_of))
        if missing:
            how = ("--node-config 'client-id=<i> data-path=<file>'" if self.exp.cfg.partition.method == "files"
                   else "--node-config 'partition-id=<i> num-partitions=<n>'")
            raise FedtuneError(f"no Flower node holds client {missing} (need 0..{need - 1}: one SuperNode per client, "
                               f"{how}; a node that did not answer within {connect_timeout_s:.0f}s is missing too)")
        if self.exp.cfg.partition.method == "files":
            self.exp.describe_clients(reports)
        return node_of

    # ------------------------------------------------------------ ClientPool
    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> Iterator[ClientUpdate]:
        """Push every client's message, then yield each update as its reply is pulled (polled every
        :data:`PULL_S` s until all replied or ``round_timeout_s``): one reply is decoded at a time, so the
        server holds the replies of one pull, not the round's."""
        messages, down, wire_down = [], 0, 0
        cids = sorted(payloads)
        for cid in cids:
            p = payloads[cid]
            record = tensors_to_record(p.tensors)
            down += record_tensor_bytes(record)
            wire_down += record.count_bytes()
            content = RecordDict({"payload": record, "config": ConfigRecord(p.config),
                                  "fedtune": self._meta(round=rnd, lr=float(lr), client_id=cid)})
            messages.append(Message(content, dst_node_id=self.node_of[cid], message_type="train", group_id=str(rnd)))
        up, wire_up, answered = 0, 0, set()
        self.failures, self.dropped = {}, {}
        self.round_bytes = (0, down, 0, wire_down)
        for cid, reply in self._replies(messages, cids, self.timeout_s):
            answered.add(cid)
            if reply.has_error():
                self._lost(cid, reply, f"round {rnd}")
                continue
            try:
                record, update, holds_state = _decode_update(cid, reply)
            except FedtuneError as e:
                self._undecodable(cid, e, f"round {rnd}")
                continue
            up += record_tensor_bytes(record)
            wire_up += record.count_bytes()
            self.round_bytes = (up, down, wire_up, wire_down)
            if holds_state:
                self.stateful_clients.add(cid)
            del reply, record
            yield update
        self._late(set(payloads) - answered, f"round {rnd}")

    def _replies(self, messages: list[Message], cids: list[int],
                 timeout: float | None) -> Iterator[tuple[int, Message]]:
        """Push ``messages`` (``messages[k]`` for client ``cids[k]``); yield each reply, with the client it answers
        for, as it is pulled."""
        ids = list(self.grid.push_messages(messages))
        client_of_message = dict(zip(ids, cids))
        outstanding = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while outstanding:
            replies = list(self.grid.pull_messages(outstanding))
            for reply in replies:
                mid = reply.metadata.reply_to_message_id
                if mid not in outstanding:
                    log.warning("dropping a reply from node %s that answers none of this round's messages",
                                reply.metadata.src_node_id)
                    continue
                outstanding.discard(mid)
                yield client_of_message[mid], reply
            if not replies:
                if deadline is not None and time.monotonic() > deadline:
                    return
                time.sleep(PULL_S)

    def _lost(self, cid: int, reply: Message, what: str) -> None:
        """File an error reply: the client's code raised (``failures``), or it could not answer (``dropped``)."""
        lost = self.failures if reply.error.code in RAISED else self.dropped
        lost[cid] = reply.error.reason
        log.warning("%s: client %d %s: %s", what, cid, "failed" if lost is self.failures else "was dropped",
                    reply.error.reason[-500:])

    def _undecodable(self, cid: int, error: FedtuneError, what: str) -> None:
        """File a reply that cannot be decoded as the client's failure."""
        self.failures[cid] = f"its reply could not be decoded: {error}"
        log.warning("%s: client %d sent a reply that could not be decoded: %s", what, cid, error)

    def _late(self, silent: set[int], what: str) -> None:
        for cid in sorted(silent - set(self.failures) - set(self.dropped)):
            self.dropped[cid] = f"no reply within round_timeout_s={self.timeout_s}"
            log.warning("%s: client %d sent no reply within %ss", what, cid, self.timeout_s)

    def evaluate(self, models: dict[int, Tensors]) -> dict[int, dict[str, float]]:
        cids = sorted(models)
        records: dict[int, ArrayRecord] = {}  # one record per distinct model (clients of a cluster share theirs)
        for cid in cids:
            if id(models[cid]) not in records:
                records[id(models[cid])] = tensors_to_record(models[cid])
        messages = [Message(RecordDict({"model": records[id(models[cid])], "fedtune": self._meta(client_id=cid)}),
                            dst_node_id=self.node_of[cid], message_type="evaluate") for cid in cids]
        out: dict[int, dict[str, float]] = {}
        self.failures, self.dropped = {}, {}
        for cid, reply in self._exchange_with(messages, cids, timeout=self.timeout_s):
            if reply.has_error():
                self._lost(cid, reply, "evaluation")
                continue
            try:
                out[cid] = _decode_metrics(reply)
            except FedtuneError as e:
                self._undecodable(cid, e, "evaluation")
        self._late(set(cids) - set(out), "evaluation")
        return out

    def held_client_states(self) -> None:
        return None  # each node keeps its client's state

    def restore_client_states(self, states: dict[int, Tensors]) -> None:
        held = sorted(cid for cid, s in states.items() if s)
        if held:
            raise FedtuneError(f"this checkpoint holds the per-client state of clients {held}, which the Flower "
                               "runtime cannot hand to its nodes; resume it with --runtime inprocess")

    def clients_with_state_on_nodes(self) -> list[int]:
        return sorted(self.stateful_clients)

    def final_client_states(self) -> dict[int, Tensors]:
        """Every client's persistent tensors, read from its node."""
        cids = sorted(self.node_of)
        msgs = [Message(RecordDict({"fedtune": ConfigRecord({"action": "state"})}), dst_node_id=self.node_of[cid],
                        message_type="query") for cid in cids]
        states: dict[int, Tensors] = {}
        for cid, reply in self._exchange_with(msgs, cids, timeout=self.timeout_s):
            if reply.has_error():
                raise FedtuneError(f"the node of client {cid} failed to return its state: "
                                   f"{reply.error.reason[-500:]}")
            try:
                states[cid] = record_to_tensors(reply.content["state"])
            except (FedtuneError, KeyError, TypeError) as e:
                raise FedtuneError(f"the node of client {cid} returned a state that could not be decoded: {e}") from None
        return states


# --------------------------------------------------------------------------- simulation


def simulation_backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray settings: each virtual client's actor reserves ``cfg.threads`` CPUs (default 1), so
    ``cores / threads`` clients train in parallel, and on a GPU ``train.gpu_fraction`` of one
    (:func:`~fedtune.device.simulation_gpus`)."""
    return {"client_resources": {"num_cpus": cfg.threads or 1, "num_gpus": simulation_gpus(cfg)},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False}}


def run_simulation_engine(exp: Experiment, body: Callable[[FlowerPool], T],
                          backend_config: dict[str, Any] | None = None, verbose: bool = False) -> T:
    """Run ``body(pool)`` inside a ServerApp on Flower's simulation engine, one virtual node per client.

    The ServerApp runs in this process (so ``exp`` and the run log are shared
    with the caller); the ClientApps run in Ray actors, each building its own
    Experiment once.
    """
    import warnings

    from flwr.simulation import run_simulation

    result: dict[str, T] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        pool = FlowerPool(grid, exp, timeout_s=exp.cfg.federation.round_timeout_s)
        result["value"] = body(pool)

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run_simulation(server_app=server, client_app=clientapp, num_supernodes=exp.num_clients,
                           backend_config=backend_config or simulation_backend_config(exp.cfg),
                           verbose_logging=verbose)
    finally:
        flwr_log.setLevel(level)
    if "value" not in result:
        raise FedtuneError("the Flower simulation ended before the ServerApp finished (see the log above)")
    return result["value"]
