"""How long the set-up steps of a run take: partitioning, loading SST-2, loading the cached SmolLM2, the Hub check.

These were wall-time assertions in the tests; on a shared 2-core machine a
timed test fails whenever the machine is busy, so the times live here, next
to a matmul probe that says how fast the machine was:

- partitioning 67,349 rows (SST-2's size) into 100 clients, per method (6 for ``natural``);
- loading SST-2 from ``$FEDTUNE_DATA`` (all three splits, parsed and validated);
- loading the packaged SmolLM2 after its one-time GGUF conversion (safetensors from the cache);
- how long an offline Hub check takes to say no (``HF_HUB_OFFLINE`` set; a refused connection).

    python benchmarks/load_speed.py

Prints a table and writes ``benchmarks/results/load_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedtune import hub
from fedtune.config import DataConfig, PartitionConfig
from fedtune.data import load_task_data, partition_clients
from fedtune.models.base import resolve_model_path
from mmlu_speed import matmul_gflops

METHODS = ("iid", "dirichlet", "pathological", "natural", "quantity")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def synthetic_train(n: int) -> datasets.Dataset:
    """n rows, five unevenly frequent labels, a six-valued ``lang`` column (as the partition tests use)."""
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict({
        "text": [f"example {i}" for i in range(n)],
        "label": rng.choice(5, size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08]),
        "lang": rng.choice(["en", "pt", "de", "fr", "es", "it"], size=n),
    })


def hub_check_s(env: dict[str, str]) -> float:
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        return timed(hub.hub_unavailable)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    probe_before = matmul_gflops()
    rows: list[tuple[str, float]] = []
    big = synthetic_train(67_349)
    for method in METHODS:
        cfg = PartitionConfig(method=method, num_clients=6 if method == "natural" else 100,
                              by="lang" if method == "natural" else "label")
        partition_clients(synthetic_train(200), PartitionConfig(method=method, num_clients=2, min_client_size=1,
                                                                by=cfg.by), seed=0)  # warm-up: imports
        rows.append((f"partition 67,349 rows into {cfg.num_clients} clients: {method}",
                     timed(lambda: partition_clients(big, cfg, seed=0))))
    rows.append(("load SST-2 (train, dev, test) from $FEDTUNE_DATA",
                 timed(lambda: load_task_data(DataConfig(name="sst2"), seed=0))))

    from transformers import AutoModelForCausalLM

    folder = resolve_model_path("smollm2-135m")  # converts once if the cache is empty (not timed)
    rows.append(("load the cached SmolLM2-135M (safetensors, fp32)",
                 timed(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))))
    rows.append(("Hub check with HF_HUB_OFFLINE=1", hub_check_s({"HF_HUB_OFFLINE": "1"})))
    rows.append(("Hub check against a refused port (HF_ENDPOINT=http://127.0.0.1:9)",
                 hub_check_s({"HF_ENDPOINT": "http://127.0.0.1:9"})))
    probe_after = matmul_gflops()

    table = Table(title=f"set-up times · matmul probe {probe_before:.0f} → {probe_after:.0f} GFLOP/s")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in rows:
        table.add_row(step, f"{seconds:.3f}")
    Console().print(table)
    out = Path(args.results) / "load_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"matmul_gflops_before": probe_before, "matmul_gflops_after": probe_after,
                               "seconds": dict(rows)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
