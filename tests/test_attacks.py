"""Simulated attacks (``federation.attack``, :mod:`fedtune.attacks`): each kind changes exactly the attacker's
update as its formula says, both runtimes run the same attack, the server's update guard catches a large one,
and the run records it."""

import json

import pytest
import torch
from test_flower import LocalGrid, adapter, local_grid_driver, tiny_cfg

from fedtune.attacks import _SEED, boost_factor
from fedtune.config import RunConfig, load_config
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.client import client_round
from fedtune.runtime.server import ClientRejected
from fedtune.seeds import derive_seed

ATTACKER = 1


def attacked(tmp_path, model_dir, data_dir, name, attack, **over) -> RunConfig:
    return tiny_cfg(tmp_path, model_dir, data_dir, name, federation={"rounds": 2, "attack": attack}, **over)


def round_one(cfg: RunConfig):
    """The experiment of ``cfg``, its round-1 payloads, and every client's round-1 update (what it would send)."""
    exp = build_experiment(cfg)
    algo = exp.algorithm
    payloads = algo.configure(1, list(range(exp.num_clients)), algo.init(exp.initial))
    updates = {cid: client_round(exp, cid, 1, p, {}, cfg.train.lr) for cid, p in payloads.items()}
    return exp, payloads, updates


@pytest.fixture(scope="module")
def honest(tmp_path_factory, tiny_model_dir, tiny_tsv_dataset):
    return round_one(tiny_cfg(tmp_path_factory.mktemp("honest"), tiny_model_dir, tiny_tsv_dataset, "honest"))


def expected(honest_update, start, k):
    """θ⁰ + k·(θ − θ⁰), computed in float64 as the formula reads."""
    return {n: (start[n].double() + k * (t.double() - start[n].double())).float() for n, t in honest_update.items()}


@pytest.mark.parametrize(("attack", "factor"), [
    ({"kind": "sign_flip", "clients": [ATTACKER]}, -1.0),
    ({"kind": "sign_flip", "clients": [ATTACKER], "scale": 2.5}, -2.5),
    ({"kind": "scale", "clients": [ATTACKER], "scale": 4.0}, 4.0),
    ({"kind": "boost", "clients": [ATTACKER], "scale": 7.0}, 7.0),
    ({"kind": "boost", "clients": [ATTACKER]}, None),  # γ from the clients' sizes
])
def test_a_change_attack_sends_its_factor_times_the_honest_change(honest, tmp_path, tiny_model_dir,
                                                                   tiny_tsv_dataset, attack, factor):
    exp_h, payloads, honest_updates = honest
    exp, _, updates = round_one(attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "a", attack))
    sizes = [tr for tr, _ in exp.client_sizes]
    if factor is None:  # every client trains every round: γ = Σ n_j / n_a, the inverse of its weight share
        factor = sum(sizes) / sizes[ATTACKER]
        assert boost_factor(ATTACKER, sizes, 3) == pytest.approx(factor)
        # sampled (K = 2 of 4): its expected share 10 / (10 + 1 · 70/3)
        assert boost_factor(0, [10, 30, 20, 20], 2) == pytest.approx((10 + 70 / 3) / 10)
        # two attackers, everyone in every round: γ divided between them, Σ_a p_a γ_a Δ_a = the mean of their Δ_a
        assert boost_factor(0, [10, 30, 20, 20], 4, attackers=2) == pytest.approx(80 / 10 / 2)
        # two of 4 attackers, K = 3: 1 + 1 · 2/3 of them expected in a round
        assert boost_factor(1, [10, 30, 20, 20], 3, attackers=2) == pytest.approx((30 + 2 * 50 / 3) / 30 / (5 / 3))
    for cid in (0, 2):  # honest clients are untouched
        assert all(torch.equal(updates[cid].tensors[n], t) for n, t in honest_updates[cid].tensors.items())
    start = payloads[ATTACKER].tensors  # FedIT: the client starts from the global model it received
    got, honest_tensors = updates[ATTACKER].tensors, honest_updates[ATTACKER].tensors
    assert got.keys() == honest_tensors.keys() == start.keys()
    want = expected(honest_tensors, start, factor)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
    assert max((honest_tensors[n] - start[n]).abs().max().item() for n in start) > 1e-4  # it trained: Δ ≠ 0
    assert updates[ATTACKER].num_examples == honest_updates[ATTACKER].num_examples
    assert exp.attack.record()["factors"] == {str(ATTACKER): factor}


@pytest.mark.parametrize("over", [
    {"lora": {"r": 4, "alpha": 8, "client_ranks": [4, 4, 2]}},  # the attacker trains rank 2 of the model's 4
    {"algorithm": {"name": "scaffold"}},  # its update carries control-variate changes besides the model
])
def test_the_change_is_taken_at_the_clients_rank_and_side_channels_are_left_alone(tmp_path, tiny_model_dir,
                                                                                   tiny_tsv_dataset, over):
    _, payloads, honest_updates = round_one(tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "h", **over))
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "a", **over, federation={
        "rounds": 2, "attack": {"kind": "sign_flip", "clients": [2], "scale": 3}})
    _, _, updates = round_one(cfg)
    start = {n: t for n, t in payloads[2].tensors.items() if not n.startswith("scaffold/")}  # θ⁰ at its rank
    got, plain = updates[2].tensors, honest_updates[2].tensors
    side = [n for n in plain if n.startswith("scaffold/delta_c/")]
    assert got.keys() == plain.keys() == start.keys() | set(side)
    assert bool(side) == ("algorithm" in over)
    if "lora" in over:
        assert {tuple(t.shape) for n, t in got.items() if "lora_A" in n} == {(2, 32)}
    want = expected({n: plain[n] for n in start}, start, -3.0)
    for n in start:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
    for n in side:  # what the algorithm made of its honest training, sent as it is
        assert torch.equal(got[n], plain[n])


def test_noise_adds_the_seeded_gaussian_to_every_model_tensor(honest, tmp_path, tiny_model_dir, tiny_tsv_dataset):
    _, _, honest_updates = honest
    cfg = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "n", {"kind": "noise", "clients": [ATTACKER],
                                                                     "std": 0.05})
    exp, _, updates = round_one(cfg)
    # the recipe of fedtune.attacks: a Generator seeded by (run seed, round, client, salt), float64 normals for the
    # tensors in sorted name order
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 1, ATTACKER, _SEED))
    honest_tensors = honest_updates[ATTACKER].tensors
    for n in sorted(honest_tensors):
        t = honest_tensors[n]
        want = (t.double() + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64)).float()
        assert torch.equal(updates[ATTACKER].tensors[n], want), n
    for cid in (0, 2):
        assert all(torch.equal(updates[cid].tensors[n], t) for n, t in honest_updates[cid].tensors.items())
    # another round draws other noise
    payload = exp.algorithm.configure(2, [ATTACKER], exp.algorithm.init(exp.initial))[ATTACKER]
    again = client_round(exp, ATTACKER, 2, payload, {}, cfg.train.lr).tensors
    noise1 = {n: updates[ATTACKER].tensors[n] - honest_tensors[n] for n in honest_tensors}
    assert any(not torch.allclose(again[n] - honest_tensors[n], noise1[n], atol=1e-3) for n in noise1)


def test_label_flip_trains_the_attacker_on_flipped_labels(honest, tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                          monkeypatch):
    exp_h, _, honest_updates = honest
    cfg = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "lf", {"kind": "label_flip", "clients": [ATTACKER]})
    exp = build_experiment(cfg)
    mine, theirs = exp.client(ATTACKER), exp_h.client(ATTACKER)
    assert (mine.train == theirs.train).all()
    assert (mine.examples.labels[mine.train] == 1 - theirs.examples.labels[theirs.train]).all()  # C = 2: 1 − y
    assert (mine.examples.labels[mine.test] == theirs.examples.labels[theirs.test]).all()  # its test shard is honest
    assert exp.client(0).examples is exp.client(2).examples  # the honest clients share the untouched encoding
    assert (exp.client(0).examples.labels == theirs.examples.labels).all()

    def labels_trained_on(e):
        seen = []
        real = e.algorithm.loss
        monkeypatch.setattr(e.algorithm, "loss", lambda ctx, batch, out: seen.append(batch["labels"]) or
                            real(ctx, batch, out))
        payload = e.algorithm.configure(1, [ATTACKER], e.algorithm.init(e.initial))[ATTACKER]
        update = client_round(e, ATTACKER, 1, payload, {}, cfg.train.lr)
        return torch.cat(seen), update

    flipped, update = labels_trained_on(exp)
    plain, _ = labels_trained_on(exp_h)
    assert torch.equal(flipped, 1 - plain) and len(plain) == cfg.train.local_steps * cfg.train.batch_size
    assert any(not torch.equal(update.tensors[n], t) for n, t in honest_updates[ATTACKER].tensors.items())


@pytest.mark.parametrize("attack", [
    {"kind": "noise", "clients": [2], "std": 0.02},
    {"kind": "boost", "clients": [0]},
    {"kind": "label_flip", "clients": [1]},
])
def test_an_attacked_run_is_identical_on_both_runtimes(tmp_path, tiny_model_dir, tiny_tsv_dataset, attack):
    a = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "inproc", attack)
    b = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "grid", attack)
    honest = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "honest")
    execute(a)
    execute_with(b, local_grid_driver(LocalGrid(3)), "flower")
    execute(honest)
    pa, pb, ph = adapter(a.run_dir), adapter(b.run_dir), adapter(honest.run_dir)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], ph[k]) for k in pa)  # and the attack changed the outcome
    rows_a, rows_b = load_run(a.run_dir).rows, load_run(b.run_dir).rows
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("clients", "rejected", "update_norms", "eval/accuracy", "eval/loss"):
            assert ra.get(key) == rb.get(key), key


def test_the_update_guard_passes_a_moderate_scale_and_rejects_a_large_one(tmp_path, tiny_model_dir,
                                                                          tiny_tsv_dataset):
    """federation.max_update_ratio (default 100 × the round's median change) is the defence working."""
    ok = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x10", {"kind": "scale", "clients": [2], "scale": 10})
    execute(ok)
    rows = load_run(ok.run_dir).rows[1:]
    assert all(r["clients"] == [0, 1, 2] and r["rejected"] == [] for r in rows)
    norms = rows[0]["update_norms"]  # the attacker's change is 10× an honest one's, well within the guard
    assert 3 < norms["2"] / max(norms["0"], norms["1"]) < 30

    big = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x1000", {"kind": "scale", "clients": [2],
                                                                         "scale": 1000})
    with pytest.raises(ClientRejected, match=r"^round 1: the update of client 2 was rejected: its change ‖Δ‖ = .* "
                                             r"exceeds federation.max_update_ratio = 100 × the reference change"):
        execute(big)
    tolerant = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "x1000t", federation={
        "rounds": 2, "tolerate_client_failures": True, "attack": {"kind": "scale", "clients": [2], "scale": 1000}})
    execute(tolerant)
    rows = load_run(tolerant.run_dir).rows[1:]
    assert [(r["clients"], r["rejected"]) for r in rows] == [([0, 1], [2]), ([0, 1], [2])]
    problems = json.loads((tolerant.run_dir / "summary.json").read_text())["client_problems"]
    assert {(p["round"], p["client"], p["kind"]) for p in problems} == {(1, 2, "rejected"), (2, 2, "rejected")}


def test_the_attack_is_recorded_in_partition_summary_and_model_card(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "rec", {"kind": "sign_flip", "clients": [0, 2],
                                                                       "scale": 2})
    execute(cfg)
    want = {"kind": "sign_flip", "clients": [0, 2], "scale": 2.0, "factors": {"0": -2.0, "2": -2.0}}
    assert json.loads((cfg.run_dir / "partition.json").read_text())["attack"] == want
    assert json.loads((cfg.run_dir / "summary.json").read_text())["attack"] == want
    card = (cfg.run_dir / "adapter" / "README.md").read_text()
    assert "**This run was attacked**" in card and "clients 0, 2 sent θ⁰ + k·Δ" in card and "k = -2" in card
    honest = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "plain", federation={"rounds": 1})
    execute(honest)
    assert json.loads((honest.run_dir / "summary.json").read_text())["attack"] is None
    assert "attacked" not in (honest.run_dir / "adapter" / "README.md").read_text()


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.attack.kind=scale", "federation.attack.clients=[0]"],
     "federation.attack.kind=scale needs federation.attack.scale"),
    (["federation.attack.kind=noise", "federation.attack.clients=[0]"],
     "federation.attack.kind=noise needs federation.attack.std"),
    (["federation.attack.kind=sign_flip", "federation.attack.clients=[0]", "federation.attack.std=1"],
     "federation.attack.std does not apply to kind=sign_flip; remove it"),
    (["federation.attack.kind=label_flip", "federation.attack.clients=[0]", "federation.attack.scale=2"],
     "federation.attack.scale does not apply to kind=label_flip; remove it"),
    (["federation.attack.kind=boost"], "federation.attack.kind=boost needs federation.attack.clients"),
    (["federation.attack.clients=[1]"], "federation.attack.clients describes an attack, but federation.attack.kind "
                                        "is none"),
    (["federation.attack.kind=scale", "federation.attack.clients=[0]", "federation.attack.scale=-1"],
     "'federation.attack.scale': Input should be greater than 0"),
    (["federation.attack.kind=flip", "federation.attack.clients=[0]"], "'federation.attack.kind'"),
])
def test_a_bad_attack_config_is_one_line(overrides, message):
    with pytest.raises(FedtuneError, match="^invalid config: ") as err:
        load_config(overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_attack_the_run_rules_out_is_one_line(tmp_path, tiny_model_dir, tiny_tsv_dataset, tiny_llama_dir,
                                                 tiny_alpaca_dataset):
    cases = [
        (attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "ids", {"kind": "sign_flip", "clients": [1, 3]}),
         "federation.attack.clients names client 3, but the run has clients 0..2; give ids of existing clients"),
        (attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "pool", {"kind": "noise", "clients": [0], "std": 1},
                  algorithm={"name": "centralized"}),
         "algorithm 'centralized' pools every client's data into one: there is no client to attack"),
        (attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "nat", {"kind": "sign_flip", "clients": [2]},
                  partition={"method": "natural", "by": "label"}),
         "federation.attack.clients names client 2, but the run has clients 0..1"),  # known once drawn
        (attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "files", {"kind": "boost", "clients": [0]},
                  partition={"method": "files", "num_clients": 2}, data={"name": str(tiny_tsv_dataset),
                  "text_column": "sentence", "label_column": "label", "labels": ["0", "1"]}),
         "federation.attack.kind=boost computes γ from every client's size"),
        (tiny_cfg(tmp_path, tiny_llama_dir, tiny_alpaca_dataset, "sft", data={"name": str(tiny_alpaca_dataset)},
                  model={"name": str(tiny_llama_dir), "task": "sft", "max_length": 32},
                  federation={"rounds": 1, "attack": {"kind": "label_flip", "clients": [0]}}),
         "federation.attack.kind=label_flip relabels classes, which model.task=sft has none of"),
    ]
    for cfg, message in cases:
        with pytest.raises(FedtuneError) as err:
            build_experiment(cfg)
        assert message in str(err.value) and "\n" not in str(err.value), cfg.name
    local = attacked(tmp_path, tiny_model_dir, tiny_tsv_dataset, "local", {"kind": "scale", "clients": [0],
                                                                            "scale": 2},
                     algorithm={"name": "local"}, partition={"method": "iid", "num_clients": 3,
                                                             "client_test_fraction": 0.25})
    with pytest.raises(FedtuneError, match="^round 1: .*federation.attack.kind=scale changes the model tensors "
                                           "client 0 sends, but algorithm 'local' sends none"):
        execute(local)
