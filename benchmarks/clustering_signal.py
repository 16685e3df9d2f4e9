"""Which update vectors tell the groups apart? Every ``cluster_on`` × ``cluster_layers`` choice, raw and centred,
scored on the same clients' updates of one clustering round.

Runs one scenario of ``benchmarks/clustered.py`` (same data, split and sizes) up to its clustering round
(``--cluster-round``, default 2: one FedIT round first) with ``clustered``, and, from that round's client updates,
clusters the clients (``n_clusters: auto``) for B / A / both × last / all, on the raw updates and on their
directions less their mean (``center``). Reports ARI and NMI against the true groups, the number of clusters and
the labels, all with Ward on the unit updates (``ward_on: unit_updates``, as the recorded scores were made). The
run itself is the ``clustered`` method with its defaults (B, last, raw). The recorded scenario c predates
``last`` meaning the highest layer: its "last" is SmolLM2's layer 9, the last by string order of 30.

    python benchmarks/clustering_signal.py --scenario c --steps 12

Writes ``benchmarks/results/clustering_signal.json``, one entry per scenario and sizes.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from clustered import SCENARIOS, scenario_overrides
from fedtune.algorithms.clustered import cluster_tensor_names
from fedtune.clustering import agreement, centred_directions, cluster_clients, cosine_similarity_matrix, update_vector
from fedtune.config import load_config
from fedtune.run import execute_with
from fedtune.runtime.inprocess import InProcessPool
from mmlu_speed import matmul_gflops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=list(SCENARIOS), default="a")
    ap.add_argument("--cluster-round", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="local steps per client per round")
    ap.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs", default="/tmp/fedtune-bench/clustering_signal")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    sc = SCENARIOS[args.scenario]
    rnd = args.cluster_round
    cfg = load_config(sc["config"], [
        f"output_dir={args.runs}", f"name={args.scenario}", *scenario_overrides(args.scenario, rnd, args.steps),
        "eval.enabled=false", "algorithm.name=clustered", f"algorithm.options.cluster_round={rnd}", *args.override])
    scores: dict[str, dict] = {}

    def driver(exp, hooks, body):
        algo, inner = exp.algorithm, exp.algorithm.aggregate

        def aggregate(r, updates, state):
            if r == rnd:
                groups = [algo.client_groups[u.client_id] for u in updates]
                for on, layers in itertools.product(["B", "A", "both"], ["last", "all"]):
                    chosen = cluster_tensor_names(updates[0].tensors, on, layers)
                    vectors = [update_vector(u.tensors, state.model_of(u.client_id), chosen) for u in updates]
                    for centre in (False, True):
                        v = centred_directions(vectors)[0] if centre else vectors
                        found = cluster_clients(cosine_similarity_matrix(v), "auto", algo.options.min_silhouette,
                                                ward_on="unit_updates")
                        scores[f"{on} · {layers} · {'centred' if centre else 'raw'}"] = {
                            "cluster_on": on, "cluster_layers": layers, "center": centre, "clusters": found.k,
                            "labels": found.labels, **agreement(found.labels, groups)}
            return inner(r, updates, state)

        algo.aggregate = aggregate
        return body(InProcessPool(exp, on_step=hooks.on_step))

    probe_before = matmul_gflops()
    res = execute_with(cfg, driver, "inprocess", overwrite=True)
    probe_after = matmul_gflops()
    table = Table(title=f"scenario {args.scenario} · updates of round {rnd} · {args.steps} local steps · "
                        f"matmul probe {probe_before:.0f} → {probe_after:.0f} GFLOP/s")
    for col in ("vectors", "clusters", "ARI", "NMI", "labels"):
        table.add_column(col, justify="left" if col in ("vectors", "labels") else "right")
    for key, s in scores.items():
        table.add_row(key, str(s["clusters"]), f"{s['ari']:.2f}", f"{s['nmi']:.2f}", str(s["labels"]))
    Console(width=120).print(table)
    out = Path(args.results) / "clustering_signal.json"
    recorded = json.loads(out.read_text()) if out.is_file() else {}
    recorded[f"{args.scenario} · round {rnd} · {args.steps} steps"] = {
        "what": sc["what"], "overrides": sc["overrides"] + args.override, "cluster_round": rnd,
        "local_steps": args.steps, "seconds": res.seconds, "matmul_gflops_before": probe_before,
        "matmul_gflops_after": probe_after, "run_dir": str(res.run_dir), "scores": scores}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
