"""Clustered FL (FedMLLM) against FedIT, local-only and oracle clusters, on clients of different groups.

Scenarios (8 clients, ``group_clusters``: each client holds one group, two or four clients per group; every
client holds out 20% of its shard as its own test set):

- ``a``: MiniLM on SST-2, 4 clients in English and 4 in Portuguese (``sst2_multilingual``), accuracy;
- ``b``: MiniLM, 4 clients on SST-2 and 4 on CoLA under one binary head (``sst2_cola``), accuracy;
- ``c``: SmolLM2-135M on XQuAD instructions in 4 languages × 2 clients (``multilingual``), perplexity of each
  client's held-out responses, and ROUGE-L of greedy generations.

Methods, all clustering in round 2 on every client's LoRA-B update of the last module, after one FedIT round
(round 1's updates, from B = 0, carry no group signal on MiniLM): ``seed``, the reference code's procedure at
the scenario's true k (the clustered options' defaults: Ward on the rows of the cosine-similarity matrix, k by
the threshold sweep, unweighted cluster means, the clusters' first models from round 3's updates);
``clustered``, fedtune's variants (``n_clusters: auto``, Ward on the unit updates, data-weighted means, the
clusters' models from round 2's updates); ``clustered-centred`` (the same, comparing the update directions
less their mean: ``center: true``); ``fedit``, ``local`` (each client alone) and ``oracle`` (clusters = the
true groups, from round 2); on request (``--methods``), ``clustered-centred-all`` (centred, on both factors
of every module: the choice that ``benchmarks/clustering_signal.py`` finds best in scenario c). Reported per
scenario and method: the mean per-client metric after the last round, weighted by the clients' test rows
(``client_eval/<metric>``) and unweighted (``client_eval_unweighted/<metric>``; for rows recorded before it
was logged, the mean of the per-group means weighted by their clients, which is the same number: each client
holds one group), its name, its mean per true group, ARI and NMI of the clusters against the true groups
(clustered methods), MB up / down, wall seconds, and a matmul probe before and after.

    python benchmarks/clustered.py [--scenarios a c] [--methods ...] [--rounds N] [--steps S]
    python benchmarks/clustered.py --scenarios a b --methods seed -o threads=1    # the seed rows, as recorded
    python benchmarks/clustered.py --scenarios c --methods seed --rounds 3 --steps 4 -o threads=1
    python benchmarks/clustered.py --summarise    # rebuild the JSON's rows from the recorded run directories

Writes ``benchmarks/results/clustered.json`` (scenarios not run keep their previous entry).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.table import Table

from fedtune.config import load_config
from fedtune.report import group_metrics
from fedtune.run import execute
from fedtune.runlog import load_run
from mmlu_speed import matmul_gflops

SCENARIOS: dict[str, dict] = {
    "a": {"what": "MiniLM, SST-2: 4 clients English, 4 Portuguese", "k": 2, "metric": "client_eval/accuracy",
          "config": "configs/quickstart.yaml", "by": "language",
          "overrides": ["data.name=sst2_multilingual", "data.parallel=disjoint", "data.max_train_examples=1200",
                        "train.lr=2e-3", "train.lr_schedule=constant"]},
    "b": {"what": "MiniLM, 4 clients SST-2, 4 clients CoLA, one binary head", "k": 2, "metric": "client_eval/accuracy",
          "config": "configs/quickstart.yaml", "by": "task",
          "overrides": ["data.name=sst2_cola", "data.max_train_examples=1200", "train.lr=2e-3",
                        "train.lr_schedule=constant"]},
    "c": {"what": "SmolLM2-135M, XQuAD instructions: en, es, de, zh × 2 clients", "k": 4, "metric": "client_eval/perplexity",
          "config": "configs/snli_instruct_fedit.yaml", "by": "language",
          "overrides": ["data.name=multilingual", "data.languages=[en,es,de,zh]", "data.parallel=disjoint",
                        "data.max_train_examples=60", "data.max_eval_examples=null", "model.max_length=256",
                        "train.batch_size=2", "train.lr=1e-3", "eval.metrics=[perplexity,rouge]",
                        "eval.max_new_tokens=24", "eval.batch_size=8"]},
}

CLUSTERED = ["algorithm.name=clustered", "algorithm.options.cluster_round=2"]
FEDTUNE = ["algorithm.options.ward_on=unit_updates", "algorithm.options.cluster_means=weighted",
           "algorithm.options.cluster_models_from=cluster_round"]
"""fedtune's variants, as the rows recorded before the reference code's procedure became the default."""
METHODS: dict[str, list[str]] = {
    "seed": [*CLUSTERED],  # the reference code's procedure; n_clusters is the scenario's true k (run_scenario)
    "clustered": [*CLUSTERED, *FEDTUNE, "algorithm.options.n_clusters=auto"],
    "clustered-centred": [*CLUSTERED, *FEDTUNE, "algorithm.options.n_clusters=auto", "algorithm.options.center=true"],
    "fedit": ["algorithm.name=fedit"],
    "local": ["algorithm.name=local"],
    "oracle": [*CLUSTERED, "algorithm.options.cluster_means=weighted",
               "algorithm.options.cluster_models_from=cluster_round", "algorithm.options.assign=oracle"],
    "clustered-centred-all": [*CLUSTERED, *FEDTUNE, "algorithm.options.n_clusters=auto", "algorithm.options.center=true",
                              "algorithm.options.cluster_on=both", "algorithm.options.cluster_layers=all"],
}
DEFAULT_METHODS = ["seed", "clustered", "clustered-centred", "fedit", "local", "oracle"]


def scenario_overrides(key: str, rounds: int, steps: int) -> list[str]:
    """The config overrides of scenario ``key`` at ``rounds`` × ``steps``: 8 clients, one group each, every client
    in every round, each evaluated once at the end on its own 20% test shard."""
    sc = SCENARIOS[key]
    return ["partition.method=group_clusters", f"partition.by={sc['by']}", "partition.num_clients=8",
            "partition.client_test_fraction=0.2", "federation.clients_per_round=null", f"federation.rounds={rounds}",
            f"train.local_steps={steps}", "eval.per_client=true", "eval.every=0", "data.eval_fraction=0",
            *sc["overrides"]]


def run_scenario(key: str, args) -> list[dict]:
    sc = SCENARIOS[key]
    results = []
    for method in args.methods:
        true_k = [f"algorithm.options.n_clusters={sc['k']}"] if method == "seed" else []
        cfg = load_config(sc["config"], [f"output_dir={Path(args.runs) / key}", f"name={method}",
                                         *scenario_overrides(key, args.rounds, args.steps), *METHODS[method],
                                         *true_k, *args.override])
        res = execute(cfg, overwrite=True)
        results.append(result_row(key, method, res.run_dir))
        Console().print(f"{key} · {method}: {sc['metric']} {results[-1]['mean_client_metric']} ({res.seconds:.0f} s)")
    return results


def result_row(key: str, method: str, run_dir: Path) -> dict:
    """One method's figures, read from its run directory alone."""
    metric = SCENARIOS[key]["metric"]
    run = load_run(run_dir)
    clustering = next((r for r in run.rows if "agg/clusters" in r), {})
    last = run.rows[-1]
    return {
        "scenario": key, "method": method, "metric": metric, "mean_client_metric": last.get(metric),
        "mean_client_metric_unweighted": last.get(metric.replace("client_eval/", "client_eval_unweighted/")),
        "client_metric_std": last.get(metric + "_std"),
        "per_group": group_metrics(run, metric),
        "rouge_l": last.get("client_eval/rougeL") if key == "c" else None,
        "clusters": clustering.get("agg/clusters"), "ari": clustering.get("agg/ari"),
        "nmi": clustering.get("agg/nmi"), "cluster_of": clustering.get("agg/cluster_of"),
        "similarity_by_group": similarity_by_group(run_dir, clustering),
        "bytes_up": last["cum_bytes_up"], "bytes_down": last["cum_bytes_down"], "seconds": run.summary["seconds"],
        "run_dir": str(run_dir),
    }


def unweighted_from_groups(per_group: dict) -> float | None:
    """The unweighted mean over clients from the per-group means (each client holds one group)."""
    if not per_group:
        return None
    return sum(v["mean"] * v["clients"] for v in per_group.values()) / sum(v["clients"] for v in per_group.values())


def similarity_by_group(run_dir: Path, clustering: dict) -> dict | None:
    """The clustering round's logged cosines (as clustered: raw or centred), averaged over the pairs of clients in
    the same true group (per group) and in different groups."""
    if "agg/similarity" not in clustering:
        return None
    groups = json.loads((Path(run_dir) / "partition.json").read_text())["client_groups"]
    sim, cids = np.array(clustering["agg/similarity"]), clustering["agg/similarity_clients"]
    pairs = [(i, j) for i in range(len(cids)) for j in range(i + 1, len(cids))]
    group = [", ".join(groups[c]) for c in cids]
    within = {g: float(np.mean([sim[i, j] for i, j in pairs if group[i] == group[j] == g])) for g in sorted(set(group))}
    return {"within": within, "between": float(np.mean([sim[i, j] for i, j in pairs if group[i] != group[j]]))}


def summarise(args) -> None:
    """Rebuild every recorded scenario's rows from its run directories (sizes and probes kept)."""
    out = Path(args.results) / "clustered.json"
    if not out.is_file():
        raise SystemExit(f"{out} does not exist; run the benchmark first")
    recorded = json.loads(out.read_text())
    for key, entry in recorded.items():
        if all(Path(r["run_dir"], "metrics.jsonl").is_file() for r in entry["results"]):
            entry["results"] = [result_row(key, r["method"], Path(r["run_dir"])) for r in entry["results"]]
        else:
            print(f"{key}: some run directories are not here; its rows are left as they are")
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                    help="methods to run; a scenario rerun at the same sizes keeps the rows of the others")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="local steps per client per round")
    ap.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/clustered")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--summarise", action="store_true",
                    help="run nothing: rebuild the recorded rows from their run directories")
    args = ap.parse_args()
    if args.summarise:
        return summarise(args)

    probe_before = matmul_gflops()
    results = [r for key in args.scenarios for r in run_scenario(key, args)]
    probe_after = matmul_gflops()
    table = Table(title=f"clustered FL · 8 clients · {args.rounds} rounds × {args.steps} local steps · "
                        f"matmul probe {probe_before:.0f} → {probe_after:.0f} GFLOP/s")
    for col in ("scenario", "method", "metric", "mean per client (rows / unweighted)", "per group", "ROUGE-L",
                "clusters", "ARI", "NMI", "MB up", "MB down", "wall s"):
        table.add_column(col, justify="left" if col in ("scenario", "method", "metric") else "right")

    def fmt(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    for r in results:
        groups = " ".join(f"{g} {v['mean']:.3f}" for g, v in r["per_group"].items())
        table.add_row(r["scenario"], r["method"], r["metric"], f"{fmt(r['mean_client_metric'])} / {fmt(r['mean_client_metric_unweighted'])}", groups or "-",
                      fmt(r["rouge_l"]), fmt(r["clusters"], "d"),
                      fmt(r["ari"], ".2f"), fmt(r["nmi"], ".2f"), f"{r['bytes_up'] / 1e6:,.1f}",
                      f"{r['bytes_down'] / 1e6:,.1f}", f"{r['seconds']:.0f}")
    Console().print(table)
    out = Path(args.results) / "clustered.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for key in args.scenarios:
        entry = {"what": SCENARIOS[key]["what"], "rounds": args.rounds, "local_steps": args.steps,
                 "overrides": SCENARIOS[key]["overrides"] + args.override,
                 "matmul_gflops_before": probe_before, "matmul_gflops_after": probe_after}
        held = previous.get(key, {})
        same = all(held.get(k) == entry[k] for k in ("what", "rounds", "local_steps", "overrides"))
        rows = {r["method"]: r for r in held.get("results", [])} if same else {}
        rows.update({r["method"]: r for r in results if r["scenario"] == key})
        if same:  # the probes of every run that made a row
            entry["matmul_gflops_before"] = min(held["matmul_gflops_before"], probe_before)
            entry["matmul_gflops_after"] = min(held["matmul_gflops_after"], probe_after)
        for r in rows.values():
            r.setdefault("mean_client_metric_unweighted", unweighted_from_groups(r["per_group"]))
        previous[key] = {**entry, "results": [rows[m] for m in METHODS if m in rows]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
