"""Heterogeneous-rank LoRA at small scale: which aggregation serves clients of mixed ranks best?

8 clients with LoRA ranks 64, 32, 16, 16, 8, 8, 4, 4 (scale alpha / r = 2 at
every rank), Dirichlet(0.5) label skew, every client in every round. Methods:
FedIT with zero-padding, FLoRA (stacking), FLoRIST (τ = 0.9 and 0.99, merge
mode), FlexLoRA, and, for reference, homogeneous-rank FedIT (every client r = 8).

- ``minilm``: MiniLM-L6 classifier on SST-2 (dev accuracy).
- ``smollm2``: SmolLM2-135M-Instruct on SNLI as instructions (choice-scoring accuracy).

For each model: a table of final accuracy, total bytes up and down, and the
per-layer ranks FLoRIST kept in the last round; the report's plots (accuracy vs
round and vs cumulative bytes) go to ``benchmarks/results/hetero_lora_<model>/``
and everything to ``benchmarks/results/hetero_lora.json``.

    python benchmarks/hetero_lora.py [--models minilm smollm2] [--rounds N --steps S ...]

The sizes (rounds, local steps, evaluation examples) are flags because a
2-core machine cannot run the SmolLM2 half at any real scale in minutes; the
JSON records the sizes used with the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.report import build_report
from fedtune.run import execute
from fedtune.runlog import load_run

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]

METHODS: dict[str, list[str]] = {
    "fedit r=8 (homogeneous)": ["algorithm.name=fedit"],
    "fedit zero-pad": ["algorithm.name=fedit", f"lora.client_ranks={RANKS}"],
    "flora": ["algorithm.name=flora", f"lora.client_ranks={RANKS}"],
    "florist τ=0.9": ["algorithm.name=florist", "algorithm.options.tau=0.9", f"lora.client_ranks={RANKS}"],
    "florist τ=0.99": ["algorithm.name=florist", "algorithm.options.tau=0.99", f"lora.client_ranks={RANKS}"],
    "flexlora": ["algorithm.name=flexlora", f"lora.client_ranks={RANKS}"],
}

MODELS = {
    "minilm": ("configs/quickstart.yaml", "eval/accuracy", []),
    "smollm2": ("configs/snli_instruct_fedit.yaml", "eval/accuracy", ["eval.metrics=[choice]"]),
}


def run_model(model: str, args, out_root: Path) -> list[dict]:
    config, metric, extra = MODELS[model]
    sizes = [
        "partition.num_clients=8", "partition.method=dirichlet", "partition.alpha=0.5",
        "federation.clients_per_round=8", f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"eval.every={args.eval_every}", "lora.r=8", "lora.alpha=16",
    ] + ([f"threads={args.threads}"] if args.threads else []) + list(args.override)
    if args.eval_examples:
        sizes.append(f"data.max_eval_examples={args.eval_examples}")
    if args.train_examples:
        sizes.append(f"data.max_train_examples={args.train_examples}")
    results, run_dirs = [], []
    for label, method in METHODS.items():
        name = label.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace("τ", "tau")
        cfg = load_config(config, [f"output_dir={out_root / model}", f"name={name}", *sizes, *extra, *method])
        res = execute(cfg, overwrite=True)
        run = load_run(res.run_dir)
        last = run.rows[-1]
        kept = last.get("agg/kept_ranks")
        results.append({
            "model": model, "method": label, "final_accuracy": last.get(metric),
            "initial_accuracy": run.rows[0].get(metric), "bytes_up": last["cum_bytes_up"],
            "bytes_down": last["cum_bytes_down"], "seconds": res.seconds,
            "kept_ranks_last_round": kept if label.startswith("florist") else None,
        })
        run_dirs.append(res.run_dir)
        Console().print(f"{model} · {label}: {metric} {last.get(metric):.4f} ({res.seconds:.0f} s)")
    report = build_report(run_dirs, metric=metric, out_dir=Path(args.results) / f"hetero_lora_{model}")
    for r, path in zip(results, run_dirs):
        r["run_dir"] = str(path)
    results[0]["plots"] = [str(p) for p in report.plots]
    return results


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=None, help="cap the held-out examples (default: all)")
    ap.add_argument("--train-examples", type=int, default=None, help="cap the training examples (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides for every run, e.g. -o train.lr=5e-3")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/hetero", help="where the run directories go")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    results = []
    for model in args.models:
        results += run_model(model, args, Path(args.runs))

    table = Table(title=f"heterogeneous-rank LoRA · 8 clients, ranks {RANKS}, Dirichlet 0.5 · "
                        f"{args.rounds} rounds × {args.steps} local steps")
    for col in ("model", "method", "accuracy (round 0 → final)", "MB up", "MB down", "FLoRIST kept ranks (last round)"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right", overflow="fold")
    for r in results:
        kept = r["kept_ranks_last_round"]
        ranks = f"mean {np.mean(kept):.1f}, min {min(kept)}, max {max(kept)}: {kept}" if kept else "-"
        table.add_row(r["model"], r["method"], f"{r['initial_accuracy']:.4f} → {r['final_accuracy']:.4f}",
                      _mb(r["bytes_up"]), _mb(r["bytes_down"]), ranks)
    Console().print(table)
    out = Path(args.results) / "hetero_lora.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for model in args.models:
        previous[model] = {"sizes": {"rounds": args.rounds, "local_steps": args.steps, "eval_every": args.eval_every,
                                     "eval_examples": args.eval_examples, "train_examples": args.train_examples,
                                     "overrides": args.override, "ranks": RANKS},
                           "results": [r for r in results if r["model"] == model]}
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
