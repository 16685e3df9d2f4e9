"""Engine overhead: a federated run vs one plain training loop doing the same local steps.

(a) ``fedtune`` FedIT with evaluation switched off: R rounds × K clients × S
    local steps (the wall time of the rounds, from metrics.jsonl);
(b) a plain PyTorch loop: the same model, LoRA, batch size and total number of
    AdamW steps over the same tokenised examples, nothing else.

Both start after the model is loaded, so the ratio (a)/(b) is what the
engine adds per step: client sampling, loading and copying adapter tensors,
aggregation and the run log. Target: ≤ 1.10.

    python benchmarks/engine_overhead.py [--rounds 5 --clients 4 --steps 10 --batch-size 16]

Prints a table and writes ``benchmarks/results/engine_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.experiment import build_experiment
from fedtune.run import execute
from fedtune.runlog import load_run
from fedtune.training import length_grouped_batches


def plain_loop(cfg, total_steps: int) -> float:
    """Seconds for ``total_steps`` plain AdamW steps on the same model and data."""
    exp = build_experiment(cfg)
    model, data = exp.model, exp.clients[0].examples
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    rng = np.random.default_rng(cfg.seed)
    indices = np.arange(len(data))
    batches = iter(length_grouped_batches(data.lengths, indices, cfg.train.batch_size, rng))
    model.train()
    t0 = time.perf_counter()
    for _ in range(total_steps):
        loss = model(**data.collate(next(batches))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/engine_overhead.json")
    args = ap.parse_args()

    overrides = [
        "name=bench_engine_overhead", "output_dir=/tmp/fedtune-bench", "eval.enabled=false",
        f"federation.rounds={args.rounds}", f"federation.clients_per_round={args.clients}",
        f"train.local_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.lr_schedule=constant",
    ]
    cfg = load_config(args.config, overrides)
    total_steps = args.rounds * args.clients * args.steps

    res = execute(cfg, overwrite=True)
    rows = load_run(res.run_dir).rows
    fed_s = sum(r["time_round_s"] for r in rows if r["round"] > 0)
    plain_s = plain_loop(cfg, total_steps)

    result = {
        "config": args.config, "rounds": args.rounds, "clients_per_round": args.clients,
        "local_steps": args.steps, "batch_size": args.batch_size, "total_steps": total_steps,
        "federated_s": fed_s, "plain_s": plain_s, "ratio": fed_s / plain_s,
        "federated_steps_per_s": total_steps / fed_s, "plain_steps_per_s": total_steps / plain_s,
        "torch_threads": torch.get_num_threads(),
    }
    table = Table(title=f"engine overhead: {total_steps} steps, batch {args.batch_size}, evaluation off")
    for col in ("run", "seconds", "steps/s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row("(a) federated (fedtune)", f"{fed_s:.1f}", f"{result['federated_steps_per_s']:.2f}")
    table.add_row("(b) plain loop", f"{plain_s:.1f}", f"{result['plain_steps_per_s']:.2f}")
    table.add_row("ratio (a)/(b)", f"{result['ratio']:.3f}", "target ≤ 1.10")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
