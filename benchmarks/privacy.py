"""Differential privacy: the ε of the issue's example under each sampling and accountant, and accuracy against ε
on a sized-down quick-start, at client level (the dp wrapper) and record level (DP-SGD).

(a) ε, computed with dp-accounting for 20 clients, 2 per round, z = 1, 200 rounds, δ = 1e-5: Poisson sampling
    (RDP, PLD); fixed-size sampling without replacement (RDP, replace-one neighbours, noise counted against the
    2S a replaced client moves the sum: fedtune's accounting); the same composed with the unhalved multiplier
    (what dp-accounting returns when given GaussianDpEvent(z) with replace-one neighbours, its issue #378); and
    no amplification by sampling (every round a plain Gaussian of z, as Flower's accountant counts).
(b) client level: ``configs/quickstart.yaml`` sized down (MiniLM + LoRA on SST-2, the first ``--train-rows``
    training rows over ``--clients`` Dirichlet(0.5) clients, Poisson sampling at q = ``--rate``, ``--rounds``
    rounds of ``--steps`` local steps), FedIT inside the dp wrapper (clip S = ``--clip``, noise z for each of
    ``--z``), and FedIT without the wrapper for reference.
(c) record level: the quick-start's 8 clients on the same rows, 4 per round (fixed), DP-SGD in every client
    (C = ``--row-clip``, σ for each of ``--sigma``), and FedIT without DP-SGD for reference; ε is each client's
    own, from its own steps, and the table gives the largest.

Every ε is at δ = 1e-5 and names its unit and sampling. A table, a matmul probe before and after (this shared
machine's speed varies), and ``benchmarks/results/privacy.json``.

    OMP_NUM_THREADS=1 python benchmarks/privacy.py [--z 0 0.5 1 2] [--sigma 0.5 1] [--rounds 16] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.run import execute
from fedtune.runlog import load_run
from mmlu_speed import matmul_gflops

DELTA = 1e-5


def epsilon_table() -> list[dict]:
    """(a): the issue's example, each way of sampling and accounting it."""
    rel = dp_accounting.NeighboringRelation
    poisson = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0))
    rows = []
    for label, accountant, event, relation, sampling in [
        ("Poisson, RDP", RdpAccountant, poisson, rel.ADD_OR_REMOVE_ONE, "poisson q = 0.1"),
        ("Poisson, PLD", PLDAccountant, poisson, rel.ADD_OR_REMOVE_ONE, "poisson q = 0.1"),
        ("fixed 2 of 20 w/o replacement, RDP (fedtune: z/2 for replace-one)", RdpAccountant,
         dp_accounting.SampledWithoutReplacementDpEvent(20, 2, dp_accounting.GaussianDpEvent(0.5)), rel.REPLACE_ONE,
         "fixed 2 of 20"),
        ("fixed 2 of 20 w/o replacement, RDP, unhalved z (dp-accounting issue #378: underestimate)", RdpAccountant,
         dp_accounting.SampledWithoutReplacementDpEvent(20, 2, dp_accounting.GaussianDpEvent(1.0)), rel.REPLACE_ONE,
         "fixed 2 of 20"),
        ("no sampling counted (Flower's accountant), RDP", RdpAccountant, dp_accounting.GaussianDpEvent(1.0),
         rel.ADD_OR_REMOVE_ONE, "none counted"),
    ]:
        acc = accountant(neighboring_relation=relation)
        acc.compose(event, 200)
        rows.append({"accounting": label, "sampling": sampling, "epsilon": acc.get_epsilon(DELTA), "delta": DELTA,
                     "unit": "client", "z": 1.0, "rounds": 200, "clients": 20})
    return rows


def run(args, name: str, overrides: list[str]) -> dict:
    cfg = load_config(args.config, [f"output_dir={args.runs}", f"name={name}", "threads=1",
                                    f"data.max_train_examples={args.train_rows}", "eval.every=0",
                                    f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
                                    *overrides])
    t0 = time.perf_counter()
    res = execute(cfg, overwrite=True)
    r = load_run(res.run_dir)
    last, privacy = r.rows[-1], (r.summary or {}).get("privacy")
    out = {"name": name, "overrides": overrides, "accuracy": last.get("eval/accuracy"), "mcc": last.get("eval/mcc"),
           "seconds": time.perf_counter() - t0, "run_dir": str(res.run_dir),
           "rounds_with_no_client": sum(1 for row in r.rows[1:] if not row["clients"]),
           "epsilon": privacy["epsilon"] if privacy else None, "unit": privacy["unit"] if privacy else None,
           "delta": privacy["delta"] if privacy else None, "sampling": privacy["sampling"] if privacy else None,
           "privacy": privacy}
    Console().print(f"{name}: accuracy {out['accuracy']:.4f}, ε {out['epsilon']} ({out['seconds']:.0f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--z", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--row-clip", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, nargs="*", default=[0.5, 1.0])
    ap.add_argument("--runs", default="/tmp/fedtune-bench/privacy")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on RDP orders it leaves out
    probe_before = matmul_gflops()
    eps_rows = epsilon_table()
    client = [f"partition.num_clients={args.clients}", "federation.sampling=poisson",
              f"federation.fraction={args.rate}", "federation.clients_per_round=null"]
    runs = [run(args, "client_none", client)]
    for z in args.z:
        runs.append(run(args, f"client_z{z:g}", [*client, "federation.max_update_ratio=0",
                                                 f"algorithm.wrappers=[{{name: dp, options: {{clip: {args.clip}, "
                                                 f"noise_multiplier: {z}}}}}]"]))
    runs.append(run(args, "record_none", []))
    for sigma in args.sigma:
        runs.append(run(args, f"record_sigma{sigma:g}", ["privacy.dp_sgd.enabled=true",
                                                         f"privacy.dp_sgd.clip={args.row_clip}",
                                                         f"privacy.dp_sgd.noise_multiplier={sigma}"]))
    probe_after = matmul_gflops()

    console = Console(width=max(Console().width, 150))  # a log file is not 80 columns
    t = Table(title=f"(a) ε, 20 clients, 2 per round, z = 1, 200 rounds, δ = {DELTA:g} (unit: client)")
    for col in ("accounting", "ε"):
        t.add_column(col, justify="left" if col == "accounting" else "right")
    for r in eps_rows:
        t.add_row(r["accounting"], f"{r['epsilon']:.2f}")
    console.print(t)
    t = Table(title=f"(b, c) sized-down quick-start · matmul probe {probe_before:.0f} → {probe_after:.0f} GFLOP/s")
    for col in ("run", "accuracy", "MCC", "ε (unit, δ)", "sampling", "empty rounds", "wall s"):
        t.add_column(col, justify="left" if col in ("run", "sampling") else "right", no_wrap=True)
    for r in runs:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g} ({r['unit']}, {r['delta']:g})"
        sampling = (f"clients: Poisson q = {args.rate:g}" if r["name"].startswith("client") else
                    "clients: 4 of 8; rows: Poisson q_i = B/n_i" if r["unit"] else "clients: 4 of 8")
        t.add_row(r["name"], f"{r['accuracy']:.4f}", f"{r['mcc']:.4f}", eps, sampling,
                  str(r["rounds_with_no_client"]), f"{r['seconds']:.0f}")
    console.print(t)
    out = Path(args.results) / "privacy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "args": {k: v for k, v in vars(args).items()},
                               "matmul_gflops_before": probe_before, "matmul_gflops_after": probe_after,
                               "epsilon_example": eps_rows, "runs": runs}, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
