"""Inference with every linear weight pre-packed into oneDNN's blocked layout (CPU, fp32).

A CPU GEMM kernel reads its weight matrix in a blocked layout, and a plain
``nn.Linear`` call copies the weight into that layout on every call. Packing
each weight once per evaluation and calling oneDNN's linear on the packed copy
(the kernels ``torch.compile``'s freezing pass selects, without its
compilation) saves that copy on every forward pass of scoring and of greedy
decoding. ``python benchmarks/mmlu_speed.py --compare`` times MMLU scoring on
packed against plain layers.

Only gradient-free fp32 CPU calls take the packed path (its outputs match the
layer's own up to float rounding); anything else (a training step, another
device or dtype, a PyTorch built without oneDNN) runs the layer's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernels."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and hasattr(
        ops, "_linear_pointwise")


def _packed_forward(layer: nn.Linear, packed: torch.Tensor):
    plain = layer.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")

    return forward


@contextmanager
def packed_linears(model: nn.Module | object, rows_hint: int = 2048) -> Iterator[None]:
    """Within the block, ``model``'s fp32 CPU ``nn.Linear`` layers compute with packed weights
    (``model`` not an ``nn.Module``: nothing to pack).

    The weights are packed on entry (``rows_hint``: the typical batch × length
    the kernels are tuned for) and must not change inside the block; the
    layers' own forward comes back on exit. Costs one extra copy of the
    packed weights while inside.
    """
    modules = model.modules() if isinstance(model, nn.Module) and packing_available() else ()
    layers = [m for m in modules if isinstance(m, nn.Linear) and "forward" not in m.__dict__
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    with torch.no_grad():
        for m in layers:
            m.forward = _packed_forward(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint))
    try:
        yield
    finally:
        for m in layers:
            del m.forward
