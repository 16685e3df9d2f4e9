"""Differential privacy: the ε of the issue's example under each sampling and accountant, and accuracy against ε
on a sized-down quick-start, at client level (the dp wrapper) and record level (DP-SGD).

(a) ε, computed with dp-accounting for 20 clients, 2 per round, z = 1, 200 rounds, δ = 1e-5: Poisson sampling
    (RDP, PLD); fixed-size sampling without replacement (RDP, replace-one neighbours, noise counted against the
    2S a replaced client moves the sum: fedtune's accounting); the same composed with the unhalved multiplier
    (what dp-accounting returns when given GaussianDpEvent(z) with replace-one neighbours, its issue #378); and
    no amplification by sampling (every round a plain Gaussian of z, as Flower's accountant counts).
(b) client level: ``configs/quickstart.yaml`` sized down (MiniLM + LoRA on SST-2, the first ``--client-rows``
    training rows, by default all 67,349: over 4,000 no Dirichlet draw gives each of 100 clients 10 rows),
    over ``--clients`` Dirichlet(0.5) clients, Poisson sampling at q = ``--rate``, ``--rounds`` rounds of
    ``--steps`` local steps, ``--algorithm`` (FedIT, FedAdam, ...) inside the dp wrapper (clip S = ``--clip``,
    noise z for each of ``--z``), and the algorithm without the wrapper for reference (``--no-reference``
    skips it).
(c) record level: the quick-start's 8 clients on the first ``--record-rows`` training rows, 4 per round
    (fixed), DP-SGD in every client (C = ``--row-clip``, σ for each of ``--sigma``), and the algorithm without
    DP-SGD for reference; ε is each client's own, from its own steps, and the table gives the largest.

``--parts`` chooses (b), (c) or both. Each run is written to the JSON as soon as it ends, keyed by its level,
name, algorithm and size (clients, sampling, rounds, steps, rows): a run of another size or algorithm adds rows
beside the recorded ones, the same key replaces its row. Each invocation's arguments, matmul probes and wall
time are kept in ``invocations``; a row names its invocation.

Every ε is at δ = 1e-5 and names its unit and sampling. Tables of every recorded row, a matmul probe before
and after (this shared machine's speed varies), and ``benchmarks/results/privacy.json``.

    OMP_NUM_THREADS=1 python benchmarks/privacy.py [--parts client record] [--algorithm fedit] [--clients 100]
        [--rate 0.1] [--z 0 0.5 1 2] [--sigma 0 0.5 1 2] [--rounds 16] [--steps 8] [--no-reference]
"""

from __future__ import annotations

import argparse
import fcntl
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


def run(args, level: str, name: str, rows: int, overrides: list[str]) -> dict:
    """One training run; the row carries its size (clients, rounds, steps, rows) and algorithm, its key."""
    cfg = load_config(args.config, [f"output_dir={args.runs}", f"name={name}", "threads=1",
                                    f"data.max_train_examples={rows}", "eval.every=0",
                                    f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
                                    f"algorithm.name={args.algorithm}", *overrides])
    t0 = time.perf_counter()
    res = execute(cfg, overwrite=True)
    r = load_run(res.run_dir)
    last, privacy = r.rows[-1], (r.summary or {}).get("privacy")
    per_round = (f"Poisson q = {cfg.federation.fraction:g}" if cfg.federation.sampling == "poisson" else
                 f"{cfg.federation.clients_per_round} of {cfg.partition.num_clients}")
    out = {"level": level, "name": name, "algorithm": args.algorithm, "clients": cfg.partition.num_clients,
           "per_round": per_round, "rounds": args.rounds, "steps": args.steps, "train_rows": rows,
           "overrides": overrides, "accuracy": last.get("eval/accuracy"), "mcc": last.get("eval/mcc"),
           "seconds": time.perf_counter() - t0, "run_dir": str(res.run_dir),
           "rounds_with_no_client": sum(1 for row in r.rows[1:] if not row["clients"]),
           "epsilon": privacy["epsilon"] if privacy else None, "unit": privacy["unit"] if privacy else None,
           "delta": privacy["delta"] if privacy else None, "sampling": privacy["sampling"] if privacy else None,
           "privacy": privacy}
    Console().print(f"{name} ({args.algorithm}, {out['clients']} clients): accuracy {out['accuracy']:.4f}, "
                    f"ε {out['epsilon']} ({out['seconds']:.0f} s)")
    return out


KEY = ("level", "name", "algorithm", "clients", "per_round", "rounds", "steps", "train_rows")


def record(path: Path, update) -> dict:
    """Read ``privacy.json``, apply ``update`` to it, write it back: each run is kept as soon as it ends, so an
    interrupted invocation leaves its finished rows, and rows of other sizes or algorithms are kept beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:  # locked: two invocations may run side by side
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        results = json.loads(text) if text else {"invocations": [], "runs": []}
        update(results)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(results, indent=2) + "\n")
    return results


def upsert(row: dict):
    """An update that puts ``row`` in place of the row with its key (level, name, algorithm and size), if any."""
    def update(results: dict) -> None:
        key = tuple(row[k] for k in KEY)
        results["runs"] = [r for r in results["runs"] if tuple(r.get(k) for k in KEY) != key] + [row]
    return update


def print_tables(results: dict, console: Console) -> None:
    t = Table(title=f"(a) ε, 20 clients, 2 per round, z = 1, 200 rounds, δ = {DELTA:g} (unit: client)")
    for col in ("accounting", "ε"):
        t.add_column(col, justify="left" if col == "accounting" else "right")
    for r in results.get("epsilon_example", []):
        t.add_row(r["accounting"], f"{r['epsilon']:.2f}")
    console.print(t)
    probes = ", ".join(f"{i['matmul_gflops_before']:.0f} → "
                       + ("?" if i.get("matmul_gflops_after") is None else f"{i['matmul_gflops_after']:.0f}")
                       for i in results["invocations"])
    t = Table(title=f"(b, c) sized-down quick-start · matmul probe per invocation (GFLOP/s): {probes}")
    for col in ("level", "algorithm", "clients", "per round", "rounds × steps", "run", "accuracy", "MCC",
                "ε (unit, δ)", "empty rounds", "wall s"):
        t.add_column(col, justify="right" if col in ("accuracy", "MCC", "ε (unit, δ)", "empty rounds", "wall s",
                                                     "clients") else "left", no_wrap=True)
    for r in sorted(results["runs"], key=lambda r: (r["level"], r["algorithm"], r["clients"], r["rounds"])):
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g} ({r['unit']}, {r['delta']:g})"
        t.add_row(r["level"], r["algorithm"], str(r["clients"]), r["per_round"], f"{r['rounds']} × {r['steps']}",
                  r["name"], f"{r['accuracy']:.4f}", f"{r['mcc']:.4f}", eps, str(r["rounds_with_no_client"]),
                  f"{r['seconds']:.0f}")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--parts", nargs="*", choices=["client", "record"], default=["client", "record"],
                    help="which of (b) client level and (c) record level to run (the ε example always is)")
    ap.add_argument("--algorithm", default="fedit", help="the wrapped algorithm (fedit, fedadam, ...)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the algorithm without DP at each size")
    ap.add_argument("--client-rows", type=int, default=67349,
                    help="training rows at client level (all of SST-2: 100 Dirichlet clients need them)")
    ap.add_argument("--record-rows", type=int, default=4000, help="training rows at record level")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--z", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--row-clip", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--runs", default="/tmp/fedtune-bench/privacy")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on RDP orders it leaves out
    out = Path(args.results) / "privacy.json"
    t_start = time.perf_counter()
    invocation = {"args": {k: v for k, v in vars(args).items()}, "matmul_gflops_before": matmul_gflops(),
                  "matmul_gflops_after": None, "seconds": None}

    def start(results: dict) -> None:
        results["config"] = args.config
        results["epsilon_example"] = epsilon_table()
        results["invocations"].append(invocation)
    index = len(record(out, start)["invocations"]) - 1

    def keep(row: dict) -> None:
        row["invocation"] = index
        record(out, upsert(row))

    if "client" in args.parts:
        client = [f"partition.num_clients={args.clients}", "federation.sampling=poisson",
                  f"federation.fraction={args.rate}", "federation.clients_per_round=null"]
        if args.reference:
            keep(run(args, "client", f"{args.algorithm}_{args.clients}c_none", args.client_rows, client))
        for z in args.z:
            keep(run(args, "client", f"{args.algorithm}_{args.clients}c_z{z:g}", args.client_rows,
                     [*client, "federation.max_update_ratio=0",
                      f"algorithm.wrappers=[{{name: dp, options: {{clip: {args.clip}, noise_multiplier: {z}}}}}]"]))
    if "record" in args.parts:
        if args.reference:
            keep(run(args, "record", f"{args.algorithm}_silos_none", args.record_rows, []))
        for sigma in args.sigma:
            keep(run(args, "record", f"{args.algorithm}_silos_sigma{sigma:g}", args.record_rows,
                     ["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.clip={args.row_clip}",
                      f"privacy.dp_sgd.noise_multiplier={sigma}"]))

    probe_after, seconds = matmul_gflops(), time.perf_counter() - t_start

    def finish(results: dict) -> None:
        results["invocations"][index].update(matmul_gflops_after=probe_after, seconds=seconds)
    results = record(out, finish)
    print_tables(results, Console(width=max(Console().width, 170)))  # a log file is not 80 columns
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
