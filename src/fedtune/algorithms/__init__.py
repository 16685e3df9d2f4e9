"""The registry of federated algorithms: one small class per method, found by name."""

from __future__ import annotations

import difflib
from typing import Any

from fedtune.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Expected,
    LoraSetup,
    Payload,
    Rule,
    RunFacts,
    ServerState,
)
from fedtune.algorithms.clip import Clip
from fedtune.algorithms.clustered import Clustered
from fedtune.algorithms.dp import Dp
from fedtune.algorithms.fedkd import FedKD
from fedtune.algorithms.fdlora import FDLoRA
from fedtune.algorithms.fedamole import FedAMoLE
from fedtune.algorithms.fedit import Centralized, FedIT
from fedtune.algorithms.ffa import FFALoRA
from fedtune.algorithms.fedprox import FedProx
from fedtune.algorithms.hetero_lora import FLoRA, FLoRIST, FlexLoRA
from fedtune.algorithms.local import LocalOnly
from fedtune.algorithms.scaffold import Scaffold
from fedtune.algorithms.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.algorithms.wrapper import Wrapper
from fedtune.errors import FedtuneError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (FedIT, FedProx, Scaffold, FedAvgM, FedAdam, FedYogi, FedAdagrad, Clustered, LocalOnly, Centralized,
                FLoRA, FLoRIST, FlexLoRA, FFALoRA, FedKD, FedAMoLE, FDLoRA)
}


WRAPPERS: dict[str, type[Wrapper]] = {cls.name: cls for cls in (Clip, Dp)}
"""The wrappers ``algorithm.wrappers`` can name."""


def build_algorithm(name: str, options: dict[str, Any] | None = None, lora: LoraSetup | None = None,
                    **facts: Any) -> Algorithm:
    """Algorithm ``name`` with ``options``; ``facts`` (fields of :class:`RunFacts`, e.g. ``num_clients=4``) are
    bound at once, as a run binds them once its partition is drawn."""
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, ALGORITHMS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedtuneError(f"unknown algorithm '{name}'{hint} (choose one of: {', '.join(ALGORITHMS)})")
    algorithm = ALGORITHMS[name].create(options, lora)
    if facts:
        if "client_groups" in facts and facts["client_groups"] is not None:
            facts["client_groups"] = tuple(facts["client_groups"])
        algorithm.bind(RunFacts(**facts))
    return algorithm


def wrap(algorithm: Algorithm, wrappers: list[Any]) -> Algorithm:
    """``algorithm`` inside each of ``wrappers`` (``algorithm.wrappers`` entries, innermost first)."""
    for w in wrappers:
        if w.name not in WRAPPERS:
            close = difflib.get_close_matches(w.name, WRAPPERS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FedtuneError(f"unknown wrapper '{w.name}' in algorithm.wrappers{hint} (choose from: "
                               f"{', '.join(WRAPPERS) or 'none registered'})")
        algorithm = WRAPPERS[w.name](algorithm, w.options)
    return algorithm


__all__ = [
    "ALGORITHMS", "WRAPPERS", "Algorithm", "ClientContext", "ClientUpdate", "Expected", "LoraSetup", "Payload", "Rule",
    "RunFacts", "ServerState", "Wrapper", "build_algorithm", "wrap",
]
