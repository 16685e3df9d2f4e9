"""FedIT: federated instruction tuning by FedAvg over LoRA adapters.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning" (ICASSP 2024); McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data" (AISTATS 2017).

Each sampled client i starts from the global adapters, trains locally on its
n_i examples and returns its trainable tensors θ_i (LoRA A and B, and the task
head when it is trained; every parameter with ``model.finetune: full``, which
makes this full-parameter FedAvg). The server averages each tensor separately::

    θ ← Σ_i p_i θ_i,    p_i = n_i / Σ_j n_j   over the round's clients

(the run's ``algorithm.reducer``: this mean by default, folded as updates
arrive; a robust rule such as the coordinate-wise median instead).

With heterogeneous ranks (``lora.client_ranks``) this is FedIT with zero
padding: A_i gets zero rows and B_i zero columns up to r_max before the
average, and client i receives the global factors cut to its rank r_i.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune.algorithms.base import Algorithm, ClientUpdate, ServerState
from fedtune.models.lora import fit_lora_rank


class FedIT(Algorithm):
    name = "fedit"
    summary = "FedAvg of the trained tensors (LoRA A, B and head, or every parameter), weighted by client data size"
    mean_of_changes = True

    def aggregate(self, rnd: int, updates: Iterable[ClientUpdate], state: ServerState) -> ServerState:
        r = self.lora.max_rank
        tensors = self.reduce((u.client_id, u.tensors if r is None else fit_lora_rank(u.tensors, r), u.num_examples)
                              for u in updates)
        return ServerState(round=rnd, global_tensors=tensors, extra=state.extra)


class Centralized(FedIT):
    """The upper reference: all shards pooled into one client, same model and optimiser.

    Each round trains ``local_steps × clients_per_round`` steps, so the total
    compute equals that of the federated runs it is compared with.
    """

    name = "centralized"
    summary = "pooled data, one trainer (the upper reference; no communication)"
    pools_data = True
    mean_of_changes = False
