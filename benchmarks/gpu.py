"""Devices and precision: SmolLM2-135M instruction tuning with LoRA at fp32, bf16 and nf4, and the quick-start on
a GPU. Written for one GPU (about 3 minutes); on a machine without one it measures the CPU instead, with a note.

Part 1, precision. A federated SmolLM2-135M SFT run (FedIT, ``--clients`` clients, every one each round, on
Alpaca demo rows, evaluation off) per variant, each in a fresh process (so that one variant's memory does not
count in the next's):

    fp32       train.precision=fp32
    bf16       train.precision=bf16                          (autocast, fp32 weights)
    nf4        model.quantization=nf4, train.precision=bf16  (QLoRA: 4-bit base, bf16 compute)
    nf4-fp32   model.quantization=nf4 (fp32 compute)         (the CPU run only: the weights' share alone)

From the run log (:mod:`fedtune.usage`) of the rounds after the first (warm-up): tokens per second (real,
unpadded tokens through forward and backward, over the clients' training time) and the peak memory of a
round (CUDA: the most torch allocated; CPU: the client process's peak resident set, libraries, data and
allocator caches included), beside what the base's weights take (``fedtune models``). Model FLOPs
utilisation = model FLOP/s / the device's peak, with model FLOPs per token (PaLM's accounting, frozen base)::

    4 · N_body + 6 · N_lora + 12 · L · d · T̄

(N_body: the weights of the transformer's linear layers, forward 2N and backward to the inputs 2N, no weight
gradient; LoRA's factors also get theirs; attention scores and values, forward 4·d·T̄ per layer and token,
backward twice that, T̄ the mean tokens per example; the output head, run only on response tokens, and a
recomputation left out). The peak is the GPU's dense bf16 or fp32 tensor rate (a table of known GPUs, or
``--peak-tflops``; fp32 runs without TF32, PyTorch's default), on the CPU the measured fp32 matmul probe.

Part 2, the quick-start on the GPU (``configs/quickstart.yaml``, MiniLM on SST-2, 12 rounds): wall time, and
the final accuracy against the CPU run of the same config in ``benchmarks/results/runtime_overhead.json``;
"within noise" is |Δ| ≤ 2 standard errors of an accuracy on the 872 dev rows. Skipped on the CPU unless
``--quickstart``.

    python benchmarks/gpu.py                          # on a GPU: writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu             # the CPU: writes benchmarks/results/gpu_cpu.json
    python benchmarks/gpu.py --device cpu --steps 1 --rounds 2 --variants fp32 --out /tmp/g.json   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from mmlu_speed import matmul_gflops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "nf4": ["model.quantization=nf4", "train.precision=bf16"],
    "nf4-fp32": ["model.quantization=nf4"],
}
PEAK_TFLOPS = {"H200": (989.5, 66.9), "H100": (989.5, 66.9), "A100": (312.0, 19.5)}
"""GPU name → dense (bf16, fp32) tensor TFLOP/s of its SXM part, from the vendor's data sheets."""


def sft_overrides(args, variant: str) -> list[str]:
    return [f"output_dir={args.runs}", f"name=gpu-{variant}", "seed=0", f"data.name={args.data}",
            f"data.max_train_examples={args.clients * args.steps * args.batch * 2}", "data.eval_fraction=0",
            f"model.name={args.model}", "model.task=sft", f"model.max_length={args.max_length}",
            f"partition.num_clients={args.clients}", f"federation.rounds={args.rounds}",
            f"train.local_steps={args.steps}", f"train.batch_size={args.batch}", "train.lr=5e-4",
            f"train.device={args.device}", "eval.enabled=false", *VARIANTS[variant]]


def run_variant(args, variant: str) -> dict:
    """One variant in this process (``--one``): its run, then what the run log and the model say."""
    from safetensors.torch import load_file

    from fedtune.config import load_config
    from fedtune.models.base import base_config
    from fedtune.models.quantization import weight_count
    from fedtune.run import execute
    from fedtune.runlog import load_run

    cfg = load_config(None, sft_overrides(args, variant))
    t0 = time.perf_counter()
    res = execute(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    rows = [r for r in load_run(res.run_dir).rows if r["round"] > 1] or load_run(res.run_dir).rows[1:]
    tokens = sum(r["train_tokens"] for r in rows)
    seconds = sum(r["train_tokens"] / r["tokens_per_s"] for r in rows)
    config = base_config(args.model)
    n_body = sum(w for w, _ in weight_count(config).layers)
    n_lora = sum(t.numel() for t in load_file(res.run_dir / "adapter" / "adapter_model.safetensors").values())
    mean_len = tokens / sum(r["train_examples"] for r in rows)
    per_token = 4 * n_body + 6 * n_lora + 12 * config.num_hidden_layers * config.hidden_size * mean_len
    held = weight_count(config).bytes(cfg.model.quantization if cfg.model.quantization != "none" else "fp32")
    return {"variant": variant, "overrides": VARIANTS[variant], "tokens_per_s": tokens / seconds, "weights_bytes": held,
            "model_tflops": per_token * tokens / seconds / 1e12, "flops_per_token": per_token,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in load_run(res.run_dir).rows[1:]),
            "train_loss": [r["train_loss"] for r in load_run(res.run_dir).rows[1:]], "wall_s": wall,
            "measured_rounds": [r["round"] for r in rows], "tokens": tokens, "mean_tokens_per_example": mean_len}


def device_peak(args, device) -> tuple[str, dict[str, float | None], str]:
    """(device name, peak TFLOP/s by compute dtype, where the peak comes from)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if args.peak_tflops is not None:
            return name, {"bf16": args.peak_tflops, "fp32": args.peak_tflops}, "--peak-tflops"
        for key, (bf16, fp32) in PEAK_TFLOPS.items():
            if key in name:
                return name, {"bf16": bf16, "fp32": fp32}, f"data sheet of {key} (SXM)"
        return name, {"bf16": None, "fp32": None}, "unknown GPU: give --peak-tflops"
    probe = matmul_gflops() / 1e3
    return platform.processor() or platform.machine(), {"bf16": probe, "fp32": probe}, "fp32 matmul probe"


def quickstart(args) -> dict:
    """The quick-start on this device: its wall time and final accuracy against the committed CPU run."""
    from fedtune.config import load_config
    from fedtune.run import execute

    cfg = load_config("configs/quickstart.yaml", [f"output_dir={args.runs}", "name=gpu-quickstart",
                                                  f"train.device={args.device}"])
    t0 = time.perf_counter()
    res = execute(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    cpu = json.loads((RESULTS / "runtime_overhead.json").read_text())
    reference = cpu["final_inprocess"]["eval/accuracy"]
    accuracy = res.final["eval/accuracy"]
    noise = 2 * math.sqrt(reference * (1 - reference) / 872)
    return {"accuracy": accuracy, "cpu_accuracy": reference, "difference": accuracy - reference,
            "noise_2se": noise, "within_noise": abs(accuracy - reference) <= noise, "wall_s": wall,
            "cpu_wall_s": cpu["inprocess_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="train.device (auto: the GPU when there is one)")
    ap.add_argument("--model", default="smollm2-135m", help="model.name (a causal LM)")
    ap.add_argument("--data", default="alpaca_en", help="data.name (instructions)")
    ap.add_argument("--variants", nargs="*", default=None, help=f"of {', '.join(VARIANTS)} (default: all but "
                    "nf4-fp32 on a GPU, all on the CPU)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="default 3 on a GPU, 2 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="local steps per round; default 20 on a GPU, 3 on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="default 16 on a GPU, 4 on the CPU")
    ap.add_argument("--max-length", type=int, default=None, help="default 256 on a GPU, 128 on the CPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    ap.add_argument("--quickstart", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the quick-start (default: on a GPU only)")
    ap.add_argument("--runs", default="/tmp/fedtune-bench-gpu")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu.json (gpu_cpu.json on the CPU)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one variant, JSON on stdout
    args = ap.parse_args()

    import torch

    from fedtune.device import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    for key, on_gpu, on_cpu in (("rounds", 3, 2), ("steps", 20, 3), ("batch", 16, 4), ("max_length", 256, 128)):
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    args.device = str(device)
    if args.one:
        print(json.dumps(run_variant(args, args.one)))
        return
    console = Console()
    if not gpu:
        console.print("note: no GPU here: measuring the CPU (peak: the fp32 matmul probe; memory: peak resident set "
                      "of the process); run on a GPU for the GPU numbers", style="yellow")
    name, peaks, peak_source = device_peak(args, device)
    variants = args.variants or [v for v in VARIANTS if gpu is False or v != "nf4-fp32"]
    child = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--data", args.data,
             "--clients", str(args.clients), "--rounds",
             str(args.rounds), "--steps", str(args.steps), "--batch", str(args.batch), "--max-length",
             str(args.max_length), "--runs", args.runs]
    results = []
    for variant in variants:
        done = subprocess.run([*child, "--one", variant], stdout=subprocess.PIPE, text=True, check=True)
        entry = json.loads(done.stdout.strip().splitlines()[-1])
        peak = peaks["bf16" if "train.precision=bf16" in VARIANTS[variant] else "fp32"]
        entry["mfu"] = entry["model_tflops"] / peak if peak else None
        results.append(entry)
    quick = quickstart(args) if (args.quickstart if args.quickstart is not None else gpu) else None

    table = Table(title=f"{args.model} SFT + LoRA, FedIT {args.clients} clients × {args.steps} steps × batch "
                        f"{args.batch} (max {args.max_length} tokens) on {name}")
    for col in ("variant", "tokens/s", "model TFLOP/s", "MFU", "weights", "peak memory", "train loss (last round)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for e in results:
        table.add_row(e["variant"], f"{e['tokens_per_s']:,.0f}", f"{e['model_tflops']:.3f}",
                      "-" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%", f"{e['weights_bytes'] / 1e6:,.0f} MB",
                      f"{e['peak_memory_bytes'] / 1e6:,.0f} MB",
                      f"{e['train_loss'][-1]:.4f}")
    console.print(table)
    if quick:
        console.print(f"quick-start on {name}: accuracy {quick['accuracy']:.4f} vs {quick['cpu_accuracy']:.4f} on "
                      f"the CPU (Δ {quick['difference']:+.4f}, noise ±{quick['noise_2se']:.4f}: "
                      f"{'within' if quick['within_noise'] else 'OUTSIDE'}), {quick['wall_s']:.0f} s vs "
                      f"{quick['cpu_wall_s']:.0f} s")
    out = Path(args.out) if args.out else RESULTS / ("gpu.json" if gpu else "gpu_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "data": args.data,
        "device": name, "device_type": device.type, "peak_tflops": peaks, "peak_source": peak_source,
        "sizes": {"clients": args.clients, "rounds": args.rounds, "steps": args.steps, "batch": args.batch,
                  "max_length": args.max_length},
        "variants": results, "quickstart": quick,
        "matmul_gflops": None if gpu else peaks["fp32"] * 1e3, "cores": os.cpu_count(),
        "torch": torch.__version__, "note": None if gpu else "no GPU: CPU numbers (peak = the fp32 matmul probe)",
    }, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
