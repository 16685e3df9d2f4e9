"""Everything a run is built from, made once from its config: data, shards, model, algorithm.

Both runtimes build an :class:`Experiment` the same way, so a seeded run
holds the same shards, the same initial adapters and the same tokenised
examples whichever runtime executes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms import Algorithm, LoraSetup, build_algorithm
from fedtune.config import RunConfig
from fedtune.data import TaskData, load_task_data, partition_clients, partition_summary, split_client_test
from fedtune.data.instructions import COLUMNS, load_instruction_data
from fedtune.data.templates import Template
from fedtune.errors import FedtuneError
from fedtune.evaluation import evaluate_classifier, evaluate_instructions
from fedtune.models.base import load_causal_lm, load_classifier, quiet_loading
from fedtune.models.lora import adapted_base_weights, apply_lora, load_state, trainable_state
from fedtune.training import (
    Encoded,
    Forward,
    causal_lm_forward,
    encode_classification,
    encode_instructions,
    eval_batches,
    model_forward,
)


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
    base: Tensors = field(default_factory=dict)
    """Pristine frozen weights of the adapted modules, for algorithms that merge updates into them."""

    @property
    def num_clients(self) -> int:
        return len(self.shards)

    def load(self, tensors: Tensors) -> None:
        """Put a model state (trainable tensors, and ``merged/`` base-weight updates) into ``model``."""
        load_state(self.model, tensors, self.base)

    def evaluate(self, data: Encoded, indices: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of the model as it is now on ``data`` rows ``indices`` (all: None), for the run's task."""
        ev = self.cfg.eval
        if self.cfg.model.task == "sft":
            return evaluate_instructions(self.model, self.tokenizer, data, indices, self.eval_metrics,
                                         ev.batch_size, ev.max_new_tokens)
        return evaluate_classifier(self.model, eval_batches(data, indices, ev.batch_size))

    @property
    def forward(self) -> Forward:
        """The training forward pass of the run's task (outputs carry ``.loss``)."""
        return causal_lm_forward if self.cfg.model.task == "sft" else model_forward

    @property
    def eval_metrics(self) -> list[str]:
        """Decoder metrics: as configured, else choice scoring where there are candidates, and perplexity."""
        if self.cfg.eval.metrics is not None:
            return list(self.cfg.eval.metrics)
        closed = any(len(c) for c in self.train.choices)
        return (["choice"] if closed else []) + ["perplexity"]

    @property
    def steps_multiplier(self) -> int:
        """Pooled training runs as many steps per round as the federated round it stands for."""
        if not self.algorithm.pools_data:
            return 1
        return clients_per_round(self.cfg, self.partition["num_clients"])

    def evaluation_gap(self) -> str | None:
        """Why nothing at all is evaluated in this run, with the key to set; None when something is."""
        cfg = self.cfg
        if not cfg.eval.enabled:
            return "no evaluation in this run: eval.enabled is false; set eval.enabled=true to evaluate"
        personalized = self.algorithm.personalized
        if (personalized or cfg.eval.per_client) and any(len(t) for t in self.client_tests):
            return None
        if self.eval is not None and not personalized:
            return None
        if personalized:
            return ("no evaluation in this run: every client's test shard is empty; "
                    "raise partition.client_test_fraction")
        if cfg.data.eval_fraction == 0:
            return (f"no evaluation in this run: {self.task.source} has no dev/test/validation split and "
                    "data.eval_fraction is 0; set data.eval_fraction (e.g. 0.1) or data.eval_split")
        return (f"no evaluation in this run: {self.task.source} is too small to hold out "
                f"data.eval_fraction={cfg.data.eval_fraction} of its rows and keep every label in training; "
                "set data.name to a folder with train and dev files, or add rows")


GROUP_PARTITIONS = ("natural", "group_clusters", "language_clusters")
"""Partitions that give each client one group (a value of ``partition.by``), e.g. a language or a task."""


def client_groups(column, shards: list[np.ndarray]) -> list[str]:
    """Each client's group: the most frequent value of ``column`` among its rows (ties: the first in order)."""
    values = np.asarray([str(v) for v in column[:]])
    groups = []
    for shard in shards:
        names, counts = np.unique(values[shard], return_counts=True)
        groups.append(str(names[int(np.argmax(counts))]))
    return groups


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


def _model_line(cfg: RunConfig, model: torch.nn.Module, ranks: list[int] | None, num_labels: int | None) -> str:
    """What was loaded, in place of transformers' load report (which lists a new task head as MISSING)."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = f", a new {num_labels}-label classification head" if num_labels is not None else ""
    rank = f"r={cfg.lora.r}" if ranks is None else f"ranks {min(ranks)}-{max(ranks)} (counted at rank {max(ranks)})"
    return (f"model {cfg.model.name}: {total / 1e6:.1f}M parameters{head}; "
            f"training {trained:,} ({100 * trained / total:.2f}%) with LoRA {rank}")


def algorithm_for(cfg: RunConfig) -> Algorithm:
    """The run's algorithm: ``cfg.algorithm`` with its options, the LoRA scale alpha / r, the clients' ranks,
    ``federation.rounds`` and ``partition.num_clients`` (None for a natural partition until it is drawn)."""
    ranks = cfg.lora.ranks(cfg.partition.num_clients)
    lora = LoraSetup(scale=cfg.lora.alpha / cfg.lora.r, client_ranks=tuple(ranks) if ranks else None)
    return build_algorithm(cfg.algorithm.name, cfg.algorithm.options, lora, cfg.federation.rounds,
                           cfg.partition.num_clients)


def build_experiment(cfg: RunConfig, note: Callable[[str], None] | None = None) -> Experiment:
    """Load data, partition it, tokenise it, load the model, attach LoRA; all seeded by ``cfg.seed``.

    ``note(line)`` receives lines for people: what the data loading chose (columns found by name, an eval
    split held out), a line before the model loads (which can take minutes) and one describing it once adapted.
    """
    note = note or (lambda line: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ranks = cfg.lora.ranks(cfg.partition.num_clients)  # None clients (natural: one per value): counted below
    algorithm = algorithm_for(cfg)
    lora = algorithm.lora
    if ranks and algorithm.pools_data:
        raise FedtuneError(f"algorithm '{algorithm.name}' trains one pooled model; remove lora.client_ranks / rank_tiers")
    sft = cfg.model.task == "sft"
    # personalised algorithms are evaluated on client test shards only: no global eval split is held out
    data_cfg = cfg.data.model_copy(update={"eval_fraction": 0.0}) if algorithm.personalized else cfg.data
    task = load_instruction_data(data_cfg, cfg.seed) if sft else load_task_data(data_cfg, cfg.seed)
    for line in task.notes:  # columns found by name, an eval split held out
        note(line)
    if not sft and (task.kind != "classification" or task.label_column is None):
        raise FedtuneError(
            f"dataset '{cfg.data.name}' is a {task.kind} dataset; model.task=classification needs a labelled "
            "classification dataset (e.g. sst2, cola, snli), or set model.task=sft to instruction-tune on it"
        )
    if cfg.data.tasks is not None and not sft:
        raise FedtuneError("data.tasks (a multitask mixture) is for model.task=sft")
    if algorithm.personalized and cfg.partition.client_test_fraction <= 0:
        raise FedtuneError(
            f"algorithm '{algorithm.name}' is evaluated on each client's own test shard; "
            "set partition.client_test_fraction (e.g. 0.2)"
        )
    if cfg.partition.method != "iid" and cfg.partition.by not in task.train.column_names:
        raise FedtuneError(
            f"partition.by='{cfg.partition.by}' is not a column of {task.name} "
            f"(columns: {', '.join(task.train.column_names)}); set partition.by to one of them"
        )

    parts = partition_clients(task.train, cfg.partition, cfg.seed)
    if ranks and len(ranks) != len(parts):
        raise FedtuneError(f"lora.client_ranks / rank_tiers give {len(ranks)} ranks but partition.method="
                           f"{cfg.partition.method} gives {len(parts)} clients (one per value of "
                           f"'{cfg.partition.by}'); give one rank per client")
    algorithm.num_clients = len(parts)  # natural without partition.num_clients: known only now
    shards, tests = [], []
    for cid, part in enumerate(parts):
        tr, te = split_client_test(part, cfg.partition.client_test_fraction, derive_seed(cfg.seed, cid))
        shards.append(tr)
        tests.append(te)
    summary = partition_summary(task.train, parts, task.label_column, task.label_names, by=cfg.partition.by)
    if cfg.partition.method in GROUP_PARTITIONS:
        algorithm.client_groups = client_groups(task.train[cfg.partition.by], shards)
    if any(len(s) == 0 for s in shards):
        empty = [i for i, s in enumerate(shards) if len(s) == 0]
        raise FedtuneError(
            f"clients {empty} received no training examples; use fewer clients or a larger partition.alpha"
        )
    if algorithm.pools_data:
        shards = [np.sort(np.concatenate(shards))]
        tests = [np.sort(np.concatenate(tests))]

    torch.manual_seed(cfg.seed)
    note(f"loading model {cfg.model.name} …")
    if sft:
        base, tokenizer = load_causal_lm(cfg.model)
        template = Template(cfg.sft.template, tokenizer, cfg.sft.system_prompt)

        def encode(ds) -> Encoded:
            rows = {c: ds[c][:] for c in COLUMNS}
            return encode_instructions(tokenizer, template, rows, cfg.model.max_length, cfg.sft.train_on_inputs)
    else:
        base, tokenizer = load_classifier(cfg.model, len(task.label_names), task.label_names)

        def encode(ds) -> Encoded:
            texts = [ds[c][:] for c in task.text_columns]
            return encode_classification(tokenizer, texts, ds[task.label_column][:], cfg.model.max_length)

    torch.manual_seed(derive_seed(cfg.seed, 1))
    with quiet_loading():
        model = apply_lora(base, cfg.lora, cfg.model.task, rank=lora.max_rank)
    note(_model_line(cfg, model, ranks, None if sft else len(task.label_names)))
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
        base=adapted_base_weights(model) if algorithm.uses_base_weights else {},
    )
