"""Checkpoints: the server state after every round, so a stopped run can continue where it was.

``<run_dir>/checkpoint/`` holds::

    state.safetensors      global/<name>, extra/<name>, model/<model>/<name> (several models), and, in-process,
                           client/<id>/<name> (each client's persistent tensors); its metadata "fedtune" holds
                           the JSON below and "sha256" the digest of its tensors, so the file alone is a
                           checkpoint that can tell when it is corrupt
    previous.safetensors   the same for the round before
    checkpoint.json        the JSON of the latest, for people: round, the round's metrics row, runtime, ...

A checkpoint is written to a temporary name, fsynced, and renamed into place
after the latest has become ``previous``; a run killed at any moment leaves
at least one intact checkpoint. :func:`load_checkpoint` verifies the digest:
a latest checkpoint that is truncated or altered (a flipped bit) is refused
with one line naming its round, and the run resumes from ``previous``. A
round is re-run after a resume exactly as it would have run (client
sampling, the learning rate and every client's seed depend only on (seed,
round, client)), so a resumed run ends with the tensors of an uninterrupted
one.

Flower keeps each client's persistent tensors in its node, not on the server;
a checkpoint from the Flower runtime records which clients held any
(``clients_with_state_on_nodes``), and resuming such a run is refused because
a new set of nodes would start without them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from fedtune.aggregation import Tensors
from fedtune.algorithms import ServerState
from fedtune.errors import FedtuneError
from fedtune.files import atomic_write, atomic_write_text, fsync_dir

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
PREVIOUS_FILE = "previous.safetensors"
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


def digest(tensors: Tensors) -> str:
    """sha256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` as ``run_dir/checkpoint/state.safetensors``; the one it replaces becomes ``previous``."""
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
    latest, previous = folder / STATE_FILE, folder / PREVIOUS_FILE
    write: Callable[[Path], object] = lambda p: save_file(tensors, str(p), metadata={"fedtune": text,
                                                                                    "sha256": digest(tensors)})
    if latest.exists():
        staged = folder / f".{STATE_FILE}.new"
        atomic_write(staged, write)
        os.replace(latest, previous)
        os.replace(staged, latest)
        fsync_dir(folder)
    else:
        atomic_write(latest, write)
    atomic_write_text(folder / META_FILE, json.dumps(json.loads(text), indent=2) + "\n")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (a round completed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return (folder / STATE_FILE).is_file() or (folder / PREVIOUS_FILE).is_file()


class CorruptCheckpoint(FedtuneError):
    """A checkpoint file that is truncated, altered or unreadable."""


def read_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint file, verified against its digest (:class:`CorruptCheckpoint` when it does not hold)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_text = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(meta_text["fedtune"])
    except Exception as e:  # safetensors raises its own errors for truncated or mangled files
        raise CorruptCheckpoint(f"cannot be read ({type(e).__name__})") from None
    if "sha256" in meta_text and digest(tensors) != meta_text["sha256"]:
        raise CorruptCheckpoint("does not match its digest (altered on disk)")

    def take(prefix: str) -> Tensors:
        p = prefix + "/"
        return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}

    try:
        client_states = None
        if meta["has_client_states"]:
            client_states = {int(cid): take(f"client/{cid}") for cid in meta["clients"]}
        state = ServerState(round=int(meta["state_round"]), global_tensors=take("global"), extra=take("extra"),
                            models={name: take(f"model/{name}") for name in meta.get("models", [])},
                            assignment={int(cid): name for cid, name in meta.get("assignment", {}).items()})
        return Checkpoint(state=state, row=meta["row"], runtime=meta["runtime"], client_states=client_states,
                          clients_with_state_on_nodes=list(meta["clients_with_state_on_nodes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"has malformed metadata ({type(e).__name__}: {e})") from None


def _of_round(folder: Path) -> str:
    """' (round r)' as ``checkpoint.json`` (written after the latest checkpoint) names it; '' if it cannot."""
    try:
        return f" (round {int(json.loads((folder / META_FILE).read_text())['round'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def load_checkpoint(run_dir: Path, note: Callable[[str], None] = lambda line: None) -> Checkpoint:
    """The latest intact checkpoint of ``run_dir``: ``state.safetensors``, or, when that one is missing or
    corrupt (``note`` receives one line saying so, naming its round), ``previous.safetensors``. A one-line
    error when neither is intact."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    latest, previous = folder / STATE_FILE, folder / PREVIOUS_FILE
    if not latest.is_file() and not previous.is_file():
        raise FedtuneError(f"cannot resume: {latest} does not exist (the run saved no checkpoint); "
                           "start it afresh with --overwrite")
    problem = None
    if latest.is_file():
        try:
            return read_checkpoint(latest)
        except CorruptCheckpoint as e:
            problem = f"the checkpoint {latest}{_of_round(folder)} {e}"
    if not previous.is_file():
        raise FedtuneError(f"cannot resume: {problem} and there is no previous checkpoint; start afresh with "
                           "--overwrite")
    try:
        ckpt = read_checkpoint(previous)
    except CorruptCheckpoint as e:
        raise FedtuneError(f"cannot resume: {problem or f'{latest} is missing'}, and the previous checkpoint "
                           f"{previous} {e}; start afresh with --overwrite") from None
    note(f"{problem or f'{latest} is missing'}; resuming from the previous checkpoint, after round {ckpt.round}")
    return ckpt
