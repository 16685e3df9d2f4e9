"""The configuration of a run: pydantic models, loaded from YAML or TOML.

A run is fully described by :class:`RunConfig`. Files are validated strictly
(an unknown key is an error naming the valid ones), ``-o key.path=value``
overrides are applied before validation, and the resolved config is written
into the run directory so every run can be repeated exactly.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.errors import FedtuneError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    eval_split: str | None = None
    """Held-out split for global evaluation; default: the dataset's own dev/test split."""
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    """For a dataset without an eval split (a single file): this share of the training rows is held out as
    the eval split (seeded by the run seed; stratified by label for classification); 0: no evaluation."""
    max_train_examples: int | None = Field(default=None, ge=1)
    """Use a seeded random subset of the training split of at most this size."""
    max_eval_examples: int | None = Field(default=None, ge=1)
    tasks: list[str] | None = None
    """``name: multitask`` only: the datasets to mix (e.g. ``[sst2, snli, alpaca_en]``), each turned into
    instructions; rows carry a ``task`` column (partition with ``by: task``). ``max_*_examples`` apply per task."""
    on_malformed: Literal["error", "skip"] = "error"
    """``error``: a malformed row stops the run, naming file and line. ``skip``: it is dropped and counted in the run log."""


class PartitionConfig(_Strict):
    """How the training examples are split across clients."""

    method: Literal["iid", "dirichlet", "pathological", "natural", "quantity"] = "iid"
    num_clients: int | None = Field(default=None, ge=1)
    """Default 8; for ``natural``, one client per value of ``by``."""
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

    @model_validator(mode="after")
    def _default_clients(self) -> PartitionConfig:
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


class RankTier(_Strict):
    clients: int = Field(ge=1)
    rank: int = Field(ge=1)


class LoraConfig(_Strict):
    """LoRA adapters (peft): W + (alpha / r) · B A on each target module."""

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    """Module names to adapt; default: the attention projections of the architecture."""
    train_head: bool = True
    """Train (and federate) the task head, e.g. the classifier of a classification model."""
    client_ranks: list[int] | None = None
    """Heterogeneous ranks: client i trains rank ``client_ranks[i]`` (one entry per client). Every client keeps
    the scale alpha / r, so ranks change capacity, not step size."""
    rank_tiers: list[RankTier] | None = None
    """Heterogeneous ranks by client index, e.g. ``[{clients: 10, rank: 64}, {clients: 90, rank: 4}]``:
    the first 10 clients train rank 64, the rest rank 4. Set this or ``client_ranks``."""

    @model_validator(mode="after")
    def _ranks_or_tiers(self) -> "LoraConfig":
        if self.client_ranks is not None and self.rank_tiers is not None:
            raise ValueError("set only one of lora.client_ranks and lora.rank_tiers")
        if self.client_ranks is not None and (not self.client_ranks or min(self.client_ranks) < 1):
            raise ValueError("lora.client_ranks must be a non-empty list of positive ranks")
        return self

    def ranks(self, num_clients: int | None) -> list[int] | None:
        """Each client's rank, or None when every client trains rank ``r`` (``num_clients`` None: not checked)."""
        if self.rank_tiers is not None:
            ranks = [t.rank for t in self.rank_tiers for _ in range(t.clients)]
        elif self.client_ranks is not None:
            ranks = list(self.client_ranks)
        else:
            return None
        if num_clients is not None and len(ranks) != num_clients:
            what = "lora.rank_tiers cover" if self.rank_tiers is not None else "lora.client_ranks has"
            raise FedtuneError(f"{what} {len(ranks)} clients but partition.num_clients is {num_clients}; "
                               "give one rank per client")
        return ranks


class TrainConfig(_Strict):
    """The local objective each client runs per round."""

    local_steps: int | None = Field(default=None, ge=1)
    """Optimiser steps per client per round (set this or ``local_epochs``; default 10 steps)."""
    local_epochs: float | None = Field(default=None, gt=0)
    """Passes over the client's shard per round, instead of ``local_steps``."""
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The client optimiser, fresh each round. ``sgd`` (with ``momentum``) is the client of Reddi et al.'s
    FedAdam / FedYogi / FedAdagrad: with one local step its update is the plain (clipped) gradient, so the
    server optimiser sees the round's union batch gradient."""
    momentum: float = Field(default=0.0, ge=0, lt=1)
    """Heavy-ball momentum of ``optimizer: sgd``."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Across rounds: round r uses lr · s(r); cosine decays to ``min_lr_ratio`` · lr at the last round."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    lora_plus_ratio: float | None = Field(default=None, gt=0)
    """LoRA+ (Hayou et al., ICML 2024): LoRA's B factors train at ``lora_plus_ratio × lr``, A and the rest at
    ``lr`` (the paper suggests 16). In federated runs a slowly moving A also keeps FedAvg of A and B, taken
    separately, close to the average of the clients' products B A."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("set only one of train.local_steps and train.local_epochs")
        if self.local_epochs is None and self.local_steps is None:
            self.__dict__["local_steps"] = 10
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("train.momentum applies to train.optimizer: sgd (AdamW keeps its own moments)")
        return self


class FederationConfig(_Strict):
    """Rounds and client sampling."""

    rounds: int = Field(default=10, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)
    """Clients sampled each round; default all (or ``fraction`` of them)."""
    fraction: float | None = Field(default=None, gt=0, le=1)
    min_clients_per_round: int = Field(default=1, ge=1)
    """Fewest usable updates a round aggregates; with fewer (clients failed, timed out or sent
    non-finite tensors) the run stops with an error naming them (resume it with ``resume``)."""
    round_timeout_s: float | None = Field(default=None, gt=0)
    """Flower runtime: seconds the server waits for a round's replies; late clients count as missing.
    None: wait for every reply. (In-process clients run synchronously and are never late.)"""

    @model_validator(mode="after")
    def _count_or_fraction(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set only one of federation.clients_per_round and federation.fraction")
        return self


class AlgorithmConfig(_Strict):
    """Which federated algorithm runs, and its own options."""

    name: str = "fedit"
    """``fedit``, ``local``, ``centralized`` (see ``fedtune algorithms``)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Algorithm-specific options, validated by the algorithm itself."""


class EvalConfig(_Strict):
    enabled: bool = True
    """Switch evaluation off entirely (e.g. to time training alone)."""
    every: int = Field(default=1, ge=0)
    """Evaluate every this many rounds (0: only after the last round)."""
    batch_size: int = Field(default=64, ge=1)
    per_client: bool = False
    """Also evaluate on every client's own test shard (always on for personalised algorithms)."""
    metrics: list[Literal["choice", "perplexity", "rouge"]] | None = None
    """``model.task: sft`` only. ``choice``: score each candidate answer (verbalised labels); ``perplexity``:
    of the reference responses; ``rouge``: ROUGE-L F1 of greedy generations. Default: choice where the data has
    candidate answers, perplexity always."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Generation (``rouge``): tokens generated per example, greedily."""


class RunConfig(_Strict):
    """Everything that defines a run."""

    name: str = "run"
    output_dir: Path = Path("runs")
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads; default: all cores."""

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


def _model_at(path: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = RunConfig
    for key in path:
        if model is None or key not in model.model_fields:
            return None
        ann = model.model_fields[key].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``8``, ``0.5``, ``[q, v]``)."""
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
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise FedtuneError(f"override '{override}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, naming valid keys for typos."""
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        where = ".".join(loc) or "config"
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{where}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"'{where}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


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
