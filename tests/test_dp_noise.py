"""The doors of DP noise (fedtune.dp_noise): whoever knows the run's seed cannot regenerate the noise, no party's
key leaves it, and a round redone after a resume adds the noise it added before."""

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedtune.algorithms import ClientContext, ClientUpdate, RunFacts, ServerState, build_algorithm, wrap
from fedtune.config import WrapperConfig
from fedtune.dp_noise import NOISE_KEY, SECRET, noise_generator, noise_key, public
from fedtune.errors import FedtuneError
from fedtune.models.lora import trainable_state
from fedtune.privacy import REPRODUCIBLE, guarantee
from fedtune.run import execute, execute_with
from fedtune.runlog import load_run
from fedtune.runtime.flower_node import answer
from fedtune.runtime.wire import record_to_tensors, tensors_to_record
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


def _state() -> ServerState:
    return ServerState(round=0, global_tensors={"l.lora_B.weight": torch.zeros(200, 50)})


def _released_noise(dp, rnd=1) -> torch.Tensor:
    """The noise a round with no client releases (the model moves by noise / m alone), in units of the sum."""
    state = _state()
    new = dp.aggregate(rnd, iter([]), state)
    return (new.global_tensors["l.lora_B.weight"].double() - state.global_tensors["l.lora_B.weight"].double()) * 4


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


def test_distributed_shares_and_dp_sgd_noise_cannot_be_regenerated_from_the_run_seed():
    model = torch.nn.Linear(100, 50)
    start = trainable_state(model)
    state = ServerState(round=0, global_tensors=start)

    def share(noise_seed, client_state):
        dp = _dp(noise_seed, noise="distributed")
        payload = dp.configure(1, [2], state)[2]
        u = dp.update(ClientContext(2, 1, model, {}, client_state, payload=payload, start=start))
        return torch.cat([(u.tensors[n].double() - start[n].double()).flatten() for n in start])

    secret_state: dict = {}
    released = share(None, secret_state)
    assert set(secret_state) == {NOISE_KEY} and secret_state[NOISE_KEY].dtype == torch.uint8
    assert abs(_correlation(released, share(SEED, {}))) < 0.05
    assert torch.equal(share(None, secret_state), released)  # the client's own key: the same share on a redo
    # DP-SGD: the client's generator for a round, from its key; the seed gives another
    key = noise_key({}, None, "client", 2)
    regenerated = noise_key({}, SEED, "client", 2)
    draw = lambda k: torch.randn(5000, generator=noise_generator(k, "dp-sgd", 1))  # noqa: E731
    assert abs(_correlation(draw(key), draw(regenerated))) < 0.05
    assert torch.equal(draw(key), draw(key)) and not torch.equal(key, noise_key({}, None, "client", 2))


def test_no_party_hands_its_key_to_anyone():
    dp = _dp()
    server = dp.aggregate(1, iter([ClientUpdate(0, _state().global_tensors, 1)]), _state())
    assert NOISE_KEY in server.extra  # kept in the server's own state (its checkpoint)
    payloads = dp.configure(2, [0, 1], server)
    assert not any(n.startswith(SECRET) for p in payloads.values() for n in [*p.tensors, *p.config])
    # a Flower node asked for its client's state (the end of a personalised run) returns none of its secrets
    held = {"fdlora/private.lora_A": torch.ones(2, 3), NOISE_KEY: noise_key({}, None, "client", 0)}
    reply, _ = answer("query", RecordDict({"fedtune": ConfigRecord({"action": "state"})}), {}, tensors_to_record(held))
    assert set(record_to_tensors(reply["state"])) == {"fdlora/private.lora_A"}
    assert set(public(held)) == {"fdlora/private.lora_A"}


def _dp_sgd_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, **privacy):
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, federation={"rounds": 3, "clients_per_round": 2},
                    train={"local_steps": 2, "batch_size": 8, "lr": 2e-2}, eval={"every": 0, "batch_size": 32},
                    privacy={"dp_sgd": {"enabled": True, "clip": 1.0, "noise_multiplier": 1.0}, **privacy})


def _central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, **privacy):
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name,
                    partition={"method": "iid", "num_clients": 4},
                    train={"local_steps": 1, "batch_size": 8, "lr": 2e-2},
                    federation={"rounds": 3, "clients_per_round": 2, "max_update_ratio": 0},
                    algorithm={"name": "fedit", "wrappers": [{"name": "dp", "options": {"clip": 0.5,
                                                                                        "noise_multiplier": 1.0}}]},
                    eval={"every": 0, "batch_size": 32}, privacy=privacy)


@pytest.mark.parametrize("make", [_central_cfg, _dp_sgd_cfg], ids=["central", "dp_sgd"])
def test_a_round_redone_after_a_resume_adds_the_noise_it_added_before(make, tmp_path, tiny_model_dir,
                                                                       tiny_tsv_dataset, monkeypatch):
    """Round 2 is released (logged) and the run dies before its checkpoint: the resumed run redoes round 2 from
    round 1's checkpoint, whose keys (the server's, and in-process the clients') give the same noise, so the
    round releases nothing new. A fresh run of the same config draws other keys, so other noise."""
    import fedtune.run as run_module

    real = run_module.save_checkpoint
    released: dict[str, dict] = {}

    def keep(label, stop_at=None):
        def save(run_dir, ckpt):
            if ckpt.state.round == 2:
                released[label] = dict(ckpt.state.global_tensors)
                if stop_at:
                    raise Stop
            real(run_dir, ckpt)
        return save

    cfg = make(tmp_path, tiny_model_dir, tiny_tsv_dataset, "redo")
    monkeypatch.setattr(run_module, "save_checkpoint", keep("first", stop_at=2))
    with pytest.raises(Stop):
        execute(cfg)
    monkeypatch.setattr(run_module, "save_checkpoint", keep("redone"))
    execute(cfg, resume=True)
    monkeypatch.setattr(run_module, "save_checkpoint", keep("fresh"))
    execute(cfg, overwrite=True)
    first, redone, fresh = released["first"], released["redone"], released["fresh"]
    assert all(torch.equal(first[n], redone[n]) for n in first)
    assert not all(torch.equal(first[n], fresh[n]) for n in first)


def test_reproducible_noise_is_said_wherever_privacy_is_reported(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = _central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "repro", reproducible_noise=True)
    res = execute(cfg)
    record = load_run(res.run_dir).summary["privacy"]
    assert record["reproducible_noise"] is True and guarantee(record).endswith(REPRODUCIBLE)
    secret = load_run(execute(_central_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "secret")).run_dir)
    assert secret.summary["privacy"]["reproducible_noise"] is False
    assert "reproducible" not in guarantee(secret.summary["privacy"])


def test_a_flower_run_whose_clients_add_noise_is_not_resumed_without_their_keys(tmp_path, tiny_model_dir,
                                                                                  tiny_tsv_dataset, monkeypatch):
    import fedtune.run as run_module

    real = run_module.save_checkpoint

    def stop_after_round_1(run_dir, ckpt):
        if ckpt.state.round == 2:
            raise Stop
        real(run_dir, ckpt)

    cfg = _dp_sgd_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "flower-sgd")
    monkeypatch.setattr(run_module, "save_checkpoint", stop_after_round_1)
    with pytest.raises(Stop):
        execute_with(cfg, local_grid_driver(LocalGrid(3)), "flower")
    monkeypatch.undo()
    with pytest.raises(FedtuneError, match=r"kept per-client state \(the secret keys of their DP noise: resumed, "
                                           r"they would draw new keys and release the interrupted round again") as e:
        execute_with(cfg, local_grid_driver(LocalGrid(3)), "flower", resume=True)
    assert "\n" not in str(e.value)
