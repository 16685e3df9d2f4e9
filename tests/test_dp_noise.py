"""The doors of DP randomness (fedtune.dp_noise): whoever knows the run's seed can neither regenerate the noise nor
recompute who or which rows were sampled, no party's key leaves it, a round redone after a resume draws what it
drew before, and a client never draws one round's noise twice."""

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedtune.algorithms import ClientContext, ClientUpdate, RunFacts, build_algorithm, wrap
from fedtune.config import WrapperConfig
from fedtune.dp_noise import LAST_ROUND, NOISE_KEY, SECRET, SecretStream, noise_key, public, round_key
from fedtune.errors import FedtuneError
from fedtune.models.lora import trainable_state
from fedtune.privacy import REPRODUCIBLE, guarantee
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedtune.runtime.flower_node import answer
from fedtune.runtime.wire import record_to_tensors, tensors_to_record
from fedtune.sampling import sample_clients
from fedtune.seeds import derive_seed
from test_flower import LocalGrid, local_grid_driver, tiny_cfg
from test_resume import Stop

SEED = 11
"""The run's seed, as config.yaml records it: known to the attacker."""


def _dp(noise_seed=None, **options):
    dp = wrap(build_algorithm("fedit"), [WrapperConfig(name="dp", options={"clip": 0.5, "noise_multiplier": 1.0,
                                                                           **options})])
    dp.bind(RunFacts(seed=SEED, rounds=10, num_clients=8, clients_per_round=4, noise_seed=noise_seed))
    return dp


def _released_noise(dp, rnd=1) -> torch.Tensor:
    """The noise a round with no client releases (the model moves by noise / m alone), in units of the sum."""
    state = dp.init({"l.lora_B.weight": torch.zeros(200, 50)})
    new = dp.aggregate(rnd, iter([]), state)
    return new.global_tensors["l.lora_B.weight"].double() * 4


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_central_noise_cannot_be_regenerated_from_the_run_seed():
    released = _released_noise(_dp())
    assert float(released.std()) == pytest.approx(0.5, rel=0.05)  # z·S: it is noise
    # the attacker's regenerations from the seed: as a reproducible run draws it, and as fedtune drew it before
    # the secret keys (commit 6741a2f: torch.Generator().manual_seed(derive_seed(seed, round, 52_711)))
    guesses = [_released_noise(_dp(noise_seed=SEED)),
               torch.randn((200, 50), generator=torch.Generator().manual_seed(derive_seed(SEED, 1, 52_711)),
                           dtype=torch.float64) * 0.5]
    for guess in guesses:
        assert abs(_correlation(released, guess)) < 0.05
        assert float((released - guess).std()) == pytest.approx(0.5 * 2 ** 0.5, rel=0.05)  # subtracting adds noise
    # the attack works where the door is open: under reproducible_noise the regeneration removes the noise exactly
    assert torch.equal(_released_noise(_dp(noise_seed=SEED)), guesses[0])
    assert not torch.equal(released, _released_noise(_dp()))  # every run draws its own key


def test_every_bit_of_the_key_counts():
    """torch's CPU generator keeps only the low 32 bits of a seed (a 2³² search would find it); the stream is
    SHAKE-256 of the whole key: keys that differ in one bit anywhere give unrelated noise."""
    key = noise_key({}, None)
    for byte in (0, 4, 31):
        other = key.clone()
        other[byte] ^= 1
        a, b = SecretStream(key, "x", 1).normal((4000,)), SecretStream(other, "x", 1).normal((4000,))
        assert abs(_correlation(a, b)) < 0.08
    draws = SecretStream(key, "x", 1).normal((200_000,))
    assert float(draws.mean()) == pytest.approx(0.0, abs=0.01) and float(draws.std()) == pytest.approx(1.0, rel=0.01)
    assert float((draws.abs() > 3).double().mean()) == pytest.approx(0.0027, rel=0.1)  # Gaussian tails


def test_distributed_shares_cannot_be_regenerated_and_are_drawn_once_per_round():
    model = torch.nn.Linear(100, 50)
    start = trainable_state(model)

    def share(noise_seed, secrets, rnd=1):
        dp = _dp(noise_seed, noise="distributed")
        state = dp.init(start)
        payload = dp.configure(rnd, [2], state)[2]
        u = dp.update(ClientContext(2, rnd, model, {}, {}, payload=payload, start=start, secrets=secrets))
        return torch.cat([(u.tensors[n].double() - start[n].double()).flatten() for n in start])

    secrets: dict = {}
    before = dict(secrets)
    released = share(None, secrets)
    assert set(secrets) == {NOISE_KEY, LAST_ROUND} and secrets[NOISE_KEY].dtype == torch.uint8
    assert abs(_correlation(released, share(SEED, {}))) < 0.05
    restored = {**before, NOISE_KEY: secrets[NOISE_KEY]}  # a resume: the key, as round 1 began
    assert torch.equal(share(None, restored), released)
    with pytest.raises(FedtuneError, match="client 2 was asked to train round 1 after round 1") as e:
        share(None, secrets)  # the server asks for round 1 again: the same noise on two updates would cancel
    assert "\n" not in str(e.value)
    assert not torch.equal(share(None, secrets, rnd=2), released)


def test_client_sampling_under_dp_comes_from_the_servers_key():
    key = noise_key({}, None)
    for rate, k in [(0.1, 10), (None, 10)]:
        drawn = [sample_clients(SEED, r, 100, k, rate, SecretStream(key, "client sampling", r)) for r in range(1, 201)]
        seeded = [sample_clients(SEED, r, 100, k, rate) for r in range(1, 201)]
        assert drawn != seeded
        assert sum(map(len, drawn)) / 200 == pytest.approx(10, rel=0.1)
        counts = torch.bincount(torch.tensor([c for d in drawn for c in d]), minlength=100).double()
        assert float(counts.std() / counts.mean()) < 0.5  # each client about equally often
        if rate is None:
            assert all(len(d) == 10 and d == sorted(set(d)) for d in drawn)


def test_no_party_hands_its_key_to_anyone():
    dp = _dp()
    server = dp.init({"l.lora_B.weight": torch.zeros(4, 3)})
    assert NOISE_KEY in server.extra  # made with the initial state, so round 0's checkpoint holds it
    server = dp.aggregate(1, iter([ClientUpdate(0, {"l.lora_B.weight": torch.ones(4, 3)}, 1)]), server)
    assert NOISE_KEY in server.extra
    payloads = dp.configure(2, [0, 1], server)
    assert not any(n.startswith(SECRET) for p in payloads.values() for n in [*p.tensors, *p.config])
    # a Flower node asked for its client's state (the end of a personalised run) returns none of its secrets
    held = {"fdlora/private.lora_A": torch.ones(2, 3), NOISE_KEY: noise_key({}, None, "client", 0)}
    reply, _ = answer("query", RecordDict({"fedtune": ConfigRecord({"action": "state"})}), {}, tensors_to_record(held))
    assert set(record_to_tensors(reply["state"])) == {"fdlora/private.lora_A"}
    assert set(public(held)) == {"fdlora/private.lora_A"}


def _dp_sgd_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, algorithm="fedit", **privacy):
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, federation={"rounds": 3, "clients_per_round": 2},
                    partition={"method": "iid", "num_clients": 3, "client_test_fraction": 0.2},
                    train={"local_steps": 2, "batch_size": 8, "lr": 2e-2}, eval={"every": 1, "batch_size": 32},
                    algorithm={"name": algorithm},
                    privacy={"dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": 1.0}, **privacy})


def _central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, rounds=3, **privacy):
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name,
                    partition={"method": "iid", "num_clients": 4},
                    train={"local_steps": 1, "batch_size": 8, "lr": 2e-2},
                    federation={"rounds": rounds, "clients_per_round": 2, "max_update_ratio": 0},
                    algorithm={"name": "fedit", "wrappers": [{"name": "dp", "options": {"clip": 0.5,
                                                                                        "noise_multiplier": 1.0}}]},
                    eval={"every": 0, "batch_size": 32}, privacy=privacy)


def _stopping_at(rnd, released, label, stop=True):
    """A save_checkpoint that keeps round ``rnd``'s released tensors under ``label`` and (``stop``) dies before
    writing its checkpoint."""
    def save(run_dir, ckpt):
        if ckpt.state.round == rnd:
            released[label] = dict(ckpt.state.global_tensors)
            if stop:
                raise Stop
        save_checkpoint(run_dir, ckpt)
    return save


@pytest.mark.parametrize("make", [_central_cfg, _dp_sgd_cfg], ids=["central", "dp_sgd"])
@pytest.mark.parametrize("crash", [1, 2])
def test_a_round_redone_after_a_resume_draws_what_it_drew_before(make, crash, tmp_path, tiny_model_dir,
                                                                  tiny_tsv_dataset, monkeypatch):
    """Round ``crash`` is released (logged) and the run dies before its checkpoint: the resumed run redoes it from
    the checkpoint before, whose keys (the server's from round 0 on, in-process the clients' too) give the same
    sample and noise, so the round releases nothing new. A fresh run of the same config draws other keys."""
    import fedtune.run as run_module

    cfg = make(tmp_path, tiny_model_dir, tiny_tsv_dataset, "redo")
    released: dict[str, dict] = {}
    monkeypatch.setattr(run_module, "save_checkpoint", _stopping_at(crash, released, "first"))
    with pytest.raises(Stop):
        execute(cfg)
    monkeypatch.setattr(run_module, "save_checkpoint", _stopping_at(crash, released, "redone", stop=False))
    execute(cfg, resume=True)
    monkeypatch.setattr(run_module, "save_checkpoint", _stopping_at(crash, released, "fresh", stop=False))
    execute(cfg, overwrite=True)
    first, redone, fresh = released["first"], released["redone"], released["fresh"]
    assert all(torch.equal(first[n], redone[n]) for n in first)
    assert not all(torch.equal(first[n], fresh[n]) for n in first)


def test_the_round_loop_samples_clients_from_the_servers_key(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = _central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "sampled", rounds=6)
    res = execute(cfg)
    key = load_checkpoint(res.run_dir).state.extra[NOISE_KEY]
    rows = load_run(res.run_dir).rows[1:]
    keyed = [sample_clients(cfg.seed, r, 4, 2, None, SecretStream(key, "client sampling", r)) for r in range(1, 7)]
    assert [row["clients"] for row in rows] == keyed
    assert keyed != [sample_clients(cfg.seed, r, 4, 2) for r in range(1, 7)]  # not what the seed gives


@pytest.mark.parametrize("algorithm", ["local", "scaffold"])
def test_algorithms_with_client_state_run_under_dp_sgd(algorithm, tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """The client's key lives beside the algorithm's own state, not in it: local-only's personal model and
    SCAFFOLD's control variates see only their own tensors; every client holds its own key and the last round
    it drew."""
    cfg = _dp_sgd_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, algorithm, algorithm=algorithm)
    res = execute(cfg)
    assert load_run(res.run_dir).summary["privacy"]["unit"] == "record"
    states = load_checkpoint(res.run_dir).client_states
    assert all(NOISE_KEY in s for s in states.values())
    trained = {c for row in load_run(res.run_dir).rows[1:] for c in row["clients"]}
    assert {c for c, s in states.items() if LAST_ROUND in s} == trained
    assert len({bytes(s[NOISE_KEY].tolist()) for s in states.values()}) == len(states)  # one key per client


def test_reproducible_noise_is_said_wherever_privacy_is_reported(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = _central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "repro", reproducible_noise=True)
    res = execute(cfg)
    record = load_run(res.run_dir).summary["privacy"]
    assert record["reproducible_noise"] is True and guarantee(record).endswith(REPRODUCIBLE)
    secret = load_run(execute(_central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "secret")).run_dir)
    assert secret.summary["privacy"]["reproducible_noise"] is False
    assert "reproducible" not in guarantee(secret.summary["privacy"])


def test_round_key_draws_each_round_once():
    store: dict = {}
    key = round_key(store, None, 5, 3)
    assert torch.equal(round_key(store, None, 5, 4), key)
    for again in (4, 2):
        with pytest.raises(FedtuneError, match=f"client 5 was asked to train round {again} after round 4"):
            round_key(store, None, 5, again)


@pytest.mark.parametrize("again", ["flower", "inprocess"])
def test_a_flower_run_whose_clients_add_noise_is_not_resumed(again, tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                             monkeypatch):
    """On Flower or in-process: either would draw new client keys and redo the interrupted round."""
    import fedtune.run as run_module

    cfg = _dp_sgd_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower-sgd")
    monkeypatch.setattr(run_module, "save_checkpoint", _stopping_at(2, {}, "first"))
    with pytest.raises(Stop):
        execute_with(cfg, local_grid_driver(LocalGrid(3)), "flower")
    monkeypatch.undo()
    with pytest.raises(FedtuneError, match=r"its clients' DP keys are not in its checkpoint") as e:
        if again == "flower":
            execute_with(cfg, local_grid_driver(LocalGrid(3)), "flower", resume=True)
        else:
            execute(cfg, resume=True)
    assert "\n" not in str(e.value) and "a rerun spends ε again" in str(e.value)
