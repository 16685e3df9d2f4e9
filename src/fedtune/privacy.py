"""Differential privacy accounting: the ε a run reaches at ``privacy.delta``, for the unit its mechanism protects.

Both mechanisms are subsampled Gaussians, composed once per use and accounted with Google's ``dp-accounting``
(``privacy.accountant``: RDP for any sampling, PLD for Poisson sampling) for the sampling the run does:

======  ===================================  ===============================================  ===============
unit    mechanism, one use                   the dp-accounting event of one use               neighbours
======  ===================================  ===============================================  ===============
client  the ``dp`` wrapper, one round        ``federation.sampling: poisson`` (rate q):       add/remove one
        (z: the whole mechanism's noise      PoissonSampledDpEvent(q, GaussianDpEvent(z))
        multiplier, adaptive clipping's      ``fixed`` (k of N): SampledWithoutReplacement-   replace one
        count included)                      DpEvent(N, k, GaussianDpEvent(z / 2))
record  DP-SGD (``privacy.dp_sgd``), one     PoissonSampledDpEvent(q_i = B / n_i,             add/remove one
        local step of client i               GaussianDpEvent(σ_i))
======  ===================================  ===============================================  ===============

Replace-one neighbours (fixed-size sampling, where the number of clients is public): replacing one client's
data moves the clipped sum by up to 2S, and dp-accounting measures a Gaussian's noise against that distance,
so noise z·S counts as z / 2. Record-level ε is each client's own, from its own steps; client sampling is not
counted as amplification there.

The accountant's state is how many uses were composed: the rounds run (client level, ``privacy/rounds``) or
each client's steps (record level, ``privacy/steps``, one entry per client, counted for every client a round
sampled: one that failed may have trained). It lives in the server state's ``extra``, so a checkpoint carries
it and a resumed run composes exactly the events an uninterrupted one does. Composing the round redone after a
resume once is right because its noise is the noise it drew before: each party draws from its own secret key
(:mod:`fedtune.dp_noise`), which the checkpoint keeps (the server's; in-process, the clients' too); a Flower run
whose clients add noise keeps their keys on the nodes and cannot be resumed.

``privacy.target_epsilon`` either stops the run before the round that would take ε past it (``stop``) or
chooses the noise before the run (``calibrate``): the smallest z (client level) or σ_i (record level, each
client for its own planned steps) with which the planned rounds reach at most the target, by bisection.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import dp_accounting
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedtune.aggregation import Tensors
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.models.kinds import kind_named
from fedtune.sampling import clients_per_round, sample_clients, sampling_rate
from fedtune.training import local_steps

ROUNDS = "privacy/rounds"
"""State key: the client-level uses composed (rounds run)."""
STEPS = "privacy/steps"
"""State key: each client's record-level uses composed (DP-SGD steps), indexed by client."""
EPSILON = "privacy/epsilon"
"""Row key: ε after the round (record level: the largest of the clients')."""
UNIT = "privacy/unit"
EPSILON_BY_CLIENT = "privacy/epsilon_by_client"
"""Row key (record level): each client's own ε."""

Relation = dp_accounting.NeighboringRelation


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs (via absl) each fractional RDP order it leaves out of an ε; the ε is unaffected."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class SampledGaussian:
    """One use of a subsampled Gaussian mechanism: noise ``noise_multiplier`` times the clip, on a Poisson sample
    of rate ``rate``, or on ``sample`` of ``population`` drawn without replacement (``rate`` None)."""

    noise_multiplier: float
    rate: float | None = None
    population: int = 0
    sample: int = 0

    @property
    def relation(self) -> Relation:
        return Relation.ADD_OR_REMOVE_ONE if self.rate is not None else Relation.REPLACE_ONE

    def event(self) -> dp_accounting.DpEvent:
        if self.rate is not None:
            return dp_accounting.PoissonSampledDpEvent(self.rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample, dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))

    def describe(self) -> str:
        if self.rate is not None:
            return f"Poisson sampling (q = {self.rate:.4g}, add/remove-one neighbours)"
        return f"{self.sample} of {self.population} without replacement (replace-one neighbours)"


class Accountant:
    """ε of ``count`` uses of one mechanism at δ, by ``kind`` (``rdp`` or ``pld``); RDP keeps each mechanism's
    per-use RDP curve, so ε after any count is one minimisation over orders."""

    def __init__(self, kind: str = "rdp"):
        self.kind = kind
        self._curves: dict[SampledGaussian, tuple[Any, Any]] = {}

    def check(self, mechanism: SampledGaussian) -> None:
        if self.kind == "pld" and mechanism.rate is None:
            raise FedtuneError("privacy.accountant=pld accounts Poisson sampling only; set federation.sampling: "
                               "poisson, or privacy.accountant: rdp")

    def epsilon(self, mechanism: SampledGaussian, count: int, delta: float) -> float:
        if count == 0:
            return 0.0
        if mechanism.noise_multiplier == 0:
            return math.inf
        self.check(mechanism)
        with _quiet():
            if self.kind == "pld":
                pld = pld_privacy_accountant.PLDAccountant(neighboring_relation=mechanism.relation)
                return float(pld.compose(mechanism.event(), count).get_epsilon(delta))
            if mechanism not in self._curves:
                one = rdp_privacy_accountant.RdpAccountant(neighboring_relation=mechanism.relation)
                one.compose(mechanism.event())
                self._curves[mechanism] = (one.orders, one.rdp)
            orders, curve = self._curves[mechanism]
            return float(rdp_privacy_accountant.compute_epsilon(orders, count * curve, delta)[0])

    def calibrate(self, mechanism: Callable[[float], SampledGaussian], count: int, delta: float,
                  target: float) -> float:
        """The smallest noise multiplier (within 0.1%) whose ``count`` uses reach at most ``target``: bisection
        between a multiplier that exceeds it and one that does not."""
        if count == 0:
            return 0.0
        high = 1.0
        while self.epsilon(mechanism(high), count, delta) > target:
            high *= 2
            if high > 1e6:
                raise FedtuneError(f"no noise multiplier reaches privacy.target_epsilon={target:g} in {count} uses")
        low = 0.0
        while high - low > 1e-3 * high:
            mid = (low + high) / 2
            low, high = (low, mid) if self.epsilon(mechanism(mid), count, delta) <= target else (mid, high)
        return high


def check_privacy(cfg: RunConfig, algorithm) -> None:
    """One line on what in the config rules the run's privacy out (both units at once, a target without a
    mechanism, DP-SGD with what it cannot privatise)."""
    from fedtune.algorithms.dp import find_dp

    p, dp = cfg.privacy, find_dp(algorithm)
    if dp is not None and p.dp_sgd.enabled:
        raise FedtuneError("the dp wrapper (client level) and privacy.dp_sgd (record level) protect different units; "
                           "choose one per run")
    if dp is None and not p.dp_sgd.enabled and (p.target_epsilon is not None or p.on_target == "calibrate"):
        raise FedtuneError("privacy.target_epsilon needs a mechanism: add the dp wrapper to algorithm.wrappers "
                           "(client level) or set privacy.dp_sgd.enabled (record level)")
    if not p.dp_sgd.enabled:
        return
    t, m = cfg.train, cfg.model
    kind = kind_named(m.finetune)
    why = (f"algorithm '{algorithm.name}' adds a term of the whole batch to its loss, which per-row gradients "
           "cannot privatise" if algorithm.loss_reads_batch else
           "train.grad_accum > 1: DP-SGD's steps are Poisson samples of the rows, each step one batch; set "
           "train.grad_accum: 1 (train.batch_size is the expected batch)" if t.grad_accum > 1 else
           "train.precision=fp16 scales the loss, and with it every row's gradient before clipping; use fp32 or "
           "bf16" if t.precision == "fp16" else
           "train.gradient_checkpointing recomputes layers in the backward pass, where per-row gradients are "
           "taken; turn it off" if t.gradient_checkpointing else
           "model.quantization: per-row gradients are taken layer by layer, which quantised layers do not "
           "support; set model.quantization: none" if m.quantization != "none" else
           f"model.finetune={m.finetune}: {kind.no_per_row_gradients}" if kind.no_per_row_gradients else None)
    if why:
        raise FedtuneError(f"privacy.dp_sgd: {why}")


@dataclass
class Privacy:
    """A run's differential privacy: the unit, the mechanism's noise, the accountant and the uses composed.

    Client level (``dp`` set: the run's dp wrapper): one use per round, ``mechanism`` (z, the sampling).
    Record level (``privacy.dp_sgd``): client i's steps are uses of σ_i at q_i = ``train.batch_size`` / n_i.
    """

    cfg: RunConfig
    algorithm: Any
    num_clients: int
    dp: Any = None
    rounds_run: int = 0
    steps: list[int] | None = None
    stopped_before: int | None = None
    """The round the run stopped before, for ``privacy.target_epsilon`` (``on_target: stop``); None: it did not."""

    def __post_init__(self):
        self.accountant = Accountant(self.cfg.privacy.accountant)
        self._sigmas: dict[int, float] = {}
        if self.steps is None:
            self.steps = [0] * self.num_clients
        if self.dp is not None:
            self.accountant.check(self.mechanism_with(1.0))
            if self.dp.noise_multiplier is None:
                p = self.cfg.privacy
                self.dp.noise_multiplier = self.accountant.calibrate(
                    self.mechanism_with, self.cfg.federation.rounds, p.delta, p.target_epsilon)
            self.dp.change_noise  # noqa: B018 -- adaptive clipping's split of z: a one-line error before the run

    # ------------------------------------------------------------------ the mechanism
    @property
    def unit(self) -> str:
        return "client" if self.dp is not None else "record"

    @cached_property
    def _k(self) -> int:
        return 1 if self.algorithm.pools_data else clients_per_round(self.cfg, self.num_clients)

    @cached_property
    def _rate(self) -> float | None:
        return None if self.algorithm.pools_data else sampling_rate(self.cfg, self.num_clients)

    def mechanism_with(self, z: float) -> SampledGaussian:
        """Client level: one round with noise multiplier ``z``, as the run samples its clients."""
        if self._rate is not None:
            return SampledGaussian(z, rate=self._rate)
        return SampledGaussian(z, population=self.num_clients, sample=self._k)

    @property
    def mechanism(self) -> SampledGaussian:
        return self.mechanism_with(self.dp.noise_multiplier)

    def round_clients(self, rnd: int) -> list[int]:
        """The clients round ``rnd`` trains, as the round loop samples them at record level (from the run's seed;
        under the dp wrapper the server samples from its secret key, and ε does not depend on who)."""
        return self.algorithm.participants(rnd, sample_clients(self.cfg.seed, rnd, self.num_clients, self._k,
                                                               self._rate))

    def client_steps(self, rows: int) -> int:
        """The DP-SGD steps one round of a client with ``rows`` training rows takes."""
        return local_steps(self.cfg.train, rows) * (self._k if self.algorithm.pools_data else 1)

    def row_rate(self, rows: int) -> float:
        """q_i: the probability with which each of a client's ``rows`` joins a step's batch."""
        return min(1.0, self.cfg.train.batch_size / rows)

    def planned_steps(self, cid: int, rows: int) -> int:
        """Client ``cid``'s DP-SGD steps over every round of the run, as sampled."""
        return self.client_steps(rows) * sum(cid in self.round_clients(r)
                                             for r in range(1, self.cfg.federation.rounds + 1))

    def sigma(self, cid: int, rows: int) -> float:
        """σ_i of client ``cid``: ``privacy.dp_sgd.noise_multiplier``, or calibrated for its planned steps."""
        if cid not in self._sigmas:
            p = self.cfg.privacy
            sigma = p.dp_sgd.noise_multiplier
            if sigma is None:
                q = self.row_rate(rows)
                sigma = self.accountant.calibrate(lambda s: SampledGaussian(s, rate=q),
                                                  self.planned_steps(cid, rows), p.delta, p.target_epsilon)
            self._sigmas[cid] = sigma
        return self._sigmas[cid]

    def record_mechanism(self, cid: int, rows: int) -> SampledGaussian:
        return SampledGaussian(self.sigma(cid, rows), rate=self.row_rate(rows))

    # ------------------------------------------------------------------ ε
    def client_epsilons(self, rows: Sequence[int], steps: Sequence[int] | None = None) -> dict[int, float]:
        """Record level: each client's ε after ``steps`` (default: the steps composed so far)."""
        steps = self.steps if steps is None else steps
        return {c: self.accountant.epsilon(self.record_mechanism(c, rows[c]), steps[c], self.cfg.privacy.delta)
                for c in range(self.num_clients)}

    def epsilon(self, rows: Sequence[int], rounds: int | None = None, steps: Sequence[int] | None = None) -> float:
        """ε after ``rounds`` (client level) or ``steps`` (record level: the largest client's); default: now."""
        if self.dp is not None:
            return self.accountant.epsilon(self.mechanism, self.rounds_run if rounds is None else rounds,
                                           self.cfg.privacy.delta)
        return max(self.client_epsilons(rows, steps).values(), default=0.0)

    def _after(self, clients: list[int], rows: Sequence[int]) -> tuple[int, list[int]]:
        """(rounds, steps) once a round of ``clients`` is composed."""
        steps = list(self.steps)
        if self.dp is None:
            for c in clients:
                steps[c] += self.client_steps(rows[c])
        return self.rounds_run + 1, steps

    def planned_epsilon(self, rows: Sequence[int]) -> float:
        """ε after every planned round (from now, as sampled)."""
        rounds, steps = self.rounds_run, list(self.steps)
        for r in range(rounds + 1, self.cfg.federation.rounds + 1):
            rounds, steps = rounds + 1, [s + (self.client_steps(rows[c]) if c in self.round_clients(r) else 0)
                                         for c, s in enumerate(steps)]
        return self.epsilon(rows, rounds, steps)

    # ------------------------------------------------------------------ the round loop's calls
    def stops_before(self, rnd: int, clients: list[int], rows: Sequence[int]) -> str | None:
        """Why the run stops before round ``rnd`` (``on_target: stop``: the round would take ε past the target),
        or None; a stop is recorded in :attr:`stopped_before`."""
        p = self.cfg.privacy
        if p.target_epsilon is None or p.on_target != "stop":
            return None
        rounds, steps = self._after(clients, rows)
        after = self.epsilon(rows, rounds, steps)
        if after <= p.target_epsilon:
            return None
        self.stopped_before = rnd
        return (f"privacy: stopped before round {rnd}, which would take ε from {self.epsilon(rows):.4g} to "
                f"{after:.4g}, past privacy.target_epsilon={p.target_epsilon:g} ({self.unit} level, δ = {p.delta:g})")

    def spend(self, clients: list[int], rows: Sequence[int]) -> None:
        """Compose one round that trained ``clients``."""
        self.rounds_run, self.steps = self._after(clients, rows)

    def state(self) -> Tensors:
        """The composed uses, for the server state's ``extra``."""
        if self.dp is not None:
            return {ROUNDS: torch.tensor(self.rounds_run, dtype=torch.int64)}
        return {STEPS: torch.tensor(self.steps, dtype=torch.int64)}

    def restore(self, extra: Tensors) -> None:
        """Take the composed uses from a checkpointed state (a state without them: none composed)."""
        if ROUNDS in extra:
            self.rounds_run = int(extra[ROUNDS])
        if STEPS in extra:
            self.steps = [int(s) for s in extra[STEPS].tolist()]

    def row(self, rows: Sequence[int]) -> dict[str, Any]:
        """The round's ``privacy/`` metrics: ε (record level: the largest, and each client's) and the unit."""
        if self.dp is not None:
            return {EPSILON: self.epsilon(rows), UNIT: "client"}
        by_client = self.client_epsilons(rows)
        return {EPSILON: max(by_client.values(), default=0.0), UNIT: "record",
                EPSILON_BY_CLIENT: {str(c): e for c, e in by_client.items()}}

    # ------------------------------------------------------------------ what people read
    def noise(self, rows: Sequence[int]) -> str:
        if self.dp is not None:
            return f"z = {self.dp.noise_multiplier:.4g}"
        sigmas = [self.sigma(c, rows[c]) for c in range(self.num_clients)]
        return f"σ = {sigmas[0]:.4g}" if len(set(sigmas)) == 1 else f"σ_i = {min(sigmas):.4g}–{max(sigmas):.4g}"

    def start_line(self, rows: Sequence[int]) -> str:
        """What the run protects and the ε its planned rounds reach (printed before the first round)."""
        p = self.cfg.privacy
        if self.dp is not None:
            how = f"client-level DP ({self.dp.describe()}), {self.mechanism.describe()}"
        else:
            sizes = sorted(rows)
            how = (f"record-level DP-SGD (C = {p.dp_sgd.clip:g}), Poisson sampling of each client's rows (q_i = "
                   f"{self.cfg.train.batch_size}/n_i, n_i {sizes[0]:,}–{sizes[-1]:,}, add/remove-one neighbours)")
        target = f"; target ε = {p.target_epsilon:g} ({p.on_target})" if p.target_epsilon is not None else ""
        return (f"privacy: {how}, {self.noise(rows)}, δ = {p.delta:g}, {p.accountant.upper()} accountant: the "
                f"{self.cfg.federation.rounds} planned rounds reach ε = {self.planned_epsilon(rows):.4g}{target}")

    def notes(self, rows: Sequence[int]) -> list[str]:
        """Lines on choices the guarantee depends on: δ against the units protected, distributed noise."""
        p, out = self.cfg.privacy, []
        population = self.num_clients if self.dp is not None else min(rows, default=0)
        if population and p.delta >= 1 / population:
            units = "clients" if self.dp is not None else "rows of the smallest client"
            out.append(f"privacy.delta={p.delta:g} is not below 1/{population} ({units}): an (ε, δ) guarantee "
                       "with δ ≥ 1/n allows one unit in the clear; lower it")
        if p.reproducible_noise:
            out.append(REPRODUCIBLE)
        if self.dp is not None and self.dp.options.noise == "distributed":
            out.append("noise: distributed — each client adds its share of the noise, for use with secure "
                       "aggregation, which fedtune does not have yet: the server sees every share, and the ε holds "
                       "for what the server releases (the sum), not for each client's update; a client that drops "
                       "out takes its share with it")
        return out

    def record(self, rows: Sequence[int]) -> dict[str, Any]:
        """What ``summary.json`` (and the model card) says of the run's privacy."""
        p = self.cfg.privacy
        out: dict[str, Any] = {"unit": self.unit, "epsilon": self.epsilon(rows), "delta": p.delta,
                               "accountant": p.accountant, "target_epsilon": p.target_epsilon,
                               "on_target": p.on_target if p.target_epsilon is not None else None,
                               "stopped_before_round": self.stopped_before,
                               "reproducible_noise": p.reproducible_noise}
        if self.dp is not None:
            out.update(mechanism=self.dp.describe(), sampling=self.mechanism.describe(),
                       noise_multiplier=self.dp.noise_multiplier, rounds_composed=self.rounds_run)
        else:
            out.update(mechanism=f"DP-SGD, per-row clip C = {p.dp_sgd.clip:g}",
                       sampling="Poisson sampling of each client's rows, q_i = train.batch_size / n_i "
                                "(add/remove-one neighbours)",
                       epsilon_by_client={str(c): e for c, e in self.client_epsilons(rows).items()},
                       noise_multiplier_by_client={str(c): self.sigma(c, rows[c]) for c in range(self.num_clients)},
                       steps_by_client={str(c): s for c, s in enumerate(self.steps)})
        return out


REPRODUCIBLE = ("privacy.reproducible_noise: the noise is drawn from the run's seed, so this ε holds against no "
                "one who knows config.yaml's seed (for tests and benchmarks only)")
"""Said wherever a run's privacy is reported, when its noise can be regenerated from its seed."""


def guarantee(record: dict[str, Any]) -> str:
    """One line on what a run's ``privacy`` record (:meth:`Privacy.record`, in ``summary.json``) guarantees: ε
    at δ, the unit it protects, the mechanism and the sampling the accountant assumed (``fedtune show``, the
    model card and ``fedtune report`` print it)."""
    eps = record["epsilon"]
    value = "∞ (no noise)" if math.isinf(eps) else f"{eps:.4g}"
    unit = ("one client (all its data)" if record["unit"] == "client" else
            "one training row of a client (the largest of the clients' ε)")
    stop = (f"; the run stopped before round {record['stopped_before_round']} to stay within ε = "
            f"{record['target_epsilon']:g}" if record.get("stopped_before_round") else "")
    void = f"; {REPRODUCIBLE}" if record.get("reproducible_noise") else ""
    return (f"(ε = {value}, δ = {record['delta']:g})-differential privacy for {unit}: {record['mechanism']}; "
            f"{record['sampling']}; {record['accountant'].upper()} accountant (dp-accounting){stop}{void}")


def clients_add_noise(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s clients draw DP randomness from keys of their own (DP-SGD, or distributed noise)."""
    return cfg.privacy.dp_sgd.enabled or any(
        w.name == "dp" and w.options.get("noise") == "distributed" for w in cfg.algorithm.wrappers)


def privacy_for(cfg: RunConfig, algorithm, num_clients: int) -> Privacy | None:
    """The run's :class:`Privacy` (calibrating the dp wrapper's z where asked), or None without a mechanism."""
    from fedtune.algorithms.dp import find_dp

    dp = find_dp(algorithm)
    if dp is None and not cfg.privacy.dp_sgd.enabled:
        return None
    return Privacy(cfg, algorithm, num_clients, dp=dp)
