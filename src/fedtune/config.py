"""The configuration of a run: pydantic models, loaded from YAML or TOML.

A run is fully described by :class:`RunConfig`. Files are validated strictly
(an unknown key is an error naming the valid ones), ``-o key.path=value``
overrides are applied before validation, and the resolved config is written
into the run directory so every run can be repeated exactly.
"""

from __future__ import annotations

import codecs
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from fedtune.errors import FedtuneError
from fedtune.models.kinds import KINDS
from fedtune.models.kinds.lora import LoraConfig, RankTier  # noqa: F401  the kinds' sections, where a run's are
from fedtune.models.kinds.mole import MoleConfig  # noqa: F401
from fedtune.sections import Section as _Strict


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
"""What ``train.device`` may say."""


FinetuneKind = Literal[tuple(KINDS)]
"""What ``model.finetune`` may say: a registered adapter kind (:mod:`fedtune.models.kinds`)."""


class DataConfig(_Strict):
    """Where the examples come from and which columns mean what."""

    name: str = "sst2"
    """A registered dataset name (see ``fedtune data list``) or a path to a CSV/TSV/JSON/JSONL file or folder."""
    text_column: str | None = None
    """Column holding the input text (registered datasets set it; default for a local file: a column named
    ``text`` or ``sentence``, or the pair ``sentence1``/``sentence2`` or ``premise``/``hypothesis``)."""
    text_pair_column: str | None = None
    """Optional second text column (sentence pairs, e.g. SNLI's hypothesis)."""
    label_column: str | None = None
    """Column holding the label (registered datasets set it; default for a local file: a column named ``label``)."""
    train_split: str = "train"
    """The split the clients' training examples come from."""
    eval_split: str | None = None
    """Held-out split for global evaluation; default: the dataset's own dev/test split."""
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    """For a dataset without an eval split (a single file): this share of the training rows is held out as
    the eval split (seeded by the run seed; stratified by label for classification); 0: no evaluation."""
    max_train_examples: int | None = Field(default=None, ge=1)
    """Use a seeded random subset of the training split of at most this size."""
    max_eval_examples: int | None = Field(default=None, ge=1)
    """Use a seeded random subset of the evaluation split of at most this size."""
    tasks: list[str] | None = None
    """``name: multitask`` only: the datasets to mix (e.g. ``[sst2, snli, alpaca_en]``), each turned into
    instructions; rows carry a ``task`` column (partition with ``by: task``). ``max_*_examples`` apply per task."""
    on_malformed: Literal["error", "skip"] = "error"
    """``error``: a malformed row stops the run, naming file and line. ``skip``: it is dropped, and the run says how
    many and where the first was; more than a tenth of a split's rows malformed (and over 10 rows) is still an
    error, as a file read with the wrong columns or quoting would be."""
    quoting: Literal["standard", "none"] | None = None
    """CSV/TSV files. ``standard``: a field in double quotes is one field, which may hold the delimiter, line
    breaks and doubled quotes ``""`` (RFC 4180; how Excel and pandas write CSV and TSV); ``none``: quote characters
    are plain text and a field ends at the next delimiter or line break (GLUE's TSV files). Default: ``standard``
    for your own files; registered datasets read theirs as they are written."""
    encoding: str = "utf-8"
    """Text encoding of the data files: a Python codec name, e.g. ``utf-8``, ``latin-1``, ``cp1252``
    (a UTF-8 byte-order mark is dropped)."""
    languages: list[str] | None = None
    """Parallel multilingual datasets (``multilingual``, ``sst2_multilingual``): the languages to load, e.g.
    ``[en, es, tr, de]``; default all. Rows carry a ``language`` column (partition with ``by: language``)."""
    labels: list[str] | None = None
    """Classification: the labels as written in the data, in class order (the head's outputs); a row with another
    label is malformed. Default: the sorted labels of the training split, refused when one is a rare near-copy of
    another (a typo such as ``positve``) or when most values occur once (not a label column). Required with
    ``partition.method: files``, so that every client's file is read against the same classes."""
    parallel: Literal["aligned", "disjoint"] = "aligned"
    """Parallel datasets: ``aligned`` keeps every row in every language (row i of one language is the translation
    of row i of another); ``disjoint`` gives each row one language only (seeded), so no item appears twice."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        """Labels written as numbers (``[0, 1]`` in YAML) are the text of the file's label column."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"'{value}' is not a text encoding Python knows; use e.g. utf-8, latin-1 or cp1252") from None
        return value


class PartitionConfig(_Strict):
    """How the training examples are split across clients."""

    method: Literal[
        "iid", "dirichlet", "pathological", "natural", "quantity", "group_clusters", "group_iid", "group_pairs",
        "language_clusters", "language_iid", "language_multi_domain", "contiguous", "files",
    ] = "iid"
    """``iid``; ``dirichlet`` (skew over ``by``, strength ``alpha``); ``pathological`` (``classes_per_client`` values
    of ``by`` each); ``natural`` (one client per value of ``by``); ``quantity`` (power-law client sizes). Group splits
    over ``by`` (FedMLLM): ``group_clusters`` (one group per client, several clients per group), ``group_iid``
    (every client holds every group), ``group_pairs`` (client k holds groups k and k+1 mod G);
    ``language_clusters``, ``language_iid``, ``language_multi_domain`` are the same with ``by: language`` by default.
    ``contiguous``: client i holds the i-th of ``num_clients`` consecutive blocks of the rows, in file order.
    ``files``: node-local data, nothing is split: client i's examples are its own file (``files[i]``, or in a
    Flower deployment the ``data-path`` its SuperNode is started with), and ``data.name`` is the server's own data
    (only its eval split is used). Every other method splits one dataset on purpose (``data.name``)."""
    num_clients: int | None = Field(default=None, ge=1)
    """Number of clients the training examples are split across; default 8, and for ``natural`` one client per
    value of ``by``."""
    by: str = "label"
    """Column to partition over (Dirichlet, pathological, natural)."""
    alpha: float = Field(default=0.5, gt=0)
    """Dirichlet concentration: small = skewed, large = close to IID."""
    classes_per_client: int = Field(default=2, ge=1)
    """Pathological partition: number of distinct values of ``by`` per client."""
    quantity_skew: float = Field(default=1.0, gt=0)
    """Quantity-skew partition: client sizes follow a power law with this exponent (1.0 = Zipf-like)."""
    min_client_size: int = Field(default=10, ge=0)
    """Dirichlet: resample until every client has at least this many examples."""
    client_test_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of each client's shard held out as its own test shard (personalised evaluation)."""
    client_aux_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of each client's remaining training rows held out as its auxiliary split, for algorithms that
    measure its data there (FedAMoLE's routing embeddings); only those algorithms accept it."""
    server_fraction: float = Field(default=0.0, ge=0, lt=1)
    """The server's own slice of the training split, which no client holds: its first ``server_fraction`` of the
    rows, contiguous in file order (FedKDLoRA's public data); the clients split the rest. With ``method: files`` it
    is the first rows of ``data.name``'s training split, the server's own data. Only algorithms that train on the
    server use it (``fedtune algorithms``); 0: the server holds no training data."""
    files: list[str] | None = None
    """``method: files``: client i's data file (CSV/TSV/JSON/JSONL, read with ``data``'s columns), one per client,
    for the in-process engine and Flower's simulation. A deployed SuperNode reads the file of its ``data-path``
    node config instead, so the server's config need not name any client file."""

    @model_validator(mode="after")
    def _defaults(self) -> "PartitionConfig":
        if self.method.startswith("language_") and "by" not in self.model_fields_set:
            self.__dict__["by"] = "language"
        if self.files is not None and self.method != "files":
            raise ValueError(f"partition.files is for partition.method=files, not '{self.method}'; remove it")
        if self.method == "files" and self.files is not None:
            if not self.files:
                raise ValueError("partition.files is empty; give one data file per client")
            if self.num_clients is not None and self.num_clients != len(self.files):
                raise ValueError(f"partition.num_clients={self.num_clients} but partition.files names "
                                 f"{len(self.files)} files; give one file per client (or drop num_clients)")
            self.__dict__["num_clients"] = len(self.files)
        if self.method == "files" and self.num_clients is None:
            raise ValueError("partition.method=files needs partition.files (one data file per client) or, for a "
                             "Flower deployment whose SuperNodes name their own data-path, partition.num_clients")
        if self.num_clients is None and self.method != "natural":
            self.__dict__["num_clients"] = 8
        return self


class ModelConfig(_Strict):
    """The base model and the task head."""

    name: str = "minilm"
    """A packaged default (``minilm``, ``smollm2-135m``), a Hugging Face id, or a local folder."""
    task: Literal["classification", "sft"] = "classification"
    """``classification``: an encoder or decoder with a class head. ``sft``: a causal LM tuned on instructions
    (classification datasets are verbalised; see the ``sft`` section)."""
    max_length: int = Field(default=128, ge=8)
    """Inputs are truncated to this many tokens; batches are padded only to their longest member."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the base model's weights and compute."""
    finetune: FinetuneKind = "lora"
    """What the clients train and the federation moves: an adapter kind (:mod:`fedtune.models.kinds`), configured
    by the section of its name: ``lora`` (LoRA adapters and the head), ``full`` (every parameter; the run saves a
    complete model folder), ``mole`` (mixtures of LoRA experts, for ``fedamole``). Heterogeneous ranks and the
    algorithms built on LoRA factors need a factorised kind (``lora``)."""
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Store the base model's linear weights in fewer bits (bitsandbytes) and train LoRA on top, as QLoRA does
    (Dettmers et al., 2023): ``nf4`` / ``fp4`` (4 bits, per block of 64 weights a scale), ``int8`` (LLM.int8()).
    The LoRA factors, the head, the norms and the embeddings stay in full precision, so what clients send is
    unchanged. Needs ``model.finetune: lora`` and an algorithm that keeps the base frozen (not flora, florist,
    flexlora, which add their updates to the base weights). ``fedtune models`` shows the memory it saves."""
    double_quantization: bool | None = None
    """4 bits: also quantise the blocks' scales (to 8 bits, in blocks of 256), QLoRA's double quantisation:
    about 0.4 bits per weight less; default true."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """4 bits: the dtype a quantised layer dequantises its weights to and computes in; default: bfloat16 or
    float16 under ``train.precision`` bf16 or fp16, else float32."""

    @model_validator(mode="after")
    def _quantization_options(self) -> "ModelConfig":
        for key in ("double_quantization", "compute_dtype"):
            if getattr(self, key) is not None and self.quantization not in ("nf4", "fp4"):
                raise ValueError(f"model.{key} applies to 4-bit quantization (model.quantization: nf4 or fp4), not "
                                 f"'{self.quantization}'; remove it")
        return self


class SftConfig(_Strict):
    """Instruction tuning of a causal LM (``model.task: sft``)."""

    template: Literal["alpaca", "vicuna", "chat"] = "alpaca"
    """Prompt format: the Alpaca or Vicuna v1.1 text template, or ``chat``: the tokenizer's own chat template."""
    train_on_inputs: bool = False
    """Also compute the loss on prompt tokens (default: response tokens only)."""
    system_prompt: str | None = None
    """The system message of the ``chat`` template ('' for an empty one); default: the chat template's own."""

    @model_validator(mode="after")
    def _system_prompt_needs_chat(self) -> SftConfig:
        if self.system_prompt is not None and self.template != "chat":
            raise ValueError(f"sft.system_prompt applies to sft.template=chat, not '{self.template}'; remove it or use chat")
        return self


class TrainConfig(_Strict):
    """The local objective each client runs per round."""

    local_steps: int | None = Field(default=None, ge=1)
    """Optimiser steps per client per round (set this or ``local_epochs``; default 10 steps)."""
    local_epochs: float | None = Field(default=None, gt=0)
    """Passes over the client's shard per round, instead of ``local_steps``."""
    batch_size: int = Field(default=16, ge=1)
    """Examples per forward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Forward passes accumulated into one optimiser step (a step sees ``batch_size × grad_accum`` examples)."""
    lr: float = Field(default=5e-4, gt=0)
    """The clients' learning rate."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The client optimiser, fresh each round. ``sgd`` (with ``momentum``) is the client of Reddi et al.'s
    FedAdam / FedYogi / FedAdagrad: with one local step its update is the plain (clipped) gradient, so the
    server optimiser sees the round's union batch gradient."""
    momentum: float = Field(default=0.0, ge=0, lt=1)
    """Heavy-ball momentum of ``optimizer: sgd``."""
    lr_schedule: Literal["constant", "cosine", "exponential"] = "constant"
    """Across rounds: round r uses lr · s(r); cosine decays to ``min_lr_ratio`` · lr at the last round;
    exponential multiplies it by ``lr_decay`` every round, s(r) = lr_decay^(r − 1) (FedAMoLE's code)."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """``cosine``: where the learning rate ends, as a fraction of ``lr``."""
    lr_decay: float = Field(default=0.99, gt=0, le=1)
    """``exponential``: the factor from one round's learning rate to the next."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip each step's gradient to this global norm (null: no clipping)."""
    lora_plus_ratio: float | None = Field(default=None, gt=0)
    """LoRA+ (Hayou et al., ICML 2024): LoRA's B factors train at ``lora_plus_ratio × lr``, A and the rest at
    ``lr`` (the paper suggests 16). In federated runs a slowly moving A also keeps FedAvg of A and B, taken
    separately, close to the average of the clients' products B A."""
    device: str = "auto"
    """Where the model and its batches live: ``auto`` (the first CUDA GPU when there is one, else the CPU),
    ``cpu``, ``cuda`` or ``cuda:N``. Payloads, aggregation, checkpoints and the run log stay on the CPU whatever
    it is. A deployed Flower node can name its own (``--node-config "device=cuda:1"``)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32``; ``bf16`` / ``fp16``: forward and backward passes (and evaluation) run under autocast in that
    dtype while the trainable weights, the optimiser and everything sent stay fp32; fp16 with a gradient scaler
    against underflow."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory for about a
    third more compute (instruction tuning then runs every row's shared prompt prefix itself)."""
    gpu_fraction: float | None = Field(default=None, gt=0, le=1)
    """Flower simulation on a GPU: the share of one GPU each virtual client reserves (Ray's ``num_gpus``), so up
    to 1 / gpu_fraction clients train at once per GPU, each holding its own copy of the model; default 1."""

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not DEVICE_NAME.fullmatch(value):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N (e.g. cuda:1), not '{value}'")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("set only one of train.local_steps and train.local_epochs")
        if self.local_epochs is None and self.local_steps is None:
            self.__dict__["local_steps"] = 10
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("train.momentum applies to train.optimizer: sgd (AdamW keeps its own moments)")
        if self.gpu_fraction is not None and self.device == "cpu":
            raise ValueError("train.gpu_fraction shares a GPU between Flower's virtual clients, but train.device is "
                             "cpu; remove it or set train.device=cuda")
        for key, schedule in (("min_lr_ratio", "cosine"), ("lr_decay", "exponential")):
            if getattr(self, key) != type(self).model_fields[key].default and self.lr_schedule != schedule:
                raise ValueError(f"train.{key} applies to train.lr_schedule: {schedule}, not {self.lr_schedule}; "
                                 f"remove it, or set that schedule")
        return self


ATTACK_OPTIONS = {"sign_flip": ("scale",), "scale": ("scale",), "noise": ("std",), "label_flip": (),
                  "boost": ("scale",)}
"""The options each kind of ``federation.attack`` takes."""


class AttackConfig(_Strict):
    """A simulated attack, to measure defences against: the clients listed change what they send, or what they
    train on. It runs in the client half, so every runtime runs it, and is recorded in ``partition.json``,
    ``summary.json`` and the model card."""

    kind: Literal["none", "sign_flip", "scale", "noise", "label_flip", "boost"] = "none"
    """With Δ = θ − θ⁰ the attacker's honest change over its model tensors: ``sign_flip`` sends θ⁰ − scale·Δ;
    ``scale`` θ⁰ + scale·Δ; ``noise`` θ + N(0, std²) per coordinate, seeded by (run seed, round, client);
    ``label_flip`` trains on the labels C − 1 − y (classification, C classes); ``boost`` is model replacement
    (Bagdasaryan et al., AISTATS 2020): θ⁰ + γ·Δ, γ = 1 / (the attacker's expected weight share in a round × the
    expected number of attackers in it) (``scale`` sets γ instead). ``none``: no attack."""
    clients: list[int] = Field(default_factory=list)
    """The ids of the attacking clients (0 .. number of clients − 1)."""
    scale: float | None = Field(default=None, gt=0)
    """``sign_flip``: s in −s·Δ (default 1); ``scale``: s in s·Δ (required); ``boost``: γ, instead of the factor
    computed from the clients' sizes."""
    std: float | None = Field(default=None, gt=0)
    """``noise``: the standard deviation of the Gaussian noise added to every model tensor sent (required)."""

    @model_validator(mode="after")
    def _options_of_the_kind(self) -> "AttackConfig":
        given = [key for key in ("clients", "scale", "std") if getattr(self, key)]
        if self.kind == "none":
            if given:
                raise ValueError(f"federation.attack.{given[0]} describes an attack, but federation.attack.kind is "
                                 "none; set a kind (sign_flip, scale, noise, label_flip, boost) or remove it")
            return self
        for key in ("scale", "std"):
            if getattr(self, key) is not None and key not in ATTACK_OPTIONS[self.kind]:
                raise ValueError(f"federation.attack.{key} does not apply to kind={self.kind}; remove it")
        if not self.clients:
            raise ValueError(f"federation.attack.kind={self.kind} needs federation.attack.clients, the ids of the "
                             "attacking clients (e.g. [0])")
        if min(self.clients) < 0 or len(set(self.clients)) < len(self.clients):
            raise ValueError(f"federation.attack.clients must be distinct client ids ≥ 0, got {self.clients}")
        if self.kind == "scale" and self.scale is None:
            raise ValueError("federation.attack.kind=scale needs federation.attack.scale, the factor s of s·Δ")
        if self.kind == "noise" and self.std is None:
            raise ValueError("federation.attack.kind=noise needs federation.attack.std, the noise's standard deviation")
        if self.kind == "sign_flip" and self.scale is None:
            self.__dict__["scale"] = 1.0
        return self


class FederationConfig(_Strict):
    """Rounds and client sampling."""

    rounds: int = Field(default=10, ge=1)
    """Communication rounds."""
    clients_per_round: int | None = Field(default=None, ge=1)
    """Clients sampled each round; default all (or ``fraction`` of them)."""
    fraction: float | None = Field(default=None, gt=0, le=1)
    """Fraction of the clients sampled each round, instead of ``clients_per_round``."""
    sampling: Literal["fixed", "poisson"] = "fixed"
    """How a round's clients are drawn, seeded by (seed, round). ``fixed``: exactly ``clients_per_round`` (or
    ``fraction`` of them) without replacement. ``poisson``: each client joins independently with probability
    q = ``fraction`` (or ``clients_per_round`` / number of clients), so a round holds q·N clients on average and
    may hold none (a round without clients leaves the model as it is, except under the ``dp`` wrapper, which
    aggregates noise alone). Client-level differential privacy is accounted for the sampling the run does."""
    min_clients_per_round: int = Field(default=1, ge=1)
    """Fewest usable updates a round aggregates; with fewer (clients failed, were dropped or had their update
    rejected) the run stops with an error naming them (resume it with ``resume``)."""
    tolerate_client_failures: bool = False
    """A client whose own code raises (in training or evaluation), or whose update the server rejects (see
    ``max_update_ratio``), stops the run with one line naming it. ``true``: leave it out of that round and go on
    (``min_clients_per_round`` still applies). Clients that are merely unreachable or late (Flower) are always
    left out. Every client left out is listed in the run's summary and report."""
    max_update_ratio: float = Field(default=100.0, ge=0)
    """The update guard: reject an update whose change from what its client started with (the L2 norm over the
    model tensors) exceeds this many times the median change of the round's updates and the previous round's
    accepted ones (from 3 changes on). Catches a scaled or boosted update that is finite and well-formed;
    0 turns the guard off. Every update is also checked for its names, shapes, dtypes, finite values and a
    sample count within the client's rows."""
    round_timeout_s: float | None = Field(default=3600.0, gt=0)
    """Flower runtime: seconds the server waits for a round's replies (training, and evaluation); late clients
    count as missing. null: wait for every reply, however long (a node that hangs then stops the run)."""
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @model_validator(mode="after")
    def _count_or_fraction(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set only one of federation.clients_per_round and federation.fraction")
        return self


class WrapperConfig(_Strict):
    """One wrapper around the algorithm (``fedtune algorithms`` lists them, and what each can wrap)."""

    name: str
    """A wrapper's name, e.g. ``clip``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The wrapper's own options, validated by it."""


class ReducerConfig(_Strict):
    """How the algorithm takes the mean of its clients' tensors (``fedtune algorithms`` lists the reducers)."""

    name: str = "mean"
    """``mean`` (the weighted mean, folded as updates arrive), or a robust rule: ``median``, ``trimmed_mean``,
    ``krum``."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The reducer's own options (e.g. ``beta`` of ``trimmed_mean``, ``f`` and ``m`` of ``krum``)."""


class AlgorithmConfig(_Strict):
    """Which federated algorithm runs, and its own options."""

    name: str = "fedit"
    """A name from ``fedtune algorithms``: ``fedit``, ``fedadam``, ``local``, ``flora``, ..."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Algorithm-specific options, validated by the algorithm itself (``fedtune algorithms`` lists them)."""
    wrappers: list[WrapperConfig] = Field(default_factory=list)
    """Wrappers around the algorithm, innermost first (e.g. ``[{name: clip, options: {bound: median}}]``)."""
    reducer: ReducerConfig = Field(default_factory=ReducerConfig)
    """Where the algorithm takes a mean of its clients' tensors, the rule it uses."""


class EvalConfig(_Strict):
    """Evaluation of the global model on the held-out split (and of each client's model on its own test shard)."""

    enabled: bool = True
    """Switch evaluation off entirely (e.g. to time training alone)."""
    every: int = Field(default=1, ge=0)
    """Evaluate every this many rounds (0: only after the last round)."""
    batch_size: int = Field(default=64, ge=1)
    """Examples per evaluation forward pass."""
    per_client: bool = False
    """Also evaluate on every client's own test shard (always on for personalised algorithms)."""
    after_local_training: bool = False
    """The "-FT" protocol (FedIT-FT is FedIT with this on): on evaluated rounds, each of the round's clients also
    scores its model right after local training, before aggregation, on its own test shard; logged as
    ``client_ft/<metric>``, the example-weighted mean over them. Needs ``partition.client_test_fraction`` > 0."""
    metrics: list[Literal["choice", "perplexity", "rouge"]] | None = None
    """``model.task: sft`` only. ``choice``: score each candidate answer (verbalised labels); ``perplexity``:
    of the reference responses; ``rouge``: ROUGE-L F1 of greedy generations. Default: choice where the data has
    candidate answers, perplexity always."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Generation (``rouge``): tokens generated per example, greedily."""


class DpSgdConfig(_Strict):
    """Record-level DP-SGD inside every client (Abadi et al., CCS 2016): each local step draws every training row
    of the client with probability q = ``train.batch_size`` / n_i (Poisson sampling), clips each row's gradient of
    the trainable tensors to norm C, adds N(0, σ²C²) to their sum and divides by the expected batch size q·n_i."""

    enabled: bool = False
    """Train every client with DP-SGD (record-level differential privacy)."""
    clip: float = Field(default=1.0, gt=0)
    """C: the largest L2 norm of one row's gradient (over every trainable tensor)."""
    noise_multiplier: float | None = Field(default=None, ge=0)
    """σ: the noise's standard deviation in units of C. null: calibrated per client to
    ``privacy.target_epsilon`` (``privacy.on_target: calibrate``)."""


class PrivacyConfig(_Strict):
    """Differential privacy: the ε a run reaches at ``delta``, for the unit its mechanism protects — one client
    (the ``dp`` wrapper in ``algorithm.wrappers``) or one training row of a client (``dp_sgd``)."""

    delta: float = Field(default=1e-5, gt=0, lt=1)
    """δ of the (ε, δ) guarantee. Keep it well below 1 / (the number of units protected): below 1/N for client-
    level DP over N clients, below 1/n_i for record-level DP over a client's n_i rows (the run says so when not)."""
    target_epsilon: float | None = Field(default=None, gt=0)
    """The ε the run must not exceed (null: none; ε is still reported after every round)."""
    on_target: Literal["stop", "calibrate"] = "stop"
    """With ``target_epsilon``: ``stop`` ends the run before the round that would take ε past it; ``calibrate``
    chooses the noise multiplier before the run (the ``dp`` wrapper's z, or each client's DP-SGD σ_i) as the
    smallest with which the planned rounds reach at most ``target_epsilon`` (then leave the noise multiplier
    unset)."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """Google's dp-accounting: ``rdp`` (Rényi DP; any sampling) or ``pld`` (privacy loss distributions: tighter,
    for Poisson sampling only)."""
    dp_sgd: DpSgdConfig = Field(default_factory=DpSgdConfig)
    """Record-level DP-SGD inside every client (``enabled``)."""
    reproducible_noise: bool = False
    """Draw the DP noise and samples from the run's seed, so that two runs of one config agree bit for bit
    (tests, benchmarks). The seed is in config.yaml: anyone who knows it can regenerate the noise and remove it,
    so the run's ε holds against no one who has the config; every report of its privacy says so, and a deployed
    node refuses it. Default: each party draws them from a secret key of its own (OS CSPRNG) that never leaves
    it (:mod:`fedtune.dp_noise`)."""

    @model_validator(mode="after")
    def _calibrate_what(self) -> "PrivacyConfig":
        if self.on_target == "calibrate" and self.target_epsilon is None:
            raise ValueError("privacy.on_target=calibrate chooses the noise for privacy.target_epsilon; set it")
        if self.dp_sgd.enabled:
            sigma = self.dp_sgd.noise_multiplier
            if sigma is None and self.on_target != "calibrate":
                raise ValueError("privacy.dp_sgd needs noise_multiplier (σ), or privacy.target_epsilon with "
                                 "privacy.on_target: calibrate to choose it")
            if sigma is not None and self.on_target == "calibrate":
                raise ValueError("privacy.on_target=calibrate chooses privacy.dp_sgd.noise_multiplier; remove it, or "
                                 "set privacy.on_target: stop")
        return self


class LogConfig(_Strict):
    """Where a run's metrics go besides ``metrics.jsonl``."""

    tensorboard: bool = False
    """Also write every numeric metric of each round as TensorBoard scalars (step = round) under
    ``<run dir>/tensorboard/`` (needs ``pip install tensorboard``; view with ``tensorboard --logdir runs``)."""


class _RunHead(_Strict):
    """The first sections of a run's config; the adapter kinds' sections follow (:class:`RunConfig`)."""

    name: str = "run"
    """The run's folder name: it is written to ``output_dir/name`` (one folder name: no ``/``, not ``..``)."""
    output_dir: Path = Path("runs")
    """Where run folders go."""
    seed: int = 0
    """Seeds data subsets, the partition, initialisation, client sampling and every client's steps."""
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise ValueError(f"name {name!r} must be one folder name inside output_dir (no '/', not '.' or '..')")
        return name


_RunWithKinds = create_model(
    "_RunWithKinds", __base__=_RunHead, __module__=__name__,
    **{name: (kind.Options, Field(default_factory=kind.Options, description=kind.Options.__doc__))
       for name, kind in KINDS.items() if kind.Options is not None})
"""The run config up to the adapter kinds' own sections, one per kind that has options, named as the kind."""


class RunConfig(_RunWithKinds):
    """Everything that defines a run: the sections of :class:`_RunHead`, a section per adapter kind with options
    (``lora``, ``mole``, ...: :mod:`fedtune.models.kinds`), then these."""

    sft: SftConfig = Field(default_factory=SftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads; default: all cores. On a loaded machine, set the cores you can have (e.g. 1).
    Flower simulation: each virtual client reserves this many CPUs (default 1)."""

    @model_validator(mode="after")
    def _adapter_sections_apply(self) -> "RunConfig":
        """An adapter kind's section (``lora.*``, ``mole.*``, ...) configures that kind of ``model.finetune`` only:
        a setting of another kind's section would be ignored (a resolved config, with every default written,
        passes)."""
        finetune = KINDS[self.model.finetune]
        for section, kind in KINDS.items():
            if kind is finetune or kind.Options is None:
                continue
            held, default = getattr(self, section), kind.Options()
            changed = [f"{section}.{k}" for k in kind.Options.model_fields
                       if k not in kind.checked_by_run and getattr(held, k) != getattr(default, k)]
            if changed:
                other = f"; {finetune.owner} own are under {finetune.name}.*" if finetune.Options is not None else ""
                one = len(changed) == 1
                raise ValueError(f"{', '.join(changed)} {'is a setting' if one else 'are settings'} of "
                                 f"{kind.section_title} (model.finetune: {section}), but this run fine-tunes "
                                 f"{finetune.name}{other}; remove {'it' if one else 'them'}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FedtuneError(f"config file not found: {path} (give the path to a .yaml or .toml file)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise FedtuneError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        detail = " ".join(str(e).split())
        raise FedtuneError(f"config file {path} is not valid {path.suffix[1:].upper()}: {detail}") from None
    if not isinstance(data, dict):
        raise FedtuneError(f"config file {path} must hold a mapping of sections (data, model, lora, ...)")
    return data


def _model_at(path: list[str], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root or RunConfig
    for key in path:
        if model is None or key not in model.model_fields:
            return None
        ann = model.model_fields[key].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _is_list_field(parts: list[str]) -> bool:
    parent = _model_at(parts[:-1])
    if parent is None or parts[-1] not in parent.model_fields:
        return False
    ann = parent.model_fields[parts[-1]].annotation
    return any(get_origin(a) is list for a in (ann, *get_args(ann)))


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``8``, ``0.5``, ``[q, v]``).

    A list field given a single value (``-o lora.target_modules=q,v``) is an error that shows the list syntax.
    """
    if "=" not in override:
        raise FedtuneError(f"override '{override}' must look like key.path=value, e.g. -o lora.r=16")
    key, _, raw = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise FedtuneError(f"override '{override}' has an empty key; use e.g. -o lora.r=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, list) and _is_list_field(parts):
        where = ".".join(parts)
        raise FedtuneError(f"{where} is a list: write -o {where}=[{raw.strip()}]")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise FedtuneError(f"override '{override}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def explain(err: ValidationError, root: type[BaseModel] | None = None, prefix: str = "") -> str:
    """Pydantic's report on ``root`` (default: RunConfig) as one line, a clause per problem; an unknown key gets
    "did you mean" and the valid keys. ``prefix`` is where ``root`` sits in the config (e.g. ``algorithm.options``)."""
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        where = ".".join([prefix, *loc] if prefix else loc) or "config"
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1], root)
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{where}'{hint} (valid keys here: {', '.join(valid) or 'none'})")
        elif not loc and e["type"] == "value_error":  # a rule across sections: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{where}': {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return "; ".join(lines)


def _explain(err: ValidationError) -> str:
    return "invalid config: " + explain(err)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a config file (or the defaults when ``path`` is None), apply overrides, validate."""
    data = _read_file(Path(path)) if path is not None else {}
    for o in overrides or []:
        apply_override(data, o)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise FedtuneError(_explain(e)) from None


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


RESULT_NEUTRAL = ("threads", "output_dir", "name")
"""Keys that do not change what a run computes (threads, where it is written): a resume may change them."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}}`` → ``{"a.b": 1}`` (an empty mapping has no keys)."""
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def yaml_flow(value: Any) -> str:
    """``value`` as one line of YAML (``8``, ``[q, v]``, ``null``, ``'yes'``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("...\n").strip()


def differences(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = RESULT_NEUTRAL) -> list[str]:
    """The keys where two config dicts differ, as ``lora.r: 8 in the run, 16 now`` (``ignore``d top-level keys
    and their sub-keys left out)."""
    a, b = _flat(saved), _flat(now)
    missing = object()
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        if key.split(".")[0] in ignore or a.get(key, missing) == b.get(key, missing):
            continue
        old = yaml_flow(a[key]) if key in a else "not set"
        new = yaml_flow(b[key]) if key in b else "not set"
        out.append(f"{key}: {old} in the run, {new} now")
    return out
