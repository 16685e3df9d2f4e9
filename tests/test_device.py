"""Devices and precision: the CPU at fp32 is the code as it was; bf16/fp16 autocast; gradient checkpointing;
a GPU this machine lacks; Flower's GPU share and a node's own device; what a round costs (tokens/s, memory)."""

import numpy as np
import pytest
import torch

from fedtune.algorithms import Payload
from fedtune.algorithms.fedprox import FedProx
from fedtune.algorithms.scaffold import C, Scaffold, _strip
from fedtune.config import load_config
from fedtune.device import on_node, resolve_device, simulation_gpus
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute
from fedtune.runlog import load_run
from fedtune.runtime.client import client_round
from fedtune.training import batch_stream, causal_lm_forward
from fedtune.units import human_bytes
from fedtune.usage import PEAK, round_usage


def _bert_cfg(tmp_path, model_dir, data_dir, *overrides):
    return load_config(None, [
        f"output_dir={tmp_path}", f"model.name={model_dir}", f"data.name={data_dir}",
        "data.text_column=sentence", "data.label_column=label", "partition.num_clients=2", "federation.rounds=2",
        "train.local_steps=2", "train.batch_size=8", "train.lr=5e-3", "eval.every=1", "threads=1", *overrides])


def _llama_cfg(tmp_path, model_dir, data_path, *overrides):
    return load_config(None, [
        f"output_dir={tmp_path}", f"model.name={model_dir}", "model.task=sft", f"data.name={data_path}",
        "partition.num_clients=2", "federation.rounds=2", "train.local_steps=3", "train.batch_size=8",
        "train.lr=1e-2", "eval.metrics=[perplexity]", "threads=1", *overrides])


# --------------------------------------------------------------------------- the CPU at fp32 is the old code


def _plain_train_local(model, batches, steps, cfg, lr, loss_fn, after_step=lambda: None, on_step=lambda: None,
                       forward=None, private=None):
    """``training.train_local`` as it was before devices and precision (fedtune at commit df92bda); ``private``
    (DP-SGD, which came later) is never set here."""
    from fedtune.training import make_optimizer

    assert private is None

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg, lr)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            loss = loss_fn(batch, forward(model, batch))
            (loss / cfg.grad_accum).backward()
            n = len(batch["input_ids"])
            total += loss.item() * n
            seen += n
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        on_step()
    return total / max(seen, 1), seen


def _plain_prox_loss(self, ctx, batch, outputs):
    """FedProx's loss as it was: the proximal term against ``ctx.start`` itself."""
    if self.options.mu == 0:
        return outputs.loss
    prox = sum(((p - ctx.start[n]) ** 2).sum() for n, p in ctx.model.named_parameters() if p.requires_grad)
    return outputs.loss + 0.5 * self.options.mu * prox


def _plain_scaffold_step(self, ctx):
    """SCAFFOLD's correction as it was: y ← y − η (c − c_i), computed at every step."""
    c = _strip(C, ctx.payload.tensors)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if p.requires_grad:
                p.sub_(ctx.lr * (c[n] - ctx.state[n]))


@pytest.mark.parametrize("algorithm", ["fedit", "fedprox", "scaffold"])
def test_cpu_at_fp32_gives_the_bits_of_the_code_before_devices(tmp_path, monkeypatch, tiny_model_dir,
                                                               tiny_tsv_dataset, algorithm):
    """train.device=cpu runs exactly what fedtune ran before it had devices: same adapters, bit for bit."""
    over = [f"algorithm.name={algorithm}", *(["algorithm.options.mu=0.1"] if algorithm == "fedprox" else [])]
    now = execute(_bert_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=now", "train.device=cpu", *over))
    monkeypatch.setattr("fedtune.runtime.client.train_local", _plain_train_local)
    monkeypatch.setattr(FedProx, "loss", _plain_prox_loss)
    monkeypatch.setattr(Scaffold, "after_step", _plain_scaffold_step)
    before = execute(_bert_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=before", *over))
    from safetensors.torch import load_file

    a = load_file(now.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(before.run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0  # it trained
    rows = [load_run(r.run_dir).rows for r in (now, before)]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_and_what_a_client_sends_stays_fp32_on_the_cpu(tmp_path, tiny_llama_dir,
                                                                      tiny_alpaca_dataset, precision):
    cfg = _llama_cfg(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, f"train.precision={precision}",
                     "train.local_steps=4")
    exp = build_experiment(cfg)
    state: dict = {}
    losses, tensors = [], dict(exp.initial)
    for rnd in range(1, 4):
        update = client_round(exp, 0, rnd, Payload(tensors=tensors), state, lr=1e-2)
        losses.append(update.metrics["train_loss"])
        tensors = update.tensors
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())
    assert all(p.dtype == torch.float32 for p in exp.model.parameters() if p.requires_grad)  # fp32 master weights
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    # the forward pass did compute in the autocast dtype
    batch = next(batch_stream(exp.client(0).examples, exp.client(0).train, 4, np.random.default_rng(0)))
    seen = []
    hook = exp.model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    from fedtune.device import autocast

    with autocast(precision, exp.device):
        causal_lm_forward(exp.model, batch)
    hook.remove()
    assert seen and set(seen) == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}


def test_gradient_checkpointing_gives_the_loss_and_gradients_of_plain_training(tmp_path, tiny_llama_dir,
                                                                              tiny_alpaca_dataset):
    """Recomputed activations, the same math: every row runs its shared prompt prefix itself (no cache)."""
    grads = []
    for checkpointing in (False, True):
        exp = build_experiment(_llama_cfg(tmp_path, tiny_llama_dir, tiny_alpaca_dataset,
                                          f"train.gradient_checkpointing={checkpointing}"))
        batch = next(batch_stream(exp.client(0).examples, exp.client(0).train, 8, np.random.default_rng(0)))
        exp.model.train()
        out = causal_lm_forward(exp.model, batch)
        out.loss.backward()
        grads.append((out.loss.item(), {n: p.grad.clone() for n, p in exp.model.named_parameters()
                                        if p.requires_grad}))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4) for n in ga)


# --------------------------------------------------------------------------- devices


def test_asking_for_a_gpu_this_machine_lacks_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    from fedtune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "c.yaml").write_text("model:\n  name: /does/not/exist\ntrain:\n  device: cuda\n")
    monkeypatch.setattr("sys.argv", ["fedtune", "run", str(tmp_path / "c.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""  # not even the data was read
    assert out.err.startswith("error: train.device=cuda but this machine has no usable CUDA GPU")
    assert out.err.count("\n") == 1 and "train.device=cpu or auto" in out.err


def test_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(FedtuneError, match="not auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(FedtuneError, match=r"has 2 CUDA GPUs \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(FedtuneError, match="train.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, ["train.device=tpu"])
    with pytest.raises(FedtuneError, match="train.gpu_fraction shares a GPU"):
        load_config(None, ["train.device=cpu", "train.gpu_fraction=0.5"])


def test_flower_simulation_reserves_a_gpu_share_per_client_and_a_node_names_its_own_device(monkeypatch):
    from fedtune.runtime.flower_server import simulation_backend_config

    cfg = load_config(None, ["train.device=cpu"])
    assert simulation_backend_config(cfg)["client_resources"]["num_gpus"] == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert simulation_gpus(load_config(None, ["train.device=cuda"])) == 1.0
    assert simulation_gpus(load_config(None, ["train.gpu_fraction=0.25"])) == 0.25
    with pytest.raises(FedtuneError, match="places each virtual client on a GPU itself"):
        simulation_gpus(load_config(None, ["train.device=cuda:1"]))

    assert on_node(cfg, {"partition-id": 0}) is cfg
    assert on_node(cfg, {"device": "cuda:1"}).train.device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedtuneError, match="no usable CUDA GPU"):
        on_node(cfg, {"device": "cuda"})
    with pytest.raises(FedtuneError, match="node config device=tpu"):
        on_node(cfg, {"device": "tpu"})


# --------------------------------------------------------------------------- what a round costs


def test_each_round_logs_tokens_per_second_and_peak_memory_and_show_prints_them(tmp_path, tiny_model_dir,
                                                                               tiny_tsv_dataset):
    from typer.testing import CliRunner

    from fedtune.cli import app

    res = execute(_bert_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "name=usage"))
    rows = load_run(res.run_dir).rows
    assert PEAK not in rows[0]  # round 0 trains nothing
    for row in rows[1:]:
        assert row["train_tokens"] > row["train_examples"] > 0 and row["tokens_per_s"] > 0
        assert row[PEAK] > 10**7  # a process with torch loaded holds tens of MB at least
    shown = CliRunner().invoke(app, ["show", str(res.run_dir)], env={"COLUMNS": "250"})
    lines = shown.output.splitlines()
    assert any("tokens" in line and "peak" in line for line in lines)  # the headers (wrapped: words per line)
    last = next(line for line in lines if line.split()[:1] == ["2"])
    assert last.split()[-3:] == [f"{rows[2]['tokens_per_s']:,.0f}", *human_bytes(rows[2][PEAK]).split()]


def test_round_usage_sums_tokens_and_seconds_and_takes_the_largest_peak():
    clients = [{"tokens": 300, "train_seconds": 2.0, PEAK: 5_000}, {"tokens": 100, "train_seconds": 2.0, PEAK: 7_000},
               {"train_loss": 1.0}]  # a client of an older node reports none
    assert round_usage(clients) == {"train_tokens": 400, "tokens_per_s": 100.0, PEAK: 7_000}
    assert round_usage([{"train_loss": 1.0}]) == {}


def test_the_gpu_benchmark_runs_on_the_cpu_with_a_note(tmp_path, tiny_llama_dir, tiny_alpaca_dataset):
    """``benchmarks/gpu.py`` stays working where CI has no GPU: a CI-sized run of its nf4 variant."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--model", str(tiny_llama_dir), "--data",
         str(tiny_alpaca_dataset), "--steps", "1", "--rounds", "2", "--batch", "2", "--max-length", "32",
         "--variants", "nf4", "--runs", str(tmp_path / "runs"), "--out", str(out)],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: no GPU here" in done.stdout
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["quickstart"] is None and result["matmul_gflops"] > 0
    (nf4,) = result["variants"]
    assert nf4["variant"] == "nf4" and nf4["overrides"] == ["model.quantization=nf4", "train.precision=bf16"]
    assert nf4["tokens_per_s"] > 0 and nf4["peak_memory_bytes"] > 0 and nf4["mfu"] > 0 and nf4["weights_bytes"] > 0
    assert nf4["measured_rounds"] == [2]  # the first round warms up
