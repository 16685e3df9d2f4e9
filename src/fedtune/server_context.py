"""What an algorithm that trains on the server receives: the server's data, its models, the loop and evaluation.

:meth:`Experiment.server_context <fedtune.experiment.Experiment.server_context>` builds one per run, in the
process that runs the round loop (the in-process engine, or Flower's ServerApp), and hands it to algorithms
with ``trains_on_server`` (:meth:`Algorithm.setup_server <fedtune.algorithms.Algorithm.setup_server>`); the
others never see it. The server's data is ``partition.server_fraction`` of the training split, rows no
client holds.

``model`` is the model the clients train. In-process the clients share that very object, so server-side
training borrows it (:meth:`ServerContext.borrowed_model`): what it leaves behind is exactly what it found.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.config import ModelConfig, RunConfig
from fedtune.data import TaskData
from fedtune.device import model_device
from fedtune.evaluation import evaluate_classifier
from fedtune.models.base import load_classifier, quiet_loading
from fedtune.models.lora import load_trainable, trainable_state
from fedtune.training import Encoded, batch_stream, encode_classification, eval_batches, train_local


@dataclass
class ServerContext:
    """The server's side of a run, for algorithms that train there (one per run)."""

    cfg: RunConfig
    model: torch.nn.Module
    """The model the clients train, as the server holds it (in-process: the clients' own; borrow it)."""
    tokenizer: Any
    label_names: list[str]
    task: TaskData
    """The dataset the server's rows come from (texts, to encode with another model's tokenizer)."""
    rows: np.ndarray
    """The server's rows of ``task.train``."""
    examples: Encoded
    """The server's rows, tokenised for ``model`` (example j is row ``rows[j]``)."""
    eval: Encoded | None
    """The run's eval split, tokenised for ``model`` (None: no eval split)."""
    load_state: Callable[[Tensors], None]
    """Put a model state (as the clients receive it) into ``model``."""
    run_dir: Path | None = None
    """Where the run is written (server-side artefacts, e.g. a pre-trained teacher); None outside a run."""
    note: Callable[[str], None] = field(default=lambda line: None)

    @staticmethod
    def encode_rows(task: TaskData, tokenizer, max_length: int) -> Callable[[Any], Encoded]:
        """A function tokenising a split of ``task`` (a ``datasets.Dataset``) with ``tokenizer``."""
        def encode(ds) -> Encoded:
            texts = [ds[c][:] for c in task.text_columns]
            return encode_classification(tokenizer, texts, ds[task.label_column][:], max_length)

        return encode

    def encode(self, tokenizer) -> tuple[Encoded, Encoded | None]:
        """The server's rows and the eval split tokenised with ``tokenizer`` (same rows, same order)."""
        encode = self.encode_rows(self.task, tokenizer, self.cfg.model.max_length)
        return encode(self.task.train.select(self.rows)), (encode(self.task.eval) if self.eval is not None else None)

    @property
    def device(self) -> torch.device:
        """Where ``model`` computes: the server's other models and their batches go there too."""
        return model_device(self.model)

    def load_classifier(self, name: str) -> tuple[torch.nn.Module, Any]:
        """Another classifier (packaged name, Hub id or folder) with the run's classes and a fresh head
        (initialised from the current torch RNG state), and its own tokenizer."""
        cfg = ModelConfig(name=name, max_length=self.cfg.model.max_length, dtype=self.cfg.model.dtype)
        with quiet_loading():
            return load_classifier(cfg, len(self.label_names), self.label_names)

    def steps(self, epochs: float, n: int | None = None) -> int:
        """Optimiser steps of ``epochs`` passes over the server's rows (or ``n`` examples), at the clients' batch size."""
        n = len(self.rows) if n is None else n
        return 0 if epochs <= 0 else max(1, math.ceil(epochs * n / self.cfg.train.batch_size))

    def batches(self, data: Encoded, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless length-grouped batches over the server's rows of ``data``, seeded."""
        return batch_stream(data, np.arange(len(data)), self.cfg.train.batch_size, np.random.default_rng(seed))

    def train(self, model: torch.nn.Module, data: Encoded, epochs: float, lr: float, seed: int) -> float:
        """``epochs`` passes of the clients' local loop (``train``: optimiser, clipping, weight decay) over the
        server's rows of ``data`` with the model's own loss, at ``lr``; returns the mean loss (nan: no step)."""
        steps = self.steps(epochs, len(data))
        if not steps:
            return math.nan
        torch.manual_seed(seed)
        loss, _ = train_local(model, self.batches(data, seed), steps, self.cfg.train.model_copy(update={"grad_accum": 1}),
                              lr, loss_fn=lambda batch, out: out.loss)
        return loss

    def evaluate(self, model: torch.nn.Module, data: Encoded) -> dict[str, float]:
        """Classification metrics of ``model`` as it is now on all of ``data``."""
        return evaluate_classifier(model, eval_batches(data, None, self.cfg.eval.batch_size))

    @contextmanager
    def borrowed_model(self) -> Iterator[torch.nn.Module]:
        """``model`` to train on; on exit its trainable tensors, train/eval mode, gradients and attention
        implementation are as they were, so in-process clients find the model they left."""
        model = self.model
        saved = trainable_state(model)
        training = model.training
        config = getattr(model, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        try:
            yield model
        finally:
            load_trainable(model, saved)
            model.zero_grad(set_to_none=True)
            model.train(training)
            if attention is not None and config._attn_implementation != attention:
                model.set_attn_implementation(attention)
