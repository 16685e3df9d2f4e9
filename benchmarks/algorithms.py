"""The FedAvg family on the quick-start config: FedIT, FedProx, SCAFFOLD and the four server optimisers.

Every algorithm runs ``configs/quickstart.yaml`` unchanged (MiniLM + LoRA on SST-2, 8 Dirichlet(0.5) clients,
4 per round, 12 rounds of 25 AdamW steps, cosine client lr) with its default options, or those given with
``--option ALGO.KEY=VALUE``. A table of final dev accuracy, MCC, MB up / down and wall seconds, with a matmul
probe before and after (this shared machine's speed varies between days), and
``benchmarks/results/algorithms.json``.

    python benchmarks/algorithms.py [--algorithms fedit fedprox ...] [-o key=value ...] [--option fedprox.mu=0.1]

A run of a subset (``--algorithms``, ``--option``) at the same config keeps the other rows; a row is labelled
by its algorithm and the options given, and holds the matmul probes of the command that ran it. The server optimisers' defaults were tuned for nothing here: a row that
trails FedIT is a finding at these defaults, not a verdict on the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.run import execute
from fedtune.runlog import load_run
from mmlu_speed import matmul_gflops

ALGORITHMS = ["fedit", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=ALGORITHMS)
    ap.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. -o federation.rounds=4")
    ap.add_argument("--option", action="append", default=[], metavar="ALGO.KEY=VALUE",
                    help="an algorithm option, e.g. --option fedprox.mu=0.1")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/algorithms", help="where the run directories go")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    options: dict[str, list[str]] = {}
    for item in args.option:
        algo, _, kv = item.partition(".")
        options.setdefault(algo, []).append(f"algorithm.options.{kv}")
    probe_before = matmul_gflops()
    results = []
    for name in args.algorithms:
        cfg = load_config(args.config, [f"output_dir={args.runs}", f"name={name}", f"algorithm.name={name}",
                                        *args.override, *options.get(name, [])])
        res = execute(cfg, overwrite=True)
        run = load_run(res.run_dir)
        last = run.rows[-1]
        label = name + "".join(f" {o.split('.', 2)[-1]}" for o in options.get(name, []))
        results.append({"algorithm": name, "label": label, "options": cfg.algorithm.options,
                        "accuracy": last.get("eval/accuracy"), "mcc": last.get("eval/mcc"),
                        "accuracy_by_round": {r["round"]: r["eval/accuracy"] for r in run.rows if "eval/accuracy" in r},
                        "bytes_up": last["cum_bytes_up"], "bytes_down": last["cum_bytes_down"],
                        "seconds": res.seconds, "run_dir": str(res.run_dir)})
        Console().print(f"{label}: accuracy {results[-1]['accuracy']:.4f} ({res.seconds:.0f} s)")
    probe_after = matmul_gflops()

    table = Table(title=f"{args.config} · matmul probe {probe_before:.0f} → {probe_after:.0f} GFLOP/s")
    for col in ("algorithm", "accuracy", "MCC", "MB up", "MB down", "wall s"):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in results:
        table.add_row(r["label"], f"{r['accuracy']:.4f}", f"{r['mcc']:.4f}", f"{r['bytes_up'] / 1e6:,.1f}",
                      f"{r['bytes_down'] / 1e6:,.1f}", f"{r['seconds']:.0f}")
    Console().print(table)
    out = Path(args.results) / "algorithms.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(Path(args.config).read_text())
    held = json.loads(out.read_text()) if out.is_file() else {}
    same = held.get("config_values") == config and held.get("overrides") == args.override
    # a rerun at the same config keeps the other rows; each row keeps the probes of the command that made it
    kept = [{"label": r["algorithm"], "matmul_gflops_before": held.get("matmul_gflops_before"),
             "matmul_gflops_after": held.get("matmul_gflops_after"), **r} for r in held.get("results", [])]
    rows = {r["label"]: r for r in (kept if same else [])}
    rows.update({r["label"]: {**r, "matmul_gflops_before": probe_before, "matmul_gflops_after": probe_after}
                 for r in results})
    out.write_text(json.dumps({"config": args.config, "config_values": config, "overrides": args.override,
                               "results": list(rows.values())}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
