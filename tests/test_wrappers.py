"""Wrappers: a wrapper forwards every hook and capability, and a pass-through one changes nothing."""

import inspect

import pytest
import torch

from fedtune.algorithms import ALGORITHMS, WRAPPERS, Algorithm, RunFacts, Wrapper, build_algorithm
from fedtune.algorithms.base import Rule
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.experiment import algorithm_for
from fedtune.run import execute, execute_with
from test_flower import LocalGrid, adapter, local_grid_driver, tiny_cfg


class PassThrough(Wrapper):
    name = "pass"
    summary = "changes nothing (a test wrapper)"


def test_a_wrapper_overrides_every_hook_of_the_base():
    hooks = {n for n, v in vars(Algorithm).items() if not n.startswith("_") and callable(v) and not isinstance(v, type)} - {
        "create", "requirements", "check", "extra_rules"}  # class-level, or answered through rules()
    missing = sorted(h for h in hooks if h not in vars(Wrapper))
    assert not missing, f"Wrapper does not forward {missing}"


def test_a_wrapper_answers_for_what_it_wraps():
    inner = build_algorithm("local")
    w = PassThrough(inner)
    assert (w.personalized, w.adapters, w.label) == (True, inner.adapters, "local+pass")
    w.bind(RunFacts(seed=5, num_clients=3, client_groups=("a", "b", "a")))
    assert (inner.seed, inner.num_clients, inner.client_groups) == (5, 3, ("a", "b", "a"))
    assert w.requirements() == inner.requirements()


def test_a_wrapper_that_refuses_says_why_in_one_line(monkeypatch):
    class OnlyMeans(Wrapper):
        name = "means"
        summary = "wraps only algorithms whose aggregate is a mean"

        def refuses(self, inner):
            return "it keeps each client's model" if inner.personalized else None

    monkeypatch.setitem(WRAPPERS, "means", OnlyMeans)
    cfg = load_config(None, ["algorithm.name=local", "algorithm.wrappers=[{name: means}]"])
    with pytest.raises(FedtuneError, match=r"^algorithm.wrappers: 'means' cannot wrap 'local': it keeps each "
                                           r"client's model$"):
        algorithm_for(cfg)
    with pytest.raises(FedtuneError, match="unknown wrapper 'mean' in algorithm.wrappers; did you mean 'means'"):
        algorithm_for(load_config(None, ["algorithm.wrappers=[{name: mean}]"]))


def test_a_wrappers_rules_join_those_of_what_it_wraps():
    class NeedsSgd(PassThrough):
        def extra_rules(self):
            return [Rule("train.optimizer: sgd", lambda cfg: None if cfg.train.optimizer == "sgd" else "needs sgd")]

    w = NeedsSgd(build_algorithm("scaffold"))
    assert w.requirements() == "one LoRA rank for every client (no lora.client_ranks / rank_tiers); train.optimizer: sgd"
    with pytest.raises(FedtuneError, match="needs sgd"):
        w.check(load_config(None, []))


# a small config for each algorithm (its own requirements), all on the tiny model
SETUPS = {
    "fedit": {}, "fedprox": {}, "scaffold": {}, "fedavgm": {}, "fedadam": {}, "fedyogi": {}, "fedadagrad": {},
    "centralized": {},
    "local": {"partition__client_test_fraction": 0.25},
    "clustered": {"algorithm__options": {"cluster_round": 1, "n_clusters": 2}},
    "flora": {"lora__client_ranks": [4, 2, 2]}, "florist": {"lora__client_ranks": [4, 2, 2]},
    "flexlora": {"lora__client_ranks": [4, 2, 2]},
}


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_a_pass_through_wrapper_gives_the_same_run_on_both_runtimes(name, tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                   monkeypatch):
    monkeypatch.setitem(WRAPPERS, "pass", PassThrough)
    over = {"algorithm": {"name": name}, **SETUPS[name]}
    if "algorithm__options" in over:
        over["algorithm"] = {**over["algorithm"], "options": over.pop("algorithm__options")}
    plain = execute(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "plain", **over))
    over["algorithm"] = {**over["algorithm"], "wrappers": [{"name": "pass"}]}
    wrapped = execute_with(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "wrapped", **over),
                           local_grid_driver(LocalGrid(1 if name == "centralized" else 3)), "flower")
    sub = "adapter" if name != "local" else "adapters/client_0"
    a, b = adapter(plain.run_dir, sub), adapter(wrapped.run_dir, sub)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.final == wrapped.final
