"""FDLoRA (algorithm.name: fdlora): the server's rounds as the FedAMoLE reference code's baseline computes them,
the fusion's objective, what travels (the shared LoRA only), a seeded fusion search, and both runtimes alike.

Reference code: zyc140345/FedAMoLE at 41ebf755, ``baselines/node.py`` and ``baselines/fdlora.py``."""

import json

import numpy as np
import pytest
import torch

from fedtune.algorithms import ClientUpdate, ServerState, build_algorithm
from fedtune.algorithms.fdlora import NEXT_BATCH, PRIVATE, fuse, model_tensors
from fedtune.config import load_config
from fedtune.errors import FedtuneError

from test_flower import LocalGrid, local_grid_driver, tiny_cfg

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def _reference_rounds(initial, rounds_of_clients):
    """node.py ``Server.aggregate``: round −1 (l. 86-94) the plain mean, and a fresh
    ``SGD(lr=1.0, momentum=0.5, nesterov=True)`` over it (l. 98-101); later rounds (l. 64-77) grad = Σ_i (θ − θ_i)
    / n, then ``step()``."""
    adapter = None
    optimizer = None
    for r, clients in enumerate(rounds_of_clients):
        if r == 0:
            adapter = {k: sum(c[k] for c in clients) / len(clients) for k in initial}
            adapter = {k: v.clone().requires_grad_(False) for k, v in adapter.items()}
            optimizer = torch.optim.SGD(adapter.values(), lr=1.0, momentum=0.5, nesterov=True)
            continue
        optimizer.zero_grad()
        for k, t in adapter.items():
            t.grad = sum(t - c[k] for c in clients) / len(clients)
        optimizer.step()
    return adapter


def test_the_server_averages_then_steps_sgd_with_nesterov_momentum_as_the_reference_code():
    torch.manual_seed(0)
    initial = {A: torch.randn(2, 5), B: torch.zeros(3, 2)}
    rounds = [[{k: torch.randn_like(v) for k, v in initial.items()} for _ in range(3)] for _ in range(4)]
    algo = build_algorithm("fdlora", num_clients=3)
    state = algo.init(initial)
    for rnd, clients in enumerate(rounds, start=1):
        updates = [ClientUpdate(i, c, num_examples=10 * (i + 1)) for i, c in enumerate(clients)]  # sizes ignored
        state = algo.aggregate(rnd, iter(updates), state)
    expected = _reference_rounds(initial, rounds)
    for k in initial:
        assert torch.allclose(state.global_tensors[k], expected[k], atol=1e-6)


def test_the_fusion_combines_the_factors_as_get_final_adapter_and_keeps_the_head():
    """fdlora.py ``get_final_adapter`` (l. 55-63): Σ_j w_j · adapter_j, key by key, for (shared, private)."""
    shared = {A: torch.randn(2, 4), B: torch.randn(3, 2), "score.weight": torch.randn(2, 3)}
    private = {A: torch.randn(2, 4), B: torch.randn(3, 2)}
    fused = fuse(shared, private, (0.7, -1.2))
    for k in (A, B):
        assert torch.allclose(fused[k], 0.7 * shared[k] + -1.2 * private[k])
    assert torch.equal(fused["score.weight"], shared["score.weight"])


def _cfg(tmp_path, model, data, name, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", f"name={name}", f"model.name={model}", f"data.name={data}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=3", "algorithm.name=fdlora",
        "algorithm.options.sync_every=1", "partition.client_test_fraction=0.2", "partition.client_aux_fraction=0.2",
        "federation.rounds=3", "train.local_steps=3", "train.batch_size=8", "train.lr=0.02", "lora.r=4", "threads=1",
        *extra])


def test_fusion_score_is_the_reference_code_objective(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """fdlora.py ``get_score`` (l. 42-52): ``get_loss`` (l. 15-39: Σ over the batches of the batch's mean loss,
    divided by the rows) plus ``get_regular`` (l. 7-12: 0.05 · Σ|w| / len(w))."""
    from fedtune.algorithms import ClientContext
    from fedtune.experiment import build_experiment
    from fedtune.training import eval_batches

    exp = build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "score"))
    data = exp.clients[0]
    ctx = ClientContext(0, 1, exp.model, exp.initial, {}, examples=data.examples, aux=data.aux, forward=exp.forward)
    batches = [data.aux[:3], data.aux[3:5]]
    assert len(data.aux) >= 5
    weights = np.array([0.5, -1.0])
    score = exp.algorithm.fusion_score(ctx, exp.initial, batches, weights)
    exp.model.eval()
    with torch.no_grad():
        losses = [float(exp.model(**next(eval_batches(data.examples, b, len(b)))).loss) for b in batches]
    assert score == pytest.approx(sum(losses) / 5 + 0.05 * (0.5 + 1.0) / 2, rel=1e-6)


def _client_states(run_dir):
    from safetensors.torch import load_file

    return {p.name: load_file(p / "adapter_model.safetensors") for p in sorted((run_dir / "adapters").iterdir())}


def test_only_the_shared_lora_travels_and_each_client_keeps_a_fused_model(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.experiment import build_experiment
    from fedtune.run import execute
    from fedtune.runtime.checkpoint import load_checkpoint

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fd", "algorithm.options.fusion_batch_size=2")
    res = execute(cfg)
    exp = build_experiment(cfg)
    shared_bytes = sum(t.numel() * t.element_size() for t in exp.initial.values())
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] == r["bytes_down"] == 3 * shared_bytes for r in rows[1:])
    states = load_checkpoint(res.run_dir).client_states
    final = load_checkpoint(res.run_dir).state.global_tensors
    for cid, state in states.items():
        private = {n for n in state if n.startswith(PRIVATE)}
        assert private and all("lora_" in n for n in private)  # the private LoRA: factors only, kept by the client
        chunks = -(-len(exp.clients[cid].aux) // 2)  # auxiliary batches of 2 rows
        assert int(state[NEXT_BATCH]) == (2 * 5 * 5) % chunks  # 2 fusions × 5 candidates × 5 batches walked on
        mine = model_tensors(state)
        assert mine.keys() == final.keys() and any(not torch.equal(mine[n], final[n]) for n in mine if "lora_" in n)
    saved = _client_states(res.run_dir)
    assert sorted(saved) == ["client_0", "client_1", "client_2"]
    again = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fd-again",
                         "algorithm.options.fusion_batch_size=2"))  # the fusion search is seeded
    for name, tensors in _client_states(again.run_dir).items():
        assert all(torch.equal(tensors[k], saved[name][k]) for k in tensors)
    assert again.final == res.final


def test_both_runtimes_give_identical_fdlora_runs(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.run import execute, execute_with
    from fedtune.runlog import load_run

    over = dict(algorithm={"name": "fdlora", "options": {"sync_every": 1}},
                partition={"method": "iid", "num_clients": 3, "client_test_fraction": 0.2,
                           "client_aux_fraction": 0.2}, federation={"rounds": 3})
    a = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    b = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "grid", **over)
    execute(a)
    execute_with(b, local_grid_driver(LocalGrid(3)), "flower")
    for ra, rb in zip(load_run(a.run_dir).rows, load_run(b.run_dir).rows, strict=True):
        for key in ("bytes_up", "bytes_down", "client_eval/accuracy", "client_eval/loss"):
            assert ra.get(key) == rb.get(key), key
    sa, sb = _client_states(a.run_dir), _client_states(b.run_dir)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert all(torch.equal(sa[name][k], sb[name][k]) for k in sa[name])


def test_fdlora_needs_a_test_and_an_auxiliary_split_and_lora(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.experiment import build_experiment

    with pytest.raises(FedtuneError, match="client_aux_fraction"):
        build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x", "partition.client_aux_fraction=0"))
    with pytest.raises(FedtuneError, match="federates model.finetune=lora, not full"):
        build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x", "model.finetune=full", "lora.r=8"))
    with pytest.raises(FedtuneError, match="fuses each client's LoRAs when it is evaluated"):
        build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x", "eval.enabled=false"))
