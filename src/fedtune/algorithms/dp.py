"""Client-level differential privacy: DP-FedAvg as a wrapper (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

Each round, with θ⁰ the global model tensors every client starts from, m the expected number of clients per
round (k, or q·N under Poisson sampling) and Δ_i = θ_i − θ⁰ over the update's model tensors::

    Δ̄ = ( Σ_i Δ_i · min(1, S / ‖Δ_i‖₂)  +  N(0, z_Δ² S² I) ) / m          equal weights, fixed denominator

and the wrapped algorithm aggregates the single update θ⁰ + Δ̄ as if one client had sent it: FedIT and FedProx
take it as the new model, the server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) step from the
pseudo-gradient Δ̄, FedKD distils from it on the server's data (post-processing: no privacy cost). Client
sampling is the run's (``federation.sampling``); a Poisson round that draws no client still aggregates the noise
alone. :mod:`fedtune.privacy` accounts the rounds.

``noise: central`` draws the noise at the server; ``noise: distributed`` has each of the k sampled clients clip
its own change and add N(0, z_Δ² S² / k), so the sum carries the whole noise (for secure aggregation, which
fedtune does not have yet: the server sees every share). Distributed noise needs fixed-size sampling.

**Adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021; geometric update, as TensorFlow
Federated's ``DifferentiallyPrivateFactory.gaussian_adaptive``): the clip S_t tracks the γ-quantile of the
change norms. Each client contributes b_i = 1[‖Δ_i‖ ≤ S_t] − ½ (sensitivity ½), noised with N(0, σ_b²), and::

    b̄ = clip_[0,1]( (Σ_i b_i + N(0, σ_b²)) / m + ½ ),      S_{t+1} = S_t · exp(−η (b̄ − γ))

Two Gaussian mechanisms on one round compose to one of multiplier z when 1/z² = 1/z_Δ² + 1/(2σ_b)², so the
change's noise is z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) for the z the run states (TFF's ``adaptive_clip_noise_params``;
σ_b defaults to m/20, the paper's choice, and must exceed z/2). The same split holds for replace-one
neighbours, where both sensitivities double.

The noise and the server's client sampling are drawn from a secret key of the party that draws them (the
server's is made with the initial state; each client's), never from the run's seed (:mod:`fedtune.dp_noise`):
amplification by sampling needs a sample that whoever knows the config cannot recompute. The guarantee covers
what the server releases (every round's global model); the run log is the server's own record and lists each
round's clients and their change norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from fedtune.aggregation import Tensors, clip_change
from fedtune.algorithms.base import (
    Algorithm, ClientContext, ClientUpdate, Expected, NoOptions, Payload, Rule, ServerState,
)
from fedtune.algorithms.wrapper import Wrapper
from fedtune.dp_noise import NOISE_KEY, SecretStream, noise_key, round_key
from fedtune.errors import FedtuneError

CLIP = "dp/clip"
"""State (``extra``) and payload config: the clip S_t of the round (adaptive clipping)."""
BELOW = "dp/below"
"""Distributed adaptive clipping: the side channel of a client's noised b_i."""


class DpOptions(NoOptions):
    clip: Annotated[float, Field(gt=0)] = 1.0
    """S: the largest L2 norm of a client's change over its model tensors (with ``adaptive``: S at round 1)."""
    noise_multiplier: float | None = Field(default=None, ge=0)
    """z: the whole mechanism's noise in units of S (the change's noise is z_Δ·S). null: calibrated to
    ``privacy.target_epsilon`` (``privacy.on_target: calibrate``)."""
    noise: Literal["central", "distributed"] = "central"
    """``central``: the server adds N(0, z_Δ²S²) to the sum; ``distributed``: each of the round's k clients adds
    N(0, z_Δ²S²/k) to its clipped change (for secure aggregation; fixed-size sampling)."""
    adaptive: bool = False
    """Adapt S each round towards the ``target_quantile`` of the clients' change norms (Andrew et al., 2021)."""
    target_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """γ: the share of clients whose change S should leave unclipped."""
    clip_lr: Annotated[float, Field(gt=0)] = 0.2
    """η: S_{t+1} = S_t · exp(−η (b̄ − γ))."""
    count_std: float | None = Field(default=None, gt=0)
    """σ_b: the noise on the count of unclipped clients; default m/20 (m: the expected clients per round)."""

    @model_validator(mode="after")
    def _adaptive_options(self) -> "DpOptions":
        loose = sorted({"target_quantile", "clip_lr", "count_std"} & self.model_fields_set)
        if loose and not self.adaptive:
            raise ValueError(f"{', '.join(loose)} tune adaptive clipping; set adaptive: true, or remove them")
        return self


def find_dp(algorithm: Algorithm) -> Dp | None:
    """The run's dp wrapper, wherever it sits among the wrappers; None without one."""
    while isinstance(algorithm, Wrapper):
        if isinstance(algorithm, Dp):
            return algorithm
        algorithm = algorithm.inner
    return None


class Dp(Wrapper):
    name = "dp"
    summary = ("client-level differential privacy, DP-FedAvg (McMahan et al., ICLR 2018): changes clipped to S, "
               "equal weights, Gaussian noise z·S on their sum, fixed or adaptive S (Andrew et al., NeurIPS 2021)")
    Options = DpOptions
    wraps = ("an algorithm whose aggregate is a mean of client changes to one global model: fedit, fedprox, "
             "fedavgm, fedadam, fedyogi, fedadagrad, fedkd, ffa (B and the head)")
    aggregates_empty_round = True

    def __init__(self, inner: Algorithm, options=None):
        super().__init__(inner, options)
        self.noise_multiplier: float | None = self.options.noise_multiplier
        """z, once known (calibrated before the run where the config leaves it unset)."""

    def refuses(self, inner: Algorithm) -> str | None:
        if inner.pools_data:
            return ("it pools every client's data in one place, so there is no client to protect (record-level DP is "
                    "privacy.dp_sgd)")
        if inner.personalized:
            return "each client keeps its own model, which the server never averages"
        if inner.combines_factors:
            return "it stacks or factorises each client's own LoRA factors, not a mean of their changes"
        if not inner.mean_of_changes:
            return ("its aggregate needs each client's own update (e.g. SCAFFOLD's control variates, clustering's "
                    "similarities), not only the mean of their changes to one global model")
        return None

    def extra_rules(self) -> list[Rule]:
        def outermost(cfg):
            names = [w.name for w in cfg.algorithm.wrappers]
            return None if names[-1:] == [self.name] else (
                "algorithm.wrappers: put dp last (outermost), so that it clips the updates as the clients sent them")

        def calibrated(cfg):
            p = cfg.privacy
            if self.options.noise_multiplier is None and p.on_target != "calibrate":
                return ("the dp wrapper needs options.noise_multiplier (z), or privacy.target_epsilon with "
                        "privacy.on_target: calibrate to choose it")
            if self.options.noise_multiplier is not None and p.on_target == "calibrate":
                return ("privacy.on_target=calibrate chooses the dp wrapper's noise_multiplier; remove it, or set "
                        "privacy.on_target: stop")
            return None

        return [
            Rule("algorithm.reducer: mean", lambda cfg: None if cfg.algorithm.reducer.name == "mean" else (
                f"algorithm.reducer={cfg.algorithm.reducer.name}: the dp wrapper's sum of clipped changes is the "
                "mean; a robust rule over noised clipped changes has no analysis here; keep the mean")),
            Rule("one LoRA rank for every client", lambda cfg: None if not cfg.lora.ranks(cfg.partition.num_clients)
                 else "the dp wrapper clips changes of one global model; remove lora.client_ranks / rank_tiers"),
            Rule("federation.max_update_ratio: 0", lambda cfg: None if cfg.federation.max_update_ratio == 0 else (
                "the dp wrapper: set federation.max_update_ratio: 0; the update guard rejects a client by comparing "
                "its change with other clients', a decision the privacy analysis does not cover (clipping to S "
                "already bounds each client's change)")),
            Rule(None, lambda cfg: None if self.options.noise == "central" or cfg.federation.sampling == "fixed"
                 else "the dp wrapper's distributed noise splits it among a known number of clients; set "
                      "federation.sampling: fixed, or noise: central"),
            Rule(None, outermost),
            Rule(None, calibrated),
        ]

    # ------------------------------------------------------------------ the mechanism's numbers
    @property
    def expected_clients(self) -> float:
        """m: the clients a round holds on average (the fixed denominator)."""
        f = self.facts
        return f.sampling_rate * f.num_clients if f.sampling_rate is not None else float(f.clients_per_round)

    @property
    def count_std(self) -> float:
        """σ_b (adaptive clipping; 0 without noise)."""
        if not self.options.adaptive or not self.noise_multiplier:
            return 0.0
        return self.options.count_std if self.options.count_std is not None else self.expected_clients / 20

    @property
    def change_noise(self) -> float:
        """z_Δ: the noise multiplier of the sum of clipped changes, so that the round's whole mechanism has z."""
        z = self.noise_multiplier
        if not self.options.adaptive or not z:
            return z
        sigma_b = self.count_std
        if z >= 2 * sigma_b:
            raise FedtuneError(f"the dp wrapper's adaptive clipping needs count_std > z/2 = {z / 2:.4g} (it is "
                               f"{sigma_b:.4g}); raise its option count_std, or lower z")
        return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5

    def describe(self) -> str:
        o = self.options
        clip = (f"adaptive clip from S = {o.clip:g} to the {o.target_quantile:g} quantile (η = {o.clip_lr:g}, "
                f"σ_b = {self.count_std:.4g})" if o.adaptive else f"clip S = {o.clip:g}")
        return (f"DP-FedAvg, {clip}, equal weights, {o.noise} noise z_Δ = {self.change_noise:.4g} on the sum, "
                f"mean over m = {self.expected_clients:g} expected clients")

    def server_key(self, state: ServerState) -> torch.Tensor:
        """The server's secret key (:mod:`fedtune.dp_noise`), made with the initial state."""
        if NOISE_KEY not in state.extra:
            raise FedtuneError("the dp wrapper's server state has no noise key: it was not made by this wrapper's "
                               "init (a checkpoint from a run without dp?); start the run afresh")
        return state.extra[NOISE_KEY]

    def sampling(self, state: ServerState, rnd: int) -> SecretStream:
        """Round ``rnd``'s client sampling, drawn from the server's key."""
        return SecretStream(self.server_key(state), "client sampling", rnd)

    def clip_of(self, state: ServerState) -> float:
        """S of the round that starts from ``state``."""
        return float(state.extra[CLIP]) if CLIP in state.extra else self.options.clip

    def model_start(self, state: ServerState) -> Tensors:
        """θ⁰: the model tensors every client of the round starts from and sends back changed (what the wrapped
        algorithm declares as the update's model, :class:`~fedtune.algorithms.Expected`; side channels and
        tensors that never travel, such as FFA-LoRA's frozen A, are not part of it)."""
        expected = self.inner.expected_update(0, Payload(), state)
        return {n: e.start for n, e in sorted(expected.items()) if e.is_model}

    # ------------------------------------------------------------------ server side
    def init(self, initial: Tensors) -> ServerState:
        state = self.inner.init(initial)
        noise_key(state.extra, self.facts.noise_seed, "server")
        return state

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        payloads = self.inner.configure(rnd, client_ids, state)
        if self.options.noise == "distributed":
            for p in payloads.values():
                p.config[CLIP] = self.clip_of(state)
        return payloads

    def expected_update(self, client_id: int, payload: Payload, state: ServerState) -> dict[str, Expected]:
        expected = self.inner.expected_update(client_id, payload, state)
        if self.options.noise == "distributed" and self.options.adaptive:
            expected[BELOW] = Expected(())
        return expected

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        start = self.model_start(state)
        clip, central = self.clip_of(state), self.options.noise == "central"
        total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in start.items()}
        below, count = 0.0, 0
        for u in updates:
            delta = {n: u.tensors[n].double() - t.double() for n, t in start.items()}
            if central:
                below += float(_norm(delta) <= clip) - 0.5
                delta, _ = clip_change(delta, clip)
            else:  # each client clipped and noised its own change
                below += float(u.tensors[BELOW]) if self.options.adaptive else 0.0
            for n, d in delta.items():
                total[n] += d
            count += 1
        m, key = self.expected_clients, self.server_key(state)
        if central and self.noise_multiplier:
            noise = SecretStream(key, "dp central noise", rnd)
            for n in total:
                total[n] += noise.normal(total[n].shape) * (self.change_noise * clip)
            below += float(noise.normal((1,))[0]) * self.count_std
        mean = ClientUpdate(-1, {n: (t.double() + total[n] / m).to(t.dtype) for n, t in start.items()}, 1)
        new = self.inner.aggregate(rnd, [mean], state)
        metrics = {"dp/clip": clip, "dp/clients": count}
        if self.options.adaptive:
            unclipped = min(1.0, max(0.0, below / m + 0.5))
            new.extra = {**new.extra, CLIP: torch.tensor(clip * math.exp(
                -self.options.clip_lr * (unclipped - self.options.target_quantile)), dtype=torch.float64)}
            metrics["dp/unclipped"] = unclipped
        new.metrics = {**new.metrics, **metrics}
        new.extra = {**new.extra, NOISE_KEY: key}  # kept in the server's state, nowhere else
        return new

    # ------------------------------------------------------------------ client side (distributed noise)
    def update(self, ctx: ClientContext) -> ClientUpdate:
        u = self.inner.update(ctx)
        if self.options.noise != "distributed":
            return u
        start = self.inner.at_client_rank(ctx.client_id, ctx.start)
        names = sorted(n for n, t in u.tensors.items() if n in start and start[n].shape == t.shape)
        delta = {n: u.tensors[n].double() - start[n].double() for n in names}
        clip = float(ctx.payload.config[CLIP])
        k = self.facts.clients_per_round
        unclipped = _norm(delta) <= clip
        delta, _ = clip_change(delta, clip)
        shares = SecretStream(round_key(ctx.secrets, self.facts.noise_seed, ctx.client_id, ctx.round),
                              "dp noise share", ctx.round)
        tensors = dict(u.tensors)
        for n in names:
            share = shares.normal(delta[n].shape) * (self.change_noise * clip / k**0.5)
            tensors[n] = (start[n].double() + delta[n] + share).to(u.tensors[n].dtype)
        if self.options.adaptive:
            noise = float(shares.normal((1,))[0]) * self.count_std / k**0.5
            tensors[BELOW] = torch.tensor(float(unclipped) - 0.5 + noise, dtype=torch.float32)
        return ClientUpdate(u.client_id, tensors, u.num_examples, u.metrics)


def _norm(delta: Tensors) -> float:
    return math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
