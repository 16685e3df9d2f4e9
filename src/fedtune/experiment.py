"""Everything a run is built from, made once from its config: data, shards, model, algorithm.

Both runtimes build an :class:`Experiment` the same way, so a seeded run
holds the same shards, the same initial adapters and the same tokenised
examples whichever runtime executes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms import Algorithm, build_algorithm
from fedtune.config import RunConfig
from fedtune.data import TaskData, load_task_data, partition_clients, partition_summary, split_client_test
from fedtune.errors import FedtuneError
from fedtune.models.base import load_classifier
from fedtune.models.lora import apply_lora, trainable_state
from fedtune.training import Encoded, encode_classification


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, client): stable across processes and machines."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@dataclass
class Experiment:
    """The built pieces of a run. Client ``i`` trains on ``train`` rows ``shards[i]``."""

    cfg: RunConfig
    task: TaskData
    algorithm: Algorithm
    model: torch.nn.Module
    tokenizer: Any
    train: Encoded
    eval: Encoded | None
    shards: list[np.ndarray]
    client_tests: list[np.ndarray]
    partition: dict[str, Any]
    initial: Tensors = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.shards)

    @property
    def steps_multiplier(self) -> int:
        """Pooled training runs as many steps per round as the federated round it stands for."""
        if not self.algorithm.pools_data:
            return 1
        return clients_per_round(self.cfg, self.cfg.partition.num_clients)


def clients_per_round(cfg: RunConfig, num_clients: int) -> int:
    fed = cfg.federation
    if fed.clients_per_round is not None:
        if fed.clients_per_round > num_clients:
            raise FedtuneError(
                f"federation.clients_per_round={fed.clients_per_round} exceeds partition.num_clients={num_clients}"
            )
        return fed.clients_per_round
    if fed.fraction is not None:
        return max(1, round(fed.fraction * num_clients))
    return num_clients


def build_experiment(cfg: RunConfig) -> Experiment:
    """Load data, partition it, tokenise it, load the model, attach LoRA; all seeded by ``cfg.seed``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.options)
    task = load_task_data(cfg.data, cfg.seed)
    if task.kind != "classification" or task.label_column is None:
        raise FedtuneError(
            f"dataset '{cfg.data.name}' is a {task.kind} dataset; model.task=classification needs a labelled "
            "classification dataset (e.g. sst2, cola, snli)"
        )
    if algorithm.personalized and cfg.partition.client_test_fraction <= 0:
        raise FedtuneError(
            f"algorithm '{algorithm.name}' is evaluated on each client's own test shard; "
            "set partition.client_test_fraction (e.g. 0.2)"
        )

    parts = partition_clients(task.train, cfg.partition, cfg.seed)
    shards, tests = [], []
    for cid, part in enumerate(parts):
        tr, te = split_client_test(part, cfg.partition.client_test_fraction, derive_seed(cfg.seed, cid))
        shards.append(tr)
        tests.append(te)
    summary = partition_summary(task.train, parts, task.label_column, task.label_names)
    if any(len(s) == 0 for s in shards):
        empty = [i for i, s in enumerate(shards) if len(s) == 0]
        raise FedtuneError(
            f"clients {empty} received no training examples; use fewer clients or a larger partition.alpha"
        )
    if algorithm.pools_data:
        shards = [np.sort(np.concatenate(shards))]
        tests = [np.sort(np.concatenate(tests))]

    torch.manual_seed(cfg.seed)
    base, tokenizer = load_classifier(cfg.model, num_labels=len(task.label_names))
    torch.manual_seed(derive_seed(cfg.seed, 1))
    model = apply_lora(base, cfg.lora, cfg.model.task)

    def encode(ds) -> Encoded:
        texts = [ds[c][:] for c in task.text_columns]
        return encode_classification(tokenizer, texts, ds[task.label_column][:], cfg.model.max_length)

    return Experiment(
        cfg=cfg,
        task=task,
        algorithm=algorithm,
        model=model,
        tokenizer=tokenizer,
        train=encode(task.train),
        eval=encode(task.eval) if task.eval is not None else None,
        shards=shards,
        client_tests=tests,
        partition=summary,
        initial=trainable_state(model),
    )
