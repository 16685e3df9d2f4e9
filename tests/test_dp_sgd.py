"""Record-level DP-SGD: per-row gradients equal single-row backward passes, clipping, noise, Poisson batches."""

import json

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.dp_noise import SecretStream, noise_key
from fedtune.dp_sgd import PrivateGradient, example_losses, per_row_gradients, poisson_batches
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute
from test_flower import tiny_cfg


def _single_row_gradients(exp, rows):
    """The reference: each row alone through the model, its own loss, one backward each."""
    data, model = exp.client(0), exp.model
    out = []
    for i in rows:
        model.zero_grad()
        one = data.examples.collate([i])
        example_losses(one, exp.forward(model, one)).sum().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


def _assert_per_row_gradients_match(exp, count):
    exp.model.eval()  # dropout off: a row's gradient is then a function of that row alone
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at 0, where A's gradient is 0: move every trained tensor off it
        for p in exp.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    rows = exp.client(0).train[:count]
    batch = exp.client(0).examples.collate(rows)  # padded to the batch's longest row
    per_row = per_row_gradients(exp.model, batch, exp.forward)
    reference = _single_row_gradients(exp, rows)
    trained = [n for n, p in exp.model.named_parameters() if p.requires_grad]
    assert set(per_row) == set(trained) and any("lora_A" in n for n in trained)
    for b, ref in enumerate(reference):
        for n in trained:
            torch.testing.assert_close(per_row[n][b], ref[n], rtol=1e-4, atol=1e-6, msg=f"row {b}, {n}")
    # every tensor has a gradient, and the rows' differ: gradients attributed to the wrong row would show
    for n in trained:
        assert per_row[n][0].abs().max() > 0 and not torch.allclose(per_row[n][0], per_row[n][1]), n


def test_per_row_gradients_equal_single_row_passes_on_the_bert_classifier(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    exp = build_experiment(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "bert"))
    _assert_per_row_gradients_match(exp, 6)


def test_per_row_gradients_equal_single_row_passes_on_the_llama_sft_model(tmp_path, tiny_llama_dir,
                                                                          tiny_alpaca_dataset):
    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.name={tiny_llama_dir}", "model.task=sft",
                             "model.max_length=64", f"data.name={tiny_alpaca_dataset}", "partition.num_clients=2",
                             "privacy.dp_sgd={enabled: true, clip: 1.0, noise_multiplier: 1.0}"])
    exp = build_experiment(cfg)
    batch = exp.client(0).examples.collate(exp.client(0).train[:3])
    assert batch["input_ids"].shape[1] > 1 and (batch["attention_mask"] == 0).any()  # rows of several lengths
    _assert_per_row_gradients_match(exp, 5)


def test_a_private_step_clips_every_row_and_adds_noise_of_sigma_c_over_b(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    exp = build_experiment(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "step"))
    model = exp.model
    model.eval()
    batch = exp.client(0).examples.collate(exp.client(0).train[:8])
    task = lambda b, out: out.loss  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # no clipping (C huge), no noise: the sum of the rows' gradients over the expected batch
    exact = PrivateGradient(clip=1e9, noise_multiplier=0.0, expected_batch=4.0,
                            noise=SecretStream(noise_key({}, None), "test", 1))
    exact.backward(model, batch, exp.forward, task, lambda: torch.autocast("cpu", enabled=False))
    private = [p.grad.clone() for _, p in params]
    mean = model(**batch).loss  # the batch's mean loss: its gradient times 8 rows / 4 expected
    grads = torch.autograd.grad(mean, [p for _, p in params])
    for mine, g in zip(private, grads):
        torch.testing.assert_close(mine, g * 8 / 4, rtol=1e-4, atol=1e-7)

    # a small C: every row's clipped gradient has norm ≤ C, and the sum over the expected batch is bounded by it
    small = PrivateGradient(clip=1e-3, noise_multiplier=0.0, expected_batch=8.0,
                            noise=SecretStream(noise_key({}, None), "test", 1))
    small.backward(model, batch, exp.forward, task, lambda: torch.autocast("cpu", enabled=False))
    assert len(small.clipped_norms) == 8 and max(small.clipped_norms) <= 1e-3 * (1 + 1e-9)
    assert sum(float(p.grad.pow(2).sum()) for _, p in params) ** 0.5 <= 1e-3 * 8 / 8 * (1 + 1e-6)

    # an empty Poisson batch: the step is the noise alone, N(0, σ²C²) / B per coordinate
    empty = exp.client(0).examples.collate([])
    noisy = PrivateGradient(clip=0.5, noise_multiplier=2.0, expected_batch=4.0,
                            noise=SecretStream(noise_key({}, None), "test", 1))
    draws = []
    for _ in range(40):
        noisy.backward(model, empty, exp.forward, task, lambda: torch.autocast("cpu", enabled=False))
        draws.append(torch.cat([p.grad.flatten() for _, p in params]))
    std = float(torch.stack(draws).std())
    assert std == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02)


def test_fedprox_under_dp_sgd_adds_its_proximal_gradient_unclipped(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.algorithms import ClientContext, build_algorithm

    exp = build_experiment(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "prox"))
    model = exp.model
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() + 0.3 for n, p in params}  # θ_g away from θ: the proximal term pulls
    algo = build_algorithm("fedprox", {"mu": 0.7})
    ctx = ClientContext(0, 1, model, exp.initial, {}, start=start)
    empty = exp.client(0).examples.collate([])
    step = PrivateGradient(clip=1.0, noise_multiplier=0.0, expected_batch=4.0,
                           noise=SecretStream(noise_key({}, None), "test", 1))
    step.backward(
        model, empty, exp.forward, lambda b, out: algo.loss(ctx, b, out), lambda: torch.autocast("cpu", enabled=False))
    for n, p in params:  # no rows, no noise: the gradient is μ(θ − θ_g) alone, not clipped to C
        torch.testing.assert_close(p.grad, 0.7 * (p.detach() - start[n]))


def test_poisson_batches_draw_each_row_with_probability_q():
    from fedtune.training import Encoded

    data = Encoded({"input_ids": [[1, 2, 3]] * 50}, np.zeros(50, dtype=np.int64), pad_id=0)
    stream = poisson_batches(data, np.arange(50), 0.1, np.random.default_rng(0))
    sizes = [len(next(stream)["input_ids"]) for _ in range(2000)]
    assert np.mean(sizes) == pytest.approx(5.0, rel=0.05) and 0 in sizes
    assert next(poisson_batches(data, np.arange(50), 0.0, np.random.default_rng(0)))["input_ids"].shape == (0, 0)


def test_a_dp_sgd_run_reports_each_clients_epsilon_from_its_own_steps(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "sgd", partition={"method": "quantity",
                   "num_clients": 3, "min_client_size": 10}, federation={"rounds": 2, "clients_per_round": 2},
                   privacy={"dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": 1.1}})
    res = execute(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = json.loads((res.run_dir / "partition.json").read_text())["train_sizes"]
    steps = [0, 0, 0]
    for row in rows[1:]:
        for c in row["clients"]:
            steps[c] += 3  # train.local_steps
        for c in range(3):  # dp-accounting, composed here from the rows' own sampling
            expected = 0.0
            if steps[c]:
                acc = RdpAccountant()
                acc.compose(dp_accounting.PoissonSampledDpEvent(min(1, 8 / sizes[c]),
                                                                dp_accounting.GaussianDpEvent(1.1)), steps[c])
                expected = acc.get_epsilon(1e-5)
            assert row["privacy/epsilon_by_client"][str(c)] == pytest.approx(expected, rel=1e-9)
        assert row["privacy/epsilon"] == max(row["privacy/epsilon_by_client"].values())
        assert row["privacy/unit"] == "record"
    summary = json.loads((res.run_dir / "summary.json").read_text())["privacy"]
    assert summary["steps_by_client"] == {str(c): s for c, s in enumerate(steps)}
    assert min(steps) < max(steps)  # clients sampled unequally: their ε differ


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=2", "train.grad_accum > 1"),
    ("train.precision=fp16", "fp16 scales the loss"),
    ("train.gradient_checkpointing=true", "gradient_checkpointing"),
    ("algorithm.name=fedamole", "adds a term of the whole batch"),
    ("model.finetune=prompt", "model.finetune=prompt: its virtual tokens are one tensor"),
    ("model.finetune=ptuning", "model.finetune=ptuning: its virtual tokens are one tensor"),
])
def test_dp_sgd_refuses_what_it_cannot_privatise_in_one_line(override, message):
    cfg = load_config(None, ["privacy.dp_sgd={enabled: true, noise_multiplier: 1.0}", override,
                             *(["model.finetune=mole", "partition.client_test_fraction=0.2",
                                "partition.client_aux_fraction=0.1"] if "fedamole" in override else [])])
    with pytest.raises(FedtuneError, match=message) as e:
        build_experiment(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.integration
@pytest.mark.parametrize("model", ["minilm", "smollm2-135m"])
def test_per_row_gradients_equal_single_row_passes_on_the_packaged_models(tmp_path, model):
    task = ["model.task=classification", "data.name=sst2"] if model == "minilm" else [
        "model.task=sft", "data.name=alpaca_en"]
    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.name={model}", "model.max_length=48",
                             "data.max_train_examples=64", "data.max_eval_examples=8", "partition.num_clients=2",
                             "privacy.dp_sgd={enabled: true, noise_multiplier: 1.0}", *task])
    _assert_per_row_gradients_match(build_experiment(cfg), 4)
