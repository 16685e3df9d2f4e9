"""Client-level differential privacy: the dp wrapper's clipping and noise, Poisson sampling, and the accountant's ε
(against dp-accounting composed here independently), its target, and its state across a resume."""

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedtune.algorithms import ClientUpdate, RunFacts, ServerState, build_algorithm, wrap
from fedtune.config import WrapperConfig, load_config
from fedtune.dp_noise import NOISE_KEY, noise_key
from fedtune.errors import FedtuneError
from fedtune.experiment import build_experiment
from fedtune.model_card import CARD
from fedtune.privacy import Accountant, SampledGaussian, guarantee
from fedtune.report import build_report
from fedtune.run import execute
from fedtune.runlog import load_run
from fedtune.sampling import sample_clients
from fedtune.show import privacy_line, round_table
from test_flower import adapter, max_diff, tiny_cfg
from test_resume import execute_stopped_at

ADD_REMOVE, REPLACE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, dp_accounting.NeighboringRelation.REPLACE_ONE


def _rdp(event, relation, count, delta=1e-5) -> float:
    acc = RdpAccountant(neighboring_relation=relation)
    acc.compose(event, count)
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------- the accountant
def test_poisson_epsilon_equals_dp_accountings_rdp_value():
    # the issue's check: z = 1, q = 0.1, 100 rounds, δ = 1e-5
    expected = _rdp(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), ADD_REMOVE, 100)
    assert Accountant("rdp").epsilon(SampledGaussian(1.0, rate=0.1), 100, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.90, abs=0.01)


def test_the_issues_example_under_each_sampling():
    """20 clients, 2 per round, z = 1, 200 rounds, δ = 1e-5."""
    acc = Accountant("rdp")
    poisson = acc.epsilon(SampledGaussian(1.0, rate=0.1), 200, 1e-5)
    assert poisson == pytest.approx(
        _rdp(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), ADD_REMOVE, 200), rel=1e-12)
    assert poisson == pytest.approx(11.06, abs=0.01)
    # fixed-size sampling without replacement: replace-one neighbours, where one client moves the clipped sum by
    # up to 2S. dp-accounting's RDP takes the noise against that distance (dp-accounting issue #378: the
    # GaussianDpEvent's s/C passed as is would give ε ≈ 20.7, a fourth of the RDP), so z·S counts as z/2.
    fixed = acc.epsilon(SampledGaussian(1.0, population=20, sample=2), 200, 1e-5)
    assert fixed == pytest.approx(_rdp(dp_accounting.SampledWithoutReplacementDpEvent(
        20, 2, dp_accounting.GaussianDpEvent(0.5)), REPLACE, 200), rel=1e-12)
    assert fixed == pytest.approx(157.7, abs=0.1)
    assert _rdp(dp_accounting.SampledWithoutReplacementDpEvent(20, 2, dp_accounting.GaussianDpEvent(1.0)),
                REPLACE, 200) == pytest.approx(20.71, abs=0.01)  # the issue's ≈ 21: the unhalved multiplier
    # PLD (Poisson only) is tighter than RDP
    pld = Accountant("pld").epsilon(SampledGaussian(1.0, rate=0.1), 200, 1e-5)
    ref = PLDAccountant(neighboring_relation=ADD_REMOVE)
    ref.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 200)
    assert pld == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9) and pld < poisson
    with pytest.raises(FedtuneError, match="pld accounts Poisson sampling only"):
        Accountant("pld").epsilon(SampledGaussian(1.0, population=20, sample=2), 200, 1e-5)


def test_calibration_finds_the_smallest_noise_within_the_target():
    acc = Accountant("rdp")
    mech = lambda z: SampledGaussian(z, rate=0.1)  # noqa: E731
    z = acc.calibrate(mech, 200, 1e-5, 4.0)
    assert acc.epsilon(mech(z), 200, 1e-5) <= 4.0 < acc.epsilon(mech(z * 0.998), 200, 1e-5)


# ---------------------------------------------------------------------------------------------- sampling
def test_poisson_sampling_draws_each_client_with_probability_q_and_may_draw_none():
    drawn = [sample_clients(3, r, 20, 2, rate=0.1) for r in range(1, 2001)]
    assert np.mean([len(d) for d in drawn]) == pytest.approx(2.0, rel=0.05)
    assert any(not d for d in drawn) and all(d == sorted(set(d)) for d in drawn)
    assert drawn[5] == sample_clients(3, 6, 20, 2, rate=0.1)  # seeded by (seed, round)
    assert all(len(sample_clients(3, r, 20, 2)) == 2 for r in range(1, 50))  # fixed: exactly k


# ---------------------------------------------------------------------------------------------- the mechanism
def _dp(inner="fedit", clients=4, k=4, rate=None, **options):
    algo = build_algorithm(inner)
    dp = wrap(algo, [WrapperConfig(name="dp", options=options)])
    dp.bind(RunFacts(seed=11, rounds=10, num_clients=clients, clients_per_round=k, sampling_rate=rate))
    return dp


def _state(shape=(6, 5)) -> ServerState:
    """A server state as the dp wrapper's init makes it: with the server's secret key."""
    g = torch.Generator().manual_seed(0)
    return ServerState(round=0, global_tensors={"l.lora_A.weight": torch.randn(shape, generator=g),
                                                "l.lora_B.weight": torch.randn(shape[::-1], generator=g)},
                       extra={NOISE_KEY: noise_key({}, None)})


def _updates(state, scales, examples=(1, 2, 3, 4)) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(1)
    return [ClientUpdate(i, {n: t + s * torch.randn(t.shape, generator=g) for n, t in state.global_tensors.items()},
                         examples[i]) for i, s in enumerate(scales)]


def _change(a, b):
    return {n: a[n].double() - b[n].double() for n in a}


def _norm(d):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))


def test_changes_are_clipped_to_s_weighted_equally_and_divided_by_the_expected_clients():
    state = _state()
    updates = _updates(state, [0.01, 0.5, 2.0])
    dp = _dp(clip=1.0, noise_multiplier=0.0, clients=10, k=4)  # m = 4 expected, 3 arrived
    new = dp.aggregate(1, iter(updates), state)
    clipped = []
    for u in updates:  # the reference, written out: Δ_i · min(1, S/‖Δ_i‖)
        d = _change(u.tensors, state.global_tensors)
        clipped.append({n: t * min(1.0, 1.0 / _norm(d)) for n, t in d.items()})
        assert _norm(clipped[-1]) <= 1.0 + 1e-12
    for n, t in state.global_tensors.items():
        expected = (t.double() + sum(c[n] for c in clipped) / 4).float()
        torch.testing.assert_close(new.global_tensors[n], expected)
    assert new.metrics["dp/clients"] == 3 and new.metrics["dp/clip"] == 1.0


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_without_noise_or_clipping_the_wrapper_equals_fedit_on_equal_clients_bit_for_bit(k):
    """z = 0, S = ∞, fixed sampling (m = k) and equal row counts (FedIT's weights 1/k): the same float32 tensors.

    FedIT sums p_i·θ_i in float64; the wrapper adds Σ_i (θ_i − θ⁰) / k to θ⁰ in float64. For k a power of two
    both are the exact mean of the float32 θ_i wherever it fits float64's 53 bits, so both round it to the same
    float32. For other k they are not bit-identical: FedIT multiplies by the rounded 1/k, the wrapper divides
    by k, and where the two float64 results straddle a float32 rounding boundary the float32 tensors differ in
    the last bit (k = 3: one element in about 10⁵ when the changes span eight orders of magnitude)."""
    state = _state(shape=(64, 48))
    g = torch.Generator().manual_seed(k)
    updates = _updates(state, [float(10 ** torch.randint(-6, 1, (), generator=g)) for _ in range(k)],
                       examples=(5,) * k)
    plain = build_algorithm("fedit").aggregate(1, iter(updates), state)
    dp = _dp(clip=math.inf, noise_multiplier=0.0, clients=2 * k, k=k).aggregate(1, iter(updates), state)
    for n in state.global_tensors:
        assert torch.equal(dp.global_tensors[n], plain.global_tensors[n])


@pytest.mark.parametrize("rate", [None, 0.2])
def test_central_noise_has_std_z_s_on_the_sum(rate):
    state = _state((100, 50))  # 10,000 coordinates per draw
    z, s, m = 1.5, 0.4, 4
    dp = _dp(clip=s, noise_multiplier=z, clients=20, k=m, rate=rate)
    assert dp.expected_clients == pytest.approx(m)
    noise = []
    for rnd in range(1, 11):
        new = dp.aggregate(rnd, iter([]), state)  # no client: the round releases the noise alone
        noise.append(torch.cat([(new.global_tensors[n].double() - t.double()).flatten() * m
                                for n, t in state.global_tensors.items()]))
    draws = torch.cat(noise)
    assert float(draws.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(draws.std()) == pytest.approx(z * s, rel=0.01)
    again = [dp.aggregate(3, iter([]), state).global_tensors["l.lora_A.weight"] for _ in range(2)]
    assert torch.equal(*again)  # a round redone from the same state (key) adds the same noise
    assert not torch.equal(again[0], dp.aggregate(3, iter([]), _state((100, 50))).global_tensors["l.lora_A.weight"])


def test_distributed_noise_shares_sum_to_std_z_s():
    from fedtune.algorithms import ClientContext
    from fedtune.models.lora import trainable_state

    z, s, k = 2.0, 0.3, 4
    dp = _dp(clip=s, noise_multiplier=z, noise="distributed", clients=8, k=k)
    model = torch.nn.Sequential(torch.nn.Linear(100, 50))
    start = trainable_state(model)
    state = dp.init(start)
    shares, sums = [], []
    for rnd in range(1, 6):
        payloads = dp.configure(rnd, list(range(k)), state)
        updates = [dp.update(ClientContext(c, rnd, model, {}, {}, payload=payloads[c], start=start)) for c in range(k)]
        own = [torch.cat([(u.tensors[n].double() - start[n].double()).flatten() for n in start]) for u in updates]
        shares += own
        new = dp.aggregate(rnd, iter(updates), state)  # no noise added at the server: the shares' sum is it
        sums.append(torch.cat([(new.global_tensors[n].double() - start[n].double()).flatten() * k for n in start]))
        torch.testing.assert_close(sums[-1], sum(own), rtol=1e-5, atol=1e-6)
    assert float(torch.cat(shares).std()) == pytest.approx(z * s / k ** 0.5, rel=0.02)
    assert float(torch.cat(sums).std()) == pytest.approx(z * s, rel=0.02)


def test_adaptive_clipping_moves_s_geometrically_towards_the_quantile():
    state = _state()
    updates = _updates(state, [0.001, 0.002, 5.0, 6.0])  # two changes below S = 1, two above
    dp = _dp(clip=1.0, noise_multiplier=0.0, adaptive=True, target_quantile=0.8, clip_lr=0.3)
    new = dp.aggregate(1, iter(updates), state)
    # b̄ = 2/4 unclipped; S₁ = S₀ · exp(−η (b̄ − γ))
    assert new.metrics["dp/unclipped"] == pytest.approx(0.5)
    assert float(new.extra["dp/clip"]) == pytest.approx(math.exp(-0.3 * (0.5 - 0.8)))
    assert dp.clip_of(new) == pytest.approx(math.exp(0.09))


def test_adaptive_clipping_splits_z_between_the_change_and_the_count():
    dp = _dp(clip=1.0, noise_multiplier=1.0, adaptive=True, clients=100, k=40)  # σ_b = 40/20 = 2
    assert dp.count_std == pytest.approx(2.0)
    # 1/z² = 1/z_Δ² + 1/(2σ_b)²
    assert dp.change_noise ** -2 + (2 * dp.count_std) ** -2 == pytest.approx(1.0)
    with pytest.raises(FedtuneError, match="count_std > z/2"):
        _ = _dp(clip=1.0, noise_multiplier=5.0, adaptive=True, count_std=1.0).change_noise


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("inner, why", [
    ("scaffold", "needs each client's own update"),
    ("clustered", "needs each client's own update"),
    ("flora", "stacks or factorises"),
    ("florist", "stacks or factorises"),
    ("flexlora", "stacks or factorises"),
    ("fedamole", "keeps its own model"),
    ("local", "keeps its own model"),
    ("centralized", "pools every client's data"),
])
def test_the_dp_wrapper_refuses_what_is_not_a_mean_of_changes_in_one_line(inner, why):
    with pytest.raises(FedtuneError, match=why) as err:
        wrap(build_algorithm(inner), [WrapperConfig(name="dp", options={"noise_multiplier": 1.0})])
    assert "\n" not in str(err.value) and f"'dp' cannot wrap '{inner}'" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("algorithm.reducer={name: median}", "a robust rule over noised clipped changes"),
    ("federation.max_update_ratio=3", "set federation.max_update_ratio: 0"),
    ("algorithm.wrappers=[{name: dp, options: {noise_multiplier: 1.0}}, {name: clip}]", "put dp last"),
    ("algorithm.wrappers=[{name: dp}]", "needs options.noise_multiplier"),
    ("privacy.dp_sgd.enabled=true", "protect different units"),
])
def test_the_dp_wrapper_refuses_configs_it_cannot_account_in_one_line(override, message):
    cfg = load_config(None, ["algorithm.wrappers=[{name: dp, options: {noise_multiplier: 1.0}}]",
                             "federation.max_update_ratio=0", "privacy.dp_sgd.noise_multiplier=1.0", override])
    with pytest.raises(FedtuneError, match=message) as err:
        build_experiment(cfg)
    assert "\n" not in str(err.value)


def test_ffa_lora_is_wrapped_over_b_and_the_head_only():
    dp = _dp("ffa", clip=1.0, noise_multiplier=0.0)
    state = _state()
    start = dp.model_start(state)
    assert list(start) == ["l.lora_B.weight"]  # A₀ never travels, so it is never noised


# ---------------------------------------------------------------------------------------------- runs
def _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, rounds=6, sampling="poisson", privacy=None,
            dp=None):
    """4 clients, 2 per round (q = 0.5 under Poisson sampling), FedIT inside the dp wrapper (S = 0.5, z = 1)."""
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name,
                    partition={"method": "iid", "num_clients": 4},
                    train={"local_steps": 1, "batch_size": 8, "lr": 2e-2},
                    federation={"rounds": rounds, "clients_per_round": 2, "sampling": sampling,
                                "max_update_ratio": 0},
                    algorithm={"name": "fedit", "wrappers": [{"name": "dp", "options": dp or {
                        "clip": 0.5, "noise_multiplier": 1.0}}]},
                    eval={"every": 0, "batch_size": 32}, privacy=privacy or {})


def test_a_run_logs_epsilon_every_round_for_the_sampling_it_does(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    # the server's key from the seed, so that the sample is known: round 7 of this seed's draws is empty
    cfg = _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "eps", rounds=7, privacy={"reproducible_noise": True})
    execute(cfg)
    run = load_run(cfg.run_dir)
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    for row in run.rows[1:]:
        assert row["privacy/epsilon"] == pytest.approx(_rdp(event, ADD_REMOVE, row["round"]), rel=1e-9)
        assert row["privacy/unit"] == "client"
    assert any(not row["clients"] for row in run.rows[1:])  # a Poisson round drew none, and the run went on
    p = run.summary["privacy"]
    assert (p["unit"], p["delta"], p["rounds_composed"]) == ("client", 1e-5, 7)
    assert "Poisson sampling (q = 0.5" in p["sampling"] and p["epsilon"] == run.rows[-1]["privacy/epsilon"]
    # fedtune show, the model card and fedtune report state ε with its unit, δ and sampling
    line = privacy_line(run)
    assert line.startswith(f"privacy: (ε = {p['epsilon']:.4g}, δ = 1e-05)-differential privacy for one client")
    assert "Poisson sampling (q = 0.5" in line and "RDP accountant" in line
    assert "ε" in [c.header for c in round_table(run).columns]
    card = (cfg.run_dir / "adapter" / CARD).read_text()
    assert "## Privacy" in card and guarantee(p) in card
    report = build_report([cfg.run_dir], metric="train_loss", out_dir=tmp_path / "report")
    assert report.rows[0]["privacy"] == p and (tmp_path / "report" / "train_loss_vs_epsilon.png").is_file()


def test_the_run_stops_before_the_round_that_would_exceed_the_target(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0))
    target = (_rdp(event, ADD_REMOVE, 3) + _rdp(event, ADD_REMOVE, 4)) / 2  # reached after 3 rounds, not 4
    cfg = _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "stop", rounds=6,
                  privacy={"target_epsilon": target, "on_target": "stop"})
    execute(cfg)
    run = load_run(cfg.run_dir)
    assert [r["round"] for r in run.rows] == [0, 1, 2, 3]
    assert max(r["privacy/epsilon"] for r in run.rows[1:]) <= target
    assert run.summary["privacy"]["stopped_before_round"] == 4 and run.summary["rounds"] == 3


def test_calibrate_chooses_z_for_the_planned_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cal", rounds=3,
                  privacy={"target_epsilon": 5.0, "on_target": "calibrate"}, dp={"clip": 0.5})
    exp = build_experiment(cfg)
    z = exp.privacy.dp.noise_multiplier
    eps = lambda z: _rdp(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)),  # noqa: E731
                         ADD_REMOVE, 3)
    assert eps(z) <= 5.0 < eps(z * 0.998)
    line = exp.privacy.start_line([tr for tr, _ in exp.client_sizes])  # printed before round 1
    assert line.startswith("privacy: client-level DP (DP-FedAvg, clip S = 0.5") and "δ = 1e-05" in line
    assert "Poisson sampling (q = 0.5, add/remove-one neighbours)" in line and f"z = {z:.4g}" in line
    assert line.endswith(f"the 3 planned rounds reach ε = {eps(z):.4g}; target ε = 5 (calibrate)")


def test_a_resumed_run_reports_the_same_epsilon(tmp_path, tiny_model_dir, tiny_tsv_dataset, monkeypatch):
    same = {"reproducible_noise": True}  # two runs, one noise: their tensors can be compared
    full = _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "full", rounds=4, sampling="fixed", privacy=same)
    cut = _dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut", rounds=4, sampling="fixed", privacy=same)
    execute(full)
    execute_stopped_at(cut, 3, monkeypatch)
    execute(cut, resume=True)
    a, b = load_run(full.run_dir), load_run(cut.run_dir)
    assert [r["privacy/epsilon"] for r in a.rows[1:]] == [r["privacy/epsilon"] for r in b.rows[1:]]
    assert a.summary["privacy"]["epsilon"] == b.summary["privacy"]["epsilon"]
    assert b.summary["privacy"]["rounds_composed"] == 4 and b.summary["resumed_after_round"] == 2
    assert max_diff(adapter(full.run_dir), adapter(cut.run_dir)) <= 1e-6  # the same noise, drawn by round
    fixed = dp_accounting.SampledWithoutReplacementDpEvent(4, 2, dp_accounting.GaussianDpEvent(0.5))
    assert b.summary["privacy"]["epsilon"] == pytest.approx(_rdp(fixed, REPLACE, 4), rel=1e-9)
    assert json.loads((cut.run_dir / "summary.json").read_text())["privacy"]["sampling"].startswith("2 of 4")


@pytest.mark.parametrize("noise, sampling", [("central", "poisson"), ("distributed", "fixed")])
def test_a_dp_run_is_the_same_on_flower(noise, sampling, tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """Distributed noise is drawn in the client half, which Flower's nodes run; an empty Poisson round sends
    nothing, on either runtime."""
    from fedtune.run import execute_with
    from test_flower import LocalGrid, local_grid_driver

    dp = {"clip": 0.5, "noise_multiplier": 1.0, "noise": noise}
    same = {"reproducible_noise": True}
    plain = execute(_dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "plain", 4, sampling, same, dp))
    flower = execute_with(_dp_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower", 4, sampling, same, dp),
                          local_grid_driver(LocalGrid(4)), "flower")
    a, b = adapter(plain.run_dir), adapter(flower.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = load_run(flower.run_dir).rows[1:]
    assert [r["privacy/epsilon"] for r in load_run(plain.run_dir).rows[1:]] == [r["privacy/epsilon"] for r in rows]
