"""FedProx and SCAFFOLD: against hand computations on a toy model, and through whole runs on both runtimes.

The toy: one trainable vector w ∈ R², client i's loss ½‖w − a_i‖² (gradient w − a_i), plain SGD without
clipping, so every step can be written down by hand.
"""

import itertools
from types import SimpleNamespace

import pytest
import torch

from fedtune.algorithms import ClientContext, build_algorithm
from fedtune.config import TrainConfig
from fedtune.errors import FedtuneError
from fedtune.models.lora import trainable_state
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.training import train_local
from fedtune.usage import MEASURED
from test_flower import LocalGrid, adapter, local_grid_driver, tiny_cfg

TARGETS = {0: torch.tensor([1.0, -2.0]), 1: torch.tensor([-3.0, 0.5])}
SIZES = {0: 30, 1: 10}
LR, STEPS = 0.1, 3


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def toy_round(algo, model, rnd, state, client_states):
    """One round as :func:`fedtune.runtime.client.client_round` runs it, on the toy model."""
    payloads = algo.configure(rnd, sorted(TARGETS), state)
    updates = []
    for cid, a in TARGETS.items():
        ctx = ClientContext(cid, rnd, model, initial={"w": torch.zeros(2)}, state=client_states[cid],
                            payload=payloads[cid], lr=LR, steps=STEPS, num_examples=SIZES[cid])
        algo.prepare(ctx, payloads[cid])
        ctx.start = trainable_state(model)
        train_local(model, itertools.repeat({"input_ids": torch.zeros(1, 1)}), STEPS,
                    TrainConfig(optimizer="sgd", lr=LR, max_grad_norm=None), LR,
                    loss_fn=lambda batch, out: algo.loss(ctx, batch, out),
                    after_step=lambda: algo.after_step(ctx),
                    forward=lambda m, batch: SimpleNamespace(loss=0.5 * ((m.w - a) ** 2).sum()))
        updates.append(algo.update(ctx))
    return algo.aggregate(rnd, updates, state), updates


def test_fedprox_two_rounds_by_hand():
    mu = 0.5
    algo = build_algorithm("fedprox", {"mu": mu})
    model, x = Toy(), torch.tensor([0.5, 0.5])
    state = algo.init({"w": x.clone()})
    p = {0: 0.75, 1: 0.25}
    for rnd in (1, 2):
        state, _ = toy_round(algo, model, rnd, state, {0: {}, 1: {}})
        expected = torch.zeros(2)
        for cid, a in TARGETS.items():
            y = x.clone()
            for _ in range(STEPS):  # gradient of ½‖y − a‖² + μ/2 ‖y − x‖²
                y = y - LR * ((y - a) + mu * (y - x))
            expected += p[cid] * y
        x = expected
        assert torch.allclose(state.global_tensors["w"], x, atol=1e-6), rnd


def test_scaffold_two_rounds_and_control_variates_by_hand():
    N = 4  # two of four clients take part
    algo = build_algorithm("scaffold", {"server_lr": 0.8}, num_clients=N)
    model = Toy()
    x, c = torch.tensor([0.5, 0.5]), torch.zeros(2)
    c_i = {0: torch.zeros(2), 1: torch.zeros(2)}
    client_states = {0: {}, 1: {}}
    state = algo.init({"w": x.clone()})
    p = {0: 0.75, 1: 0.25}
    for rnd in (1, 2):
        state, updates = toy_round(algo, model, rnd, state, client_states)
        ys, deltas = {}, {}
        for cid, a in TARGETS.items():
            y = x.clone()
            for _ in range(STEPS):
                y = y - LR * (y - a)          # the SGD step
                y = y - LR * (c - c_i[cid])   # the correction
            c_new = c_i[cid] - c + (x - y) / (STEPS * LR)
            ys[cid], deltas[cid] = y, c_new - c_i[cid]
            c_i[cid] = c_new
        x = x + 0.8 * sum(p[cid] * (ys[cid] - x) for cid in TARGETS)
        c = c + sum(deltas.values()) / N
        assert torch.allclose(state.global_tensors["w"], x, atol=1e-5), rnd
        assert torch.allclose(state.extra["scaffold/c/w"], c, atol=1e-5), rnd
        for u in updates:
            assert torch.allclose(u.tensors["scaffold/delta_c/w"], deltas[u.client_id], atol=1e-5)
            assert torch.allclose(client_states[u.client_id]["w"], c_i[u.client_id], atol=1e-5)
    assert c.abs().sum() > 0 and all(ci.abs().sum() > 0 for ci in c_i.values())  # the corrections were live


def test_scaffold_refuses_heterogeneous_ranks_and_a_run_without_client_count():
    from fedtune.algorithms import LoraSetup

    from fedtune.config import load_config

    ranks = load_config(None, ["algorithm.name=scaffold", "partition.num_clients=2", "lora.client_ranks=[8, 4]"])
    with pytest.raises(FedtuneError, match="scaffold.*one LoRA rank"):
        build_algorithm("scaffold", lora=LoraSetup(2.0, (8, 4))).check(ranks)
    algo = build_algorithm("scaffold")
    state = algo.init({"w": torch.zeros(2)})
    _, updates = toy_round(build_algorithm("scaffold", num_clients=2), Toy(), 1, state, {0: {}, 1: {}})
    with pytest.raises(FedtuneError, match="number of clients"):
        algo.aggregate(1, updates, state)


def _rows_without_times(run_dir):
    """The run's rows without what measures the machine (seconds, throughput, memory)."""
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in MEASURED}
            for r in load_run(run_dir).rows]


def test_fedprox_with_mu_zero_is_fedit_bit_for_bit(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    runs = {}
    for name, algo in (("fedit", {"name": "fedit"}), ("prox0", {"name": "fedprox", "options": {"mu": 0.0}})):
        cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, algorithm=algo)
        runs[name] = execute(cfg).run_dir
    a, b = adapter(runs["fedit"]), adapter(runs["prox0"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows_without_times(runs["fedit"]) == _rows_without_times(runs["prox0"])
    # μ > 0 changes the result (the option reaches the loss)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "prox", algorithm={"name": "fedprox",
                                                                                 "options": {"mu": 10.0}})
    c = adapter(execute(cfg).run_dir)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_scaffold_same_models_and_bytes_on_both_runtimes(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    over = dict(algorithm={"name": "scaffold"}, train={"local_steps": 3, "batch_size": 8, "lr": 2e-2},
                federation={"rounds": 2, "clients_per_round": 2})
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    execute(cfg)
    flw = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower", **over)
    execute_with(flw, local_grid_driver(LocalGrid(3)), "flower")
    a, b = adapter(cfg.run_dir), adapter(flw.run_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    rows_a, rows_b = load_run(cfg.run_dir).rows, load_run(flw.run_dir).rows
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["clients"], ra["bytes_up"], ra["bytes_down"]) == (rb["clients"], rb["bytes_up"], rb["bytes_down"])
    # Down: x and c; up: y and Δc, per client: twice the trainable tensors each way.
    trainable = sum(t.numel() * 4 for t in a.values())
    assert rows_a[1]["bytes_down"] == rows_a[1]["bytes_up"] == 2 * 2 * trainable
