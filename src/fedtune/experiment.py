"""Everything a run is built from, made once from its config: data, shards, model, algorithm.

Both runtimes build an :class:`Experiment` the same way, so a seeded run
holds the same shards, the same initial adapters and the same tokenised
examples whichever runtime executes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedtune.aggregation import Tensors
from fedtune.algorithms import Algorithm, LoraSetup, RunFacts, build_algorithm, wrap
from fedtune.attacks import Attack, attack_for, check_attack
from fedtune.config import DataConfig, RunConfig
from fedtune.data import TaskData, load_task_data, partition_clients, partition_summary, split_client_test
from fedtune.data.partition import add_client_splits, counts_summary, server_split
from fedtune.data.instructions import COLUMNS, load_instruction_data
from fedtune.data.templates import Template
from fedtune.device import autocast, resolve_device
from fedtune.errors import FedtuneError
from fedtune.reducers import build_reducer
from fedtune.sampling import clients_per_round, sampling_rate
from fedtune.evaluation import (
    classification_metrics, classifier_outputs, evaluate_classifier, evaluate_instructions, group_accuracy,
)
from fedtune.models.base import load_causal_lm, load_classifier, quiet_loading
from fedtune.models.kinds import AdapterKind, kind_for
from fedtune.models.lora import HEAD_NAMES, adapted_base_weights, load_state, trainable_state
from fedtune.models.quantization import check_quantization, prepare_quantized, quantization_config
from fedtune.privacy import Privacy, check_privacy, privacy_for
from fedtune.seeds import derive_seed, seed_everything
from fedtune.server_context import ServerContext
from fedtune.training import (
    Encoded,
    Forward,
    causal_lm_forward,
    encode_classification,
    encode_instructions,
    eval_batches,
    eval_order,
    truncation_note,
)


@dataclass
class ClientData:
    """The examples one client holds: it trains on rows ``train`` of ``examples`` and is tested on rows ``test``;
    rows ``aux`` (``partition.client_aux_fraction``) are its auxiliary split, for algorithms that measure
    something of its data besides training (FedAMoLE's routing embeddings)."""

    examples: Encoded
    train: np.ndarray
    test: np.ndarray
    aux: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class Experiment:
    """The built pieces of a run, as one process holds them.

    ``clients`` holds the data of the clients this process runs: every client in-process, one on a Flower
    node, none in a Flower ServerApp. ``client_sizes`` gives every client's (training rows, test rows);
    with node-local data (``partition.method: files``) a ServerApp learns them from the nodes
    (:meth:`describe_clients`). ``task`` is the data this process loaded itself: the dataset that is split
    (or the server's own data with node-local data, or on a node its own file).
    """

    cfg: RunConfig
    task: TaskData | None
    algorithm: Algorithm
    model: torch.nn.Module
    tokenizer: Any
    eval: Encoded | None
    clients: dict[int, ClientData]
    num_clients: int
    client_sizes: list[tuple[int, int]]
    partition: dict[str, Any]
    initial: Tensors = field(default_factory=dict)
    base: Tensors = field(default_factory=dict)
    """Pristine frozen weights of the adapted modules, for algorithms that merge updates into them."""
    server_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """The server's own rows of ``task.train`` (``partition.server_fraction``), which no client holds; empty in a
    process that did not load ``task`` or when the server holds none."""
    note: Callable[[str], None] = lambda line: None
    """Where lines for people go (the run's console)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where ``model`` computes (``train.device`` resolved); every tensor outside the model is on the CPU."""
    attack: Attack | None = None
    """The run's simulated attack (``federation.attack``), which its clients apply; None: no attack."""
    privacy: Privacy | None = None
    """The run's differential privacy (the ``dp`` wrapper or ``privacy.dp_sgd``) and its accountant; None: none."""
    _server: ServerContext | None = field(default=None, repr=False)

    def server_context(self, run_dir: Path | None = None) -> ServerContext:
        """The server's side of the run for algorithms that train there (:mod:`fedtune.server_context`), built on
        the first call and the same object after; ``run_dir``: where server-side artefacts go."""
        if self._server is None:
            if self.task is None or not len(self.server_rows):
                raise FedtuneError("this run gives the server no data of its own; set partition.server_fraction "
                                   "(e.g. 0.2)")
            if self.cfg.model.task != "classification":
                raise FedtuneError(f"algorithm '{self.algorithm.name}' trains on the server for model.task="
                                   "classification only")
            tokenised = ServerContext.encode_rows(self.task, self.tokenizer, self.cfg.model.max_length)
            self._server = ServerContext(
                cfg=self.cfg, model=self.model, tokenizer=self.tokenizer, label_names=self.label_names,
                task=self.task, rows=self.server_rows, examples=tokenised(self.task.train.select(self.server_rows)),
                eval=self.eval, load_state=self.load, run_dir=run_dir, note=self.note)
        return self._server

    def client(self, cid: int) -> ClientData:
        """Client ``cid``'s data; a one-line error in a process that does not hold it."""
        if cid not in self.clients:
            raise FedtuneError(f"this process holds the data of clients {sorted(self.clients)}, not of client {cid}")
        return self.clients[cid]

    def describe_clients(self, reports: dict[int, dict[str, Any]]) -> None:
        """Take every client's sizes and label counts from its own report (node-local data on Flower):
        ``{cid: {"train": n, "test": m, "label_counts": [...]}}``."""
        self.client_sizes = [(int(reports[c]["train"]), int(reports[c]["test"])) for c in range(self.num_clients)]
        counts = [reports[c].get("label_counts") for c in range(self.num_clients)]
        self.partition = files_summary(self.client_sizes, counts, self.label_names, self.cfg)

    def client_report(self, cid: int) -> dict[str, Any]:
        """What client ``cid`` tells the server of its data: its training and test rows, and (classification)
        its rows per class."""
        data = self.client(cid)
        report: dict[str, Any] = {"train": len(data.train), "test": len(data.test)}
        if self.cfg.model.task == "classification":
            labels = np.asarray(data.examples.labels, dtype=np.int64)
            report["label_counts"] = np.bincount(labels, minlength=len(self.label_names)).tolist()
        return report

    @property
    def label_names(self) -> list[str]:
        return _label_names(self.cfg, self.task)

    def load(self, tensors: Tensors) -> None:
        """Put a model state (trainable tensors, and ``merged/`` base-weight updates) into ``model``."""
        load_state(self.model, tensors, self.base)

    def evaluate(self, data: Encoded, indices: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of the model as it is now on ``data`` rows ``indices`` (all: None), for the run's task, computed
        under ``train.precision``'s autocast."""
        ev = self.cfg.eval
        with autocast(self.cfg.train.precision, self.device):
            if self.cfg.model.task == "sft":
                return evaluate_instructions(self.model, self.tokenizer, data, indices, self.eval_metrics(data),
                                             ev.batch_size, ev.max_new_tokens)
            if data.groups is None:
                return evaluate_classifier(self.model, eval_batches(data, indices, ev.batch_size))
            logits, labels = classifier_outputs(self.model, eval_batches(data, indices, ev.batch_size))
        groups = data.groups[eval_order(data, indices)]
        return {**classification_metrics(logits, labels), **group_accuracy(logits, labels, groups)}

    @property
    def forward(self) -> Forward:
        """The training forward pass of the run's task (outputs carry ``.loss``): the kind's. Under DP-SGD every
        row of an instruction batch runs its own prompt prefix: a row's gradient must come from that row alone."""
        if self.cfg.model.task == "sft" and self.cfg.privacy.dp_sgd.enabled:
            return partial(causal_lm_forward, share_prefix=False)
        return self.kind.forward(self.cfg.model.task)

    @property
    def kind(self) -> AdapterKind:
        """What the clients train (``model.finetune``), with its section of the config."""
        return kind_for(self.cfg)

    def eval_metrics(self, data: Encoded) -> list[str]:
        """Decoder metrics on ``data``: as configured, else choice scoring where it has candidates, and perplexity."""
        if self.cfg.eval.metrics is not None:
            return list(self.cfg.eval.metrics)
        closed = any(len(c) for c in data.choices)
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
        if (personalized or cfg.eval.per_client) and any(test for _, test in self.client_sizes):
            return None
        if self.eval is not None and not personalized:
            return None
        if personalized:
            return ("no evaluation in this run: every client's test shard is empty; "
                    "raise partition.client_test_fraction")
        source = self.task.source if self.task else cfg.data.name
        if cfg.data.eval_fraction == 0:
            return (f"no evaluation in this run: {source} has no dev/test/validation split and "
                    "data.eval_fraction is 0; set data.eval_fraction (e.g. 0.1) or data.eval_split")
        return (f"no evaluation in this run: {source} is too small to hold out "
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


MAX_EVAL_GROUPS = 20
"""Classification runs report accuracy per group on the eval split (``eval/…/accuracy@<group>``) for up to this
many groups."""


def eval_groups(split, column: str | None) -> np.ndarray | None:
    """Each eval row's group, the value of the clients' group column (``partition.by``), where the split has that
    column with 2 … :data:`MAX_EVAL_GROUPS` values; else None."""
    if column is None or column not in split.column_names:
        return None
    groups = np.asarray([str(v) for v in split[column][:]])
    return groups if 2 <= len(set(groups.tolist())) <= MAX_EVAL_GROUPS else None


def evaluated_round(cfg: RunConfig, rnd: int) -> bool:
    """Round ``rnd`` is evaluated: evaluation is on, and it is the last round or a multiple of ``eval.every``
    (round 0, the initial model, is one)."""
    every = cfg.eval.every
    return cfg.eval.enabled and (rnd == cfg.federation.rounds or bool(every and rnd % every == 0))


def _weights(p: torch.Tensor) -> int:
    """The weights a parameter stands for (a 4-bit one packs two per byte: its quantisation state has the shape)."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def model_line(name: str, model: torch.nn.Module, how: str, num_labels: int | None) -> str:
    """What was loaded, in place of transformers' load report (which lists a new task head as MISSING)."""
    total = sum(_weights(p) for p in model.parameters())
    trained = sum(_weights(p) for p in model.parameters() if p.requires_grad)
    head = f", a new {num_labels}-label classification head" if num_labels is not None else ""
    return (f"model {name}: {total / 1e6:.1f}M parameters{head}; "
            f"training {trained:,} ({100 * trained / total:.2f}%) with {how}")


def algorithm_for(cfg: RunConfig) -> Algorithm:
    """The run's algorithm: ``cfg.algorithm`` with its options, the LoRA scale alpha / r and the clients' ranks
    (the run's facts are bound once the partition is drawn: :meth:`Algorithm.bind`)."""
    ranks = cfg.lora.ranks(cfg.partition.num_clients)
    lora = LoraSetup(scale=cfg.lora.alpha / cfg.lora.r, client_ranks=tuple(ranks) if ranks else None)
    algorithm = wrap(build_algorithm(cfg.algorithm.name, cfg.algorithm.options, lora), cfg.algorithm.wrappers)
    algorithm.reducer = build_reducer(cfg.algorithm.reducer.name, cfg.algorithm.reducer.options)
    return algorithm


Holds = Literal["all", "none"] | int
"""Whose data a process loads: ``"all"`` (the in-process engine), ``"none"`` (a Flower ServerApp), or one
client id (a Flower node)."""


def build_experiment(cfg: RunConfig, note: Callable[[str], None] | None = None, holds: Holds = "all",
                     data_path: str | None = None) -> Experiment:
    """Load data, partition it, tokenise it, load the model, attach LoRA; all seeded by ``cfg.seed``.

    ``holds``: the clients whose data this process loads (:data:`Holds`). With node-local data
    (``partition.method: files``) a client's examples are its own file: ``data_path`` on a node (its
    ``data-path`` node config), else ``partition.files[cid]``; a process holding no client (a ServerApp)
    opens no client file, and one holding a client does not load the server's data. Every other partition
    splits ``data.name``, which every process then reads. ``note(line)`` receives lines for people: what the
    data loading chose (columns found by name, an eval split held out, malformed rows skipped), a line before
    the model loads (which can take minutes), one describing it once adapted, and the share of the training
    and eval inputs that ``model.max_length`` cuts.
    """
    note = note or (lambda line: None)
    device = resolve_device(cfg.train.device)  # a GPU this machine lacks: one line before anything loads
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    ranks = cfg.lora.ranks(cfg.partition.num_clients)  # None clients (natural: one per value): counted below
    algorithm = algorithm_for(cfg)
    lora = algorithm.lora
    algorithm.check(cfg)  # what the algorithm needs of the rest of the config, as fedtune algorithms lists it
    sft = cfg.model.task == "sft"
    if cfg.data.tasks is not None and not sft:
        raise FedtuneError("data.tasks (a multitask mixture) is for model.task=sft")
    adapter = kind_for(cfg)
    if ranks and not adapter.factorised:
        raise FedtuneError(f"lora.client_ranks / rank_tiers give clients LoRA ranks, but model.finetune={adapter.name} "
                           f"trains {adapter.trains}; remove them or use model.finetune=lora")
    check_quantization(cfg, algorithm)
    if cfg.eval.after_local_training and cfg.partition.client_test_fraction <= 0:
        raise FedtuneError("eval.after_local_training scores each client on its own test shard; set "
                           "partition.client_test_fraction (e.g. 0.2)")
    check_attack(cfg, algorithm, cfg.partition.num_clients)
    check_privacy(cfg, algorithm)
    load = _node_local_data if cfg.partition.method == "files" else _split_data
    data = load(cfg, algorithm, holds, data_path, note)
    algorithm.bind(RunFacts(seed=cfg.seed, rounds=cfg.federation.rounds, num_clients=data.num_clients,
                            clients_per_round=1 if algorithm.pools_data else clients_per_round(cfg, data.num_clients),
                            sampling_rate=None if algorithm.pools_data else sampling_rate(cfg, data.num_clients),
                            noise_seed=cfg.seed if cfg.privacy.reproducible_noise else None,
                            client_groups=data.client_groups))
    privacy = privacy_for(cfg, algorithm, data.num_clients)
    attack = (attack_for(cfg, algorithm, data.num_clients, [tr for tr, _ in data.sizes],
                         clients_per_round(cfg, data.num_clients)) if cfg.federation.attack.kind != "none" else None)
    if ranks and len(ranks) != data.num_clients:
        raise FedtuneError(f"lora.client_ranks / rank_tiers give {len(ranks)} ranks but partition.method="
                           f"{cfg.partition.method} gives {data.num_clients} clients (one per value of "
                           f"'{cfg.partition.by}'); give one rank per client")
    task = data.task
    label_names = _label_names(cfg, task)

    torch.manual_seed(cfg.seed)
    quantized = cfg.model.quantization != "none"
    how = [str(device)] + ([cfg.model.quantization] if quantized else []) + (
        [cfg.train.precision] if cfg.train.precision != "fp32" else [])
    note(f"loading model {cfg.model.name} ({', '.join(how)}) …")
    if sft:
        base, tokenizer = load_causal_lm(cfg.model, quantization_config(cfg), device)
        template = Template(cfg.sft.template, tokenizer, cfg.sft.system_prompt)

        def encode(t: TaskData, ds) -> Encoded:
            rows = {c: ds[c][:] for c in COLUMNS}
            return encode_instructions(tokenizer, template, rows, cfg.model.max_length, cfg.sft.train_on_inputs)
    else:
        base, tokenizer = load_classifier(cfg.model, len(label_names), label_names,
                                          quantization_config(cfg, skip=list(HEAD_NAMES)), device)

        def encode(t: TaskData, ds) -> Encoded:
            texts = [ds[c][:] for c in t.text_columns]
            return encode_classification(tokenizer, texts, ds[t.label_column][:], cfg.model.max_length)

    if quantized:
        base = prepare_quantized(base, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(derive_seed(cfg.seed, 1))
    with quiet_loading():
        model = adapter.build(base, cfg.model.task, lora.max_rank)
    if not quantized:  # built on the CPU (the same initial adapters on every device), then moved once
        model.to(device)
    note(model_line(cfg.model.name, model, adapter.describe(ranks), None if sft else len(label_names)))
    encoded: dict[int, Encoded] = {}  # one encoding per loaded dataset: the clients of a split share it
    clients = {}
    for cid, (t, train_rows, aux_rows, test_rows) in data.clients.items():
        if id(t) not in encoded:
            encoded[id(t)] = encode(t, t.train)
        examples = encoded[id(t)]
        if attack is not None:  # a label flipper trains on its own relabelled copy
            examples = attack.training_examples(cid, examples, train_rows, len(label_names))
        clients[cid] = ClientData(examples, train_rows, test_rows, aux_rows)
    evaluation = encode(task, task.eval) if task is not None and task.eval is not None else None
    if evaluation is not None and not sft:
        evaluation.groups = eval_groups(task.eval, data.summary.get("group_column"))
    lengths = {"training": np.concatenate([c.examples.full_lengths[c.train] for c in clients.values()]
                                          or [np.zeros(0, dtype=np.int64)])}
    if evaluation is not None:
        lengths["eval"] = evaluation.full_lengths
    line = truncation_note(cfg.model.max_length, lengths)
    if line:
        note(line)
    exp = Experiment(
        cfg=cfg,
        task=task,
        algorithm=algorithm,
        model=model,
        tokenizer=tokenizer,
        eval=evaluation,
        clients=clients,
        num_clients=data.num_clients,
        client_sizes=data.sizes,
        partition=data.summary,
        initial=trainable_state(model),
        base=adapted_base_weights(model) if algorithm.uses_base_weights else {},
        server_rows=data.server_rows,
        note=note,
        device=device,
        attack=attack,
        privacy=privacy,
    )
    if cfg.partition.method == "files" and holds == "all":
        exp.describe_clients({cid: exp.client_report(cid) for cid in clients})
    return exp


@dataclass
class _Loaded:
    """What a process loaded: its ``task`` (the split dataset, or the server's own data), the data of the
    clients it holds (their dataset, training rows, test rows), every client's (train, test) sizes and the
    partition summary (empty where only the nodes know them)."""

    task: TaskData | None
    clients: dict[int, tuple[TaskData, np.ndarray, np.ndarray, np.ndarray]]
    sizes: list[tuple[int, int]]
    summary: dict[str, Any]
    num_clients: int
    server_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    client_groups: tuple[str, ...] | None = None
    """Each client's group, for a partition over a column (:func:`~fedtune.data.partition.client_groups`)."""


def _label_names(cfg: RunConfig, task: TaskData | None) -> list[str]:
    """The classes: those of the data this process loaded, else (a node with its own file) ``data.labels``."""
    return list(task.label_names) if task is not None else list(cfg.data.labels or [])


def _held(holds: Holds, num_clients: int) -> list[int]:
    if holds == "all":
        return list(range(num_clients))
    if holds == "none":
        return []
    if not 0 <= int(holds) < num_clients:
        raise FedtuneError(f"client {holds} does not exist: the run has clients 0..{num_clients - 1}")
    return [int(holds)]


def _load(cfg: RunConfig, data_cfg) -> TaskData:
    return load_instruction_data(data_cfg, cfg.seed) if cfg.model.task == "sft" else load_task_data(data_cfg, cfg.seed)


def _check_task(cfg: RunConfig, task: TaskData) -> None:
    if cfg.model.task != "sft" and (task.kind != "classification" or task.label_column is None):
        raise FedtuneError(
            f"dataset '{task.name}' is a {task.kind} dataset; model.task=classification needs a labelled "
            "classification dataset (e.g. sst2, cola, snli), or set model.task=sft to instruction-tune on it"
        )


def _split_data(cfg: RunConfig, algorithm: Algorithm, holds: Holds, data_path: str | None,
                note: Callable[[str], None]) -> _Loaded:
    """One dataset (``data.name``) split across the clients by ``partition.method``; every process reads it."""
    if data_path is not None:
        raise FedtuneError(f"a data-path was given, but partition.method={cfg.partition.method} splits "
                           f"data.name={cfg.data.name} across the clients; use partition.method=files for node-local data")
    # personalised algorithms are evaluated on client test shards only: no global eval split is held out
    data_cfg = cfg.data.model_copy(update={"eval_fraction": 0.0}) if algorithm.personalized else cfg.data
    task = _load(cfg, data_cfg)
    for line in task.notes:  # columns found by name, an eval split held out
        note(line)
    _check_task(cfg, task)
    if cfg.partition.method != "iid" and cfg.partition.by not in task.train.column_names:
        raise FedtuneError(
            f"partition.by='{cfg.partition.by}' is not a column of {task.name} "
            f"(columns: {', '.join(task.train.column_names)}); set partition.by to one of them"
        )
    server_rows, client_rows = server_split(len(task.train), cfg.partition.server_fraction)
    clients_view = task.train.select(client_rows) if len(server_rows) else task.train
    parts = partition_clients(clients_view, cfg.partition, cfg.seed)
    summary = partition_summary(clients_view, parts, task.label_column, task.label_names, by=cfg.partition.by)
    if len(server_rows):
        summary["server_examples"] = len(server_rows)
        parts = [client_rows[p] for p in parts]
    shards, auxes, tests = [], [], []
    for cid, part in enumerate(parts):
        tr, aux, te = _client_rows(part, cfg, cid)
        shards.append(tr)
        auxes.append(aux)
        tests.append(te)
    add_client_splits(summary, *([len(rows) for rows in split] for split in (shards, tests, auxes)))
    groups = (tuple(client_groups(task.train[cfg.partition.by], shards))
              if cfg.partition.method in GROUP_PARTITIONS else None)
    if any(len(s) == 0 for s in shards):
        empty = [i for i, s in enumerate(shards) if len(s) == 0]
        raise FedtuneError(
            f"clients {empty} received no training examples; use fewer clients or a larger partition.alpha"
        )
    if algorithm.pools_data:
        shards, auxes, tests = ([np.sort(np.concatenate(rows))] for rows in (shards, auxes, tests))
    held = {cid: (task, shards[cid], auxes[cid], tests[cid]) for cid in _held(holds, len(shards))}
    return _Loaded(task, held, [(len(a), len(b)) for a, b in zip(shards, tests)], summary, len(shards),
                   server_rows if holds in ("all", "none") else server_rows[:0], groups)


def _client_rows(rows: np.ndarray, cfg: RunConfig, cid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Client ``cid``'s (train, aux, test) rows: ``partition.client_test_fraction`` of ``rows`` for its test
    shard, then ``client_aux_fraction`` of the rest for its auxiliary split, each seeded by (seed, client)."""
    train, test = split_client_test(rows, cfg.partition.client_test_fraction, derive_seed(cfg.seed, cid))
    if cfg.partition.client_aux_fraction <= 0:
        return train, train[:0], test
    train, aux = split_client_test(train, cfg.partition.client_aux_fraction, derive_seed(cfg.seed, cid, 2))
    return train, aux, test


def _node_local_data(cfg: RunConfig, algorithm: Algorithm, holds: Holds, data_path: str | None,
                     note: Callable[[str], None]) -> _Loaded:
    """Node-local data (``partition.method: files``): each client reads its own file; the server its own data."""
    sft = cfg.model.task == "sft"
    if not sft and not cfg.data.labels:
        raise FedtuneError("partition.method=files: set data.labels to the class labels as written in the clients' "
                           "files, in order (e.g. [0, 1]), so that every node reads its file against the same classes")
    if algorithm.pools_data:
        raise FedtuneError(f"algorithm '{algorithm.name}' pools every client's data in one place, which node-local "
                           "data (partition.method=files) rules out; split one dataset instead (e.g. partition.method=iid)")
    n = int(cfg.partition.num_clients)
    task = None
    server_rows = np.zeros(0, dtype=np.int64)
    if holds in ("all", "none") and ((cfg.eval.enabled and not algorithm.personalized)
                                     or cfg.partition.server_fraction > 0):
        task = _load(cfg, cfg.data)  # the server's own data: its eval split, and its training rows for the server
        for line in task.notes:
            note(line)
        _check_task(cfg, task)
        server_rows = server_split(len(task.train), cfg.partition.server_fraction)[0]
    clients = {}
    for cid in _held(holds, n):
        path = data_path if data_path is not None else (cfg.partition.files or [None] * n)[cid]
        if path is None:
            raise FedtuneError(f"client {cid} has no data file: list it in partition.files, or in a deployment start "
                               f"its SuperNode with --node-config 'client-id={cid} data-path=<its file>'")
        try:
            t = load_client_file(cfg, path)
            _check_task(cfg, t)
        except FedtuneError as e:  # its text may quote rows: a deployed node sends the server only this kind
            raise FedtuneError(str(e), public=e.public or "its data file does not pass the run's checks (its "
                               "columns, labels or rows: see that node's own log)") from None
        for line in t.notes:  # malformed rows skipped
            note(f"client {cid}: {line}")
        tr, aux, te = _client_rows(np.arange(len(t.train)), cfg, cid)
        if not len(tr):
            raise FedtuneError(f"client {cid}'s file {path} leaves no training rows; add rows or lower "
                               "partition.client_test_fraction")
        clients[cid] = (t, tr, aux, te)
    return _Loaded(task, clients, [], {}, n, server_rows)


def load_client_file(cfg: RunConfig, path: str) -> TaskData:
    """A client's own data file, read with the run's columns and labels (every row of it is the client's)."""
    if not Path(path).exists():
        raise FedtuneError(f"client data file '{path}' does not exist (resolved: {Path(path).resolve()}); "
                           "check the data-path of this node (relative paths are from its working directory)")
    fields = {k: v for k, v in cfg.data.model_dump().items()
              if k in ("text_column", "text_pair_column", "label_column", "labels", "on_malformed")}
    return _load(cfg, DataConfig(name=str(path), eval_fraction=0.0, **fields))


def files_summary(sizes: list[tuple[int, int]], label_counts: list[list[int] | None], label_names: list[str],
                  cfg: RunConfig) -> dict[str, Any]:
    """The partition summary of node-local data, from each client's (train, test) sizes and label counts."""
    counts = None if any(c is None for c in label_counts) else label_counts
    summary = counts_summary([tr + te for tr, te in sizes], counts, cfg.data.label_column or "label", label_names,
                             method="files")
    add_client_splits(summary, [tr for tr, _ in sizes], [te for _, te in sizes])
    return summary
