"""The Flower runtime: the same round loop and the same client half, over Flower's Message API.

Server side, :class:`FlowerPool` is the :class:`~fedtune.runtime.server.ClientPool`
that :func:`~fedtune.runtime.server.run_rounds` drives inside a ``ServerApp``:
it turns each :class:`~fedtune.algorithms.Payload` into a ``Message`` for the
node of that client, and each reply back into a
:class:`~fedtune.algorithms.ClientUpdate`. Node side, :func:`answer` replies to
those messages with :func:`~fedtune.runtime.client.client_round` and
:func:`~fedtune.runtime.client.client_evaluate`, the functions the in-process
engine calls; the ClientApp that calls it is in
:mod:`fedtune.runtime.flower_client`. Nothing here knows which algorithm runs.

Wire format (one ``RecordDict`` per message)::

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

Client ``i`` is the node whose node config says ``client-id=i`` (node-local
data, ``partition.method: files``; with its ``data-path``) or ``partition-id=i``
(a split dataset; the simulation engine); its persistent tensors
(``ClientContext.state``) live in that node's ``Context.state`` under
``"fedtune.state"``. A node builds its :class:`~fedtune.experiment.Experiment`
(its own client's data only) once per run config and reuses it for every
message (:func:`node_experiment`), so the base model is never reloaded: in a
Ray actor of the simulation engine, or in the ``fedtune supernode`` worker that
a deployed node's ClientApp forwards to (:mod:`fedtune.runtime.flower_client`).

Bytes: ``bytes_up``/``bytes_down`` are the tensor bytes inside the ArrayRecords
actually sent and received (equal to the in-process accounting);
``wire_bytes_*`` are their serialised sizes (``ArrayRecord.count_bytes``:
adds the layout key, the tensors' names, dtypes and shapes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientUpdate, Payload
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.experiment import Experiment, build_experiment
from fedtune.runtime.client import client_evaluate, client_round
from fedtune.runtime.flower_client import clientapp

log = logging.getLogger("fedtune.flower")

PACKED_STYPE = "fedtune.packed"
"""Serialisation type of a tensor pack (:func:`tensors_to_record`): the tensors' raw bytes, back to back."""

T = TypeVar("T")

RAISED = frozenset({ErrorCode.UNKNOWN, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION})
"""Error codes of a reply whose ClientApp raised: the client's own code failed (the others: it could not answer)."""


# --------------------------------------------------------------------------- record conversion


def tensors_to_record(tensors: Tensors) -> ArrayRecord:
    """Named tensors → an ``ArrayRecord`` of one packed ``Array``: their bytes back to back (``uint8``), and the
    layout (name, dtype, shape of each, in order) as the record's one key, JSON.

    One Array, not one per tensor: Flower moves each Array as its own object (an HTTP request between the
    SuperLink and a node, and between the SuperLink and the ServerApp), and a LoRA payload has dozens of tensors.
    Any dtype travels, bfloat16 included.
    """
    layout, parts = [], []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        parts.append(t.reshape(-1).view(torch.uint8))
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    record = ArrayRecord()
    record[json.dumps(layout)] = Array(dtype="uint8", shape=(packed.numel(),), stype=PACKED_STYPE,
                                       data=packed.numpy().tobytes())
    return record


def record_to_tensors(record: ArrayRecord | None) -> Tensors:
    """``ArrayRecord`` made by :func:`tensors_to_record` → named tensors (each a fresh, writable tensor)."""
    out: Tensors = {}
    for key, arr in (record or {}).items():
        if arr.stype != PACKED_STYPE:
            raise FedtuneError(f"a record entry of type '{arr.stype}' is not a fedtune tensor pack; is the peer "
                               "running the same fedtune version?")
        buf = torch.frombuffer(bytearray(arr.data), dtype=torch.uint8) if len(arr.data) else torch.zeros(0, dtype=torch.uint8)
        offset = 0
        for name, dtype, shape in json.loads(key):
            dt = getattr(torch, dtype)
            n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            out[name] = buf[offset:offset + n].clone().view(dt).reshape(shape)
            offset += n
    return out


def record_tensor_bytes(record: ArrayRecord) -> int:
    """Tensor bytes inside a record: Σ numel · element size over its tensors (the packed Arrays' lengths)."""
    return sum(math.prod(arr.shape) * np.dtype(arr.dtype).itemsize for arr in record.values())


# --------------------------------------------------------------------------- node side

_CACHE: dict[tuple[str, int, str | None], Experiment] = {}
_CACHE_LOCK = threading.Lock()


def node_client(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[int, str | None]:
    """(client id, data path) of the node whose node config is ``node_config``.

    Node-local data (``partition.method: files``): ``client-id`` and ``data-path`` (a deployed SuperNode), or
    ``partition-id`` (the simulation engine; the file is ``partition.files[id]``). A split dataset: ``partition-id``.
    """
    if cfg.partition.method == "files":
        cid = node_config.get("client-id", node_config.get("partition-id"))
        path = node_config.get("data-path")
        if cid is None:
            raise FedtuneError("this SuperNode has no client-id; start it with --node-config "
                               "'client-id=<i> data-path=<its data file>' (node-local data, partition.method=files)")
        return int(cid), None if path is None else str(path)
    if "data-path" in node_config:
        raise FedtuneError(f"this SuperNode names a data-path, but the run splits data.name={cfg.data.name} "
                           f"(partition.method={cfg.partition.method}); set partition.method=files for node-local data")
    pid = node_config.get("partition-id")
    if pid is None:
        raise FedtuneError("this SuperNode has no partition-id; start it with "
                           "--node-config 'partition-id=<i> num-partitions=<n>' (a split dataset), or run with "
                           "partition.method=files and --node-config 'client-id=<i> data-path=<file>'")
    return int(pid), None


def node_experiment(run_json: str, node_config: dict[str, Any]) -> tuple[Experiment, int]:
    """This node's Experiment for the run config (its client's data only) and its client id: built on first
    use, then reused for every message. Only the latest run's experiment is kept (a node serves one run at a time)."""
    cfg = RunConfig.model_validate(json.loads(run_json))
    cid, path = node_client(cfg, node_config)
    key = (hashlib.sha256(run_json.encode()).hexdigest(), cid, path)
    with _CACHE_LOCK:
        exp = _CACHE.get(key)
        if exp is None:
            _CACHE.clear()
            t0 = time.perf_counter()
            exp = _CACHE[key] = build_experiment(cfg, holds=cid, data_path=path)
            log.info("client %d: built the experiment of run %s in %.1fs (%d training rows%s); kept for its messages",
                     cid, cfg.name, time.perf_counter() - t0, len(exp.client(cid).train),
                     f" from {path}" if path else "")
        return exp, cid


def _meta_of(content: RecordDict, node_config: dict[str, Any]) -> tuple[Experiment, int, dict[str, Any]]:
    meta = dict(content["fedtune"])
    exp, cid = node_experiment(str(meta["run"]), node_config)
    if "client_id" in meta and int(meta["client_id"]) != cid:
        raise FedtuneError(f"message for client {meta['client_id']} reached the node of client {cid}")
    return exp, cid, meta


def answer(message_type: str, content: RecordDict, node_config: dict[str, Any],
           state: ArrayRecord | None) -> tuple[RecordDict, ArrayRecord | None]:
    """A node's reply to one message (wire format above) and its client's new persistent state (None: unchanged).

    The one place a node does fedtune's work: called in the ClientApp process, or in the long-lived
    ``fedtune supernode`` worker the ClientApp forwards to (:mod:`fedtune.runtime.supernode`).
    """
    held = record_to_tensors(state)
    if message_type == "train":
        exp, cid, meta = _meta_of(content, node_config)
        payload = Payload(record_to_tensors(content["payload"]), dict(content["config"]))
        update = client_round(exp, cid, int(meta["round"]), payload, held, float(meta["lr"]))
        metrics = {"client_id": cid, "num_examples": int(update.num_examples), "state_tensors": len(held)}
        metrics.update({f"m.{k}": float(v) for k, v in update.metrics.items()})
        return (RecordDict({"update": tensors_to_record(update.tensors), "metrics": MetricRecord(metrics)}),
                tensors_to_record(held))
    if message_type == "evaluate":
        exp, cid, _ = _meta_of(content, node_config)
        metrics = client_evaluate(exp, cid, record_to_tensors(content["model"]), held)
        return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}), None
    action = content["fedtune"]["action"]
    if action == "state":
        return RecordDict({"state": state if state is not None else ArrayRecord()}), None
    exp, cid, _ = _meta_of(content, node_config)  # "hello": build (or reuse) the experiment, say who this is
    report: dict[str, Any] = {"client_id": cid}
    if exp.cfg.partition.method == "files":  # only this node knows its data: its sizes and label counts
        report.update(exp.client_report(cid))
    return RecordDict({"metrics": ConfigRecord(report)}), None


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

    def __init__(self, grid: Grid, exp: Experiment, timeout_s: float | None = None, connect_timeout_s: float = 300.0):
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
        """Map client id → node id: wait for the nodes, send each the run (it builds its experiment) and ask
        which client it is; with node-local data each also reports its data's sizes and label counts."""
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
        for reply in self._exchange(msgs, timeout=connect_timeout_s):
            if reply.has_error():
                raise FedtuneError(f"node {reply.metadata.src_node_id} failed to start its client: "
                                   f"{reply.error.reason[-800:]}")
            report = dict(reply.content["metrics"])
            cid = int(report["client_id"])
            if cid in node_of:
                raise FedtuneError(f"two Flower nodes claim client {cid}")
            node_of[cid] = reply.metadata.src_node_id
            reports[cid] = report
        missing = sorted(set(range(need)) - set(node_of))
        if missing:
            how = ("--node-config 'client-id=<i> data-path=<file>'" if self.exp.cfg.partition.method == "files"
                   else "--node-config 'partition-id=<i> num-partitions=<n>'")
            raise FedtuneError(f"no Flower node holds client {missing} (need 0..{need - 1}: one SuperNode per client, {how})")
        if self.exp.cfg.partition.method == "files":
            self.exp.describe_clients(reports)
        return node_of

    # ------------------------------------------------------------ ClientPool
    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
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
        updates, up, wire_up = [], 0, 0
        self.failures, self.dropped = {}, {}
        for cid, reply in self._exchange_with(messages, cids, timeout=self.timeout_s):
            if reply.has_error():
                self._lost(cid, reply, f"round {rnd}")
                continue
            record = reply.content["update"]
            up += record_tensor_bytes(record)
            wire_up += record.count_bytes()
            m = dict(reply.content["metrics"])
            if int(m["state_tensors"]):
                self.stateful_clients.add(cid)
            metrics = {k[2:]: v for k, v in m.items() if k.startswith("m.")}
            updates.append(ClientUpdate(cid, record_to_tensors(record), int(m["num_examples"]), metrics))
        self._late(set(payloads) - {u.client_id for u in updates}, f"round {rnd}")
        self.round_bytes = (up, down, wire_up, wire_down)
        return sorted(updates, key=lambda u: u.client_id)

    def _lost(self, cid: int, reply: Message, what: str) -> None:
        """File an error reply: the client's code raised (``failures``), or it could not answer (``dropped``)."""
        lost = self.failures if reply.error.code in RAISED else self.dropped
        lost[cid] = reply.error.reason
        log.warning("%s: client %d %s: %s", what, cid, "failed" if lost is self.failures else "was dropped",
                    reply.error.reason[-500:])

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
            out[cid] = dict(reply.content["metrics"])
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
            states[cid] = record_to_tensors(reply.content["state"])
        return states


# --------------------------------------------------------------------------- simulation


def simulation_backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray settings: each virtual client's actor reserves ``cfg.threads`` CPUs (default 1), so
    ``cores / threads`` clients train in parallel."""
    return {"client_resources": {"num_cpus": cfg.threads or 1, "num_gpus": 0.0},
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
