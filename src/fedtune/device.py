"""Where a model computes and in what precision: the one boundary between a device and fedtune's CPU tensors.

The model and its batches live on the run's device (``train.device``). Everything that leaves the model
(payloads, updates, aggregation, checkpoints, the run log) is CPU tensors:
:func:`~fedtune.models.lora.trainable_state` copies to the CPU and
:func:`~fedtune.models.lora.load_trainable` copies back onto the device, so runtimes and algorithms never see
a device. An algorithm that computes on live parameters asks its client context for its tensors on the
model's device (:meth:`ClientContext.on_device <fedtune.algorithms.ClientContext.on_device>`).

Precision (``train.precision``): ``fp32`` runs exactly the code it always ran (no autocast, no scaler), so
``train.device: cpu`` gives the same bits as before devices existed. ``bf16`` / ``fp16`` run forward passes
under ``torch.autocast`` with fp32 weights; fp16 scales the loss (``torch.amp.GradScaler``) so that small
gradients do not underflow, and skips a step whose gradients overflowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from pydantic import ValidationError

from fedtune.config import DEVICE_NAME, RunConfig, TrainConfig, explain
from fedtune.errors import FedtuneError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` → the dtype autocast computes in (``fp32``: no autocast)."""


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names on this machine: ``auto`` is the first CUDA GPU, else the CPU.

    A GPU that this machine does not have is a one-line error, raised before anything is loaded.
    """
    if not DEVICE_NAME.fullmatch(name):
        raise FedtuneError(f"device '{name}' is not auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise FedtuneError(f"train.device={name} but this machine has no usable CUDA GPU (torch "
                               f"{torch.__version__}, {build}); set train.device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FedtuneError(f"train.device={name} but this machine has {count} CUDA GPU"
                               f"{'s' * (count != 1)} (cuda:0 … cuda:{count - 1}); pick one of them")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device`` (the same tensors when they are there already)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context a forward pass runs in: autocast to bf16 / fp16, or nothing at fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (fresh, like the optimiser, for each round's local training); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None



NODE_DEVICE = "device"
"""Node config key of a Flower node's own device (``--node-config "client-id=0 device=cuda:1"``)."""


def on_node(cfg: RunConfig, node_config: Mapping[str, object]) -> RunConfig:
    """``cfg`` as a Flower node runs it: ``train.device`` is the node's own ``device`` when its node config
    names one (each machine of a deployment has its own devices), checked on this machine."""
    if NODE_DEVICE not in node_config:
        return cfg
    try:
        train = TrainConfig.model_validate({**cfg.train.model_dump(), "device": str(node_config[NODE_DEVICE])})
    except ValidationError as e:
        raise FedtuneError(f"node config {NODE_DEVICE}={node_config[NODE_DEVICE]}: "
                           f"{explain(e, TrainConfig, 'train')}") from None
    resolve_device(train.device)
    return cfg.model_copy(update={"train": train})


def simulation_gpus(cfg: RunConfig) -> float:
    """The share of a GPU each virtual client of Flower's simulation reserves (Ray's ``num_gpus``):
    ``train.gpu_fraction`` (default 1) when the run's device is a GPU, else 0.

    Ray gives each client actor its GPU (its only visible one), so the run names ``cuda`` or ``auto``
    rather than one GPU of the machine.
    """
    device = resolve_device(cfg.train.device)
    if device.type != "cuda":
        return 0.0
    if cfg.train.device not in ("auto", "cuda"):
        raise FedtuneError(f"Flower's simulation places each virtual client on a GPU itself; set train.device=cuda "
                           f"(or auto), not {cfg.train.device}, and share GPUs with train.gpu_fraction")
    return cfg.train.gpu_fraction or 1.0
