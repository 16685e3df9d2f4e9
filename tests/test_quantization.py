"""Quantised bases (model.quantization): QLoRA trains and federates on both runtimes, its adapter loads in plain
transformers + peft + bitsandbytes, what cannot be trained soundly is refused, and the memory it takes is known."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedtune.algorithms import Payload
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.models.base import base_config, load_causal_lm
from fedtune.models.quantization import prepare_quantized, quantization_config, weight_count
from fedtune.run import execute
from fedtune.runlog import load_run
from fedtune.runtime.client import client_round


def _sft(tmp_path, model, data, *overrides):
    return load_config(None, [
        f"output_dir={tmp_path}", f"model.name={model}", "model.task=sft", f"data.name={data}", "seed=2",
        "partition.num_clients=2", "federation.rounds=2", "train.local_steps=3", "train.batch_size=8",
        "train.lr=1e-2", "eval.metrics=[perplexity]", "threads=1", "model.quantization=nf4", *overrides])


def _held_bytes(model: torch.nn.Module) -> int:
    """The bytes a loaded model's weights take: parameters, and bitsandbytes' scales beside its codes."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
        scales = getattr(p, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


def _reloaded(base_dir, adapter_dir):
    """The saved adapter on the base, loaded as anyone would: transformers' 4-bit loading, then peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map={"": "cpu"})
    for m in base.modules():  # the same (dequantise, then matmul) kernel as fedtune trains with
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def _fedtune_logits(cfg, run_dir, ids):
    from fedtune.runtime.checkpoint import load_checkpoint

    exp = build_experiment(cfg)
    exp.load(load_checkpoint(run_dir).state.global_tensors)
    exp.model.eval()
    with torch.no_grad():
        return exp.model(input_ids=ids).logits


def test_nf4_tiny_llama_federates_on_both_runtimes_and_its_adapter_loads_in_plain_peft(
        tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    inproc = _sft(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "name=nf4-inproc")
    flower = _sft(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "name=nf4-flower")
    execute(inproc)
    execute(flower, runtime="flower")
    a, b = (load_file(c.run_dir / "adapter" / "adapter_model.safetensors") for c in (inproc, flower))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # LoRA trained on the 4-bit base
    rows = load_run(inproc.run_dir).rows
    assert all(np.isfinite(r["train_loss"]) for r in rows[1:]) and rows[-1]["eval/loss"] < rows[0]["eval/loss"]
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in load_run(flower.run_dir).rows]

    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        reloaded = _reloaded(tiny_llama_dir, inproc.run_dir / "adapter")(input_ids=ids).logits
    assert torch.allclose(reloaded, _fedtune_logits(inproc, inproc.run_dir, ids), atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    ("model.finetune=full", "model.quantization=nf4 stores the base weights in 4 bits, which cannot be trained, but "
                            "model.finetune=full trains every parameter"),
    ("algorithm.name=flora", "algorithm 'flora' adds its aggregated updates s·B·A to the base weights"),
    ("algorithm.name=flexlora", "algorithm 'flexlora' adds its aggregated updates"),
    ("model.finetune=mole", "model.finetune=mole builds its mixtures on full-precision linear layers"),
])
def test_what_cannot_train_on_a_quantised_base_is_refused_in_one_line(tmp_path, tiny_llama_dir,
                                                                     tiny_alpaca_dataset, setting, message):
    extra = ["algorithm.name=fedamole", "partition.client_aux_fraction=0.2", "partition.client_test_fraction=0.2"] \
        if setting == "model.finetune=mole" else []
    with pytest.raises(FedtuneError, match=message) as err:
        build_experiment(_sft(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, setting, *extra))
    assert "\n" not in str(err.value)


def test_quantisation_options_are_for_4_bits():
    with pytest.raises(FedtuneError, match="model.compute_dtype applies to 4-bit quantization"):
        load_config(None, ["model.compute_dtype=bfloat16"])
    with pytest.raises(FedtuneError, match="model.double_quantization applies to 4-bit quantization"):
        load_config(None, ["model.quantization=int8", "model.double_quantization=false"])


@pytest.mark.parametrize("quantization, double", [("nf4", True), ("fp4", False), ("int8", None), ("none", None)])
def test_the_memory_fedtune_models_states_is_what_the_loaded_weights_take(tiny_llama_dir, quantization, double):
    over = [f"model.name={tiny_llama_dir}", "model.task=sft", f"model.quantization={quantization}"]
    cfg = load_config(None, over + ([f"model.double_quantization={double}"] if double is not None else []))
    model, _ = load_causal_lm(cfg.model, quantization_config(cfg), torch.device("cpu"))
    if quantization != "none":
        model = prepare_quantized(model, gradient_checkpointing=False)
    precision = "fp32" if quantization == "none" else quantization
    expected = weight_count(base_config(str(tiny_llama_dir))).bytes(precision, double is not False)
    assert _held_bytes(model) == expected


def test_a_quantised_classifier_keeps_its_head_in_full_precision_and_trains_it(tmp_path, tiny_model_dir,
                                                                               tiny_tsv_dataset):
    cfg = load_config(None, [
        f"output_dir={tmp_path}", f"model.name={tiny_model_dir}", f"data.name={tiny_tsv_dataset}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=2", "threads=1",
        "model.quantization=int8", "train.local_steps=2", "train.batch_size=8"])
    exp = build_experiment(cfg)
    head = {n: t for n, t in exp.initial.items() if "classifier" in n}
    assert head and all(t.dtype == torch.float32 for t in head.values())
    update = client_round(exp, 0, 1, Payload(tensors=exp.initial), {}, lr=1e-2)
    assert np.isfinite(update.metrics["train_loss"])
    assert any(not torch.equal(update.tensors[n], t) for n, t in head.items())


@pytest.mark.integration
def test_nf4_smollm2_federates_on_both_runtimes_and_its_adapter_loads_in_plain_peft(tmp_path, tiny_alpaca_dataset):
    """The packaged SmolLM2-135M, quantised from its fp32 safetensors folder: one short FedIT round per runtime."""
    from fedtune.models.base import resolve_model_path

    over = ["model.max_length=64", "federation.rounds=1", "train.local_steps=2", "train.batch_size=4",
            "data.max_eval_examples=4", "train.lr=1e-3"]
    inproc = _sft(tmp_path, "smollm2-135m", tiny_alpaca_dataset, "name=smol-inproc", *over)
    flower = _sft(tmp_path, "smollm2-135m", tiny_alpaca_dataset, "name=smol-flower", *over)
    execute(inproc)
    execute(flower, runtime="flower")
    a, b = (load_file(c.run_dir / "adapter" / "adapter_model.safetensors") for c in (inproc, flower))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0
    row = load_run(inproc.run_dir).rows[-1]
    assert np.isfinite(row["train_loss"]) and row["peak_memory_bytes"] > 0

    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    model = _reloaded(resolve_model_path("smollm2-135m"), inproc.run_dir / "adapter")
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and not torch.allclose(tuned, base)  # the trained adapter is applied
