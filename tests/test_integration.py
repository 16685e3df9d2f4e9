"""Integration: the real packaged models and the real SST-2 files, a few hundred examples."""

import json
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.data.sources import data_roots
from fedtune.run import execute

pytestmark = pytest.mark.integration


def _sst2_available() -> bool:
    return any((root / "sst2" / "train.tsv").is_file() for root in data_roots())


@pytest.mark.skipif(not _sst2_available(), reason="SST-2 not found: set FEDTUNE_DATA or provide ../shared/data")
def test_fedit_on_real_minilm_learns_sst2(tmp_path):
    cfg = load_config("configs/quickstart.yaml" if Path("configs/quickstart.yaml").exists() else None, [
        f"output_dir={tmp_path}", "name=it", "data.max_train_examples=400", "data.max_eval_examples=200",
        "partition.num_clients=4", "partition.min_client_size=10", "federation.rounds=3",
        "federation.clients_per_round=4", "train.local_steps=5", "train.batch_size=16", "train.lr=2e-3",
        "eval.every=3", "train.lr_schedule=constant",
    ])
    res = execute(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"]  # 60 steps on 400 examples already lower the dev loss
    assert rows[-1]["eval/accuracy"] > 0.6
    assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_smollm2_gguf_is_converted_once_then_loads_as_safetensors(tmp_path, monkeypatch):
    """The GGUF is dequantised once into the cache; later loads read safetensors (times: benchmarks/load_speed.py)."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    import fedtune.models.base as base

    folder = Path(base.resolve_model_path("smollm2-135m"))
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert not list(folder.glob("*.gguf"))

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read again although the converted folder is cached")

    monkeypatch.setattr(base.AutoModelForCausalLM, "from_pretrained", no_gguf)
    monkeypatch.setattr(base.AutoTokenizer, "from_pretrained", no_gguf)
    assert Path(base.resolve_model_path("smollm2-135m")) == folder
    monkeypatch.undo()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


@pytest.mark.skipif(not any((root / "snli").is_dir() for root in data_roots()), reason="SNLI not found")
def test_smollm2_instruction_tuning_on_a_handful_of_snli_examples(tmp_path):
    """The real SmolLM2 through the engine as an instruction tuner: choice scoring, perplexity, generation."""
    cfg = load_config("configs/snli_instruct_fedit.yaml", [
        f"output_dir={tmp_path}", "name=sft", "data.max_train_examples=32", "data.max_eval_examples=12",
        "partition.method=iid", "partition.num_clients=2", "federation.rounds=1", "federation.clients_per_round=2",
        "train.local_steps=3", "train.batch_size=4", "eval.every=1", "eval.metrics=[choice, perplexity, rouge]",
        "eval.max_new_tokens=3",
    ])
    res = execute(cfg)
    first, last = (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines())
    for row in (first, last):
        assert 0 <= row["eval/accuracy"] <= 1 and 0 <= row["eval/rougeL"] <= 1
    assert last["eval/perplexity"] < first["eval/perplexity"]  # 24 examples already teach the answer format
    assert last["bytes_up"] == 2 * 30 * 8 * (576 + 576 + 576 + 192) * 4  # 2 clients, 30 layers, r = 8 on q and v
