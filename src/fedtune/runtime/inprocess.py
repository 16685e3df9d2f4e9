"""The in-process simulation: every client runs in this process on one shared base model.

Only adapter tensors move: the base model is loaded once, each client's
persistent state is a dict of tensors, and a client "receives" its payload by
having those tensors copied into the shared model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedtune.aggregation import Tensors
from fedtune.algorithms import ClientUpdate, Payload, ServerState
from fedtune.experiment import Experiment
from fedtune.runtime.client import client_evaluate, client_round

log = logging.getLogger("fedtune.inprocess")


class InProcessPool:
    """Runs the sampled clients one after another in this process.

    A client whose training raises is left out of the round (``failures`` names
    it and the error); the round loop decides whether enough updates remain.
    """

    def __init__(self, exp: Experiment, on_step: Callable[[], None] = lambda: None):
        self.exp = exp
        self.on_step = on_step
        self.client_states: dict[int, Tensors] = {cid: {} for cid in range(exp.num_clients)}
        self.failures: dict[int, str] = {}
        self.round_bytes = None  # nothing crosses a wire

    def train(self, rnd: int, payloads: dict[int, Payload], lr: float) -> list[ClientUpdate]:
        updates, self.failures = [], {}
        for cid in sorted(payloads):
            try:
                updates.append(client_round(self.exp, cid, rnd, payloads[cid], self.client_states[cid], lr,
                                            self.on_step))
            except Exception as e:  # a failing client must not stop the round; run_rounds enforces the minimum
                self.failures[cid] = f"{type(e).__name__}: {e}"
                log.warning("round %d: client %d failed: %s", rnd, cid, self.failures[cid], exc_info=True)
        return updates

    def evaluate(self, state: ServerState) -> dict[int, dict[str, float]]:
        return {
            cid: client_evaluate(self.exp, cid, state.global_tensors, self.client_states[cid])
            for cid in range(self.exp.num_clients)
            if len(self.exp.client_tests[cid])
        }

    def held_client_states(self) -> dict[int, Tensors]:
        return self.client_states

    def restore_client_states(self, states: dict[int, Tensors]) -> None:
        self.client_states.update(states)

    def clients_with_state_on_nodes(self) -> list[int]:
        return []

    def final_client_states(self) -> dict[int, Tensors]:
        return self.client_states
