"""Runtime overhead: the same run on Flower's simulation engine vs in-process.

Both runs use the same config (default: the quick-start, ``configs/quickstart.yaml``)
and the same seed; each is timed end to end, as ``execute`` reports it (building the
experiment, the rounds, evaluation, saving adapters). On Flower this includes starting
Ray and the client actors (each builds its own experiment once); the table also shows
the time inside the rounds (``time_round_s`` summed over metrics.jsonl).
Target: Flower / in-process wall time ≤ 1.3.

    python benchmarks/runtime_overhead.py                       # the full quick-start
    python benchmarks/runtime_overhead.py --rounds 2 --max-train-examples 2000   # a quick check

Prints a table and writes ``benchmarks/results/runtime_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.run import execute
from fedtune.runlog import load_run


def timed(cfg, runtime: str) -> dict:
    res = execute(cfg, overwrite=True, runtime=runtime)
    rows = load_run(res.run_dir).rows
    return {"wall_s": res.seconds, "rounds_s": sum(r["time_round_s"] for r in rows if r["round"] > 0),
            "final": res.final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=None, help="federation.rounds (default: the config's)")
    ap.add_argument("--max-train-examples", type=int, default=None, help="data.max_train_examples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per client (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--out", default="benchmarks/results/runtime_overhead.json")
    args = ap.parse_args()

    overrides = ["output_dir=/tmp/fedtune-bench"]
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    if args.max_train_examples is not None:
        overrides.append(f"data.max_train_examples={args.max_train_examples}")
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    overrides += args.set
    results = {}
    for runtime in ("inprocess", "flower"):
        cfg = load_config(args.config, [*overrides, f"name=bench_runtime_{runtime}"])
        results[runtime] = timed(cfg, runtime)

    inp, flw = results["inprocess"], results["flower"]
    result = {
        "config": args.config, "overrides": overrides, "rounds": cfg.federation.rounds,
        "num_clients": cfg.partition.num_clients, "threads": cfg.threads,
        "inprocess_s": inp["wall_s"], "flower_s": flw["wall_s"], "ratio": flw["wall_s"] / inp["wall_s"],
        "inprocess_rounds_s": inp["rounds_s"], "flower_rounds_s": flw["rounds_s"],
        "rounds_ratio": flw["rounds_s"] / inp["rounds_s"] if inp["rounds_s"] else None,
        "final_inprocess": inp["final"], "final_flower": flw["final"],
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    table = Table(title=f"runtime overhead: {args.config}, {result['rounds']} rounds, "
                        f"{result['num_clients']} clients")
    for col in ("runtime", "wall s", "rounds s"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    table.add_row("in-process", f"{inp['wall_s']:.1f}", f"{inp['rounds_s']:.1f}")
    table.add_row("Flower simulation", f"{flw['wall_s']:.1f}", f"{flw['rounds_s']:.1f}")
    rr = result["rounds_ratio"]
    table.add_row("ratio Flower / in-process", f"{result['ratio']:.3f}", "-" if rr is None else f"{rr:.3f}")
    table.caption = "target: wall-time ratio ≤ 1.3"
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
