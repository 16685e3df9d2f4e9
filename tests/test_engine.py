"""The in-process engine end to end on a tiny random BERT: determinism, run directory, baselines."""

import json

import pytest
import torch
import yaml

from fedtune.config import load_config
from fedtune.run import execute
from fedtune.usage import MEASURED


def _cfg(tmp_path, model_dir, data_dir, *overrides):
    return load_config(None, [
        f"output_dir={tmp_path}", f"model.name={model_dir}", f"data.name={data_dir}",
        "data.text_column=sentence", "data.label_column=label",
        "partition.num_clients=3", "partition.method=dirichlet", "partition.alpha=1.0", "partition.min_client_size=5",
        "federation.rounds=2", "train.local_steps=2", "train.batch_size=8", "train.lr=5e-3",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", *overrides,
    ])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_times(row):
    return {k: v for k, v in row.items() if not k.startswith("time_") and k not in MEASURED}


def test_same_seed_gives_identical_metrics_and_adapters(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    runs = [execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, f"name=r{i}")) for i in range(2)]
    rows = [[_without_times(r) for r in _rows(res.run_dir)] for res in runs]
    assert rows[0] == rows[1]
    from safetensors.torch import load_file

    a, b = (load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=r2", "seed=1"))
    assert [_without_times(r) for r in _rows(other.run_dir)] != rows[0]


def test_run_directory_holds_config_partition_metrics_and_a_loadable_adapter(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=full", "eval.every=1"))
    d = res.run_dir
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["federation"]["rounds"] == 2 and cfg["seed"] == 0
    part = json.loads((d / "partition.json").read_text())
    assert sum(part["sizes"]) == 90 and len(part["label_counts"]) == 3
    rows = _rows(d)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all("eval/accuracy" in r and "eval/mcc" in r for r in rows)
    # FedIT moves the full trainable state down to and up from each of the 3 clients
    lora_params = 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers × (query, value) × (A + B)
    head = 32 * 2 + 2
    per_client = 4 * (lora_params + head)
    assert rows[1]["bytes_down"] == rows[1]["bytes_up"] == 3 * per_client
    assert rows[2]["cum_bytes_up"] == 6 * per_client
    assert 0 < rows[1]["train_examples"] <= 3 * 2 * 8  # a shard's last batch of an epoch may be partial

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, d / "adapter")
    saved = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert saved and any(p.abs().sum() > 0 for p in saved.values())  # trained B factors, not the zero init
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final"]["eval/accuracy"] == rows[-1]["eval/accuracy"]


def test_local_only_evaluates_each_client_and_communicates_nothing(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=local", "algorithm.name=local",
                       "partition.client_test_fraction=0.25"))
    rows = _rows(res.run_dir)
    assert rows[-1]["cum_bytes_up"] == rows[-1]["cum_bytes_down"] == 0
    assert "client_eval/accuracy" in rows[-1] and "client_eval/accuracy_std" in rows[-1]
    assert sorted(p.name for p in (res.run_dir / "adapters").iterdir()) == ["client_0", "client_1", "client_2"]


def test_local_only_without_client_test_shards_is_a_clear_error(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="client_test_fraction"):
        execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=bad", "algorithm.name=local"))


def test_centralized_pools_all_shards_into_one_trainer_with_matched_compute(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=central", "algorithm.name=centralized"))
    rows = _rows(res.run_dir)
    assert rows[1]["clients"] == [0] and rows[1]["train_examples"] == 3 * 2 * 8  # 3 clients' steps, full batches
    assert all(r["bytes_up"] == r["bytes_down"] == r["cum_bytes_up"] == r["cum_bytes_down"] == 0 for r in rows)


def test_client_sampling_and_cosine_schedule(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=sampled", "federation.clients_per_round=2",
                       "federation.rounds=3", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1", "eval.every=0"))
    rows = _rows(res.run_dir)
    assert all(r["num_clients"] == 2 for r in rows[1:])
    assert [r["lr"] for r in rows[1:]] == pytest.approx([5e-3, 5e-3 * 0.55, 5e-4])
    assert "eval/accuracy" not in rows[1] and "eval/accuracy" in rows[3]  # every=0: only after the last round


def test_lora_plus_trains_b_at_ratio_times_the_learning_rate(tiny_model_dir):
    """Adam's first step moves each parameter with a nonzero gradient by lr: B (from zero) by λ·lr, the head by lr."""
    from fedtune.config import LoraConfig, TrainConfig
    from fedtune.models.base import load_classifier
    from fedtune.models.lora import apply_lora
    from fedtune.training import model_forward, train_local

    torch.manual_seed(0)
    base, _ = load_classifier(load_config(None, [f"model.name={tiny_model_dir}"]).model, num_labels=2)
    model = apply_lora(base, LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = {"input_ids": torch.randint(5, 90, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    lr, ratio = 1e-3, 16.0
    cfg = TrainConfig(local_steps=1, lr=lr, lora_plus_ratio=ratio, max_grad_norm=None)
    train_local(model, iter([batch]), 1, cfg, lr, lambda b, out: out.loss, forward=model_forward)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    b_moves = [v for n, v in moved.items() if "lora_B" in n]
    head_moves = [v for n, v in moved.items() if "lora_" not in n]
    assert b_moves and head_moves
    assert all(v == pytest.approx(ratio * lr, rel=2e-2) for v in b_moves)  # |g| / (|g| + eps) of tiny gradients
    assert all(v == pytest.approx(lr, rel=2e-2) for v in head_moves)
    assert all(v == 0 for n, v in moved.items() if "lora_A" in n)  # B = 0: A has no gradient at step 1
