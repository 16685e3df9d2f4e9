"""How far apart are honest clients' changes? The evidence for ``federation.max_update_ratio``'s default.

The update guard rejects an update whose change ‖θ_i − θ_i⁰‖₂ exceeds
``max_update_ratio`` × the reference change (the lower median of the round's
changes and the previous round's accepted ones; :mod:`fedtune.runtime.update_check`).
A default that flagged an honest client would change results. This runs the
settings of the committed benchmarks with the guard off (ratio 0, so nothing
is rejected and every change is logged in ``update_norms``) and reports, per
setting, the largest ratio of an honest change to its reference over every
client and round, next to the default. Settings, each a few rounds of its
benchmark's config, every client honest:

- ``quickstart``: ``configs/quickstart.yaml`` (MiniLM, SST-2, 8 Dirichlet(0.5) clients, 4 per round, 25 steps);
- ``quickstart-epochs``: the same on 4,000 training rows with one local epoch instead of 25 steps (steps ∝
  shard size: the widest honest spread a FedAvg user is likely to configure);
- ``hetero-ranks``: FedIT zero-padding over ranks 64 … 4 (``benchmarks/hetero_lora.py``'s clients);
- ``fedamole-a-0.1``: FedAMoLE on SNLI, Dirichlet(0.1) with 5-row clients (``benchmarks/fedamole.py`` a-0.1);
- ``clustered-a``: clustered FL, scenario (a) of ``benchmarks/clustered.py`` (English vs Portuguese SST-2).

    python benchmarks/update_guard.py [--settings ...] [--rounds 3]

Writes ``benchmarks/results/update_guard.json`` with a matmul probe (the timing is incidental).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from mmlu_speed import matmul_gflops  # noqa: E402

from fedtune.config import FederationConfig, load_config  # noqa: E402
from fedtune.run import execute  # noqa: E402
from fedtune.runlog import load_run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "update_guard.json"
HETERO_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]

SETTINGS: dict[str, tuple[str | None, list[str]]] = {
    "quickstart": ("configs/quickstart.yaml", []),
    "quickstart-epochs": ("configs/quickstart.yaml", ["train.local_steps=null", "train.local_epochs=1",
                                                      "data.max_train_examples=4000"]),
    "hetero-ranks": ("configs/quickstart.yaml", [f"lora.client_ranks={HETERO_RANKS}", "federation.clients_per_round=null",
                                                 "train.local_steps=20", "train.lr=1e-3", "train.lr_schedule=constant"]),
    "fedamole-a-0.1": (None, ["data.name=snli", "data.max_train_examples=2000", "partition.method=dirichlet",
                              "partition.alpha=0.1", "partition.min_client_size=5", "partition.num_clients=10",
                              "partition.client_test_fraction=0.2", "partition.client_aux_fraction=0.1",
                              "model.name=minilm", "model.max_length=64", "model.finetune=mole",
                              "algorithm.name=fedamole", "train.lr=2e-3", "train.local_steps=12",
                              "train.batch_size=8", "eval.every=0"]),
    "clustered-a": ("configs/quickstart.yaml", ["data.name=sst2_multilingual", "data.parallel=disjoint",
                                                "data.max_train_examples=1200", "partition.method=group_clusters",
                                                "partition.by=language", "partition.num_clients=8",
                                                "partition.client_test_fraction=0.2", "train.local_steps=10",
                                                "train.lr=2e-3", "train.lr_schedule=constant",
                                                "federation.clients_per_round=null", "eval.per_client=true",
                                                "eval.every=0", "data.eval_fraction=0", "algorithm.name=clustered",
                                                "algorithm.options.cluster_round=2"]),
}


def ratios(rows: list[dict]) -> list[float]:
    """Each logged change over its reference, as the guard computes it (the lower median of the round's changes
    and the previous round's)."""
    out, previous = [], []
    for row in rows[1:]:
        norms = [float(v) for v in row.get("update_norms", {}).values()]
        pool = norms + previous
        if len(pool) >= 3:
            reference = float(torch.tensor(pool, dtype=torch.float64).median())
            out += [n / reference for n in norms if reference > 0]
        previous = norms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", default="/tmp/fedtune-bench/update_guard")
    args = ap.parse_args()
    default = FederationConfig().max_update_ratio
    probe = matmul_gflops()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    table = Table("setting", "clients × rounds", "largest honest ratio", "median ratio", f"rejected at {default:g}")
    for name in args.settings:
        config, overrides = SETTINGS[name]
        cfg = load_config(config, [*overrides, f"federation.rounds={args.rounds}", "federation.max_update_ratio=0",
                                   f"output_dir={args.runs}", f"name={name}", "threads=1"])
        res = execute(cfg, overwrite=True)
        r = sorted(ratios(load_run(res.run_dir).rows))
        results[name] = {"config": config, "overrides": overrides, "rounds": args.rounds, "changes": len(r),
                         "largest_ratio": r[-1] if r else None, "median_ratio": r[len(r) // 2] if r else None,
                         "rejected_at_default": sum(x > default for x in r), "default": default,
                         "seconds": round(res.seconds, 1), "matmul_gflops": probe}
        row = results[name]
        table.add_row(name, str(row["changes"]), f"{row['largest_ratio']:.2f}", f"{row['median_ratio']:.2f}",
                      str(row["rejected_at_default"]))
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    Console().print(table)


if __name__ == "__main__":
    main()
