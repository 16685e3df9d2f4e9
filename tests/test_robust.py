"""Robust aggregation as the run uses it: reducers under any algorithm, the clip wrapper, and the per-round
diagnostics (change norms, cosines to the aggregate, who a rule left out)."""

import pytest
import torch

from fedtune.algorithms import ClientUpdate, Expected, Payload, ServerState, build_algorithm, wrap
from fedtune.config import WrapperConfig, load_config
from fedtune.errors import FedtuneError
from fedtune.experiment import algorithm_for
from fedtune.reducers import build_reducer
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.diagnostics import cosines, sketch
from test_flower import LocalGrid, adapter, local_grid_driver, tiny_cfg


def _u(cid, w, n=1):
    return ClientUpdate(cid, {"w": torch.tensor(w, dtype=torch.float32)}, n)


def test_the_reducer_chosen_in_the_config_is_what_fedit_and_fedadam_reduce_with():
    ups = [_u(0, [1.0, 0.0]), _u(1, [2.0, 0.0]), _u(2, [3.0, 100.0])]
    state = ServerState(0, {"w": torch.zeros(2)})
    fedit = build_algorithm("fedit")
    fedit.reducer = build_reducer("median")
    assert torch.equal(fedit.aggregate(1, iter(ups), state).global_tensors["w"], torch.tensor([2.0, 0.0]))
    adam = build_algorithm("fedadam", {"server_lr": 1.0, "beta1": 0.0, "beta2": 0.5, "tau": 1e-9})
    adam.reducer = build_reducer("median")
    step = adam.aggregate(1, iter(ups), state).global_tensors["w"]  # Adam steps towards the median, not the mean
    assert step[0] > 0 and step[1] == 0
    krum = build_algorithm("fedit")
    krum.reducer = build_reducer("krum", {"f": 1, "m": 1})
    krum.reducer.begin_round()
    krum.aggregate(1, iter([_u(0, [0.0, 0.0]), _u(1, [0.0, 1.0]), _u(2, [1.0, 0.0]), _u(3, [50.0, 50.0])]), state)
    assert krum.reducer.round_report() == {"left_out": [1, 2, 3]}


def test_a_robust_reducer_is_refused_where_factors_are_stacked():
    cfg = load_config(None, ["algorithm.name=flora", "algorithm.reducer.name=median"])
    with pytest.raises(FedtuneError, match="'flora' combines the clients' LoRA factors by stacking or SVD"):
        algorithm_for(cfg).check(cfg)
    with pytest.raises(FedtuneError, match="unknown algorithm.reducer 'medain'; did you mean 'median'"):
        build_reducer("medain")
    with pytest.raises(FedtuneError, match="invalid algorithm.reducer.options for 'trimmed_mean'"):
        build_reducer("trimmed_mean", {"beta": 0.5})


def test_clip_scales_each_change_to_the_bound_before_the_wrapped_mean():
    start = {"w": torch.zeros(2)}
    state = ServerState(0, start)
    ups = [_u(0, [1.0, 0.0]), _u(1, [0.0, 2.0]), _u(2, [10.0, 0.0])]  # change norms 1, 2, 10
    for bound, third in (("median", [2.0, 0.0]), (1.5, [1.5, 0.0])):
        algo = wrap(build_algorithm("fedit"), [WrapperConfig(name="clip", options={"bound": bound})])
        algo.configure(1, [0, 1, 2], state)
        new = algo.aggregate(1, iter(ups), state)
        second = [0.0, min(2.0, 1.5 if bound == 1.5 else 2.0)]
        expected = (torch.tensor([1.0, 0.0]) + torch.tensor(second) + torch.tensor(third)) / 3
        assert torch.allclose(new.global_tensors["w"], expected)
        assert new.metrics["clip/scaled"] == ([2] if bound == "median" else [1, 2])
    with pytest.raises(FedtuneError, match="algorithm.wrappers: 'clip' cannot wrap 'local': its clients send no"):
        wrap(build_algorithm("local"), [WrapperConfig(name="clip")])
    with pytest.raises(FedtuneError, match="invalid algorithm.wrappers options for 'clip'"):
        wrap(build_algorithm("fedit"), [WrapperConfig(name="clip", options={"bound": -1})])


def test_clip_leaves_side_channels_as_they_are():
    algo = wrap(build_algorithm("scaffold", num_clients=2), [WrapperConfig(name="clip", options={"bound": 1.0})])
    state = algo.init({"w": torch.zeros(2)})
    algo.configure(1, [0, 1], state)
    ups = [ClientUpdate(c, {"w": torch.tensor([3.0, 4.0]), "scaffold/delta_c/w": torch.tensor([5.0, 5.0])}, 1)
           for c in (0, 1)]
    new = algo.aggregate(1, iter(ups), state)
    assert torch.allclose(new.global_tensors["w"], torch.tensor([0.6, 0.8]))  # (3, 4) clipped to norm 1
    assert torch.allclose(new.extra["scaffold/c/w"], torch.tensor([5.0, 5.0]))  # Σ Δc_i / N, untouched


def test_the_count_sketch_estimates_cosines_to_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20000, generator=g, dtype=torch.float64)
    deltas = {0: base + 0.3 * torch.randn(20000, generator=g, dtype=torch.float64),
              1: base + 0.3 * torch.randn(20000, generator=g, dtype=torch.float64),
              2: -base}  # a sign-flipper
    weights = {0: 2.0, 1: 1.0, 2: 1.0}
    mean = sum(deltas[c] * weights[c] for c in deltas) / sum(weights.values())
    exact = {c: float(d @ mean / (d.norm() * mean.norm())) for c, d in deltas.items()}
    est = cosines({c: sketch({"a": d[:7000], "b": d[7000:]}) for c, d in deltas.items()}, weights)
    assert all(abs(est[c] - exact[c]) < 0.1 for c in deltas), (est, exact)
    assert est[2] < 0 < min(est[0], est[1])
    a, b = torch.randn(500, dtype=torch.float64), torch.randn(500, dtype=torch.float64)
    assert torch.allclose(sketch({"x": a + 2 * b}), sketch({"x": a}) + 2 * sketch({"x": b}))  # linear


@pytest.mark.parametrize("reducer", ["median", "krum"])
def test_a_robust_run_is_the_same_on_both_runtimes_and_logs_its_diagnostics(reducer, tmp_path, tiny_model_dir,
                                                                              tiny_tsv_dataset):
    over = dict(partition={"method": "iid", "num_clients": 4},
                federation={"rounds": 2, "attack": {"kind": "scale", "scale": 30.0, "clients": [3]}},
                algorithm={"name": "fedit", "reducer": {"name": reducer, "options": {"f": 1} if reducer == "krum"
                                                        else {}}})
    a = execute(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "in", **over))
    b = execute_with(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "fl", **over),
                     local_grid_driver(LocalGrid(4)), "flower")
    assert all(torch.equal(x, y) for x, y in zip(adapter(a.run_dir).values(), adapter(b.run_dir).values()))
    rows = load_run(a.run_dir).rows
    for row in rows[1:]:
        assert set(row["update_norms"]) == set(row["update_cosines"]) == {"0", "1", "2", "3"}
        assert all(-1 <= c <= 1 for c in row["update_cosines"].values())
    if reducer == "krum":
        assert all(3 in row["reducer"]["left_out"] for row in rows[1:])


def test_clip_and_median_under_clustered_fl(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    over = dict(partition={"method": "iid", "num_clients": 4},
                algorithm={"name": "clustered", "options": {"cluster_round": 1, "n_clusters": 2},
                           "wrappers": [{"name": "clip"}], "reducer": {"name": "median"}})
    res = execute(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cl", **over))
    rows = load_run(res.run_dir).rows
    assert "agg/clip/scaled" in rows[1] and res.final


def test_report_plots_each_clients_change_and_cosine(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    from fedtune.report import build_report

    over = dict(partition={"method": "iid", "num_clients": 4},
                federation={"rounds": 2, "attack": {"kind": "scale", "scale": 30.0, "clients": [3]}},
                algorithm={"name": "fedit", "reducer": {"name": "krum", "options": {"f": 1}}})
    res = execute(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "rep", **over))
    report = build_report([res.run_dir], out_dir=tmp_path / "report")
    assert (tmp_path / "report" / "updates_vs_round.png") in report.plots
