"""Loading run configs: YAML/TOML files, -o overrides, one-line errors, the resolved config round trip."""

from pathlib import Path

import pytest

from fedtune.config import RunConfig, apply_override, dump_config, load_config
from fedtune.errors import FedtuneError

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- files


def test_yaml_and_toml_give_the_same_config(tmp_path):
    yml = write(tmp_path / "c.yaml", "name: a\nlora:\n  r: 4\n  target_modules: [query, value]\ntrain:\n  lr: 1.0e-3\n")
    toml = write(
        tmp_path / "c.toml", 'name = "a"\n[lora]\nr = 4\ntarget_modules = ["query", "value"]\n[train]\nlr = 1e-3\n'
    )
    a, b = load_config(yml), load_config(toml)
    assert a == b
    assert a.lora.r == 4 and a.lora.target_modules == ["query", "value"] and a.train.lr == 1e-3
    assert a.partition == RunConfig().partition  # untouched sections keep their defaults


def test_packaged_quickstart_loads():
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.algorithm.name == "fedit" and cfg.model.name == "minilm"
    assert (cfg.data.name, cfg.partition.method, cfg.partition.num_clients, cfg.partition.alpha) == ("sst2", "dirichlet", 8, 0.5)


def test_no_file_gives_the_defaults_and_an_empty_file_too(tmp_path):
    assert load_config() == RunConfig()
    assert load_config(write(tmp_path / "empty.yaml", "")) == RunConfig()


def test_missing_file(tmp_path):
    with pytest.raises(FedtuneError, match="config file not found") as err:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in one_line(err)


def test_unknown_suffix(tmp_path):
    with pytest.raises(FedtuneError, match=r"must end in \.yaml, \.yml or \.toml"):
        load_config(write(tmp_path / "c.json", "{}"))


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [("c.yaml", "lora:\n  r: [1, 2\n", "YAML"), ("c.toml", "[lora\nr = 1\n", "TOML")],
)
def test_unparsable_file_is_one_line(tmp_path, name, text, kind):
    with pytest.raises(FedtuneError, match=f"is not valid {kind}") as err:
        load_config(write(tmp_path / name, text))
    assert name in one_line(err)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(FedtuneError, match="must hold a mapping"):
        load_config(write(tmp_path / "c.yaml", "- a\n- b\n"))


# --------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(overrides=[
        "lora.r=16", "train.lr=2e-4", "lora.target_modules=[q_proj, v_proj]", "partition.alpha=0.1",
        "data.max_train_examples=100", "name=exp-1",
    ])
    assert cfg.lora.r == 16 and isinstance(cfg.lora.r, int)
    assert cfg.train.lr == 2e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.partition.alpha == 0.1
    assert cfg.data.max_train_examples == 100
    assert cfg.name == "exp-1"


def test_override_beats_the_file_and_later_overrides_win(tmp_path):
    cfg = load_config(QUICKSTART, ["lora.r=4", "lora.r=32", "federation.rounds=2"])
    assert cfg.lora.r == 32 and cfg.federation.rounds == 2
    assert cfg.lora.alpha == 16  # the rest of the file's section is kept


def test_override_creates_nested_sections():
    data: dict = {}
    apply_override(data, "algorithm.options.mu=0.01")
    apply_override(data, "algorithm.name=fedit")
    assert data == {"algorithm": {"options": {"mu": 0.01}, "name": "fedit"}}
    assert load_config(overrides=["algorithm.options.mu=0.01"]).algorithm.options == {"mu": 0.01}


def test_empty_override_value_is_none():
    assert load_config(overrides=["data.eval_split="]).data.eval_split is None


@pytest.mark.parametrize("bad", ["lora.r", "=3", " . =3"])
def test_malformed_override(bad):
    with pytest.raises(FedtuneError, match="-o lora.r=16"):
        load_config(overrides=[bad])


def test_override_through_a_value():
    with pytest.raises(FedtuneError, match="'name' is a value, not a section"):
        load_config(overrides=["name=a", "name.x=1"])


# --------------------------------------------------------------------------- validation


def test_typo_names_the_key_and_lists_the_valid_ones(tmp_path):
    with pytest.raises(FedtuneError) as err:
        load_config(write(tmp_path / "c.yaml", "lora:\n  rank: 4\n"))
    message = one_line(err)
    assert "unknown key 'lora.rank'" in message
    assert "valid keys here: alpha, client_ranks, dropout, r, rank_tiers, target_modules, train_head" in message


def test_typo_suggests_the_close_key():
    with pytest.raises(FedtuneError, match="did you mean 'federation'") as err:
        load_config(overrides=["federaton.rounds=3"])
    assert "valid keys here: " in one_line(err) and "algorithm" in str(err.value)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("lora.r=0", "'lora.r'"),  # range
        ("lora.r=abc", "'lora.r'"),  # type
        ("train.lr=-1", "'train.lr'"),
        ("partition.method=random", "'partition.method'"),  # not one of the choices
        ("partition.client_test_fraction=1.0", "'partition.client_test_fraction'"),
        ("federation.rounds=[1, 2]", "'federation.rounds'"),
    ],
)
def test_wrong_type_or_range_names_the_key(override, where):
    with pytest.raises(FedtuneError, match="invalid config") as err:
        load_config(overrides=[override])
    assert where in one_line(err)


def test_several_problems_are_reported_together_on_one_line():
    with pytest.raises(FedtuneError) as err:
        load_config(overrides=["lora.r=0", "train.lrr=1"])
    message = one_line(err)
    assert "'lora.r'" in message and "'train.lrr'" in message


# --------------------------------------------------------------------------- local steps vs epochs


def test_local_steps_default_to_10():
    train = load_config().train
    assert train.local_steps == 10 and train.local_epochs is None


def test_local_epochs_replace_the_default_steps():
    train = load_config(overrides=["train.local_epochs=0.5"]).train
    assert train.local_epochs == 0.5 and train.local_steps is None


def test_local_steps_and_epochs_together_are_refused():
    with pytest.raises(FedtuneError, match="set only one of train.local_steps and train.local_epochs") as err:
        load_config(overrides=["train.local_steps=5", "train.local_epochs=1"])
    one_line(err)


def test_momentum_needs_the_sgd_client_optimiser():
    with pytest.raises(FedtuneError, match="train.momentum applies to train.optimizer: sgd") as err:
        load_config(overrides=["train.momentum=0.9"])
    one_line(err)
    assert load_config(overrides=["train.optimizer=sgd", "train.momentum=0.9"]).train.momentum == 0.9


@pytest.mark.parametrize("override", ["train.local_steps=0", "train.local_epochs=0"])
def test_local_steps_and_epochs_must_be_positive(override):
    with pytest.raises(FedtuneError, match=override.split("=")[0]):
        load_config(overrides=[override])


# --------------------------------------------------------------------------- resolved config


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.local_steps=null", "train.local_epochs=2", "lora.target_modules=[query]", "data.name=my data.csv",
         "algorithm.options.mu=0.1", "output_dir=/tmp/x"],
    ],
)
def test_resolved_config_round_trips(tmp_path, overrides):
    cfg = load_config(QUICKSTART, overrides)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.train.local_steps == cfg.train.local_steps  # the filled-in default survives as an explicit value
    assert again.run_dir == cfg.run_dir


def test_natural_partition_leaves_the_client_count_to_the_data(tmp_path):
    cfg = load_config(None, ["partition.method=natural", "partition.by=site"])
    assert cfg.partition.num_clients is None and load_config().partition.num_clients == 8
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(None, ["partition.method=natural", "partition.num_clients=3"]).partition.num_clients == 3


def test_eval_fraction_defaults_to_a_tenth_and_is_checked():
    assert load_config().data.eval_fraction == 0.1
    assert load_config(None, ["data.eval_fraction=0"]).data.eval_fraction == 0
    with pytest.raises(FedtuneError, match="'data.eval_fraction': Input should be less than 1") as err:
        load_config(None, ["data.eval_fraction=1"])
    one_line(err)


def test_clients_per_round_and_fraction_are_exclusive():
    with pytest.raises(FedtuneError, match="only one of federation.clients_per_round and federation.fraction"):
        load_config(None, ["federation.clients_per_round=2", "federation.fraction=0.5"])
