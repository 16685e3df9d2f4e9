"""The in-process simulation: every client runs in this process on one shared base model.

Only adapter tensors move: the base model is loaded once, each client's
persistent state is a dict of tensors, and a client "receives" its payload by
having those tensors copied into the shared model.
"""

from __future__ import annotations

from collections.abc import Callable

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientUpdate, Payload, ServerState
from fedtune.experiment import Experiment
from fedtune.runtime.client import client_evaluate, client_round


class InProcessPool:
    """Runs the sampled clients one after another in this process."""

    def __init__(self, exp: Experiment, on_step: Callable[[], None] = lambda: None):
        self.exp = exp
        self.on_step = on_step
        self.client_states: dict[int, Tensors] = {cid: {} for cid in range(exp.num_clients)}

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
        return [
            client_round(self.exp, cid, rnd, payloads[cid], self.client_states[cid], lr, self.on_step)
            for cid in sorted(payloads)
        ]

    def evaluate(self, state: ServerState) -> dict[int, dict[str, float]]:
        return {
            cid: client_evaluate(self.exp, cid, state.global_tensors, self.client_states[cid])
            for cid in range(self.exp.num_clients)
            if len(self.exp.client_tests[cid])
        }
