"""The in-process simulation: every client runs in this process on one shared base model.

Only adapter tensors move: the base model is loaded once, each client's
persistent state is a dict of tensors, and a client "receives" its payload by
having those tensors copied into the shared model.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientUpdate, Payload
from fedtune.dp_noise import noise_key, public
from fedtune.errors import FedtuneError
from fedtune.experiment import Experiment
from fedtune.privacy import clients_add_noise
from fedtune.runtime.client import client_evaluate, client_round

log = logging.getLogger("fedtune.inprocess")
T = TypeVar("T")


class InProcessPool:
    """Runs the sampled clients one after another in this process.

    A client whose code raises is recorded in ``failures`` with its traceback (a
    :class:`~fedtune.errors.FedtuneError` with its message alone); unless the run
    tolerates client failures, the round stops there and the round loop fails the
    run with that error. In-process clients are never ``dropped``.
    """

    def __init__(self, exp: Experiment, on_step: Callable[[], None] = lambda: None):
        self.exp = exp
        self.on_step = on_step
        self.tolerate = exp.cfg.federation.tolerate_client_failures
        self.client_states: dict[int, Tensors] = {cid: {} for cid in range(exp.num_clients)}
        if clients_add_noise(exp.cfg):  # each client's DP key from the start, so that round 0's checkpoint holds it
            for cid, state in self.client_states.items():
                noise_key(state, exp.algorithm.facts.noise_seed, "client", cid)
        self.failures: dict[int, str] = {}
        self.dropped: dict[int, str] = {}
        self.round_bytes = None  # nothing crosses a wire

    def _guarded(self, cids: list[int], work: Callable[[int], T], what: str) -> Iterator[tuple[int, T]]:
        """``(cid, work(cid))`` for each client, as each finishes; a raising client goes to ``failures`` (and
        stops the rest unless tolerated)."""
        self.failures = {}
        for cid in cids:
            try:
                result = work(cid)
            except Exception as e:
                self.failures[cid] = (f"{type(e).__name__}: {e}" if isinstance(e, FedtuneError)
                                      else "".join(traceback.format_exception(e)).rstrip())
                log.warning("%s: client %d failed: %s: %s", what, cid, type(e).__name__, e)
                if not self.tolerate:
                    return
                continue
            yield cid, result

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> Iterator[ClientUpdate]:
        """Each client trains as the aggregate asks for its update: one update is alive at a time."""
        for _, update in self._guarded(sorted(payloads), lambda cid: client_round(
                self.exp, cid, rnd, payloads[cid], self.client_states[cid], lr, self.on_step), f"round {rnd}"):
            yield update

    def evaluate(self, models: dict[int, Tensors]) -> dict[int, dict[str, float]]:
        return dict(self._guarded(sorted(models), lambda cid: client_evaluate(
            self.exp, cid, models[cid], self.client_states[cid]), "evaluation"))

    def held_client_states(self) -> dict[int, Tensors]:
        return self.client_states

    def restore_client_states(self, states: dict[int, Tensors]) -> None:
        self.client_states.update(states)

    def clients_with_state_on_nodes(self) -> list[int]:
        return []

    def final_client_states(self) -> dict[int, Tensors]:
        return {cid: public(state) for cid, state in self.client_states.items()}
