"""Clustered FL: the clustering on planted update directions, the algorithm's per-cluster rounds, both runtimes."""

import json

import numpy as np
import pytest
import scipy.cluster.hierarchy as spc
import torch
from safetensors.torch import load_file

from fedtune.aggregation import weighted_mean
from fedtune.algorithms import ClientUpdate, build_algorithm
from fedtune.algorithms.clustered import cluster_tensor_names
from fedtune.clustering import agreement, centre, centred_directions, cluster_clients, cosine_similarity_matrix
from fedtune.errors import FedtuneError
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from test_flower import LocalGrid, local_grid_driver, tiny_cfg

B = "m.layer.1.value.lora_B.default.weight"
A = "m.layer.1.value.lora_A.default.weight"
B0 = "m.layer.0.value.lora_B.default.weight"
FEDTUNE_TIMING = {"cluster_models_from": "cluster_round", "cluster_means": "weighted"}
"""fedtune's variants: clusters from the clustering round's own updates, members weighted by data size."""


def planted(groups: list[int], dim: int = 64, noise: float = 0.2, seed: int = 0) -> list[torch.Tensor]:
    """One random direction per group; each client's vector = its group's direction + noise."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(max(groups) + 1, dim, generator=g)
    return [directions[k] + noise * torch.randn(dim, generator=g) for k in groups]


def test_auto_recovers_planted_groups_and_their_number():
    truth = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    found = cluster_clients(cosine_similarity_matrix(planted(truth)), "auto", ward_on="unit_updates")
    assert found.k == 3 and found.labels == truth
    assert agreement(found.labels, [str(t) for t in truth]) == {"ari": 1.0, "nmi": 1.0}
    assert max(found.silhouettes, key=found.silhouettes.get) == 3


def test_auto_keeps_structureless_clients_together_and_fixed_k_is_honoured():
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(400, generator=g) for _ in range(8)]
    for on in ("unit_updates", "similarity_rows"):
        assert cluster_clients(cosine_similarity_matrix(noise), "auto", ward_on=on).labels == [0] * 8
        assert cluster_clients(cosine_similarity_matrix(planted([0, 0, 1, 1])), 2, ward_on=on).labels == [0, 0, 1, 1]
        assert cluster_clients(cosine_similarity_matrix(planted([0, 1])), "auto", ward_on=on).labels == [0, 0]  # n < 3
        assert cluster_clients(cosine_similarity_matrix(planted([0, 1, 2])), 5, ward_on=on).k == 3  # k ≥ n: alone


def test_centring_puts_an_incoherent_group_together():
    """Every client learns one task (a common direction t). English clients also share a language direction d;
    the model cannot read Portuguese, so those clients' updates are mostly noise. Raw cosines keep the English
    clients together and scatter the others, each alone; less their mean direction, the others share −d."""
    truth = [0, 1, 0, 1, 0, 1, 0, 1]
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(256, generator=g), torch.randn(256, generator=g)
    vectors = [t + 0.5 * d + 0.3 * torch.randn(256, generator=g) if k == 0 else 0.5 * t + torch.randn(256, generator=g)
               for k in truth]
    assert cluster_clients(cosine_similarity_matrix(vectors), "auto", ward_on="unit_updates").labels == [0, 1, 0, 2, 0, 3, 0, 4]
    centred, mean = centred_directions(vectors)
    assert torch.allclose(sum(centred), torch.zeros(256, dtype=torch.float64), atol=1e-12)
    assert cluster_clients(cosine_similarity_matrix(centred), "auto", ward_on="unit_updates").labels == truth
    # the rows of S see it without centring: the noisy clients are alike in agreeing with no one
    assert cluster_clients(cosine_similarity_matrix(vectors), "auto", ward_on="similarity_rows").labels == truth
    assert torch.allclose(centre(vectors[3] * 7, mean), centred[3])  # a later client: the same m, any length


def _updates(x, groups, sizes=None, seed=0):
    """Client i's update: x plus its group's planted direction on B (A and the other module move at random)."""
    vecs = planted(groups, dim=x[B].numel(), noise=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [ClientUpdate(cid, {B: x[B] + v.reshape(x[B].shape), A: x[A] + torch.randn(x[A].shape, generator=g),
                               B0: x[B0] + torch.randn(x[B0].shape, generator=g)}, (sizes or {}).get(cid, 10))
            for cid, v in enumerate(vecs)]


def _x():
    g = torch.Generator().manual_seed(9)
    return {B: torch.randn(8, 2, generator=g), A: torch.randn(2, 8, generator=g), B0: torch.randn(8, 2, generator=g)}


def test_cluster_round_trains_everyone_then_each_cluster_averages_its_own_members():
    algo = build_algorithm("clustered", {"cluster_round": 2, **FEDTUNE_TIMING}, num_clients=5)
    assert algo.participants(1, [0, 3]) == [0, 3] and algo.participants(2, [0, 3]) == [0, 1, 2, 3, 4]
    x = _x()
    state = algo.init(x)
    ups = _updates(x, [0, 0, 1, 1, 0], sizes={0: 10, 1: 30, 4: 20})
    state = algo.aggregate(2, ups, state)
    assert state.assignment == {0: "cluster_0", 1: "cluster_0", 4: "cluster_0", 2: "cluster_1", 3: "cluster_1"}
    assert state.metrics["clusters"] == 2 and len(state.metrics["similarity"]) == 5
    want0 = weighted_mean([ups[i].tensors for i in (0, 1, 4)], [10, 30, 20])
    assert all(torch.allclose(state.models["cluster_0"][k], want0[k]) for k in want0)
    # Each client now trains from its cluster's model; a round with only cluster 1's clients leaves cluster 0 as is.
    payloads = algo.configure(3, [1, 2], state)
    assert payloads[1].tensors is state.models["cluster_0"] and payloads[2].tensors is state.models["cluster_1"]
    r3 = [ClientUpdate(2, {k: v + 1 for k, v in state.models["cluster_1"].items()}, 5),
          ClientUpdate(3, {k: v - 1 for k, v in state.models["cluster_1"].items()}, 15)]
    after = algo.aggregate(3, r3, state)
    assert after.models["cluster_0"] is state.models["cluster_0"]
    assert torch.allclose(after.models["cluster_1"][B], state.models["cluster_1"][B] - 0.5)  # 0.25·(+1) + 0.75·(−1)
    evals = algo.configure_evaluate([0, 2], after)
    assert evals[0] is after.models["cluster_0"] and evals[2] is after.models["cluster_1"]
    assert set(algo.evaluation_models(after)) == {"cluster_0", "cluster_1"}


def test_a_late_client_joins_the_cluster_its_update_points_to():
    algo = build_algorithm("clustered", {"n_clusters": 2, **FEDTUNE_TIMING}, num_clients=4)
    x = _x()
    ups = _updates(x, [0, 0, 1, 1, 1])  # client 4's update, planted in group 1, arrives after the clustering
    state = algo.aggregate(1, ups[:4], algo.init(x))
    assert 4 not in state.assignment and algo.configure(2, [4], state)[4].tensors is state.global_tensors
    after = algo.aggregate(2, [ups[4]], state)
    assert after.assignment[4] == state.assignment[2] and after.metrics["joined"] == {"4": state.assignment[2]}


def test_centred_clustering_stores_its_mean_direction_and_centres_a_late_client_by_it():
    x = _x()
    ups = _updates(x, [0, 0, 1, 1, 1])
    algo = build_algorithm("clustered", {"n_clusters": 2, "center": True, **FEDTUNE_TIMING}, num_clients=4)
    state = algo.aggregate(1, ups[:4], algo.init(x))
    assert state.assignment == {0: "cluster_0", 1: "cluster_0", 2: "cluster_1", 3: "cluster_1"}
    assert state.extra["clustered/mean_direction"].shape == (x[B].numel(),)
    after = algo.aggregate(2, [ups[4]], state)
    assert after.assignment[4] == "cluster_1"
    assert "clustered/mean_direction" not in build_algorithm("clustered", {"n_clusters": 2, **FEDTUNE_TIMING},
                                                              num_clients=4).aggregate(
        1, ups[:4], algo.init(x)).extra


def test_singletons_one_cluster_random_and_oracle_variants():
    x = _x()
    ups = _updates(x, [0, 1, 1, 1])
    lone = build_algorithm("clustered", {"n_clusters": 2, **FEDTUNE_TIMING}, num_clients=4).aggregate(1, ups, build_algorithm(
        "clustered").init(x))
    assert sorted(map(len, [[c for c, n in lone.assignment.items() if n == k] for k in lone.models])) == [1, 3]
    one = build_algorithm("clustered", {"n_clusters": 1, **FEDTUNE_TIMING}, num_clients=4).aggregate(1, ups, lone)
    fedit = build_algorithm("fedit").aggregate(1, ups, lone)
    assert list(one.models) == ["cluster_0"] and all(torch.equal(one.models["cluster_0"][k], fedit.global_tensors[k])
                                                     for k in fedit.global_tensors)
    rand = build_algorithm("clustered", {"n_clusters": 2, "assign": "shuffled", **FEDTUNE_TIMING}, num_clients=4)
    sizes = sorted(list(rand.aggregate(1, ups, lone).assignment.values()).count(n) for n in ("cluster_0", "cluster_1"))
    assert sizes == [1, 3]  # the same sizes as the similarity clustering
    with pytest.raises(FedtuneError, match="oracle needs the clients' true groups"):
        build_algorithm("clustered", {"assign": "oracle", **FEDTUNE_TIMING}, num_clients=4).aggregate(1, ups, lone)
    oracle = build_algorithm("clustered", {"assign": "oracle", **FEDTUNE_TIMING}, num_clients=4,
                             client_groups=["en", "pt", "en", "pt"])
    state = oracle.aggregate(1, ups, lone)
    assert state.assignment == {0: "cluster_0", 1: "cluster_1", 2: "cluster_0", 3: "cluster_1"}
    assert state.metrics["ari"] == 1.0


def test_clustered_runs_identically_on_both_runtimes_and_saves_every_model(tmp_path, tiny_model_dir,
                                                                            tiny_tsv_dataset):
    over = dict(algorithm={"name": "clustered", "options": {"n_clusters": 2, "cluster_round": 1}},
                partition={"method": "iid", "num_clients": 4, "client_test_fraction": 0.25},
                federation={"rounds": 2, "clients_per_round": 2}, eval={"every": 1, "batch_size": 32,
                                                                        "per_client": True})
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", **over)
    execute(cfg)
    flw = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower", **over)
    execute_with(flw, local_grid_driver(LocalGrid(4)), "flower")
    rows = load_run(cfg.run_dir).rows
    assert rows[1]["clients"] == [0, 1, 2, 3] and rows[2]["num_clients"] == 2  # round 1 clusters everyone
    # the reference code's timing: round 1 decides the clusters, round 2 makes their first models
    assert rows[1]["agg/clusters"] == 2 and "eval/accuracy" in rows[1] and "eval/cluster_0/accuracy" not in rows[1]
    assert "eval/cluster_0/accuracy" in rows[2] and "client_eval/accuracy" in rows[2]
    models = json.loads((cfg.run_dir / "models.json").read_text())
    assert models == json.loads((flw.run_dir / "models.json").read_text())
    assert sorted(models["assignment"]) == ["0", "1", "2", "3"] and models["models"] == ["cluster_0", "cluster_1"]
    for name in models["models"]:
        a = load_file(cfg.run_dir / "adapters" / name / "adapter_model.safetensors")
        b = load_file(flw.run_dir / "adapters" / name / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_run(cfg.run_dir).rows[2]["bytes_down"] == load_run(flw.run_dir).rows[2]["bytes_down"]

    assert (cfg.run_dir / "clustering_round1_similarity.png").is_file()
    assert (cfg.run_dir / "clustering_round1_dendrogram.png").is_file()
    from fedtune.report import build_report

    report = build_report([cfg.run_dir], metric="client_eval/accuracy", out_dir=tmp_path / "report")
    assert report.rows[0]["models"] == {name: sorted(int(c) for c, m in models["assignment"].items() if m == name)
                                        for name in models["models"]}
    assert (tmp_path / "report" / "clustering_round1_dendrogram.png").is_file()


def test_each_cluster_takes_steps_of_its_own_server_optimiser():
    x = _x()
    ups = _updates(x, [0, 0, 1, 1])
    opts = {"cluster_round": 2, "n_clusters": 2, "server": "fedadam", "server_options": {"server_lr": 0.1},
            **FEDTUNE_TIMING}
    algo = build_algorithm("clustered", opts, num_clients=4)
    fedadam = build_algorithm("fedadam", {"server_lr": 0.1})
    r1 = algo.aggregate(1, ups, algo.init(x))  # before clustering: FedAdam on the global model
    alone = fedadam.aggregate(1, ups, fedadam.init(x))
    assert all(torch.equal(r1.global_tensors[k], alone.global_tensors[k]) for k in x)
    assert r1.extra["clustered/server/global/server_opt/step"].item() == 1
    r2 = algo.aggregate(2, _updates(r1.global_tensors, [0, 0, 1, 1]), r1)
    assert not any(k.startswith("clustered/server/") for k in r2.extra)  # clusters and moments start anew
    members = [ClientUpdate(c, {k: v + 0.5 * c for k, v in r2.models["cluster_0"].items()}, 10) for c in (0, 1)]
    r3 = algo.aggregate(3, members, r2)
    want = fedadam.aggregate(3, members, type(r2)(round=2, global_tensors=r2.models["cluster_0"]))
    assert all(torch.equal(r3.models["cluster_0"][k], want.global_tensors[k]) for k in x)
    assert r3.models["cluster_1"] is r2.models["cluster_1"]
    r4 = algo.aggregate(4, [ClientUpdate(2, {k: v - 1 for k, v in r3.models["cluster_1"].items()}, 10)], r3)
    steps = {k: v.item() for k, v in r4.extra.items() if k.endswith("server_opt/step")}
    assert steps == {"clustered/server/cluster_0/server_opt/step": 1, "clustered/server/cluster_1/server_opt/step": 1}
    with pytest.raises(FedtuneError, match="algorithm.options.server_options"):
        build_algorithm("clustered", {"server": "fedadam", "server_options": {"server_lr": -1}})


def test_a_clustering_round_says_what_it_decided():
    x = _x()
    algo = build_algorithm("clustered", {}, num_clients=6, client_groups=["en", "en", "en", "pt", "pt", "pt"])
    state = algo.aggregate(1, _updates(x, [0, 0, 0, 1, 1, 1]), algo.init(x))
    best = max(state.metrics["silhouettes"].values())
    assert algo.decisions(1, state.metrics) == [
        f"round 1: clustered 6 clients into 2 clusters (auto: best silhouette {best:.3f} at k=2, ≥ min_silhouette "
        "0.1): cluster_0 = clients 0, 1, 2 (en ×3); cluster_1 = clients 3, 4, 5 (pt ×3); ARI 1.00, NMI 1.00 against "
        "their groups; their models are made from round 2's updates"]
    g = torch.Generator().manual_seed(3)
    noise = [ClientUpdate(c, {B: x[B] + torch.randn(x[B].shape, generator=g), A: x[A], B0: x[B0]}, 10)
             for c in range(6)]
    strict = build_algorithm("clustered", {"min_silhouette": 0.9}, num_clients=6)
    one = strict.aggregate(1, noise, strict.init(x))
    best = max(one.metrics["silhouettes"].values())
    k = max(one.metrics["silhouettes"], key=one.metrics["silhouettes"].get)
    assert strict.decisions(1, one.metrics) == [
        f"round 1: clustered 6 clients into 1 cluster (auto: best silhouette {best:.3f} at k={k}, below "
        "min_silhouette 0.9): cluster_0 = clients 0, 1, 2, 3, 4, 5; their models are made from round 2's updates"]
    fixed = build_algorithm("clustered", {"n_clusters": 2}, num_clients=4)
    late = fixed.aggregate(2, [_updates(x, [0, 0, 1, 1, 1])[4]], fixed.aggregate(1, _updates(x, [0, 0, 1, 1]),
                                                                                fixed.init(x)))
    assert fixed.decisions(2, late.metrics) == ["round 2: client 4 joined cluster_1 (the nearest centroid)"]
    assert fixed.decisions(3, {}) == []


def test_a_grouped_clustered_run_prints_its_decision_and_show_report_and_cards_carry_it(tmp_path, tiny_model_dir):
    """Clients of two domains (a column of the files, in the dev split too): the console line of the clustering
    round, clusters / ARI / NMI in ``fedtune show`` and ``fedtune report``, accuracy per domain on the eval split,
    the domains on the heat map's axes, the report's default metric (the clients' own), and each card its model's."""
    import random

    from rich.console import Console

    from fedtune.config import RunConfig
    from fedtune.report import _client_label, build_report
    from fedtune.show import round_table

    rng = random.Random(0)
    for split, n in (("train", 80), ("dev", 40)):
        rows = [f"{rng.choice(['a', 'the'])} {['bad', 'good'][i % 2]} {['book', 'flight'][i // 2 % 2]}\t"
                f"{['neg', 'pos'][i % 2]}\t{['books', 'air'][i // 2 % 2]}" for i in range(n)]
        (tmp_path / f"{split}.tsv").write_text("text\tlabel\tdomain\n" + "\n".join(rows) + "\n")
    cfg = RunConfig.model_validate(dict(
        name="grouped", output_dir=str(tmp_path / "runs"), seed=1, threads=1, data=dict(name=str(tmp_path)),
        partition=dict(method="group_clusters", by="domain", num_clients=4, client_test_fraction=0.25),
        model=dict(name=str(tiny_model_dir), max_length=16), lora=dict(r=4, alpha=8),
        train=dict(local_steps=2, batch_size=8, lr=2e-2), federation=dict(rounds=2),
        algorithm=dict(name="clustered", options={"n_clusters": 2, "cluster_models_from": "cluster_round"}),
        eval=dict(per_client=True)))
    console = Console(record=True, width=300)
    execute(cfg, console=console)
    printed = console.export_text()
    row = load_run(cfg.run_dir).rows[1]
    line = next(line for line in printed.splitlines() if line.startswith("round 1: clustered 4 clients into 2"))
    assert line.startswith("round 1: clustered 4 clients into 2 clusters (n_clusters=2): cluster_0 = clients")
    assert line.endswith(f"ARI {row['agg/ari']:.2f}, NMI {row['agg/nmi']:.2f} against their groups")
    assert {"eval/cluster_0/accuracy@air", "eval/cluster_0/accuracy@books"} <= set(row)

    table = round_table(load_run(cfg.run_dir))
    columns = {str(c.header): list(c.cells) for c in table.columns}
    assert [columns[h] for h in ("clusters", "ARI", "NMI")] == [
        ["-", "2", "-"], ["-", f"{row['agg/ari']:.4f}", "-"], ["-", f"{row['agg/nmi']:.4f}", "-"]]
    assert not any("@" in h for h in columns)  # per-group accuracies are left to the report

    report = build_report([cfg.run_dir])
    assert report.metric == "client_eval/accuracy" and report.note is None  # eval/accuracy ends at round 0
    assert report.rows[0]["clustering"] == {"round": 1, "clusters": 2, "ari": row["agg/ari"], "nmi": row["agg/nmi"]}
    assert set(report.rows[0]["eval_groups"]) == {"cluster_0", "cluster_1"}
    table = Console(record=True, width=200)
    table.print(report.table)
    for extra in report.clients:
        table.print(extra)
    text = table.export_text()
    assert f"2 ({row['agg/ari']:.2f}, {row['agg/nmi']:.2f})" in text and "grouped: eval accuracy by domain" in text
    stale = build_report([cfg.run_dir], metric="eval/accuracy")
    assert "records eval/accuracy only up to round 0" in stale.note and stale.rows[0]["final_round"] == 0

    groups = json.loads((cfg.run_dir / "partition.json").read_text())["client_groups"]
    assert _client_label("2", groups, row["agg/cluster_of"]) == (
        f"2 {groups[2][0]} ({row['agg/cluster_of']['2'].removeprefix('cluster_')})")
    final = json.loads((cfg.run_dir / "summary.json").read_text())["final"]
    for name in ("cluster_0", "cluster_1"):
        card = (cfg.run_dir / "adapters" / name / "README.md").read_text()
        assert f"| eval/accuracy | {final[f'eval/{name}/accuracy']:.4f} |" in card
    assert "last evaluated in round 0 (the untrained model)" in (cfg.run_dir / "adapter" / "README.md").read_text()


# ---------------------------------------------------------------------------- the reference code's procedure
# Expected values below are computed as GabrielTalasso/FedMLLM computes them, transcribed in the test.

def reference_similarity(vectors: list[torch.Tensor]) -> np.ndarray:
    """federated_learning/fed_clustered.py:84-89 (calculate_similarity): torch's CosineSimilarity(dim=0, eps=1e-6)
    between every pair of flattened updates."""
    cos = torch.nn.CosineSimilarity(dim=0, eps=1e-6)
    return np.array([[float(cos(a.double(), b.double())) for b in vectors] for a in vectors])


def reference_make_clusters(similarity_matrix: np.ndarray, n_clusters: int) -> np.ndarray:
    """federated_learning/fed_clustered.py:103-117 (make_clusters): Ward on pdist of S's rows, then the largest of
    5000 thresholds from the first to the last merge that leaves n_clusters flat clusters (else the last)."""
    pdist = spc.distance.pdist(similarity_matrix)
    link = spc.linkage(pdist, method="ward")
    min_link, max_link = link[0][2], link[-1][2]
    th = max_link
    for i in np.linspace(min_link, max_link, 5000):
        if len(np.unique(spc.fcluster(link, i, "distance"))) == n_clusters:
            th = i
    return spc.fcluster(link, th, "distance")


def english_and_noise(seed: int, dim: int = 256) -> tuple[list[torch.Tensor], list[int]]:
    """Every client learns a task (t); the 'English' clients (0) also share a direction d, the others' updates are
    mostly noise: the construction on which raw unit-update distances scatter the noisy group."""
    truth = [0, 1, 0, 1, 0, 1, 0, 1]
    g = torch.Generator().manual_seed(seed)
    t, d = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    return [t + 0.5 * d + 0.3 * torch.randn(dim, generator=g) if k == 0 else 0.5 * t + torch.randn(dim, generator=g)
            for k in truth], truth


def _on_b(x, vectors, sizes=None):
    g = torch.Generator().manual_seed(5)
    return [ClientUpdate(c, {B: x[B] + v.reshape(x[B].shape), A: x[A] + torch.randn(x[A].shape, generator=g),
                             B0: x[B0] + torch.randn(x[B0].shape, generator=g)}, (sizes or {}).get(c, 10))
            for c, v in enumerate(vectors)]


@pytest.mark.parametrize("seed", [0, 11, 22])
def test_default_clustering_is_the_reference_codes_on_the_planted_construction(seed):
    vectors, truth = english_and_noise(seed)
    x = {B: torch.zeros(16, 16), A: torch.zeros(16, 8), B0: torch.zeros(16, 16)}
    algo = build_algorithm("clustered", {"n_clusters": 2}, num_clients=8)
    state = algo.aggregate(1, _on_b(x, vectors), algo.init(x))
    found = [state.metrics["cluster_of"][str(c)] for c in range(8)]
    expected = reference_make_clusters(reference_similarity(vectors), 2)
    assert agreement(found, [str(e) for e in expected])["ari"] == 1.0
    assert agreement(found, [str(t) for t in truth])["ari"] == 1.0  # and it finds the groups


def test_a_fixed_k_no_threshold_reaches_gives_one_cluster_as_the_reference_code_does():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sim = cosine_similarity_matrix([a, a, b, b])  # two merges at distance 0: no cut leaves 3 clusters
    expected = reference_make_clusters(reference_similarity([a, a, b, b]), 3)
    assert len(set(expected)) == 1
    assert cluster_clients(sim, 3, ward_on="similarity_rows").labels == [0, 0, 0, 0]


def test_clusters_are_decided_in_the_clustering_round_and_made_in_the_next_unweighted():
    """main_sft_clustered.py:110-127, 182 and fed_global.py:63-144: round sim_round trains every client and
    aggregates by data size; the round after, every client trains from that global model and each cluster's model
    is the plain mean of its members' latest local models (a member not sampled: its model of the clustering
    round); later rounds average a cluster's sampled members, each once."""
    x = _x()
    sizes = {0: 10, 1: 30, 2: 5, 3: 15}
    algo = build_algorithm("clustered", {"n_clusters": 2}, num_clients=4)
    r1 = _updates(x, [0, 0, 1, 1], sizes=sizes)
    s1 = algo.aggregate(1, r1, algo.init(x))
    fedavg = {k: sum(u.tensors[k] * u.num_examples for u in r1) / sum(sizes.values()) for k in x}  # :65-67
    assert not s1.models and all(torch.allclose(s1.global_tensors[k], fedavg[k]) for k in x)
    assert algo.configure(2, [0, 2], s1)[0].tensors is s1.global_tensors  # round 2 trains from the global model
    r2 = [ClientUpdate(c, {k: v + c + 1 for k, v in s1.global_tensors.items()}, sizes[c]) for c in (0, 2, 3)]
    s2 = algo.aggregate(2, r2, s1)
    latest = {0: r2[0].tensors, 1: r1[1].tensors, 2: r2[1].tensors, 3: r2[2].tensors}  # local_dict_list
    for members in ([0, 1], [2, 3]):
        name = s2.assignment[members[0]]
        assert s2.assignment[members[1]] == name
        want = {k: sum(latest[c][k] for c in members) / len(members) for k in x}  # fed_global.py:114
        assert all(torch.allclose(s2.models[name][k], want[k]) for k in x)
    r3 = [ClientUpdate(c, {k: v * (c + 2) for k, v in s2.model_of(c).items()}, sizes[c]) for c in (0, 1, 3)]
    s3 = algo.aggregate(3, r3, s2)
    want = {k: (r3[0].tensors[k] + r3[1].tensors[k]) / 2 for k in x}  # fed_global.py:141, sizes 10 and 30 aside
    assert all(torch.allclose(s3.models[s2.assignment[0]][k], want[k]) for k in x)


def test_random_assignment_draws_labels_uniformly_not_the_found_sizes():
    """fed_global.py:94-95 (clustered_random): idx = np.random.randint(1, n_clusters + 1, size=num_clients)."""
    x = _x()
    ups = _updates(x, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    algo = build_algorithm("clustered", {"n_clusters": 2, "assign": "random", "recluster_every": 1,
                                         "cluster_models_from": "cluster_round"}, num_clients=12)
    state, sizes = algo.init(x), set()
    for rnd in range(1, 13):
        state = algo.aggregate(rnd, ups, state)
        sizes.add(tuple(sorted(list(state.assignment.values()).count(n) for n in state.models)))
    assert len(sizes) > 2  # the draws' cluster sizes vary from round to round (the found clusters are 6 and 6)


def test_the_last_module_is_the_models_last_as_the_reference_code_takes_it():
    """fed_clustered.py:41 and :56: [param for name, param in state_dict.items() if 'lora_B' in name][-1], the
    state dict in the model's order: layer 11 of 12, where names in string order end at layer 9."""
    names = [f"model.layers.{i}.self_attn.{m}.lora_{f}.default.weight"
             for i in range(12) for m in ("q_proj", "v_proj") for f in "AB"]
    tensors = {n: torch.zeros(1) for n in names}
    expected = [n for n in tensors if "lora_B" in n][-1]
    assert cluster_tensor_names(tensors, "B", "last") == [expected] == ["model.layers.11.self_attn.v_proj.lora_B.default.weight"]
    assert cluster_tensor_names(dict(sorted(tensors.items())), "B", "last") == [expected]  # whatever the order


@pytest.mark.parametrize("options, message", [
    ({"n_clusters": 2, "min_silhouette": 0.3}, "min_silhouette applies to n_clusters: auto"),
    ({"assign": "oracle", "n_clusters": 3}, "assign: oracle takes the clusters from the true groups; remove n_clusters"),
    ({"recluster_every": 2}, "set cluster_models_from: cluster_round"),
])
def test_an_option_that_would_be_ignored_is_an_error(options, message):
    with pytest.raises(FedtuneError, match=message):
        build_algorithm("clustered", options, num_clients=4)


@pytest.mark.parametrize("options, message", [
    ({"cluster_round": 3}, r"clusters are decided in round cluster_round=3, but the run's last round to make them "
                           r"is 2 \(federation.rounds=3\)"),
    ({"cluster_round": 4, **FEDTUNE_TIMING}, "made in round cluster_round=4, but the run's last round"),
])
def test_clusters_the_run_has_no_round_left_to_make_are_an_error(options, message):
    from fedtune.config import load_config

    cfg = load_config(None, ["federation.rounds=3", "algorithm.name=clustered"])
    build_algorithm("clustered", {"cluster_round": 2}).check(cfg)
    with pytest.raises(FedtuneError, match=message):
        build_algorithm("clustered", options).check(cfg)


def test_more_clusters_than_clients_is_one_line_error():
    """A fixed n_clusters above the clients there are is an error once the partition is known (k = n, one
    cluster per client, is the reference code's edge case and stays allowed)."""
    with pytest.raises(FedtuneError, match=r"n_clusters=5 but the federation has 4 clients to cluster; set "
                                           r"n_clusters to at most 4"):
        build_algorithm("clustered", {"n_clusters": 5}, num_clients=4)
    assert build_algorithm("clustered", {"n_clusters": 4}, num_clients=4).options.n_clusters == 4


def test_each_cluster_is_reduced_by_the_runs_reducer():
    """algorithm.reducer applies per cluster: the cluster server (FedIT, or a server optimiser) reduces its
    members with the run's rule, here the coordinate-wise median of a cluster holding an outlier."""
    from fedtune.reducers import build_reducer

    x = _x()
    algo = build_algorithm("clustered", {"n_clusters": 2, **FEDTUNE_TIMING}, num_clients=6)
    algo.reducer = build_reducer("median")
    state = algo.aggregate(1, _updates(x, [0, 0, 0, 1, 1, 1]), algo.init(x))
    members = [c for c, k in state.assignment.items() if k == state.assignment[0]]
    model = state.models[state.assignment[0]]
    shifts = [1.0, 2.0, 1000.0]
    after = algo.aggregate(2, [ClientUpdate(c, {k: v + s for k, v in model.items()}, 10 * (i + 1))
                               for i, (c, s) in enumerate(zip(members, shifts))], state)
    assert torch.allclose(after.models[state.assignment[0]][B], model[B] + 2.0)
