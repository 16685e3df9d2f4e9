"""SNLI as instructions on SmolLM2-135M: FedAdam against FedIT, the README's instruction-tuning figures.

Runs the committed configs (``fedadam``: ``configs/snli_instruct_fedadam.yaml``,
``fedit``: ``configs/snli_instruct_fedit.yaml``; each takes about half an hour:
``rounds_s`` in the summary) and keeps each run as a record in ``benchmarks/results/snli_instruct/``:
the run directory's ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` as
``<record>_config.yaml``, ``<record>_metrics.jsonl``, ``<record>_summary.json``,
and ``<record>_machine.json`` (cores, threads, a matmul probe before and after),
with ``<record>`` = ``<method>_seed<seed>``.

``--summarise`` (also the last step of a run) reads every record there and
writes ``benchmarks/results/snli_instruct.json``: per record, the committed
config it ran and the keys it overrode, accuracy / macro-F1 / MCC at each
evaluated round, ``rounds_s`` (``time_round_s`` summed over all rows: round 0's
evaluation included, data preparation and model loading not) and, where
recorded, the run's wall time and machine. The packaged ``smollm2-135m`` is
SmolLM2-135M-Instruct from a Q4_1 GGUF dequantised to fp32.

    python benchmarks/snli_instruct.py [--methods fedadam fedit] [--seed 0]   # run, record, summarise
    python benchmarks/snli_instruct.py --summarise                           # summarise the records only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.models.base import PACKAGED
from fedtune.report import human_seconds
from fedtune.runlog import load_run

CONFIGS = {"fedadam": "configs/snli_instruct_fedadam.yaml", "fedit": "configs/snli_instruct_fedit.yaml"}
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # of a run directory
NOT_COMPARED = {"name", "output_dir",  # where a run was written, not what it ran
                "federation.round_timeout_s"}  # how long Flower waits: the in-process records never wait
METRICS = ("accuracy", "macro_f1", "mcc")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _overrides(config: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """``key=value`` for each setting of ``config`` that differs from ``base`` (both resolved)."""
    a, b = _flat(config), _flat(base)
    return [f"{k}={json.dumps(a.get(k))}" for k in sorted(a.keys() | b.keys())
            if k.split(".")[0] not in NOT_COMPARED and k not in NOT_COMPARED and a.get(k) != b.get(k)]


def summarise_record(records: Path, record: str) -> dict[str, Any]:
    """One record's entry in the summary (see the module docstring)."""
    config = load_config(records / f"{record}_config.yaml").to_dict()  # validated: defaults filled in
    rows = [json.loads(line) for line in (records / f"{record}_metrics.jsonl").read_text().splitlines() if line.strip()]
    diffs = {name: _overrides(config, load_config(path).to_dict()) for name, path in CONFIGS.items()}
    method = min(diffs, key=lambda name: len(diffs[name]))
    evaluated = [r for r in rows if "eval/accuracy" in r]
    curves = {m: {str(r["round"]): r[f"eval/{m}"] for r in evaluated} for m in METRICS}
    first, last = evaluated[0], evaluated[-1]
    rounds_s = sum(r["time_round_s"] for r in rows)
    summary_path, machine_path = records / f"{record}_summary.json", records / f"{record}_machine.json"
    wall_s = json.loads(summary_path.read_text())["seconds"] if summary_path.is_file() else None
    model = config["model"]["name"]
    return {
        "record": record,
        "run_name": config["name"],
        "config": CONFIGS[method],
        "overrides": diffs[method],
        "seed": config["seed"],
        "algorithm": config["algorithm"]["name"],
        "model": f"{model}: {PACKAGED[model].weights}" if model in PACKAGED else model,
        "rounds": rows[-1]["round"],
        "clients_per_round": config["federation"]["clients_per_round"],
        "eval_pairs": config["data"]["max_eval_examples"],
        **curves,
        "readout": f"accuracy {first['eval/accuracy']:.3f} (round {first['round']}) → "
                   f"{last['eval/accuracy']:.3f} (round {last['round']}) in {human_seconds(rounds_s)} of rounds",
        "rounds_s": round(rounds_s, 1),
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "cum_bytes_up": rows[-1]["cum_bytes_up"],
        "cum_bytes_down": rows[-1]["cum_bytes_down"],
        "machine": json.loads(machine_path.read_text()) if machine_path.is_file() else None,
    }


def summarise(records: Path) -> dict[str, Any]:
    """The summary of every ``<record>_config.yaml`` + ``<record>_metrics.jsonl`` pair in ``records``."""
    names = sorted(p.name.removesuffix("_metrics.jsonl") for p in records.glob("*_metrics.jsonl"))
    return {
        "command": "python benchmarks/snli_instruct.py --summarise",
        "records": str(records),
        "runs": {name: summarise_record(records, name) for name in names},
    }


def run_and_record(method: str, seed: int, records: Path, scratch: Path) -> str:
    """Run ``method``'s committed config with ``seed`` and copy its run directory's files into ``records``."""
    import torch
    from mmlu_speed import matmul_gflops  # beside this script

    from fedtune.run import execute

    record = f"{method}_seed{seed}"
    cfg = load_config(CONFIGS[method], [f"seed={seed}", f"name={record}", f"output_dir={scratch}"])
    before = matmul_gflops()
    result = execute(cfg, overwrite=True, console=Console())
    machine = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
               "matmul_gflops_before": before, "matmul_gflops_after": matmul_gflops()}
    load_run(result.run_dir)  # the run directory is complete and readable
    records.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        shutil.copyfile(result.run_dir / name, records / f"{record}_{name}")
    (records / f"{record}_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarise", action="store_true", help="only rewrite the summary from the records")
    ap.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", default="benchmarks/results/snli_instruct")
    ap.add_argument("--out", default="benchmarks/results/snli_instruct.json")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/snli_instruct", help="where the run directories go")
    args = ap.parse_args()

    records = Path(args.records)
    if not args.summarise:
        for method in args.methods:
            run_and_record(method, args.seed, records, Path(args.runs))
    result = summarise(records)
    table = Table(title=f"SNLI instruct · {records}", title_justify="left")
    for col in ("record", "config + overrides", "accuracy by round", "rounds time", "wall time"):
        table.add_column(col, overflow="fold")
    for name, r in result["runs"].items():
        acc = ", ".join(f"{k}: {v:.3f}" for k, v in r["accuracy"].items())
        table.add_row(name, " ".join([r["config"], *r["overrides"]]), acc, human_seconds(r["rounds_s"]),
                      "-" if r["wall_s"] is None else human_seconds(r["wall_s"]))
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
