"""FedIT aggregation against hand computation, and the algorithm registry."""

import json
import math

import pytest
import torch

from fedtune.aggregation import tensor_bytes, weighted_mean
from fedtune.algorithms import ALGORITHMS, ClientUpdate, ServerState, build_algorithm
from fedtune.config import TrainConfig
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


def test_misspelt_algorithm_names_and_options_get_did_you_mean():
    with pytest.raises(FedtuneError, match=r"unknown algorithm 'fedadm'; did you mean 'fedadam'\? \(choose one of: "):
        build_algorithm("fedadm")
    with pytest.raises(FedtuneError) as err:
        build_algorithm("fedadam", {"server_lrr": 0.1})
    assert str(err.value) == ("invalid algorithm.options for 'fedadam': unknown key 'algorithm.options.server_lrr'; "
                              "did you mean 'server_lr'? (valid keys here: beta1, beta2, cooldown_fraction, "
                              "min_lr_ratio, schedule, server_lr, tau)")
    with pytest.raises(FedtuneError, match=r"'algorithm.options.mode': Input should be 'merge' or 'truncate'"):
        build_algorithm("florist", {"mode": "trunc"})


def _round(algo, state, *client_tensors, sizes=None):
    sizes = sizes or [1] * len(client_tensors)
    updates = [ClientUpdate(i, {"w": w}, num_examples=n) for i, (w, n) in enumerate(zip(client_tensors, sizes))]
    return algo.aggregate(state.round + 1, updates, state)


def test_fedavgm_is_fedit_without_momentum_and_accumulates_with_it():
    x0 = torch.tensor([1.0, -2.0])
    plain = build_algorithm("fedavgm", {"momentum": 0.0, "server_lr": 1.0})
    state = _round(plain, ServerState(0, {"w": x0}), torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0]), sizes=[1, 3])
    assert torch.allclose(state.global_tensors["w"], torch.tensor([1.5, 0.0]))  # FedIT: 0.25·3 + 0.75·1

    algo = build_algorithm("fedavgm", {"momentum": 0.5, "server_lr": 2.0})
    s1 = _round(algo, ServerState(0, {"w": x0}), x0 + 1.0)  # Δ1 = 1: v = 1, x = x0 + 2
    assert torch.allclose(s1.global_tensors["w"], x0 + 2.0)
    s2 = _round(algo, s1, s1.global_tensors["w"] - 1.0)  # Δ2 = -1: v = 0.5·1 − 1 = −0.5, x −= 1
    assert torch.allclose(s2.global_tensors["w"], x0 + 1.0)


@pytest.mark.parametrize("name, reference", [
    ("fedadam", lambda p, o: torch.optim.Adam([p], lr=o["server_lr"], betas=(o["beta1"], o["beta2"]), eps=o["tau"])),
    ("fedadagrad", lambda p, o: torch.optim.Adagrad([p], lr=o["server_lr"], eps=o["tau"])),
])
def test_adaptive_server_optimisers_equal_torch_optimisers_on_minus_the_pseudo_gradient(name, reference):
    """Δ = mean(x_i) − x plays the role of −g: the server step is the torch optimiser's step on g = −Δ."""
    opts = {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3} if name == "fedadam" else \
        {"server_lr": 0.05, "beta1": 0.0, "tau": 1e-3}
    algo = build_algorithm(name, opts)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen)
    p = torch.nn.Parameter(x.clone())
    ref = reference(p, opts)
    state = ServerState(0, {"w": x})
    for _ in range(4):
        clients = [state.global_tensors["w"] + 0.1 * torch.randn(3, 4, generator=gen) for _ in range(3)]
        delta = torch.stack(clients).mean(0) - state.global_tensors["w"]
        state = _round(algo, state, *clients)
        p.grad = -delta
        ref.step()
        assert torch.allclose(state.global_tensors["w"], p.detach(), atol=1e-6)
    assert int(state.extra["server_opt/step"]) == 4


def test_fedyogi_second_moment_moves_additively_by_sign():
    algo = build_algorithm("fedyogi", {"server_lr": 1.0, "beta1": 0.0, "beta2": 0.5, "tau": 0.0})
    x = torch.tensor([0.0, 0.0])
    # v0 = [4, 0.25], Δ = [1, 1]: v = v0 − 0.5·Δ²·sign(v0 − Δ²) = [3.5, 0.75]; t = 2: v̂ = v / (1 − 0.25)
    state = ServerState(1, {"w": x}, extra={"server_opt/step": torch.tensor(1),
                                            "server_opt/v/w": torch.tensor([4.0, 0.25])})
    state = _round(algo, state, x + 1.0)
    assert torch.allclose(state.extra["server_opt/v/w"], torch.tensor([3.5, 0.75]))
    v_hat = torch.tensor([3.5, 0.75]) / 0.75
    assert torch.allclose(state.global_tensors["w"], 1.0 / v_hat.sqrt())


def test_fedadam_over_one_sgd_step_is_adam_on_the_union_batch():
    """Clients take one SGD step (lr 1) on their batches; FedAdam then moves like Adam on all the batches at once."""
    from fedtune.config import TrainConfig
    from fedtune.training import train_local

    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randn(4, 3, generator=gen), "y": torch.randn(4, 1, generator=gen)} for _ in range(2)]
    forward = lambda m, b: m(b["input_ids"])  # noqa: E731
    loss_fn = lambda b, out: torch.nn.functional.mse_loss(out, b["y"])  # noqa: E731
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(local_steps=1, lr=1.0, optimizer="sgd", max_grad_norm=None)
    updates = []
    for i, batch in enumerate(batches):
        model.load_state_dict(start)
        train_local(model, iter([batch]), 1, cfg, 1.0, loss_fn, forward=forward)
        updates.append(ClientUpdate(i, {n: p.detach().clone() for n, p in model.named_parameters()}, num_examples=4))
    opts = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
    state = build_algorithm("fedadam", opts).aggregate(1, updates, ServerState(0, start))

    model.load_state_dict(start)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    loss_fn(union, forward(model, union)).backward()
    adam.step()
    for n, p in model.named_parameters():
        assert torch.allclose(state.global_tensors[n], p.detach(), atol=1e-6)


def test_server_step_size_schedules():
    cos = build_algorithm("fedadam", {"schedule": "cosine", "min_lr_ratio": 0.1}, rounds=5)
    assert [round(cos.schedule_factor(r), 6) for r in (1, 3, 5)] == [1.0, 0.55, 0.1]
    cool = build_algorithm("fedavgm", {"schedule": "cooldown", "cooldown_fraction": 0.5, "min_lr_ratio": 0.0}, rounds=5)
    assert [cool.schedule_factor(r) for r in range(1, 6)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    # the step applied is η_r times the optimiser's direction
    state = _round(cool, ServerState(3, {"w": torch.zeros(1)}, extra={"server_opt/step": torch.tensor(3)}),
                   torch.ones(1))
    assert torch.allclose(state.global_tensors["w"], torch.tensor([0.5])) and state.metrics["server_lr"] == 0.5
    with pytest.raises(FedtuneError, match="needs the run's number of rounds"):
        build_algorithm("fedadam", {"schedule": "cosine"}).schedule_factor(1)


def test_adaptive_server_optimisers_advise_against_a_client_lr_schedule():
    cosine = TrainConfig(optimizer="sgd", lr=1.0, lr_schedule="cosine")
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        (line,) = build_algorithm(name).advice(cosine)
        assert name in line and "algorithm.options.schedule" in line
        assert build_algorithm(name).advice(TrainConfig(optimizer="sgd", lr=1.0)) == []
    assert build_algorithm("fedavgm").advice(cosine) == [] and build_algorithm("fedit").advice(cosine) == []


# --------------------------------------------------------------------------- options from a config, through the algorithm


def _configured(name: str, rounds: int = 2, **options):
    from fedtune.algorithms import RunFacts
    from fedtune.config import load_config
    from fedtune.experiment import algorithm_for

    cfg = load_config(None, [f"algorithm.name={name}", f"federation.rounds={rounds}",
                             *(f"algorithm.options.{k}={v}" for k, v in options.items())])
    return algorithm_for(cfg).bind(RunFacts(rounds=cfg.federation.rounds))


def _two_steps(algo, d1: float = 1.0, d2: float = 3.0) -> tuple[float, float]:
    """x after rounds 1 and 2 from x = 0, where the clients' average moves x by Δ1 = d1, then Δ2 = d2."""
    s1 = _round(algo, ServerState(0, {"w": torch.zeros(1)}), torch.tensor([d1]))
    s2 = _round(algo, s1, s1.global_tensors["w"] + d2)
    return float(s1.global_tensors["w"]), float(s2.global_tensors["w"])


# Δ1 = 1, Δ2 = 3 with η = 1, β1 = β2 = 1/2, τ = 0 as the base; each row changes one option.
# Adam: m2 = ½·½ + ½·3 = 1.75, v2 = ½·½ + ½·9 = 4.75, bias corrections 1 − ½² = 0.75;
# with β2 = 0.9: v1 = 0.1, v2 = 0.09 + 0.9 = 0.99, correction 1 − 0.81. Step 1 is η Δ1 / (|Δ1| + τ).
# Yogi: v1 = 0 + ½·1 = ½, v2 = ½ + ½·9 = 5 (v < Δ² adds); with β2 = 0.9: v2 = 0.1 + 0.9 = 1.
# Adagrad: v2 = 1 + 9 = 10, no correction.
_BASE = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.0}
_ADAGRAD = {k: v for k, v in _BASE.items() if k != "beta2"}


@pytest.mark.parametrize("name, options, x1, x2", [
    ("fedadam", _BASE, 1.0, 1 + (1.75 / 0.75) / math.sqrt(4.75 / 0.75)),
    ("fedadam", {**_BASE, "server_lr": 0.5}, 0.5, 0.5 + 0.5 * (1.75 / 0.75) / math.sqrt(4.75 / 0.75)),
    ("fedadam", {**_BASE, "tau": 1.0}, 0.5, 0.5 + (1.75 / 0.75) / (math.sqrt(4.75 / 0.75) + 1)),
    ("fedadam", {**_BASE, "beta1": 0.0}, 1.0, 1 + 3 / math.sqrt(4.75 / 0.75)),
    ("fedadam", {**_BASE, "beta2": 0.9}, 1.0, 1 + (1.75 / 0.75) / math.sqrt(0.99 / 0.19)),
    ("fedyogi", _BASE, 1.0, 1 + (1.75 / 0.75) / math.sqrt(5 / 0.75)),
    ("fedyogi", {**_BASE, "beta2": 0.9}, 1.0, 1 + (1.75 / 0.75) / math.sqrt(1 / 0.19)),
    ("fedyogi", {**_BASE, "server_lr": 0.5, "tau": 1.0}, 0.25, 0.25 + 0.5 * (1.75 / 0.75) / (math.sqrt(5 / 0.75) + 1)),
    ("fedadagrad", _ADAGRAD, 1.0, 1 + (1.75 / 0.75) / math.sqrt(10)),
    ("fedadagrad", {**_ADAGRAD, "beta1": 0.0}, 1.0, 1 + 3 / math.sqrt(10)),
    ("fedadagrad", {**_ADAGRAD, "server_lr": 0.5, "tau": 1.0}, 0.25, 0.25 + 0.5 * (1.75 / 0.75) / (math.sqrt(10) + 1)),
    # FedAvgM: v ← β v + Δ, x ← x + η v
    ("fedavgm", {"server_lr": 1.0, "momentum": 0.0}, 1.0, 4.0),
    ("fedavgm", {"server_lr": 1.0, "momentum": 0.5}, 1.0, 1 + (0.5 + 3)),
    ("fedavgm", {"server_lr": 2.0, "momentum": 0.0}, 2.0, 2 + 2 * 3),
])
def test_each_server_optimiser_option_from_a_config_changes_the_step_as_computed_by_hand(name, options, x1, x2):
    assert _two_steps(_configured(name, **options)) == pytest.approx((x1, x2), rel=1e-6)


@pytest.mark.parametrize("options, eta2", [
    ({}, 1.0),
    ({"schedule": "cosine"}, 0.1 + 0.9 * 0.5),  # 3 rounds: round 2 is half way, min_lr_ratio 0.1 by default
    ({"schedule": "cosine", "min_lr_ratio": 0.5}, 0.5 + 0.5 * 0.5),
    ({"schedule": "cooldown", "cooldown_fraction": 0.5}, 1.0),  # round 2 is before the last half
    ({"schedule": "cooldown", "cooldown_fraction": 1.0, "min_lr_ratio": 0.0}, 0.5),  # half way down to 0
])
def test_server_schedule_options_from_a_config_scale_the_step_of_round_2(options, eta2):
    algo = _configured("fedavgm", rounds=3, server_lr=1.0, momentum=0.0, **options)
    assert _two_steps(algo) == pytest.approx((1.0, 1.0 + eta2 * 3), rel=1e-6)


def test_after_local_training_scores_each_trained_client_on_its_own_test_shard(tmp_path, tiny_model_dir,
                                                                               tiny_tsv_dataset):
    """FedIT-FT: the round's clients score the model they just trained, before aggregation."""
    from fedtune.config import load_config
    from fedtune.evaluation import mean_metrics
    from fedtune.experiment import build_experiment
    from fedtune.runlog import RunLog
    from fedtune.runtime.inprocess import InProcessPool
    from fedtune.runtime.server import run_rounds

    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=ft", f"model.name={tiny_model_dir}", f"data.name={tiny_tsv_dataset}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=3",
        "partition.client_test_fraction=0.25", "eval.after_local_training=true", "federation.rounds=2",
        "train.local_steps=3", "train.lr=1e-2", "threads=1", "eval.every=2",
    ])
    exp = build_experiment(cfg)
    updates = []

    class Keeping(InProcessPool):
        def train(self, rnd, payloads, lr):
            kept = []
            updates.append(kept)
            for u in super().train(rnd, payloads, lr):
                kept.append(u)
                yield u

    run_rounds(exp, Keeping(exp), RunLog(cfg.run_dir))
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "client_ft/accuracy" not in rows[1] and "client_ft/accuracy" in rows[2]  # evaluated rounds only
    scores = {}
    for u in updates[1]:
        exp.load(u.tensors)  # the trained model the client sent
        scores[u.client_id] = exp.evaluate(exp.clients[u.client_id].examples, exp.clients[u.client_id].test)
        assert u.metrics["ft/accuracy"] == scores[u.client_id]["accuracy"]
    assert rows[2]["client_ft/accuracy"] == pytest.approx(mean_metrics(scores)["accuracy"])
    with pytest.raises(FedtuneError, match="client_test_fraction"):
        build_experiment(cfg.model_copy(update={"partition": cfg.partition.model_copy(
            update={"client_test_fraction": 0.0})}))
