"""Record-level DP-SGD inside a client (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016).

A step of client i (n_i training rows, B = ``train.batch_size``, q_i = B / n_i, C = ``privacy.dp_sgd.clip``,
σ = its noise multiplier)::

    S ~ Poisson(q_i): every row independently, so |S| is B on average and may be 0
    g_j = ∇_θ ℓ_j(θ) for each j ∈ S          ℓ_j: row j's own task loss, θ: the trainable tensors only
    g̃  = ( Σ_{j∈S} g_j · min(1, C / ‖g_j‖₂)  +  N(0, σ² C² I) ) / B  +  ∇_θ r(θ)

and the client's optimiser steps with g̃ (S and the noise drawn from the client's secret key,
:mod:`fedtune.dp_noise`); r is what the algorithm adds to the task loss, a term of the parameters alone
(FedProx's μ/2 ‖θ − θ_g‖²), whose gradient needs no privatising. ``train.max_grad_norm`` then bounds the step
as ever (post-processing). :mod:`fedtune.privacy` accounts each step as a Poisson-sampled
Gaussian with add/remove-one neighbours.

Per-row gradients are taken layer by layer, as Opacus's functorch path does: forward hooks keep each input of
every module that holds trainable tensors, tensor hooks keep the gradient of its output, and
``torch.func.vmap(torch.func.grad(...))`` over the rows of one module's ``functional_call`` gives each row's
gradient of that module's tensors (for a linear layer, Σ_t g_t a_tᵀ of that row). The model's own forward
runs unchanged, batched, so any architecture works as long as each row's output depends on that row alone
(no batch statistics; instruction batches run without their shared prompt prefix) and ℓ_j is row j's loss as
a batch of one would give it: the mean cross-entropy of its class, or of its scored tokens
(:func:`example_losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedtune.dp_noise import SecretStream
from fedtune.errors import FedtuneError
from fedtune.training import IGNORE, Encoded, LMOutputs


def poisson_batches(data: Encoded, indices: np.ndarray, rate: float, rng: SecretStream | np.random.Generator):
    """Endless batches of ``indices``, each row in each batch independently with probability ``rate``
    (a batch may be empty: zero rows); ``rng.random(n)`` gives the uniforms (a run draws them from the client's
    :class:`~fedtune.dp_noise.SecretStream`)."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("a client with no training examples cannot train")
    while True:
        yield data.collate(indices[rng.random(len(indices)) < rate])


def example_losses(batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
    """Each row's own task loss, as a batch of that row alone would compute it: a classifier's cross-entropy,
    or an instruction row's mean cross-entropy over its scored tokens (0 for a row with none)."""
    labels = batch["labels"]
    if not isinstance(outputs, LMOutputs):
        return torch.nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="none")
    targets = labels[:, 1:]
    scored = targets != IGNORE
    rows = scored.nonzero()[:, 0]  # the row of each scored logit, in the order causal_lm_forward keeps them
    tokens = torch.nn.functional.cross_entropy(outputs.logits.float(), targets[scored], reduction="none")
    sums = torch.zeros(len(labels), dtype=tokens.dtype, device=tokens.device).index_add(0, rows, tokens)
    return sums / scored.sum(1).clamp(min=1)


class PerExampleGradients:
    """Within ``with``: records what each layer holding trainable tensors saw; afterwards, with the backward
    of Σ_j ℓ_j done, :meth:`gradients` gives every trainable tensor's per-row gradients, shape (rows, *shape)."""

    def __init__(self, model: torch.nn.Module, rows: int):
        self.rows = rows
        self.layers = {name: m for name, m in model.named_modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))}
        self._calls: dict[str, list[list[torch.Tensor | None]]] = {name: [] for name in self.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> PerExampleGradients:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keeper(self, name: str):
        def keep(module, args, output):
            if not torch.is_grad_enabled():
                return
            if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise FedtuneError(f"privacy.dp_sgd takes per-row gradients layer by layer; module '{name}' "
                                   f"({type(module).__name__}) takes or gives more than one tensor")
            if args[0].shape[0] != self.rows:
                raise FedtuneError(f"privacy.dp_sgd: module '{name}' saw {args[0].shape[0]} rows in a batch of "
                                   f"{self.rows}, so its rows' gradients cannot be told apart")
            call: list[torch.Tensor | None] = [args[0].detach(), None]
            self._calls[name].append(call)
            if output.requires_grad:
                output.register_hook(lambda g: call.__setitem__(1, g.detach()))
        return keep

    def gradients(self) -> dict[str, torch.Tensor]:
        """Per-row gradients by parameter name (as ``model.named_parameters`` gives it)."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.layers.items():
            own = dict(module.named_parameters(recurse=False))
            trained = {n: p.detach() for n, p in own.items() if p.requires_grad}
            fixed = {**{n: p.detach() for n, p in own.items() if not p.requires_grad},
                     **dict(module.named_buffers(recurse=False))}

            def weighted_output(params, x, g, module=module, fixed=fixed):
                y = functional_call(module, {**params, **fixed}, (x.unsqueeze(0),))
                return (y * g.unsqueeze(0).to(y.dtype)).sum()

            per_row = vmap(grad(weighted_output), in_dims=(None, 0, 0))
            total = {n: torch.zeros((self.rows, *p.shape), dtype=p.dtype, device=p.device) for n, p in trained.items()}
            for x, g in self._calls[name]:
                if g is None:  # its output did not reach the loss
                    continue
                dtype = next(iter(trained.values())).dtype
                x = x.to(dtype) if x.is_floating_point() else x
                for n, rows in per_row(trained, x, g.to(dtype)).items():
                    total[n] += rows
            prefix = f"{name}." if name else ""
            out.update({prefix + n: t for n, t in total.items()})
        return out


class _ParameterTerms:
    """The outputs an algorithm's loss sees when only its own terms are wanted: a task loss of 0 (the rows'
    losses are privatised separately); any other attribute is an error (no algorithm reading the batch runs
    under DP-SGD)."""

    loss = torch.zeros(())


@dataclass
class PrivateGradient:
    """Client i's DP-SGD step (module docstring): per-row clip ``clip``, noise ``noise_multiplier`` drawn from
    ``noise`` (the client's :class:`~fedtune.dp_noise.SecretStream`), divided by ``expected_batch`` (q_i · n_i)."""

    clip: float
    noise_multiplier: float
    expected_batch: float
    noise: SecretStream
    clipped_norms: list[float] = field(default_factory=list)
    """Every row's gradient norm after clipping, in this round's steps (for tests and checks)."""

    def backward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Callable,
                 loss_fn: Callable, context: Callable[[], Any]) -> tuple[float, int]:
        """Set every trainable tensor's ``.grad`` to g̃ for ``batch``; returns (Σ_j ℓ_j, rows). ``context``: the
        forward's autocast."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        rows = len(batch["input_ids"])
        own = loss_fn(batch, _ParameterTerms())  # r(θ): the algorithm's own term, e.g. FedProx's
        regulariser = (dict(zip([n for n, _ in params], torch.autograd.grad(
            own, [p for _, p in params], allow_unused=True))) if own.requires_grad else {n: None for n, _ in params})
        summed: dict[str, torch.Tensor] = {n: torch.zeros_like(p) for n, p in params}
        total = 0.0
        if rows:
            with PerExampleGradients(model, rows) as recorded:
                with context():
                    losses = example_losses(batch, forward(model, batch))
                losses.sum().backward()
            total = float(losses.detach().sum())
            per_row = recorded.gradients()
            missing = [n for n, _ in params if n not in per_row]
            if missing:
                raise FedtuneError(f"privacy.dp_sgd: no per-row gradient for {missing[0]} (it is not held by a "
                                   "module of its own)")
            norms = torch.sqrt(sum(per_row[n].flatten(1).double().pow(2).sum(1) for n, _ in params))
            factors = (self.clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            self.clipped_norms.extend((norms * factors).tolist())
            for n, _ in params:
                g = per_row[n]
                summed[n] = torch.einsum("b,b...->...", factors.to(g.dtype), g)
        scale = self.noise_multiplier * self.clip
        for n, p in params:
            noise = (self.noise.normal(p.shape) * scale).to(p.dtype) if scale else 0.0
            g = (summed[n] + (noise.to(p.device) if scale else 0.0)) / self.expected_batch
            p.grad = g if regulariser[n] is None else g + regulariser[n]
        return total, rows


def per_row_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Callable) -> dict[
        str, torch.Tensor]:
    """Every trainable tensor's per-row gradients of ``batch``'s rows' own losses (``.grad`` is left as the
    backward set it): what :class:`PrivateGradient` clips, exposed for checking against single-row passes."""
    with PerExampleGradients(model, len(batch["input_ids"])) as recorded:
        example_losses(batch, forward(model, batch)).sum().backward()
    return recorded.gradients()

