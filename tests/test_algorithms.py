"""FedIT aggregation against hand computation, and the algorithm registry."""

import pytest
import torch

from fedtune.aggregation import tensor_bytes, weighted_mean
from fedtune.algorithms import ALGORITHMS, ClientUpdate, ServerState, build_algorithm
from fedtune.errors import FedtuneError


def test_fedit_is_the_data_size_weighted_mean_of_each_tensor():
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    a2, b2 = torch.tensor([[5.0, -2.0]]), torch.tensor([[0.0], [1.0]])
    updates = [
        ClientUpdate(0, {"lora_A": a1, "lora_B": b1}, num_examples=30),
        ClientUpdate(1, {"lora_A": a2, "lora_B": b2}, num_examples=10),
    ]
    algo = build_algorithm("fedit")
    state = algo.aggregate(1, updates, ServerState(0, {"lora_A": a1, "lora_B": b1}))
    # p = (0.75, 0.25): A = 0.75·[1, 2] + 0.25·[5, -2] = [2, 1]; B = 0.75·[3, 4] + 0.25·[0, 1] = [2.25, 3.25]
    assert torch.allclose(state.global_tensors["lora_A"], torch.tensor([[2.0, 1.0]]))
    assert torch.allclose(state.global_tensors["lora_B"], torch.tensor([[2.25], [3.25]]))
    assert state.round == 1


def test_weighted_mean_rejects_mismatched_updates_and_zero_weight():
    with pytest.raises(ValueError):
        weighted_mean([{"a": torch.ones(2)}, {"b": torch.ones(2)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_mean([{"a": torch.ones(2)}], [0])


def test_weighted_mean_keeps_dtype_and_is_order_independent():
    sets = [{"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(i))} for i in range(5)]
    w = [3, 1, 4, 1, 5]
    fwd = weighted_mean(sets, w)["w"]
    rev = weighted_mean(sets[::-1], w[::-1])["w"]
    assert fwd.dtype == torch.float32
    assert torch.allclose(fwd, rev, atol=1e-7)


def test_tensor_bytes_counts_numel_times_element_size():
    assert tensor_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}) == 3 * 4 * 4 + 5 * 2


def test_local_only_sends_nothing_and_keeps_personal_state():
    algo = build_algorithm("local")
    payloads = algo.configure(1, [0, 1], ServerState(0, {"w": torch.ones(2)}))
    assert all(not p.tensors for p in payloads.values())
    assert algo.personalized


def test_unknown_algorithm_and_bad_options_are_one_line_errors():
    with pytest.raises(FedtuneError, match="unknown algorithm 'fedavgg'.*fedit"):
        build_algorithm("fedavgg")
    with pytest.raises(FedtuneError, match="invalid algorithm.options for 'fedit'"):
        build_algorithm("fedit", {"momentum": 0.9})
    assert {"fedit", "local", "centralized"} <= set(ALGORITHMS)
