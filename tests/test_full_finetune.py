"""Full-parameter fine-tuning (model.finetune: full): every parameter trains, travels and is saved."""

import json

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import FedtuneError


def _cfg(tmp_path, model, data, *extra):
    return load_config(None, [
        f"output_dir={tmp_path}", "name=full", f"model.name={model}", f"data.name={data}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=2", "model.finetune=full",
        "federation.rounds=2", "train.local_steps=3", "train.batch_size=8", "train.lr=1e-3", "threads=1", *extra,
    ])


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_full_fedavg_of_one_client_is_centralized_full_fine_tuning(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """One client, SGD (no optimiser state to reset between rounds): FedAvg for R rounds of k steps is R·k steps
    of plain full fine-tuning on its shard, written here as its own loop."""
    from transformers import AutoModelForSequenceClassification

    from fedtune.experiment import build_experiment
    from fedtune.run import execute
    from fedtune.seeds import derive_seed
    from fedtune.training import batch_stream, train_local

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "partition.num_clients=1", "train.optimizer=sgd",
               "train.lr=0.05")
    res = execute(cfg)
    exp = build_experiment(cfg)
    model, shard = exp.model, exp.clients[0]
    assert all(p.requires_grad for p in model.parameters())
    for rnd in (1, 2):
        seed = derive_seed(cfg.seed, rnd, 0)
        torch.manual_seed(seed)
        batches = batch_stream(shard.examples, shard.train, cfg.train.batch_size, np.random.default_rng(seed))
        train_local(model, batches, cfg.train.local_steps, cfg.train, cfg.train.lr, loss_fn=lambda b, o: o.loss)
    saved = AutoModelForSequenceClassification.from_pretrained(res.run_dir / "adapter")  # transformers alone
    ours = dict(model.named_parameters())
    for name, p in saved.named_parameters():
        assert torch.equal(p, ours[name]), name


def test_every_parameter_travels_and_the_run_saves_a_complete_model(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.experiment import build_experiment
    from fedtune.run import execute
    from fedtune.saved_model import classify, load_run_model

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset)
    res = execute(cfg)
    exp = build_experiment(cfg)
    every = sum(p.numel() * p.element_size() for p in exp.model.parameters())
    rows = _rows(res.run_dir)
    assert rows[1]["bytes_up"] == rows[1]["bytes_down"] == 2 * every
    folder = res.run_dir / "adapter"
    assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        probs = model(**tok(["a good film"], return_tensors="pt")).logits.softmax(-1)[0]
    ours = classify(load_run_model(res.run_dir), ["a good film"])[0]
    assert ours["probabilities"][model.config.id2label[0]] == pytest.approx(float(probs[0]), abs=1e-5)
    card = (folder / "README.md").read_text()
    assert "fine-tuned in full" in card and "AutoModelForSequenceClassification.from_pretrained(folder)" in card


def test_full_instruction_tuning_saves_a_causal_lm(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    from transformers import AutoModelForCausalLM

    from fedtune.run import execute

    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=sft-full", f"model.name={tiny_llama_dir}", "model.task=sft",
        f"data.name={tiny_alpaca_dataset}", "partition.num_clients=2", "model.finetune=full", "federation.rounds=1",
        "train.local_steps=2", "train.batch_size=4", "threads=1",
    ])
    res = execute(cfg)
    assert "eval/perplexity" in res.final
    model = AutoModelForCausalLM.from_pretrained(res.run_dir / "adapter")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("extra,match", [
    (["lora.client_ranks=[2, 1]"], "trains every parameter"),
    (["algorithm.name=flora"], "federates model.finetune=lora, not full"),
    (["algorithm.name=clustered"], "federates model.finetune=lora, not full"),
])
def test_lora_only_settings_are_an_error_with_full_fine_tuning(tmp_path, tiny_model_dir, tiny_tsv_dataset, extra,
                                                               match):
    from fedtune.experiment import build_experiment

    with pytest.raises(FedtuneError, match=match):
        build_experiment(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, *extra))


def test_an_adapter_option_on_a_full_run_says_to_load_it_as_the_model(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.models.base import load_classifier
    from fedtune.config import ModelConfig
    from fedtune.models.lora import load_adapter
    from fedtune.run import execute

    res = execute(_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "federation.rounds=1"))
    base, _ = load_classifier(ModelConfig(name=str(tiny_model_dir)), 2)
    with pytest.raises(FedtuneError, match="holds a complete model"):
        load_adapter(base, res.run_dir)
