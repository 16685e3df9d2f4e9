"""The node half of the Flower runtime: one client answers the server's messages.

:func:`answer` replies to each message with
:func:`~fedtune.runtime.client.client_round` and
:func:`~fedtune.runtime.client.client_evaluate`, the functions the in-process
engine calls. It runs in a Ray actor of the simulation engine (through the
ClientApp, :mod:`fedtune.runtime.flower_client`), or, on a deployed node, in
the long-lived ``fedtune supernode`` worker (:mod:`fedtune.runtime.supernode`)
the ClientApp forwards to. Wire format: :mod:`fedtune.runtime.flower_server`.

**What a node reads is its own decision** (:func:`node_data`). The run config
arrives with every message, from the server; a deployed node (``deployed=True``:
the ``fedtune supernode`` worker) never opens a path it names:

- node-local data (``partition.method: files``): the node reads the file its
  operator gave in ``--node-config data-path=...``, and nothing else (a
  missing ``data-path`` is an error on the node, never a fallback to the
  server's ``partition.files``);
- a split dataset: ``data.name`` must be a registered dataset *name*, which the
  node resolves in its own data roots (``$FEDTUNE_DATA``), or a path under a
  ``data-root`` its operator gave in the node config; any other path is refused;
- ``model.name`` must be a packaged model or a Hub id resolved in the node's own
  cache, or a folder under a ``model-root`` its operator gave in the node config.

The simulation engine (one machine, one user: the server's files are the
nodes' files) keeps the conveniences: ``partition.files[i]`` and any path.

A node builds its :class:`~fedtune.experiment.Experiment` (its own client's
data only) once per run config and data file (:func:`node_experiment`) and
reuses it for every message; a file that changed is read afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.algorithms import Payload
from fedtune.config import RunConfig
from fedtune.data.registry import REGISTRY
from fedtune.device import on_node
from fedtune.dp_noise import public
from fedtune.errors import FedtuneError, public_error
from fedtune.experiment import Experiment, build_experiment
from fedtune.models.base import PACKAGED
from fedtune.runtime.client import client_evaluate, client_round
from fedtune.runtime.wire import record_to_tensors, tensors_to_record

log = logging.getLogger("fedtune.node")

DATA_PATH = "data-path"
"""Node config key: this node's own data file (node-local data)."""
MODEL_ROOT = "model-root"
"""Node config key: a folder under which a deployed node accepts a ``model.name`` that is a local path."""
DATA_ROOT = "data-root"
"""Node config key: a folder under which a deployed node accepts a ``data.name`` path (a split dataset)."""


def _under(path: str, root: object) -> bool:
    """``path`` lies inside the folder ``root`` (None: no folder allowed)."""
    if root is None:
        return False
    return Path(path).expanduser().resolve().is_relative_to(Path(str(root)).expanduser().resolve())


@dataclass(frozen=True)
class NodeData:
    """What one node reads: its client id, and its own data file (None: the split dataset ``data.name``)."""

    client_id: int
    path: str | None


def node_data(cfg: RunConfig, node_config: dict[str, Any], deployed: bool) -> NodeData:
    """The client this node is and the data it reads, from its own node config (rules: module docstring).

    Node-local data: ``client-id`` (a deployed SuperNode) or ``partition-id`` (the simulation engine) and
    ``data-path`` (in the simulation, ``partition.files[id]`` when absent). A split dataset: ``partition-id``.
    """
    if cfg.partition.method == "files":
        cid = node_config.get("client-id", None if deployed else node_config.get("partition-id"))
        if cid is None:
            raise public_error("this SuperNode has no client-id; start it with --node-config "
                               "'client-id=<i> data-path=<its data file>' (node-local data, partition.method=files)")
        path = node_config.get(DATA_PATH)
        if path is None and deployed:
            raise public_error(f"this SuperNode (client {cid}) has no data-path; a node reads only the file its "
                               "operator names: start it with --node-config 'client-id=<i> data-path=<its data file>'")
        return NodeData(int(cid), None if path is None else str(path))
    if DATA_PATH in node_config:
        raise public_error(f"this SuperNode names a data-path, but the run splits data.name={cfg.data.name} "
                           f"(partition.method={cfg.partition.method}); set partition.method=files for node-local data")
    pid = node_config.get("partition-id")
    if pid is None:
        raise public_error("this SuperNode has no partition-id; start it with "
                           "--node-config 'partition-id=<i> num-partitions=<n>' (a split dataset), or run with "
                           "partition.method=files and --node-config 'client-id=<i> data-path=<file>'")
    if deployed:
        for name in [cfg.data.name, *(cfg.data.tasks or [])]:
            if name not in REGISTRY and not _under(name, node_config.get(DATA_ROOT)):
                raise public_error(f"the run asks this node to read '{name}', which is not a registered dataset "
                                   "name: a node never opens a path the server names; split a registered dataset "
                                   "(found in this node's FEDTUNE_DATA), allow a folder with --node-config "
                                   f"\"{DATA_ROOT}=<folder>\", or use partition.method=files with this node's own "
                                   "data-path")
    return NodeData(int(pid), None)


def check_model_name(cfg: RunConfig, node_config: dict[str, Any]) -> None:
    """A deployed node loads a packaged model, a Hub id, or a folder under its operator's ``model-root``."""
    name = cfg.model.name
    if name in PACKAGED:
        return
    path = Path(name).expanduser()
    is_path = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") != 1
    if not is_path:
        return  # owner/name: a Hub id, looked up in this node's own cache
    if _under(name, node_config.get(MODEL_ROOT)):
        return
    raise public_error(f"the run asks this node to load the model at '{name}', a path the server names; a node "
                       f"loads a packaged model, a Hub id, or a folder under the model-root its operator allows "
                       f"(--node-config \"{MODEL_ROOT}=<folder>\")")


def file_fingerprint(path: str | None) -> str:
    """The content hash (sha256) of a node's data file (a folder: of its files' names and contents); '' for none."""
    if path is None:
        return ""
    p = Path(path)
    digest = hashlib.sha256()
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            digest.update(str(f.relative_to(p) if p.is_dir() else "").encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _stat(path: str | None) -> tuple:
    if path is None:
        return ()
    p = Path(path)
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return tuple((str(f), s.st_size, s.st_mtime_ns, s.st_ino) for f in files if f.is_file() and (s := f.stat()))


@dataclass
class _Built:
    exp: Experiment
    run_hash: str
    client_id: int
    path: str | None
    stat: tuple
    content: str


_BUILT: _Built | None = None
_LOCK = threading.Lock()


def node_experiment(run_json: str, node_config: dict[str, Any], deployed: bool = False,
                    fresh: bool = False) -> tuple[Experiment, int]:
    """This node's Experiment for the run config (its client's data only) and its client id: built on first
    use, then reused for every message while the run config and the data file are unchanged (its size, time
    and inode on each message; with ``fresh``, at a run's start, its content hash). A node keeps one
    experiment: a new run config, or a changed file, builds afresh."""
    global _BUILT
    cfg = on_node(RunConfig.model_validate(json.loads(run_json)), node_config)
    where = node_data(cfg, node_config, deployed)
    if deployed:
        check_model_name(cfg, node_config)
        if cfg.federation.attack.kind != "none":
            raise public_error(f"the run asks nodes to attack (federation.attack: {cfg.federation.attack.kind}); a "
                               "deployed node never misbehaves on the server's say: attacks are for simulations")
        if cfg.privacy.reproducible_noise:
            raise public_error("the run asks nodes to draw their DP noise from the run's seed "
                               "(privacy.reproducible_noise), which the server chose and anyone with the config knows; "
                               "a deployed node draws it from a key of its own")
    run_hash = hashlib.sha256(run_json.encode()).hexdigest()
    with _LOCK:
        built = _BUILT
        same = (built is not None and built.run_hash == run_hash and built.client_id == where.client_id
                and built.path == where.path and built.stat == _stat(where.path))
        if same and fresh:
            same = built.content == file_fingerprint(where.path)
        if not same:
            _BUILT = None  # a failed build must not leave the previous run's experiment in place
            t0 = time.perf_counter()
            content, stat = file_fingerprint(where.path), _stat(where.path)
            exp = build_experiment(cfg, holds=where.client_id, data_path=where.path,
                                   note=lambda line: log.info("client %d: %s", where.client_id, line))
            _BUILT = built = _Built(exp, run_hash, where.client_id, where.path, stat, content)
            log.info("client %d: built the experiment of run %s in %.1fs (%d training rows%s); kept for its messages",
                     where.client_id, cfg.name, time.perf_counter() - t0, len(exp.client(where.client_id).train),
                     f" from {where.path}" if where.path else "")
        return built.exp, built.client_id


def forget_experiment() -> None:
    """Drop the kept experiment (the next message builds afresh)."""
    global _BUILT
    with _LOCK:
        _BUILT = None


def kept_experiment() -> Experiment | None:
    """The experiment this node keeps between messages, if any."""
    return None if _BUILT is None else _BUILT.exp


def _meta_of(content: RecordDict, node_config: dict[str, Any], deployed: bool,
             fresh: bool = False) -> tuple[Experiment, int, dict[str, Any]]:
    meta = dict(content["fedtune"])
    exp, cid = node_experiment(str(meta["run"]), node_config, deployed, fresh)
    if "client_id" in meta and int(meta["client_id"]) != cid:
        raise public_error(f"message for client {meta['client_id']} reached the node of client {cid}")
    return exp, cid, meta


def answer(message_type: str, content: RecordDict, node_config: dict[str, Any], state: ArrayRecord | None,
           deployed: bool = False) -> tuple[RecordDict, ArrayRecord | None]:
    """A node's reply to one message (wire format: :mod:`fedtune.runtime.flower_server`) and its client's new
    persistent state (None: unchanged). ``deployed``: apply a deployed node's rules on what it reads
    (module docstring)."""
    held = record_to_tensors(state)
    if message_type == "train":
        exp, cid, meta = _meta_of(content, node_config, deployed)
        payload = Payload(record_to_tensors(content["payload"]), dict(content["config"]))
        update = client_round(exp, cid, int(meta["round"]), payload, held, float(meta["lr"]))
        metrics = {"client_id": cid, "num_examples": int(update.num_examples), "state_tensors": len(public(held))}
        metrics.update({f"m.{k}": float(v) for k, v in update.metrics.items()})
        return (RecordDict({"update": tensors_to_record(update.tensors), "metrics": MetricRecord(metrics)}),
                tensors_to_record(held))
    if message_type == "evaluate":
        exp, cid, _ = _meta_of(content, node_config, deployed)
        metrics = client_evaluate(exp, cid, record_to_tensors(content["model"]), held)
        # an algorithm may keep what evaluating found (FDLoRA's fused model), as the in-process pool does
        return (RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}),
                tensors_to_record(held) if held or state is not None else None)
    action = content["fedtune"]["action"]
    if action == "state":  # never its secrets (the client's DP noise key)
        return RecordDict({"state": tensors_to_record(public(held))}), None
    # "hello", at a run's start: build the experiment (reading the data file afresh if it changed), say who this is
    exp, cid, _ = _meta_of(content, node_config, deployed, fresh=True)
    report: dict[str, Any] = {"client_id": cid}
    if exp.cfg.partition.method == "files":  # only this node knows its data: its sizes and label counts
        report.update(exp.client_report(cid))
    return RecordDict({"metrics": ConfigRecord(report)}), None


def public_reason(error: BaseException, message_type: str, node_config: dict[str, Any]) -> str:
    """What a deployed node tells the server of an error: who it is, what it was doing and the kind of problem,
    never the error's text (which can quote rows: a label value, a sentence). The full error goes to the
    node's own log. A :class:`~fedtune.errors.FedtuneError` raised with ``public=`` says that line instead."""
    who = node_config.get("client-id", node_config.get("partition-id"))
    who = f"client {who}" if who is not None else f"a node without a client-id (pid {os.getpid()})"
    doing = {"train": "training", "evaluate": "evaluating"}.get(message_type, "starting its client")
    public = getattr(error, "public", None)
    if public:
        return f"{who} failed while {doing}: {public}"
    kind = "a fedtune error" if isinstance(error, FedtuneError) else f"an internal error ({type(error).__name__})"
    return f"{who} failed while {doing}: {kind}; the details stay in that node's own log"
