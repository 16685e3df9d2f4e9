"""The registry of federated algorithms: one small class per method, found by name."""

from __future__ import annotations

import difflib
from typing import Any

from fedtune.algorithms.base import Algorithm, ClientContext, ClientUpdate, Expected, LoraSetup, Payload, ServerState
from fedtune.algorithms.clustered import Clustered
from fedtune.algorithms.fedkd import FedKD
from fedtune.algorithms.fedamole import FedAMoLE
from fedtune.algorithms.fedit import Centralized, FedIT
from fedtune.algorithms.fedprox import FedProx
from fedtune.algorithms.hetero_lora import FLoRA, FLoRIST, FlexLoRA
from fedtune.algorithms.local import LocalOnly
from fedtune.algorithms.scaffold import Scaffold
from fedtune.algorithms.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.errors import FedtuneError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (FedIT, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi, FedAdagrad, Clustered, LocalOnly, Centralized,
                FLoRA, FLoRIST, FlexLoRA, FedKD, FedAMoLE)
}


def build_algorithm(name: str, options: dict[str, Any] | None = None, lora: LoraSetup | None = None,
                    rounds: int | None = None, num_clients: int | None = None) -> Algorithm:
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, ALGORITHMS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedtuneError(f"unknown algorithm '{name}'{hint} (choose one of: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name].create(options, lora, rounds, num_clients)


__all__ = [
    "ALGORITHMS", "Algorithm", "ClientContext", "ClientUpdate", "Expected", "LoraSetup", "Payload", "ServerState", "build_algorithm",
]
