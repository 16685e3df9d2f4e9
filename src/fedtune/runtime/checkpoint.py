"""Checkpoints: the server state after every round, so a stopped run can continue where it was.

``<run_dir>/checkpoint/`` holds::

    state.safetensors   global/<name>, extra/<name>, model/<model>/<name> (several models), and, in-process,
                        client/<id>/<name> (each client's persistent tensors);
                        its metadata "fedtune" holds the JSON below, so the file alone is a checkpoint
    checkpoint.json     the same JSON, for people: round, the round's metrics row, runtime, ...

Both files are written to a temporary name and renamed into place, so a run
killed at any moment leaves the previous round's checkpoint intact. A round
is re-run after a resume exactly as it would have run (client sampling, the
learning rate and every client's seed depend only on (seed, round, client)),
so a resumed run ends with the tensors of an uninterrupted one.

Flower keeps each client's persistent tensors in its node, not on the server;
a checkpoint from the Flower runtime records which clients held any
(``clients_with_state_on_nodes``), and resuming such a run is refused because
a new set of nodes would start without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from fedtune.aggregation import Tensors
from fedtune.algorithms import ServerState
from fedtune.errors import FedtuneError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
META_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    state: ServerState
    row: dict[str, Any]
    """The metrics row of the checkpointed round (holds the running byte totals)."""
    runtime: str
    client_states: dict[int, Tensors] | None = None
    """Each client's persistent tensors (in-process runtime); None where the runtime keeps them elsewhere."""
    clients_with_state_on_nodes: list[int] = field(default_factory=list)

    @property
    def round(self) -> int:
        return int(self.row["round"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` into ``run_dir/checkpoint/``, replacing the previous one."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, ts: Tensors) -> None:
        for name, t in ts.items():
            tensors[f"{prefix}/{name}"] = t.detach().cpu().contiguous().clone()

    put("global", ckpt.state.global_tensors)
    put("extra", ckpt.state.extra)
    for name, ts in ckpt.state.models.items():
        put(f"model/{name}", ts)
    for cid, ts in (ckpt.client_states or {}).items():
        put(f"client/{cid}", ts)
    meta = {
        "round": ckpt.round,
        "state_round": ckpt.state.round,
        "models": sorted(ckpt.state.models),
        "assignment": {str(cid): name for cid, name in sorted(ckpt.state.assignment.items())},
        "runtime": ckpt.runtime,
        "has_client_states": ckpt.client_states is not None,
        "clients": sorted(ckpt.client_states) if ckpt.client_states is not None else [],
        "clients_with_state_on_nodes": sorted(ckpt.clients_with_state_on_nodes),
        "row": ckpt.row,
    }
    text = json.dumps(meta, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    _atomic(folder / STATE_FILE, lambda p: save_file(tensors, str(p), metadata={"fedtune": text}))
    _atomic(folder / META_FILE, lambda p: p.write_text(json.dumps(json.loads(text), indent=2) + "\n"))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (a round completed)."""
    return (Path(run_dir) / CHECKPOINT_DIR / STATE_FILE).is_file()


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir`` (error naming what to do when there is none)."""
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        raise FedtuneError(f"cannot resume: {path} does not exist (the run saved no checkpoint); "
                           "start it afresh with --overwrite")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["fedtune"])
    tensors = load_file(str(path))

    def take(prefix: str) -> Tensors:
        p = prefix + "/"
        return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}

    client_states = None
    if meta["has_client_states"]:
        client_states = {int(cid): take(f"client/{cid}") for cid in meta["clients"]}
    state = ServerState(round=int(meta["state_round"]), global_tensors=take("global"), extra=take("extra"),
                        models={name: take(f"model/{name}") for name in meta.get("models", [])},
                        assignment={int(cid): name for cid, name in meta.get("assignment", {}).items()})
    return Checkpoint(state=state, row=meta["row"], runtime=meta["runtime"], client_states=client_states,
                      clients_with_state_on_nodes=list(meta["clients_with_state_on_nodes"]))
