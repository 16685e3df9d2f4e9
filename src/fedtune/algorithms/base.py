"""The algorithm seam: what every federated method implements, and what a runtime moves.

A round, whatever the runtime::

    client_ids = algo.participants(rnd, sampled)               # server
    payloads = algo.configure(rnd, client_ids, state)
    for each client i:                                         # client (anywhere)
        algo.prepare(ctx_i, payloads[i])                       #   payload → model
        local steps of  algo.loss(ctx, batch, outputs)         #   + algo.after_step(ctx)
        update_i = algo.update(ctx_i)                          #   model → update
    state = algo.aggregate(rnd, updates, state)                # server

:class:`Payload` and :class:`ClientUpdate` are named tensors plus plain
scalars, so a runtime can ship them without knowing the algorithm and count
their bytes exactly. Client-side state that must survive between rounds
(personal adapters, control variates) lives in ``ctx.state`` as tensors; the
runtime keeps it (in memory, or in a Flower node's context).

Heterogeneous ranks (:class:`LoraSetup`): the model carries LoRA of the
largest client rank; client i sends and receives factors of its own rank r_i,
which the default hooks cut and zero-pad (:func:`fit_lora_rank`), so every
algorithm runs with mixed ranks.

Several models (:attr:`ServerState.models`, e.g. one per cluster): the
algorithm decides which model each client trains from (``configure``), is
evaluated with (:meth:`Algorithm.configure_evaluate`) and which are scored on
the held-out split (:meth:`Algorithm.evaluation_models`); the run saves every
model the state ends with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedtune.aggregation import Tensors
from fedtune.config import TrainConfig, explain
from fedtune.device import model_device
from fedtune.errors import FedtuneError
from fedtune.models.kinds import kinds_with
from fedtune.models.lora import MERGED, fit_lora_rank, load_state, trainable_state
from fedtune.reducers import Mean, Reducer
from fedtune.server_context import ServerContext

Scalar = int | float | str | bool


@dataclass
class Payload:
    """Server → one client: tensors to load and a small config."""

    tensors: Tensors = field(default_factory=dict)
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One client → server after local training."""

    client_id: int
    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Expected:
    """What one tensor of a client's update must be (:meth:`Algorithm.expected_update`): the server rejects an
    update with a missing or extra name, another shape, another kind of dtype, or a non-finite value."""

    shape: tuple[int, ...]
    start: torch.Tensor | None = None
    """A model tensor: the value the client started its round from (its change is measured from it). None: a
    side channel (a control variate, routing embeddings), which is checked but not part of the model."""
    integer: bool = False
    """An integer tensor (e.g. expert ids); otherwise a real floating-point one (complex is never accepted)."""
    equals: torch.Tensor | None = None
    """Its exact value, where the server knows it (e.g. the ids of the experts it sent)."""

    @property
    def is_model(self) -> bool:
        return self.start is not None


@dataclass
class ServerState:
    """The server's state after a round: ``global_tensors`` is the model that is evaluated and saved.

    ``global_tensors`` may hold ``merged/<W>`` entries: dense updates added to the
    frozen base weights W (see :func:`~fedtune.models.lora.load_state`).
    ``metrics`` are logged in the round's row (e.g. the ranks an aggregation kept).
    """

    round: int
    global_tensors: Tensors
    extra: Tensors = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Tensors] = field(default_factory=dict)
    """Several models at once (e.g. one per cluster), by name; empty: ``global_tensors`` is the only model."""
    assignment: dict[int, str] = field(default_factory=dict)
    """Client id → the name of its model in ``models`` (clients not listed use ``global_tensors``)."""

    def model_of(self, client_id: int) -> Tensors:
        """The model client ``client_id`` belongs to."""
        name = self.assignment.get(client_id)
        return self.global_tensors if name is None else self.models[name]


@dataclass(frozen=True)
class LoraSetup:
    """What algorithms know of the adapters: the scale s = alpha / r, and each client's rank."""

    scale: float = 1.0
    client_ranks: tuple[int, ...] | None = None
    """Rank r_i of client i; None: every client trains the model's rank."""

    def rank(self, client_id: int) -> int | None:
        return None if self.client_ranks is None else self.client_ranks[client_id]

    @property
    def max_rank(self) -> int | None:
        return None if self.client_ranks is None else max(self.client_ranks)


@dataclass
class ClientContext:
    """What the client half of an algorithm sees during one round."""

    client_id: int
    round: int
    model: torch.nn.Module
    initial: Tensors
    """The trainable tensors at initialisation (identical on every client: same seed)."""
    state: Tensors
    """Persistent per-client tensors, kept by the runtime between rounds."""
    base: Tensors = field(default_factory=dict)
    """The frozen base weights of the adapted modules, as loaded (only for ``uses_base_weights`` algorithms)."""
    payload: Payload = field(default_factory=Payload)
    """What the client received this round."""
    start: Tensors = field(default_factory=dict)
    """The trainable tensors the client starts the round from (after :meth:`Algorithm.prepare`; model shape)."""
    lr: float = 0.0
    """The round's learning rate."""
    steps: int = 0
    """The optimiser steps of this round's local training."""
    num_examples: int = 0
    train_loss: float = float("nan")
    examples: Any = None
    """The client's tokenised examples (:class:`~fedtune.training.Encoded`; rows ``aux`` are its auxiliary split)."""
    aux: Any = None
    """The rows of ``examples`` in the client's auxiliary split (``uses_aux_split`` algorithms)."""
    forward: Any = None
    """The forward pass of the run's task on ``model`` (:attr:`~fedtune.experiment.Experiment.forward`: outputs
    carry ``.loss``), for algorithms that score the model themselves."""
    secrets: Tensors = field(default_factory=dict)
    """The client's secrets (its DP key, :mod:`fedtune.dp_noise`): kept by the runtime beside ``state``, never
    handed on, and not part of the algorithm's state."""
    _on_device: dict[str, Tensors] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the model computes; every tensor of the context (payload, state, start, ...) is on the CPU."""
        return model_device(self.model)

    def on_device(self, key: str, tensors: Callable[[], Tensors]) -> Tensors:
        """The tensors ``tensors()`` makes, on the model's device, for math on live parameters (e.g. a proximal
        term each step): made and moved once per round under ``key``, then reused. They must not change while
        the round trains; on the CPU they are the tensors themselves."""
        if key not in self._on_device:
            device = self.device
            self._on_device[key] = {n: t.to(device) for n, t in tensors().items()}
        return self._on_device[key]


class NoOptions(BaseModel):
    """An algorithm's options: a pydantic model whose field docstrings say what each option means."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True)
class RunFacts:
    """What a run tells its algorithm, once, before the first round (:meth:`Algorithm.bind`); wrappers pass
    the same facts on to what they wrap."""

    seed: int = 0
    """The run's seed, for the server's own random choices."""
    rounds: int | None = None
    """``federation.rounds``, for server-side schedules."""
    num_clients: int | None = None
    """How many clients the federation has."""
    clients_per_round: int | None = None
    """How many clients each round samples (with Poisson sampling: the nearest whole number to q·N)."""
    sampling_rate: float | None = None
    """``federation.sampling: poisson``: the probability q with which each client joins a round; None: each round
    samples exactly ``clients_per_round``."""
    noise_seed: int | None = None
    """``privacy.reproducible_noise``: the run's seed, from which DP noise is then drawn (tests, benchmarks; no
    guarantee against whoever knows it); None: each party draws a secret key (:mod:`fedtune.dp_noise`)."""
    client_groups: tuple[str, ...] | None = None
    """Each client's group (the most frequent value of ``partition.by`` in its shard) when the partition is over
    a column; reference variants (e.g. oracle clusters) and agreement scores use it."""


@dataclass(frozen=True)
class Rule:
    """One thing an algorithm needs of the rest of the config: the text ``fedtune algorithms`` shows
    (``requires``; None: not shown) and the check a run makes (``broken``: the one-line error, or None)."""

    requires: str | None
    broken: Callable[[Any], str | None] = lambda cfg: None


class Algorithm(ABC):
    """Base class: FedAvg-style defaults that subclasses override hook by hook; ``aggregate`` is theirs to define.

    Capabilities (``personalized``, ``pools_data``, ``uses_base_weights``, ``adapters``, ``uses_aux_split``,
    ``trains_on_server``, ...) are declared on the class and read from the instance, so a wrapper
    (:class:`~fedtune.algorithms.wrapper.Wrapper`) answers for the algorithm it wraps.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    options_key: ClassVar[str] = "algorithm.options"
    """Where the config holds this algorithm's options (for its errors)."""
    requires: ClassVar[str] = ""
    """What the algorithm is meant for, beyond what its flags and :meth:`extra_rules` imply (shown by
    ``fedtune algorithms``; advice, not checked)."""
    personalized: ClassVar[bool] = False
    """Each client ends with its own model: evaluate per client, on its own test shard."""
    pools_data: ClassVar[bool] = False
    """Train on the union of all shards as one client (the centralized reference)."""
    uses_base_weights: ClassVar[bool] = False
    """The global model holds ``merged/`` updates of the base weights, so clients reset them each round."""
    adapters: ClassVar[tuple[str, ...]] = kinds_with("averaged")
    """The kinds of fine-tuning (``model.finetune``) the algorithm federates, by their capabilities
    (:mod:`fedtune.models.kinds`): every averaged kind; methods on LoRA factors, the factorised ones."""
    uses_aux_split: ClassVar[bool] = False
    """The client half reads the client's auxiliary split (``partition.client_aux_fraction``, :attr:`ClientContext.aux`)."""
    trains_on_server: ClassVar[bool] = False
    """The algorithm trains on the server's own data (``partition.server_fraction``): the round loop hands it
    the run's :class:`~fedtune.server_context.ServerContext` once, before the first round (:meth:`setup_server`)."""
    sends_model: ClassVar[bool] = True
    """Its clients send model tensors (LocalOnly's send nothing)."""
    combines_factors: ClassVar[bool] = False
    """Its aggregate combines LoRA factors by stacking or SVD (not a mean of each tensor): a robust
    ``algorithm.reducer`` has no meaning there."""
    mean_of_changes: ClassVar[bool] = False
    """Its aggregate depends on the round's updates only through the mean of the clients' model tensors, every
    client having started from the one global model (FedIT, FedProx, the server optimisers, FedKD's student),
    so the mean of one update θ⁰ + Δ̄ stands for it: client-level differential privacy (the ``dp`` wrapper)
    replaces Δ̄ by a noised mean of clipped changes."""
    aggregates_empty_round: ClassVar[bool] = False
    """It aggregates a round whose sampling drew no client (Poisson sampling), e.g. noise alone; otherwise
    such a round leaves the server state as it is."""
    loss_reads_batch: ClassVar[bool] = False
    """Its :meth:`loss` adds to the task loss a term of the batch (e.g. a routing balance over the batch's
    tokens), not of the parameters alone: record-level DP-SGD, which privatises each row's task loss, refuses it."""

    def __init__(self, options: dict[str, Any] | None = None, lora: LoraSetup | None = None):
        self.lora = lora or LoraSetup()
        self.reducer: Reducer = Mean()
        """The rule :meth:`reduce` applies (``algorithm.reducer``)."""
        self.facts = RunFacts()
        """The run's facts (:meth:`bind`); defaults outside a run."""
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as e:
            raise FedtuneError(
                f"invalid {self.options_key} for '{self.name}': {explain(e, self.Options, self.options_key)}"
            ) from None

    @classmethod
    def create(cls, options: dict[str, Any] | None = None, lora: LoraSetup | None = None) -> Algorithm:
        """The algorithm for ``options``: this class, or the variant of it that an option selects."""
        return cls(options, lora)

    def bind(self, facts: RunFacts) -> Algorithm:
        """Take the run's facts, once, when they are known (the partition drawn); returns the algorithm."""
        self.facts = facts
        return self

    @property
    def label(self) -> str:
        """What the run calls this algorithm: its name, and with wrappers, theirs (``fedadam+clip``)."""
        return self.name

    @property
    def seed(self) -> int:
        return self.facts.seed

    @property
    def rounds(self) -> int | None:
        return self.facts.rounds

    @property
    def num_clients(self) -> int | None:
        return self.facts.num_clients

    @property
    def client_groups(self) -> tuple[str, ...] | None:
        return self.facts.client_groups

    # ------------------------------------------------------------------ what the algorithm needs of a run
    def rules(self) -> list[Rule]:
        """Everything this algorithm needs of the rest of the config: implied by its capabilities, then
        :meth:`extra_rules`. ``fedtune algorithms`` prints their text; a run checks each (:meth:`check`)."""
        name = self.name
        kinds = " or ".join(self.adapters)
        rules = [Rule(None if self.adapters == Algorithm.adapters else f"model.finetune: {kinds}",
                      lambda cfg: None if cfg.model.finetune in self.adapters else (
                          f"algorithm '{name}' federates model.finetune={kinds}, not {cfg.model.finetune}; set "
                          f"model.finetune={self.adapters[0]}, or choose an algorithm for {cfg.model.finetune} "
                          "(fedtune algorithms lists what each requires)"))]
        if self.personalized:
            rules.append(Rule("partition.client_test_fraction > 0 (each client is evaluated on its own test shard)",
                              lambda cfg: None if cfg.partition.client_test_fraction > 0 else (
                                  f"algorithm '{name}' is evaluated on each client's own test shard; set "
                                  "partition.client_test_fraction (e.g. 0.2)")))
        if self.pools_data:
            rules.append(Rule("one rank for all (no lora.client_ranks / rank_tiers)",
                              lambda cfg: None if not cfg.lora.ranks(cfg.partition.num_clients) else (
                                  f"algorithm '{name}' trains one pooled model; remove lora.client_ranks / "
                                  "rank_tiers")))
        if self.trains_on_server:
            rules.append(Rule("partition.server_fraction > 0 (the server's own data)",
                              lambda cfg: None if cfg.partition.server_fraction > 0 else (
                                  f"algorithm '{name}' trains on the server's own data; set partition.server_fraction "
                                  "(e.g. 0.2) to give the server a slice no client holds")))
        aux = self.uses_aux_split
        rules.append(Rule("partition.client_aux_fraction > 0 (each client's auxiliary split)" if aux else None,
                          lambda cfg: None if (cfg.partition.client_aux_fraction > 0) == aux else (
                              f"algorithm '{name}' measures routing on each client's auxiliary split: set "
                              "partition.client_aux_fraction (e.g. 0.1)" if aux else
                              "partition.client_aux_fraction holds out rows that algorithm "
                              f"'{name}' never reads; remove it")))
        if self.combines_factors:
            rules.append(Rule(None, lambda cfg: None if cfg.algorithm.reducer.name == "mean" else (
                f"algorithm.reducer={cfg.algorithm.reducer.name}: '{name}' combines the clients' LoRA factors by "
                "stacking or SVD, where a coordinate-wise rule has no meaning; keep the mean, or use fedit (zero "
                "padding) or ffa for a robust rule over mixed ranks")))
        rules += self.extra_rules()
        if self.requires:
            rules.append(Rule(self.requires))
        return rules

    def extra_rules(self) -> list[Rule]:
        """Rules of this algorithm beyond its capabilities (e.g. one LoRA rank for every client)."""
        return []

    def requirements(self) -> str:
        """What the rest of the config must hold for this algorithm, as ``fedtune algorithms`` shows it."""
        return "; ".join(r.requires for r in self.rules() if r.requires)

    def check(self, cfg: Any) -> None:
        """Raise the first of :meth:`rules` that ``cfg`` (a :class:`~fedtune.config.RunConfig`) breaks, as its
        one-line error."""
        for rule in self.rules():
            why = rule.broken(cfg)
            if why:
                raise FedtuneError(why)

    def advice(self, train: TrainConfig) -> list[str]:
        """Lines to show before a run: valid combinations with the clients' ``train`` config that are rarely meant."""
        return []

    # ------------------------------------------------------------------ server side
    def reduce(self, items) -> Tensors:
        """Where the algorithm takes a mean: ``items`` are ``(client, tensors, weight)``, taken in one pass, and
        the run's reducer (:mod:`fedtune.reducers`: the folded weighted mean, or a robust rule) reduces them."""
        return self.reducer.reduce(items)

    def setup_server(self, server: ServerContext) -> None:
        """``trains_on_server`` algorithms: receive the run's server context, once, before :meth:`init` (or before
        the first round of a resumed run)."""

    def evaluate_on_server(self, state: ServerState) -> dict[str, dict[str, float]]:
        """Models of the server's own (e.g. a teacher that never leaves it) scored on the eval split, by name:
        logged as ``eval/<name>/<metric>`` in every evaluated round. Default: none."""
        return {}

    def init(self, initial: Tensors) -> ServerState:
        return ServerState(round=0, global_tensors={k: v.clone() for k, v in initial.items()})

    def decisions(self, rnd: int, metrics: dict[str, Any]) -> list[str]:
        """Lines for the run's console on what round ``rnd``'s aggregation decided (e.g. the clusters it formed),
        from the ``metrics`` of the state it returned; default: none."""
        return []

    def participants(self, rnd: int, sampled: list[int]) -> list[int]:
        """The clients that train in round ``rnd``; default: the ones the run sampled."""
        return sampled

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        """Default: every sampled client receives the global tensors (LoRA factors at its own rank)."""
        return {cid: Payload(tensors=self.at_client_rank(cid, state.global_tensors)) for cid in client_ids}

    @abstractmethod
    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        """The new server state from the round's usable updates: an iterable taken in one pass, each update
        arriving as its client's reply does (on the in-process engine, as the client finishes training), so an
        aggregate that folds them (:meth:`reduce` with the mean) holds a constant number of updates whatever
        the number of clients; one that needs them all makes a list."""

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        """What client ``client_id``'s update must hold, having received ``payload`` in a round that started
        from ``state``: name → :class:`Expected`. The server checks every update against it before aggregating.

        Default (the update is the client's trainable tensors): the model the client belongs to (without
        ``merged/`` base-weight updates) at the client's rank, each starting from what the payload sent under
        that name, else from the model's own tensor (e.g. LoRA restarted from its initialisation).
        """
        model = self.at_client_rank(client_id, {k: v for k, v in state.model_of(client_id).items()
                                                if not k.startswith(MERGED)})
        return {n: Expected(tuple(t.shape), start=payload.tensors.get(n, t)) for n, t in model.items()}

    def configure_evaluate(self, client_ids: list[int], state: ServerState) -> dict[int, Tensors]:
        """The model each client is evaluated with on its own test shard; default: the model it belongs to
        (:meth:`ServerState.model_of`). Personalised algorithms answer with :meth:`personal_tensors` on the
        client instead, so their clients receive nothing to evaluate."""
        if self.personalized:
            return {cid: {} for cid in client_ids}
        return {cid: state.model_of(cid) for cid in client_ids}

    def evaluation_models(self, state: ServerState) -> dict[str, Tensors]:
        """The models scored on the run's held-out split, by name: ``""`` logs ``eval/<metric>``, any other name
        ``eval/<name>/<metric>``. Default: the global model, or each of ``state.models``."""
        return dict(state.models) if state.models else {"": state.global_tensors}

    def evaluation_weights(self, state: ServerState) -> dict[str, float]:
        """Weights w of some of :meth:`evaluation_models`' models: their mean Σ w·m / Σ w of each metric m is logged
        as ``eval/<metric>`` (e.g. each client's own model, weighted by its data). Default: none."""
        return {}

    # ------------------------------------------------------------------ client side
    def prepare(self, ctx: ClientContext, payload: Payload) -> None:
        """Default: load the received tensors into the model."""
        self.load(ctx, payload.tensors)

    def loss(self, ctx: ClientContext, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        """The local objective; default: the model's own task loss. Anything added to ``outputs.loss`` is a term
        of the parameters alone, unless the algorithm declares :attr:`loss_reads_batch`."""
        return outputs.loss

    def after_step(self, ctx: ClientContext) -> None:
        """Called after each optimiser step (e.g. a control-variate correction)."""

    def update(self, ctx: ClientContext) -> ClientUpdate:
        """Default: send back all trainable tensors (LoRA factors at the client's rank)."""
        return ClientUpdate(ctx.client_id, self.at_client_rank(ctx.client_id, trainable_state(ctx.model)),
                            ctx.num_examples)

    def personal_tensors(self, ctx: ClientContext) -> Tensors | None:
        """The client's own model for per-client evaluation; None: it uses the global model (``ctx.payload``: what
        :meth:`configure_evaluate` sent it). What it writes into ``ctx.state`` is kept, on every runtime."""
        return None

    # ------------------------------------------------------------------ ranks
    def at_client_rank(self, client_id: int, tensors: Tensors) -> Tensors:
        """``tensors`` with LoRA factors cut or zero-padded to client ``client_id``'s rank (as is: one rank)."""
        rank = self.lora.rank(client_id)
        return tensors if rank is None else fit_lora_rank(tensors, rank)

    def load(self, ctx: ClientContext, tensors: Tensors) -> None:
        """Load tensors of the client's rank into the model (padded to the model's rank; base weights reset)."""
        if self.lora.max_rank is not None:
            tensors = fit_lora_rank(tensors, self.lora.max_rank)
        load_state(ctx.model, tensors, ctx.base)

    def initial_at_rank(self, ctx: ClientContext) -> Tensors:
        """The common initialisation at the client's rank (A's rows beyond it zero, like B)."""
        return self.at_client_rank(ctx.client_id, ctx.initial)
