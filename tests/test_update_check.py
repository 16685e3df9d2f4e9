"""The server checks every update before it aggregates it, on both runtimes.

A client (here client 2 of 4) sends each kind of bad update an attacker or a
broken node could send: values of 1e30 (finite and well-formed: the update
guard's case), a complex tensor with NaN, an integer tensor, an inflated and a
negative sample count, a wrong but broadcastable shape, an extra and a missing
tensor, and (on Flower's wire) a reply that cannot be decoded. With
``tolerate_client_failures`` the run completes, names exactly client 2 in
``summary.json``, and ends with the adapters of a run in which client 2 simply
failed every round (the others aggregated exactly), close to the honest run;
without it the run stops with one line naming client 2.
"""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedtune.algorithms import ClientUpdate, Expected
from fedtune.errors import FedtuneError
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime import inprocess
from fedtune.runtime.update_check import change_norm, check_update, oversized
from fedtune.runtime.wire import PACKED_STYPE, record_to_tensors, tensors_to_record
from test_flower import LocalGrid, local_grid_driver, tiny_cfg

BAD = 2


def _first(tensors):
    return sorted(tensors)[0]


def corrupt(kind: str, tensors: dict, n: int) -> tuple[dict, int]:
    """Client ``BAD``'s update of ``kind``, from its honest ``tensors`` and sample count ``n``."""
    t = dict(tensors)
    name = _first(t)
    if kind == "huge":
        t = {k: torch.full_like(v, 1e30) for k, v in t.items()}
    elif kind == "complex_nan":
        t[name] = torch.complex(t[name], torch.full_like(t[name], math.nan))
    elif kind == "integer":
        t[name] = t[name].long()
    elif kind == "inflated":
        n = 10**12
    elif kind == "negative":
        n = -5
    elif kind == "shape":
        t[name] = t[name].unsqueeze(0)  # broadcastable against the expected shape, and wrong
    elif kind == "extra":
        t["evil.weight"] = torch.zeros(3)
    elif kind == "missing":
        del t[name]
    return t, n


KINDS = ["huge", "complex_nan", "integer", "inflated", "negative", "shape", "extra", "missing", "undecodable"]


def four_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, tolerate=True):
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, partition={"method": "iid", "num_clients": 4},
                    federation={"rounds": 2, "tolerate_client_failures": tolerate})


@pytest.fixture
def inprocess_attack(monkeypatch):
    """``attack(kind)``: in-process client ``BAD`` sends updates of that kind ("undecodable": a non-tensor)."""
    honest = inprocess.client_round

    def attack(kind):
        def client_round(exp, cid, *args, **kwargs):
            update = honest(exp, cid, *args, **kwargs)
            if cid != BAD:
                return update
            if kind == "undecodable":
                return ClientUpdate(cid, {**update.tensors, _first(update.tensors): "not a tensor"},
                                    update.num_examples, update.metrics)
            tensors, n = corrupt(kind, update.tensors, update.num_examples)
            return ClientUpdate(cid, tensors, n, update.metrics)

        monkeypatch.setattr(inprocess, "client_round", client_round)

    return attack


def flower_attack(kind):
    """A Flower reply rewriter: client ``BAD``'s node answers with an update of ``kind``."""
    def rewrite(content: RecordDict) -> RecordDict:
        metrics = dict(content["metrics"])
        if kind == "undecodable":
            record = ArrayRecord()
            for key, arr in content["update"].items():
                arr.data = arr.data[:-3]  # the packed bytes no longer add up
                record[key] = arr
            return RecordDict({"update": record, "metrics": MetricRecord(metrics)})
        tensors, n = corrupt(kind, record_to_tensors(content["update"]), metrics["num_examples"])
        metrics["num_examples"] = n
        return RecordDict({"update": tensors_to_record(tensors), "metrics": MetricRecord(metrics)})

    return {(rnd, BAD): rewrite for rnd in (1, 2)}


def adapters(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model_dir, tiny_tsv_dataset):
    """The honest run, and the run in which client ``BAD`` fails every round (tolerated), in-process."""
    tmp = tmp_path_factory.mktemp("refs")
    honest = execute(four_clients(tmp, tiny_model_dir, tiny_tsv_dataset, "honest"))
    cfg = four_clients(tmp, tiny_model_dir, tiny_tsv_dataset, "without")
    without = execute_with(cfg, local_grid_driver(LocalGrid(4, fail={(1, BAD): "error", (2, BAD): "error"})), "flower")
    return honest, without


def _check_tolerated(res, references):
    honest, without = references
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert {p["client"] for p in summary["client_problems"]} == {BAD}
    assert [p["round"] for p in summary["client_problems"]] == [1, 2]
    rows = load_run(res.run_dir).rows
    assert all(r["clients"] == [0, 1, 3] for r in rows[1:])
    bad, ref = adapters(res.run_dir), adapters(without.run_dir)
    assert all(torch.equal(bad[k], ref[k]) for k in ref)  # exactly the others' aggregate
    assert abs(res.final["eval/accuracy"] - honest.final["eval/accuracy"]) <= 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_update_is_rejected_in_process(kind, tmp_path, tiny_model_dir, tiny_tsv_dataset, inprocess_attack,
                                             references):
    inprocess_attack(kind)
    res = execute(four_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset, "bad"))
    _check_tolerated(res, references)
    with pytest.raises(FedtuneError, match=rf"^round 1: the update of client {BAD} was rejected: [^\n]+$"):
        execute(four_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset, "strict", tolerate=False))


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_update_is_rejected_on_flower(kind, tmp_path, tiny_model_dir, tiny_tsv_dataset, references):
    cfg = four_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset, "bad")
    res = execute_with(cfg, local_grid_driver(LocalGrid(4, fail=flower_attack(kind))), "flower")
    _check_tolerated(res, references)
    cfg = four_clients(tmp_path, tiny_model_dir, tiny_tsv_dataset, "strict", tolerate=False)
    with pytest.raises(FedtuneError, match=rf"^round 1: (the update of )?client {BAD} (was rejected|failed in "
                                           rf"train): [^\n]+$"):
        execute_with(cfg, local_grid_driver(LocalGrid(4, fail=flower_attack(kind))), "flower")


# --------------------------------------------------------------------------- the check on hand cases


def _expected():
    return {"a": Expected((2, 3), start=torch.zeros(2, 3)), "side": Expected((3,)),
            "ids": Expected((2,), integer=True, equals=torch.tensor([4, 7]))}


def _update(n=5, **tensors):
    base = {"a": torch.ones(2, 3), "side": torch.zeros(3), "ids": torch.tensor([4, 7])}
    base.update(tensors)
    return ClientUpdate(0, {k: v for k, v in base.items() if v is not None}, n)


@pytest.mark.parametrize("update, why", [
    (_update(), None),
    (_update(n=0), "num_examples 0 is outside 1..10"),
    (_update(n=11), "num_examples 11 is outside 1..10"),
    (_update(n=2.5), "num_examples 2.5 is not an integer"),
    (_update(a=torch.ones(3, 2)), "tensor 'a' has shape (3, 2), expected (2, 3)"),
    (_update(a=torch.ones(1, 2, 3)), "tensor 'a' has shape (1, 2, 3), expected (2, 3)"),
    (_update(side=torch.tensor([1.0, math.inf, 0.0])), "tensor 'side' has non-finite values"),
    (_update(side=torch.zeros(3, dtype=torch.complex64)), "tensor 'side' has dtype torch.complex64"),
    (_update(side=torch.zeros(3, dtype=torch.int32)), "tensor 'side' has dtype torch.int32"),
    (_update(ids=torch.tensor([4.0, 7.0])), "tensor 'ids' has dtype torch.float32, expected an integer dtype"),
    (_update(ids=torch.tensor([4, 8])), "tensor 'ids' does not hold the values the server sent"),
    (_update(extra=torch.zeros(1)), "unexpected tensor 'extra'"),
    (_update(side=None), "missing tensor 'side'"),
])
def test_check_update_names_what_is_wrong(update, why):
    got = check_update(update, _expected(), max_examples=10)
    assert got == why if why is None else got.startswith(why), got


def test_change_norm_is_over_model_tensors_from_where_the_client_started():
    u = _update(side=torch.full((3,), 100.0))  # a side channel does not count
    assert change_norm(u, _expected()) == pytest.approx(math.sqrt(6))


def test_the_guard_uses_the_lower_median_of_this_and_the_previous_round():
    assert oversized({0: 1.0, 1: 2.0, 2: 1e30}, ratio=100) == {
        2: "its change ‖Δ‖ = 1e+30 exceeds federation.max_update_ratio = 100 × the reference change 2"}
    assert oversized({0: 1.0, 1: 1e30}, ratio=100) == {}  # two changes: nothing to compare with
    assert set(oversized({0: 1.0, 1: 1e30}, ratio=100, previous=[1.2, 0.9])) == {1}  # the last round's helps
    assert oversized({0: 1.0, 1: 50.0, 2: 1.5, 3: 2.0}, ratio=100) == {}  # an honest spread passes
    assert oversized({0: 1.0, 1: 2.0, 2: 1e30}, ratio=0) == {}  # 0: off


def test_an_undecodable_record_is_one_line_naming_what_is_wrong():
    record = tensors_to_record({"a": torch.ones(2)})
    key, arr = next(iter(record.items()))
    cases = {
        json.dumps([["a", "load", [2]]]): "unknown dtype",
        json.dumps([["a", "float32", [-2]]]): "malformed shape",
        json.dumps([["a", "float32", [3]]]): "runs past the end",
        json.dumps([["a", "float32", [1]]]): "belong to no tensor",
        "not json": "not JSON",
    }
    for layout, what in cases.items():
        bad = ArrayRecord()
        bad[layout] = arr
        with pytest.raises(FedtuneError, match=what):
            record_to_tensors(bad)
    assert arr.stype == PACKED_STYPE
