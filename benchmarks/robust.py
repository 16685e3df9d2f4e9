"""Robust aggregation under attack, and the server's memory as the number of clients grows.

**accuracy**: a reduced quick-start (``configs/quickstart.yaml``: MiniLM + LoRA on SST-2, 8 Dirichlet(0.5)
clients) on 2,400 training rows, each client holding out 20% of its shard as its own test set; all 8 clients
train every round (so the attackers are in every round), 6 rounds of 8 local steps (cut from 8 rounds to fit
the machine: 2 cores shared by four agents), evaluated once after the last round on the 872 dev sentences and
on every client's test shard. Attackers: client 3 (×1) or clients 3
and 4 (×2), two mid-sized shards holding both labels. Attacks (``federation.attack``):

- ``sign_flip``: θ⁰ − 4Δ (s = 4, the sign-flipping attack of Li et al., RSA, AAAI 2019);
- ``scale``: θ⁰ + 10Δ;
- ``noise``: θ + N(0, 0.05²) per coordinate: over the 74,498 trained numbers ‖ε‖ ≈ 13.6, about 4× an honest
  client's first-round change (≈ 3.4 in a clean run) and 30–40× its last-round one, inside the guard's 100×;
- ``label_flip``: the attacker trains on flipped labels;
- ``boost``: model replacement with γ computed from the shard sizes (``fedtune.attacks.boost_factor``).

Defences: ``none`` (the plain mean, the update guard off: ``federation.max_update_ratio=0``), ``guard`` (the
mean with the default guard, ratio 100), ``median``, ``trimmed_mean`` (β = 0.25: ⌊0.25·8⌋ = 2 dropped at each
end; the default β = 0.1 drops none of 8), ``krum`` (f = 2, the most attackers in the grid, m = 1) and ``clip``
(norm bounding to the round's median change). The robust rules run with the guard off, so each defence is
measured alone; every run tolerates rejected clients. Grid (``GRID``, cut to fit the machine; ``--attacks``
and ``--defences`` run any other cell of ``ATTACKS`` × ``DEFENCES``): FedIT with attacks {none, sign_flip×2,
scale×1, noise×2, label_flip×2, boost×1} × every defence (36 runs); FedAdam (its defaults) and clustered FL with
attacks {none, sign_flip×2, boost×1} × defences {none, median, clip} (9 each), 54 runs in all. Clustered FL runs
its defaults, the reference code's procedure (Ward on the rows of the cosine-similarity matrix of the clients'
last-module LoRA-B updates in round 1, unweighted cluster means, the clusters' first models from round 2), with
``n_clusters: 2``: ``docs/reference_code.md`` says to set the k you expect rather than rely on ``auto``, and
the two labels of SST-2 under Dirichlet(0.5) label skew are the groups these 8 clients can form. Reported per
run: dev accuracy (``eval/accuracy``; clustered FL has no single model and reports none), the clients' accuracy
on their own test shards (``client_eval/accuracy``, their pooled rows; ``client_eval_unweighted/accuracy``,
each client once; clustered FL: each with its cluster's model) and the honest clients' (the example-weighted
mean over the clients that do not attack), what the defence did to attackers and to honest clients (updates
rejected by the guard, left out by Krum, scaled down by clip), the logged change norms and wall seconds.

**memory**: one FedIT aggregation round on the server (``RoundIntake`` → ``aggregate``, as the round loop runs
it) of 10, 100 and 1,000 clients, each sending a synthetic 1 MiB float32 update (8 tensors of 32,768), in a
fresh subprocess per measurement: its peak RSS during the round (Linux: VmHWM of ``/proc/self/status``, reset to
the RSS at the round's start through ``/proc/self/clear_refs``), the peak's growth over the RSS before the round,
and the most updates alive at once (weak references to each update's tensors). Modes: ``mean`` (the streaming mean, the guard
judging each update against the previous round's changes: every round after the first), ``mean-first`` (the
first round: no previous changes, so the guard holds the round's valid updates), ``mean-first-off`` (the first
round with the guard off: nothing to judge, so nothing is held), ``mean-list`` (every update held in a list before the mean: the server before
streaming) and ``median`` (a reducer that holds the round).

    python benchmarks/robust.py accuracy [--algorithms fedit ...] [--attacks ...] [--defences ...] [--missing]
    python benchmarks/robust.py memory [--clients 10 100 1000] [--modes ...]

Writes ``benchmarks/results/robust.json``; a run of a subset replaces only its own rows (rows recorded at other
sizes are dropped); ``accuracy --missing`` with nothing missing prints the table of the recorded rows. Each row
carries the matmul probe of the command that made it and its run directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from fedtune.config import FederationConfig, load_config
from fedtune.run import execute
from fedtune.runlog import load_run
from mmlu_speed import matmul_gflops

RESULTS = Path(__file__).parent / "results" / "robust.json"

# ---------------------------------------------------------------- part 1: accuracy under attack
CONFIG = "configs/quickstart.yaml"
SIZES = ["data.max_train_examples=2400", "partition.client_test_fraction=0.2", "federation.clients_per_round=null",
         "federation.rounds=6", "train.local_steps=8", "eval.every=0", "eval.per_client=true",
         "federation.tolerate_client_failures=true", "threads=1"]
ATTACKERS = {1: [3], 2: [3, 4]}
KINDS = {"sign_flip": ["federation.attack.scale=4"], "scale": ["federation.attack.scale=10"],
         "noise": ["federation.attack.std=0.05"], "label_flip": [], "boost": []}
ATTACKS: dict[str, list[str]] = {"none": []} | {
    f"{kind}x{a}": [f"federation.attack.kind={kind}", f"federation.attack.clients={clients}", *options]
    for kind, options in KINDS.items() for a, clients in ATTACKERS.items()}
GUARD_OFF = "federation.max_update_ratio=0"
DEFENCES: dict[str, list[str]] = {
    "none": [GUARD_OFF],
    "guard": [],  # the default federation.max_update_ratio
    "median": [GUARD_OFF, "algorithm.reducer.name=median"],
    "trimmed_mean": [GUARD_OFF, "algorithm.reducer.name=trimmed_mean", "algorithm.reducer.options.beta=0.25"],
    "krum": [GUARD_OFF, "algorithm.reducer.name=krum", "algorithm.reducer.options.f=2"],
    "clip": [GUARD_OFF, "algorithm.wrappers=[{name: clip, options: {bound: median}}]"],
}
ALGORITHMS: dict[str, list[str]] = {
    "fedit": [], "fedadam": [],
    "clustered": ["algorithm.options.n_clusters=2"],  # the k these clients can form (see the docstring)
}
SUBSET = (["none", "sign_flipx2", "boostx1"], ["none", "median", "clip"])
GRID: dict[str, tuple[list[str], list[str]]] = {
    "fedit": (["none", "sign_flipx2", "scalex1", "noisex2", "label_flipx2", "boostx1"], list(DEFENCES)),
    "fedadam": SUBSET, "clustered": SUBSET}
FIRST = ["none", "sign_flipx2", "boostx1"]
"""The attacks run first, under every algorithm and defence of the grid, so a cut-short run still has them."""


def attackers_of(attack: str) -> list[int]:
    return [] if attack == "none" else ATTACKERS[int(attack.rsplit("x", 1)[1])]


def accuracy_row(algorithm: str, attack: str, defence: str, run_dir: Path, seconds: float) -> dict:
    """One run's figures, read from its run directory."""
    run = load_run(run_dir)
    last = run.rows[-1]
    bad = set(attackers_of(attack))
    clients = {int(c): m for c, m in last.get("client_metrics", {}).items()}
    honest = {c: m for c, m in clients.items() if c not in bad and m["n"]}
    honest_acc = (sum(m["accuracy"] * m["n"] for m in honest.values()) / sum(m["n"] for m in honest.values())
                  if honest else None)

    def count(lists) -> dict[str, int]:
        """How many (round, client) entries of ``lists`` are attackers' and honest clients'."""
        flat = [int(c) for cs in lists for c in cs]
        return {"attackers": sum(c in bad for c in flat), "honest": sum(c not in bad for c in flat)}

    trained = run.rows[1:]
    norms = [(int(c), v) for r in trained for c, v in r.get("update_norms", {}).items()]
    honest_norms = sorted(v for c, v in norms if c not in bad)
    attacker_norms = [v for c, v in norms if c in bad]
    clustering = next((r for r in trained if "agg/cluster_of" in r), {})
    return {
        "algorithm": algorithm, "attack": attack, "defence": defence, "attackers": sorted(bad),
        "accuracy": last.get("eval/accuracy"), "client_accuracy": last.get("client_eval/accuracy"),
        "client_accuracy_unweighted": last.get("client_eval_unweighted/accuracy"), "honest_client_accuracy": honest_acc,
        "rejected": count(r.get("rejected", []) for r in trained),
        "left_out": count(r.get("reducer", {}).get("left_out", []) for r in trained),
        "clipped": count(r.get("agg/clip/scaled", []) for r in trained),
        "honest_median_norm": honest_norms[len(honest_norms) // 2] if honest_norms else None,
        "attacker_mean_norm": sum(attacker_norms) / len(attacker_norms) if attacker_norms else None,
        "attack_record": (run.summary or {}).get("attack"),
        "clusters": clustering.get("agg/clusters"), "cluster_of": clustering.get("agg/cluster_of"),
        "seconds": round(seconds, 1), "run_dir": str(run_dir),
    }


def accuracy(args, probe: float, record: dict) -> None:
    setup = {"config": CONFIG, "sizes": SIZES, "algorithms": ALGORITHMS, "attackers": ATTACKERS, "attacks": ATTACKS,
             "defences": DEFENCES, "default_max_update_ratio": FederationConfig().max_update_ratio}
    part = record.get("accuracy", {})
    if {k: v for k, v in part.get("setup", {}).items() if k != "grid"} != json.loads(json.dumps(setup)):
        if part.get("rows"):
            print("the recorded accuracy rows were made at other sizes: they are dropped")
        part = {"rows": []}
    part["setup"] = setup | {"grid": GRID}
    rows = {(r["algorithm"], r["attack"], r["defence"]): r for r in part["rows"]}
    chosen = [(alg, att, d) for alg in args.algorithms
              for att in (args.attacks or GRID[alg][0]) for d in (args.defences or GRID[alg][1])]
    todo = sorted((k for k in chosen if not (args.missing and k in rows)),
                  key=lambda k: (k[1] not in FIRST, FIRST.index(k[1]) if k[1] in FIRST else 0))
    print(f"{len(todo)} runs")
    for i, (alg, att, d) in enumerate(todo, 1):
        name = f"{alg}-{att}-{d}"
        cfg = load_config(CONFIG, [*SIZES, f"algorithm.name={alg}", *ALGORITHMS[alg], *ATTACKS[att], *DEFENCES[d],
                                   f"output_dir={args.runs}", f"name={name}"])
        t0 = time.perf_counter()
        res = execute(cfg, overwrite=True)
        row = accuracy_row(alg, att, d, res.run_dir, time.perf_counter() - t0) | {"matmul_gflops": probe}
        rows[(alg, att, d)] = row
        part["rows"] = [rows[k] for k in sorted(rows)]
        record["accuracy"] = part
        save(record)
        print(f"[{i}/{len(todo)}] {name}: dev {fmt(row['accuracy'])}, honest clients "
              f"{fmt(row['honest_client_accuracy'])} ({row['seconds']:.0f} s)", flush=True)
    table = Table(title=f"accuracy under attack (matmul probe {probe:.0f} GFLOP/s); what the defence did to "
                        f"attackers / honest clients, counted over (round, client)")
    for col in ("algorithm", "attack", "defence", "dev acc", "clients' acc", "honest clients' acc", "rejected",
                "left out", "clipped", "seconds"):
        table.add_column(col, justify="left" if col in ("algorithm", "attack", "defence") else "right")
    order = [*DEFENCES]
    for r in sorted(rows.values(), key=lambda r: (list(ALGORITHMS).index(r["algorithm"]),
                                                  list(ATTACKS).index(r["attack"]), order.index(r["defence"]))):
        table.add_row(r["algorithm"], r["attack"], r["defence"], fmt(r["accuracy"]), fmt(r["client_accuracy"]),
                      fmt(r["honest_client_accuracy"]),
                      *(f"{r[k]['attackers']} / {r[k]['honest']}" for k in ("rejected", "left_out", "clipped")),
                      f"{r['seconds']:.0f}")
    Console(width=180).print(table)


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- part 2: the server's memory
TENSORS, NUMEL = 8, 32_768  # 8 × 32,768 float32 = 1 MiB per update


class Mode(NamedTuple):
    reducer: str
    previous: bool
    """The previous round's changes are known (every round after the first): the guard judges on arrival."""
    listed: bool
    """Every update is held in a list before the round is aggregated (the server before streaming)."""
    guard: bool = True


MODES = {"mean": Mode("mean", True, False), "mean-first": Mode("mean", False, False),
         "mean-first-off": Mode("mean", False, False, guard=False), "mean-list": Mode("mean", True, True),
         "median": Mode("median", True, False)}


def _status_mib(field: str) -> float:
    """``field`` of /proc/self/status (VmRSS: resident now; VmHWM: its peak) in MiB."""
    line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure_memory(mode: str, n: int) -> dict:
    """One FedIT round of ``n`` clients on the server in ``mode`` (run in a fresh process): peak RSS and the most
    updates alive at once."""
    import torch

    from fedtune.algorithms import ClientUpdate, Payload, build_algorithm
    from fedtune.config import RunConfig
    from fedtune.reducers import build_reducer
    from fedtune.runtime.server import RoundIntake

    m = MODES[mode]
    algo = build_algorithm("fedit", num_clients=n)
    algo.reducer = build_reducer(m.reducer)
    start = {f"layer.{i}.lora_{'AB'[i % 2]}.weight": torch.zeros(NUMEL) for i in range(TENSORS)}
    state = algo.init(start)
    payloads = {c: Payload(tensors=start) for c in range(n)}
    cfg = RunConfig.model_validate({} if m.guard else {"federation": {"max_update_ratio": 0}})
    exp = SimpleNamespace(algorithm=algo, client_sizes=[(10, 0)] * n, cfg=cfg)
    change = 0.01 * (TENSORS * NUMEL) ** 0.5  # ‖Δ‖ of a change with per-coordinate std 0.01
    alive: list[list[weakref.ref]] = []  # per update, its tensors: alive while any is (a reducer may keep them)
    most = 0

    def sample() -> None:
        nonlocal most
        most = max(most, sum(any(r() is not None for r in refs) for refs in alive))

    def updates():
        g = torch.Generator().manual_seed(0)
        for cid in range(n):
            u = ClientUpdate(cid, {k: 0.01 * torch.randn(NUMEL, generator=g) for k in start}, 10)
            alive.append([weakref.ref(t) for t in u.tensors.values()])
            sample()
            yield u
            sample()

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the RSS now
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    intake = RoundIntake(exp, 1, payloads, state, [change] * 3 if m.previous else [], tolerate=False,
                         now=time.perf_counter)
    received = list(updates()) if m.listed else updates()
    algo.aggregate(1, intake.accepted(received), state)
    intake.drain()
    del received
    seconds = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    if sorted(intake.accepted_ids) != list(range(n)):
        raise SystemExit(f"{mode}: only {len(intake.accepted_ids)} of {n} updates were accepted")
    return {"mode": mode, "clients": n, "update_mib": TENSORS * NUMEL * 4 / 2**20, "peak_rss_mib": peak,
            "rss_before_mib": before, "peak_growth_mib": peak - before, "held_if_all_mib": n * TENSORS * NUMEL * 4 / 2**20,
            "most_alive": most, "seconds": round(seconds, 2)}


def memory(args, probe: float, record: dict) -> None:
    part = record.get("memory", {})
    setup = {"update": f"{TENSORS} float32 tensors of {NUMEL:,} (1 MiB)", "algorithm": "fedit",
             "modes": {name: m._asdict() for name, m in MODES.items()}}
    if part.get("setup") != setup:
        part = {"setup": setup, "rows": []}
    rows = {(r["mode"], r["clients"]): r for r in part["rows"]}
    for n in args.clients:
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "measure", mode, str(n)], capture_output=True,
                                 text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"matmul_gflops": probe}
            rows[(mode, n)] = row
            part["rows"] = [rows[k] for k in sorted(rows, key=lambda k: (list(MODES).index(k[0]), k[1]))]
            record["memory"] = part
            save(record)
            print(f"{mode} × {n}: peak {row['peak_rss_mib']:.0f} MiB (+{row['peak_growth_mib']:.0f}), "
                  f"{row['most_alive']} alive, {row['seconds']} s", flush=True)
    table = Table(title=f"server memory, one FedIT round of 1 MiB updates (matmul probe {probe:.0f} GFLOP/s)")
    for col in ("mode", "clients", "peak RSS MiB", "growth MiB", "most alive", "seconds"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in part["rows"]:
        table.add_row(r["mode"], f"{r['clients']:,}", f"{r['peak_rss_mib']:,.0f}", f"{r['peak_growth_mib']:,.0f}",
                      f"{r['most_alive']:,}", f"{r['seconds']:.1f}")
    Console().print(table)


def save(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy", help="accuracy under attack, per algorithm, attack and defence")
    acc.add_argument("--algorithms", nargs="+", choices=list(GRID), default=list(GRID))
    acc.add_argument("--attacks", nargs="+", choices=list(ATTACKS), help="these attacks (default: the grid's)")
    acc.add_argument("--defences", nargs="+", choices=list(DEFENCES), help="these defences (default: the grid's)")
    acc.add_argument("--missing", action="store_true", help="skip the runs already recorded at these sizes")
    acc.add_argument("--runs", default="/tmp/fedtune-bench/robust", help="where the run directories go")
    mem = sub.add_parser("memory", help="the server's peak memory against the number of clients")
    mem.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    mem.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    one = sub.add_parser("measure", help="(internal) one memory measurement, printed as JSON")
    one.add_argument("mode", choices=list(MODES))
    one.add_argument("clients", type=int)
    args = ap.parse_args()
    if args.part == "measure":
        print(json.dumps(measure_memory(args.mode, args.clients)))
        return
    record = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    probe = matmul_gflops()
    (accuracy if args.part == "accuracy" else memory)(args, probe, record)


if __name__ == "__main__":
    main()
