"""Deployment overhead: a real TLS deployment (SuperLink + 3 SuperNodes on this machine) vs the in-process engine.

The same run on both, ``configs/deploy.yaml``: MiniLM, FedIT, 3 clients with node-local data (each SuperNode in its own folder reads
its own ``train.tsv``, a disjoint slice of SST-2's training split; in-process the same three files via
``partition.files``), the server evaluating on SST-2 dev. The deployment uses ``scripts/make_certs.sh``,
``fedtune superlink``, ``fedtune supernode`` and ``flwr run`` exactly as ``docs/flower.md`` does (through
``tests/test_deployment.py``'s ``Deployment``). The per-round wall time is ``time_round_s`` from each run's
``metrics.jsonl`` (rounds 1..R: sending, local training, receiving, aggregation, server evaluation), so the
fixed start-up (certificates, SuperLink, node worker builds) is reported apart. ``ratio`` = deployed /
in-process mean per-round time; target ≤ 1.3.

``--plain`` also deploys with Flower's own ``flower-supernode``, whose ClientApp process imports torch and
rebuilds the experiment for every message (what a deployed round cost before ``fedtune supernode``).

    python benchmarks/deploy_overhead.py                  # 4 rounds, 600 rows per client
    python benchmarks/deploy_overhead.py --plain          # and the plain flower-supernode for reference

Prints a table and writes ``benchmarks/results/deploy_overhead.json`` with a matmul probe before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fedtune.config import RunConfig  # noqa: E402
from fedtune.data.sources import data_roots  # noqa: E402
from fedtune.run import execute  # noqa: E402
from fedtune.runlog import load_run  # noqa: E402
from test_deployment import Deployment  # noqa: E402


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def client_files(root: Path, rows_per_client: int, clients: int) -> list[Path]:
    """Disjoint slices of SST-2's training rows, one ``node_<i>/train.tsv`` per client."""
    source = next(r / "sst2" / "train.tsv" for r in data_roots() if (r / "sst2" / "train.tsv").is_file())
    header, *rows = source.read_text().splitlines()
    files = []
    for i in range(clients):
        folder = root / f"node_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        part = rows[i * rows_per_client:(i + 1) * rows_per_client]
        (folder / "train.tsv").write_text("\n".join([header, *part]) + "\n")
        files.append(folder / "train.tsv")
    return files


def run_config(args) -> dict:
    """``configs/deploy.yaml`` (the recipe's config) with this command's sizes."""
    cfg = yaml.safe_load((REPO / "configs" / "deploy.yaml").read_text())
    cfg["threads"] = args.threads
    cfg["partition"]["num_clients"] = args.clients
    cfg["train"]["local_steps"] = args.steps
    cfg["federation"]["rounds"] = args.rounds
    cfg["data"]["max_eval_examples"] = args.eval_examples
    return cfg


def per_round(rows: list[dict]) -> list[float]:
    return [r["time_round_s"] for r in rows if r["round"] > 0]


def deployed(tmp: Path, config: dict, clients: int, rows: int, plain: bool) -> dict:
    tmp.mkdir(parents=True)
    dep = Deployment(tmp, config)
    client_files(dep.nodes_root, rows, clients)
    t0 = time.perf_counter()
    try:
        # flower-supernode itself wants text quoted (fedtune supernode also takes it bare) and, here, absolute
        node_config = ((lambda i: f'client-id={i} data-path="{dep.nodes_root / f"node_{i}" / "train.tsv"}"') if plain
                       else (lambda i: f"client-id={i} data-path=train.tsv"))
        dep.start_link_and_nodes(clients, node_config=node_config, plain=plain)
        dep.wait_registered(clients)
        t_up = time.perf_counter()
        run = dep.flwr_run()
        rows = dep.wait_finished(run)
        t_end = time.perf_counter()
    finally:
        dep.close()
    return {"rows": rows, "run_dir": dep.run_dir, "startup_s": t_up - t0, "run_s": t_end - t_up}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="local steps per round")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rows", type=int, default=600, help="training rows per client")
    ap.add_argument("--eval-examples", type=int, default=300, help="server eval rows (SST-2 dev)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per client process")
    ap.add_argument("--plain", action="store_true", help="also deploy with plain flower-supernode")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deploy_overhead.json"))
    args = ap.parse_args()
    probe_before = matmul_gflops()
    config = run_config(args)
    out: dict = {"config": config, "rows_per_client": args.rows, "host": platform.node(),
                 "cpus": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="fedtune-deploy-") as tmp:
        tmp = Path(tmp)
        fed = deployed(tmp / "deployed", config, args.clients, args.rows, plain=False)
        files = client_files(tmp / "inprocess_data", args.rows, args.clients)
        ref_cfg = {**config, "name": "inprocess", "output_dir": str(tmp / "runs"),
                   "partition": {**config["partition"], "files": [str(f) for f in files]}}
        t0 = time.perf_counter()
        res = execute(RunConfig.model_validate(ref_cfg))
        inproc_s = time.perf_counter() - t0
        rows_in = load_run(res.run_dir).rows
        a = load_file(fed["run_dir"] / "adapter" / "adapter_model.safetensors")
        b = load_file(res.run_dir / "adapter" / "adapter_model.safetensors")
        out["identical_adapters"] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        out["identical_bytes"] = all(ra["bytes_up"] == rb["bytes_up"] and ra["bytes_down"] == rb["bytes_down"]
                                     for ra, rb in zip(rows_in, fed["rows"], strict=True))
        runs = {"inprocess": {"per_round_s": per_round(rows_in), "run_s": inproc_s,
                              "final_accuracy": rows_in[-1].get("eval/accuracy")},
                "deployed": {"per_round_s": per_round(fed["rows"]), "startup_s": fed["startup_s"],
                             "run_s": fed["run_s"], "final_accuracy": fed["rows"][-1].get("eval/accuracy")}}
        if args.plain:
            plain = deployed(tmp / "plain", config, args.clients, args.rows, plain=True)
            runs["deployed_plain_supernode"] = {"per_round_s": per_round(plain["rows"]),
                                                "startup_s": plain["startup_s"], "run_s": plain["run_s"],
                                                "final_accuracy": plain["rows"][-1].get("eval/accuracy")}
    for r in runs.values():
        r["mean_round_s"] = sum(r["per_round_s"]) / len(r["per_round_s"])
    out["runs"] = runs
    out["ratio"] = runs["deployed"]["mean_round_s"] / runs["inprocess"]["mean_round_s"]
    if "deployed_plain_supernode" in runs:
        out["ratio_plain_supernode"] = runs["deployed_plain_supernode"]["mean_round_s"] / runs["inprocess"]["mean_round_s"]
    out["matmul_gflops_before"], out["matmul_gflops_after"] = probe_before, matmul_gflops()

    table = Table(title=f"per-round wall, {args.clients} clients × {args.steps} steps, {args.rounds} rounds "
                        f"(matmul {probe_before:.0f} → {out['matmul_gflops_after']:.0f} GFLOP/s)")
    for col in ("run", "mean round s", "rounds s", "start-up s", "final acc"):
        table.add_column(col)
    for name, r in runs.items():
        table.add_row(name, f"{r['mean_round_s']:.2f}", " ".join(f"{x:.1f}" for x in r["per_round_s"]),
                      f"{r.get('startup_s', 0):.1f}", f"{r['final_accuracy']:.4f}")
    Console().print(table)
    Console().print(f"ratio deployed / in-process: {out['ratio']:.3f} (target ≤ 1.3); identical adapters: "
                    f"{out['identical_adapters']}, identical bytes: {out['identical_bytes']}")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
