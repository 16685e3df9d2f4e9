"""Named tensors on Flower's wire: one packed ``Array`` per message, decoded strictly.

Both halves of the Flower runtime (:mod:`~fedtune.runtime.flower_server`,
:mod:`~fedtune.runtime.flower_node`) use these. A record that arrives is the
peer's word, not fedtune's: :func:`record_to_tensors` accepts only a layout
of known dtypes and non-negative integer shapes whose bytes add up to the
packed array exactly, and raises :class:`UndecodableRecord` for anything
else, so a malformed reply is one client's failure, never the run's.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.aggregation import Tensors
from fedtune.errors import FedtuneError

PACKED_STYPE = "fedtune.packed"
"""Serialisation type of a tensor pack (:func:`tensors_to_record`): the tensors' raw bytes, back to back."""

DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
"""The dtypes a pack may name (complex ones decode, so that the update check can name and reject them)."""


class UndecodableRecord(FedtuneError):
    """A record that is not a well-formed fedtune tensor pack."""


def tensors_to_record(tensors: Tensors) -> ArrayRecord:
    """Named tensors → an ``ArrayRecord`` of one packed ``Array``: their bytes back to back (``uint8``), and the
    layout (name, dtype, shape of each, in order) as the record's one key, JSON.

    One Array, not one per tensor: Flower moves each Array as its own object (an HTTP request between the
    SuperLink and a node, and between the SuperLink and the ServerApp), and a LoRA payload has dozens of tensors.
    Any dtype of :data:`DTYPES` travels, bfloat16 included.
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


def _layout(key: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    try:
        entries = json.loads(key)
    except ValueError:
        raise UndecodableRecord("its tensor layout is not JSON") from None
    if not isinstance(entries, list):
        raise UndecodableRecord("its tensor layout is not a list")
    out, names = [], set()
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise UndecodableRecord("a tensor layout entry is not [name, dtype, shape]")
        name, dtype, shape = entry
        if dtype not in DTYPES:
            raise UndecodableRecord(f"tensor {name!r} has an unknown dtype {str(dtype)[:40]!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise UndecodableRecord(f"tensor {name!r} has a malformed shape")
        if name in names:
            raise UndecodableRecord(f"tensor {name!r} appears twice")
        names.add(name)
        out.append((name, DTYPES[dtype], tuple(shape)))
    return out


def record_to_tensors(record: ArrayRecord | None) -> Tensors:
    """``ArrayRecord`` made by :func:`tensors_to_record` → named tensors (each a fresh, writable tensor).

    Raises :class:`UndecodableRecord` (one line) for a record that is not such a pack: another serialisation
    type, a layout that is not JSON or names an unknown dtype or a malformed shape, or bytes that do not add up.
    """
    out: Tensors = {}
    for key, arr in (record or {}).items():
        if getattr(arr, "stype", None) != PACKED_STYPE:
            raise UndecodableRecord(f"a record entry of type '{getattr(arr, 'stype', '?')}' is not a fedtune tensor "
                                    "pack; is the peer running the same fedtune version?")
        data = bytes(arr.data)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        offset = 0
        for name, dt, shape in _layout(key):
            n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            if offset + n > len(buf):
                raise UndecodableRecord(f"tensor {name!r} runs past the end of the packed bytes")
            if name in out:
                raise UndecodableRecord(f"tensor {name!r} appears twice")
            out[name] = buf[offset:offset + n].clone().view(dt).reshape(shape)
            offset += n
        if offset != len(buf):
            raise UndecodableRecord(f"{len(buf) - offset} packed bytes belong to no tensor")
    return out


def record_tensor_bytes(record: ArrayRecord) -> int:
    """Tensor bytes inside a record: Σ numel · element size over its tensors (the packed Arrays' lengths)."""
    return sum(math.prod(arr.shape) * np.dtype(arr.dtype).itemsize for arr in record.values())
