"""Norm bounding: each client's change is scaled to a bounded norm before the wrapped algorithm aggregates it.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?" (2019). With Δ_i = θ_i − θ_i⁰
over the update's model tensors (the algorithm's :class:`~fedtune.algorithms.Expected`: what the client started
from; side channels such as SCAFFOLD's Δc_i are left as they are)::

    θ_i ← θ_i⁰ + Δ_i · min(1, S / ‖Δ_i‖₂)

S is fixed (``bound: 0.5``) or the median of the round's change norms (``bound: median``, which holds the
round's updates to take it). The wrapped algorithm then aggregates the clipped updates as it would any:
FedIT's mean, FedAdam's step, clustered FL's clusters. Which clients were scaled, and the smallest factor,
are in the round's row (``agg/clip/scaled``, ``agg/clip/min_factor``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from typing import Annotated, Literal

import torch
from pydantic import Field

from fedtune.aggregation import clip_change
from fedtune.algorithms.base import Algorithm, ClientUpdate, NoOptions, Payload, ServerState
from fedtune.algorithms.wrapper import Wrapper


class ClipOptions(NoOptions):
    bound: Annotated[float, Field(gt=0)] | Literal["median"] = "median"
    """S: the largest norm of a client's change over its model tensors; a number > 0, or ``median``: the median
    of the round's changes."""


class Clip(Wrapper):
    name = "clip"
    summary = "norm bounding: each client's change scaled to norm ≤ S before aggregation (Sun et al., 2019)"
    Options = ClipOptions
    wraps = "an algorithm whose clients send their model (not local)"

    def __init__(self, inner: Algorithm, options=None):
        super().__init__(inner, options)
        self._round: tuple[dict[int, Payload], ServerState] | None = None

    def refuses(self, inner: Algorithm) -> str | None:
        return None if inner.sends_model else "its clients send no model to clip"

    def configure(self, rnd: int, client_ids: list[int], state: ServerState) -> dict[int, Payload]:
        payloads = self.inner.configure(rnd, client_ids, state)
        self._round = (payloads, state)  # what each client starts from: its change is measured against it
        return payloads

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        payloads, start = self._round
        scaled: dict[int, float] = {}

        def changes() -> Iterator[tuple[ClientUpdate, dict[str, torch.Tensor], dict]]:
            for u in updates:
                expected = self.inner.expected_update(u.client_id, payloads[u.client_id], start)
                yield u, {n: u.tensors[n].double() - e.start.double() for n, e in expected.items() if e.is_model}, \
                    expected

        def clipped(items) -> Iterator[ClientUpdate]:
            for u, delta, expected, bound in items:
                small, factor = clip_change(delta, bound)
                if factor < 1:
                    scaled[u.client_id] = factor
                tensors = dict(u.tensors)
                for n, d in small.items():
                    tensors[n] = (expected[n].start.double() + d).to(u.tensors[n].dtype)
                yield ClientUpdate(u.client_id, tensors, u.num_examples, u.metrics)

        if self.options.bound == "median":
            held = list(changes())
            bound = statistics.median(_norm(d) for _, d, _ in held)
            items = ((u, d, e, bound) for u, d, e in held)
        else:
            items = ((u, d, e, self.options.bound) for u, d, e in changes())
        new = self.inner.aggregate(rnd, clipped(items), state)
        new.metrics = {**new.metrics, "clip/scaled": sorted(scaled),
                       "clip/min_factor": min(scaled.values(), default=1.0)}
        return new


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(sum(d.pow(2).sum() for d in delta.values())) ** 0.5
