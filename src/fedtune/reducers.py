"""Reducers: the one place where an algorithm takes the mean of its clients' tensors, and the robust rules
that can take its place.

Every algorithm reduces through :meth:`Algorithm.reduce <fedtune.algorithms.Algorithm.reduce>`; the run's
``algorithm.reducer`` decides the rule, so a robust rule applies to FedIT, the server optimisers (to the mean
they step from), FedProx, SCAFFOLD (to its model mean; Σ Δc_i stays a sum), clustered FL (within each
cluster), FedAMoLE (each expert over its holders), fedkd's student, FFA-LoRA's B and the head of the
heterogeneous-rank methods. FLoRA, FLoRIST and FlexLoRA combine factors by stacking and SVD, where a
coordinate-wise rule has no meaning: with a robust reducer they are refused.

==============  =========================================================================  ===================
reducer         rule (over the n updates θ_i of one reduction, weights w_i)               memory
==============  =========================================================================  ===================
``mean``        Σ w_i θ_i / Σ w_i, folded as updates arrive (double-double, order-free)    constant
``median``      coordinate-wise median, unweighted (Yin et al., ICML 2018)                 holds the n updates
``trimmed_mean``  coordinate-wise mean after dropping ⌊β n⌋ from each end (Yin et al.)   holds the n updates
``krum``        mean of the m updates with the lowest Krum scores, f assumed Byzantine     holds the n updates
                (Blanchard et al., NeurIPS 2017; m = 1: Krum, m > 1: multi-Krum)
==============  =========================================================================  ===================

The robust rules are unweighted, as in their papers: a client's sample count is its own word, and a weight
is what an attacker would inflate. What a rule left out (Krum's unselected clients) is reported per round
(:meth:`Reducer.round_report`) and logged in the round's row.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.aggregation import StreamingMean, Tensors, coordinate_median, krum_select, trimmed_mean
from fedtune.config import explain
from fedtune.errors import FedtuneError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Accumulator(ABC):
    """One reduction in progress: updates are added one at a time, then :meth:`result` is taken once."""

    @abstractmethod
    def add(self, tensors: Tensors, weight: float, client: int | None = None) -> None: ...

    @abstractmethod
    def result(self) -> Tensors: ...


class Reducer(ABC):
    """A rule for reducing clients' tensors to one set; :meth:`start` begins one reduction."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = _Options
    streams: ClassVar[bool] = False
    """Folds each update as it arrives (the round holds a constant number of updates), or holds them all."""

    def __init__(self, options: dict[str, Any] | None = None):
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as e:
            raise FedtuneError(f"invalid algorithm.reducer.options for '{self.name}': "
                               f"{explain(e, self.Options, 'algorithm.reducer.options')}") from None
        self._reports: list[dict[str, Any]] = []

    @abstractmethod
    def start(self) -> Accumulator:
        """A new reduction."""

    def reduce(self, items: Iterable[tuple[int | None, Tensors, float]]) -> Tensors:
        """The rule over ``(client, tensors, weight)`` items, taken in one pass (a generator is never held)."""
        acc = self.start()
        for client, tensors, weight in items:
            acc.add(tensors, weight, client)
        return acc.result()

    def begin_round(self) -> None:
        """Forget the last round's reports."""
        self._reports = []

    def round_report(self) -> dict[str, Any]:
        """What this round's reductions decided, for the round's row: ``{}`` for a rule that leaves no client out,
        else e.g. ``{"left_out": [client ids]}`` (in any of the round's reductions)."""
        left = sorted({c for r in self._reports for c in r.get("left_out", []) if c is not None})
        return {"left_out": left} if left else {}


class _Held(Accumulator):
    """Holds every update of the reduction, then applies ``rule`` to the list."""

    def __init__(self, reducer: Reducer, rule):
        self.reducer, self.rule = reducer, rule
        self.sets: list[Tensors] = []
        self.clients: list[int | None] = []

    def add(self, tensors: Tensors, weight: float, client: int | None = None) -> None:
        self.sets.append(tensors)
        self.clients.append(client)

    def result(self) -> Tensors:
        """The rule over the held updates in client order, so the result does not depend on arrival order."""
        if not self.sets:
            raise ValueError(f"{self.reducer.name}: no update to reduce")
        order = sorted(range(len(self.sets)), key=lambda i: (self.clients[i] is None, self.clients[i] or 0, i))
        self.sets = [self.sets[i] for i in order]
        self.clients = [self.clients[i] for i in order]
        return self.rule(self)


class Mean(Reducer):
    name = "mean"
    summary = "the weighted mean, folded as updates arrive (the server holds the model and one update at a time)"
    streams = True

    class _Acc(Accumulator):
        def __init__(self):
            self.mean = StreamingMean()

        def add(self, tensors: Tensors, weight: float, client: int | None = None) -> None:
            self.mean.add(tensors, weight)

        def result(self) -> Tensors:
            return self.mean.result()

    def start(self) -> Accumulator:
        return Mean._Acc()


class Median(Reducer):
    name = "median"
    summary = "coordinate-wise median of the clients' tensors, unweighted (Yin et al., ICML 2018)"

    def start(self) -> Accumulator:
        return _Held(self, lambda acc: coordinate_median(acc.sets))


class TrimmedMeanOptions(_Options):
    beta: float = Field(default=0.1, ge=0, lt=0.5)
    """β: the share of the updates dropped at each end, per coordinate (⌊β·n⌋ each side)."""


class TrimmedMean(Reducer):
    name = "trimmed_mean"
    summary = "coordinate-wise mean after dropping the ⌊β·n⌋ largest and smallest values (Yin et al., ICML 2018)"
    Options = TrimmedMeanOptions

    def start(self) -> Accumulator:
        return _Held(self, lambda acc: trimmed_mean(acc.sets, self.options.beta))


class KrumOptions(_Options):
    f: int = Field(default=1, ge=0)
    """f: how many of a reduction's updates may be Byzantine (each update's score sums its n − f − 2 nearest)."""
    m: int = Field(default=1, ge=1)
    """m: how many lowest-scored updates are averaged (1: Krum; more: multi-Krum)."""


class Krum(Reducer):
    name = "krum"
    summary = ("the mean of the m updates closest to their n − f − 2 nearest others (Blanchard et al., NeurIPS "
               "2017; m > 1: multi-Krum)")
    Options = KrumOptions

    def start(self) -> Accumulator:
        def rule(acc: _Held) -> Tensors:
            o = self.options
            chosen = krum_select(acc.sets, o.f, min(o.m, len(acc.sets)))
            self._reports.append({"left_out": [c for i, c in enumerate(acc.clients) if i not in chosen]})
            picked = [acc.sets[i] for i in chosen]
            return {k: (torch.stack([t[k].double() for t in picked]).mean(0)).to(picked[0][k].dtype)
                    for k in picked[0]}

        return _Held(self, rule)


REDUCERS: dict[str, type[Reducer]] = {cls.name: cls for cls in (Mean, Median, TrimmedMean, Krum)}


def build_reducer(name: str, options: dict[str, Any] | None = None) -> Reducer:
    """The reducer ``name`` with ``options``; a one-line error for an unknown name."""
    if name not in REDUCERS:
        close = difflib.get_close_matches(name, REDUCERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedtuneError(f"unknown algorithm.reducer '{name}'{hint} (choose one of: {', '.join(REDUCERS)})")
    return REDUCERS[name](options)
