"""Loading run configs: YAML/TOML files, -o overrides, one-line errors, the resolved config round trip."""

from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from fedtune.config import (
    DataConfig,
    EvalConfig,
    LoraConfig,
    PartitionConfig,
    RunConfig,
    apply_override,
    differences,
    dump_config,
    load_config,
)
from fedtune.config_doc import STARTERS, allowed, commented_yaml
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
        ("name=../../etc", "'name'"),  # a run folder stays inside output_dir
        ("name=a/b", "'name'"),
        ("federation.max_update_ratio=-1", "'federation.max_update_ratio'"),
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


# --------------------------------------------------------------------------- list fields, differences


@pytest.mark.parametrize(("override", "hint"), [
    ("lora.target_modules=q,v", "lora.target_modules is a list: write -o lora.target_modules=[q,v]"),
    ("lora.client_ranks=4", "lora.client_ranks is a list: write -o lora.client_ranks=[4]"),
    ("eval.metrics=rouge", "eval.metrics is a list: write -o eval.metrics=[rouge]"),
])
def test_a_list_field_given_one_value_shows_the_list_syntax(override, hint):
    with pytest.raises(FedtuneError) as err:
        load_config(overrides=[override])
    assert one_line(err) == hint


def test_list_fields_take_lists_and_null():
    cfg = load_config(overrides=["lora.target_modules=[q, v]", "eval.metrics=null", "data.name=a,b.csv"])
    assert cfg.lora.target_modules == ["q", "v"] and cfg.eval.metrics is None and cfg.data.name == "a,b.csv"


def test_differences_name_each_key_with_both_values():
    saved = RunConfig().to_dict()
    now = load_config(overrides=["lora.r=16", "lora.target_modules=[q, v]", "algorithm.options.tau=0.5"]).to_dict()
    assert differences(saved, now) == [
        "lora.r: 8 in the run, 16 now",
        "lora.target_modules: null in the run, [q, v] now",
        "algorithm.options.tau: not set in the run, 0.5 now",
    ]
    assert differences(now, saved)[-1] == "algorithm.options.tau: 0.5 in the run, not set now"


def test_differences_ignore_threads_and_output_paths_only():
    saved = RunConfig().to_dict()
    neutral = load_config(overrides=["threads=2", "name=elsewhere", "output_dir=/tmp/moved"]).to_dict()
    assert differences(saved, neutral) == []
    assert differences(saved, load_config(overrides=["eval.batch_size=8"]).to_dict()) == [
        "eval.batch_size: 64 in the run, 8 now"]


# --------------------------------------------------------------------------- commented YAML (config init / show)


def _models(model=RunConfig, path=""):
    """Every (path, pydantic model) in the config tree."""
    yield path, model
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = [ann, *get_args(ann), *(a for x in get_args(ann) for a in get_args(x))]
        for sub in {a for a in args if isinstance(a, type) and issubclass(a, BaseModel)}:
            yield from _models(sub, f"{path}.{name}" if path else name)


def test_every_config_field_and_algorithm_option_says_what_it_means():
    from fedtune.algorithms import ALGORITHMS

    models = [*_models(), *((f"algorithm {n}", cls.Options) for n, cls in ALGORITHMS.items())]
    sections = [model for path, model in _models() if path]
    assert [m.__name__ for m in sections if not (m.__doc__ or "").strip()] == []
    undocumented = [f"{where}:{name}" for where, model in models for name, field in model.model_fields.items()
                    if field.annotation not in sections and not (field.description or "").strip()]
    assert undocumented == []


@pytest.mark.parametrize("overrides", [
    [],
    ["lora.rank_tiers=[{clients: 2, rank: 8}, {clients: 1, rank: 2}]", "partition.num_clients=3",
     "sft.template=chat", "sft.system_prompt=", "data.name=my data.csv", "eval.metrics=[choice, rouge]",
     "train.local_epochs=0.5", "train.local_steps=null", "data.text_column='yes'", "algorithm.options.mu=0.1"],
])
def test_show_writes_every_field_with_a_comment_and_loads_back(tmp_path, overrides):
    cfg = load_config(QUICKSTART, overrides)
    text = commented_yaml(cfg, header="a header")
    assert load_config(write(tmp_path / "shown.yaml", text)) == cfg
    lines = text.splitlines()
    assert lines[0] == "# a header"
    for path, model in _models():
        for name in model.model_fields:
            if path.startswith("lora.rank_tiers"):
                continue  # list items are written inline
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
            assert lines[i - 1].strip().startswith("#"), name


def test_show_writes_the_algorithms_resolved_options_with_their_meaning(tmp_path):
    from fedtune.algorithms import build_algorithm

    cfg = load_config(overrides=["algorithm.name=fedadam", "algorithm.options.tau=0.01"])
    options = build_algorithm("fedadam", cfg.algorithm.options).options
    text = commented_yaml(cfg, options=options)
    assert "    # τ: the adaptivity floor added to √v" in text and "    tau: 0.01\n" in text
    assert "    server_lr: 0.01\n" in text and "[one of: constant, cosine, cooldown]" in text
    assert load_config(write(tmp_path / "c.yaml", text)).algorithm.options == options.model_dump()


def test_starters_name_existing_fields_and_validate():
    for task, (settings, keys) in STARTERS.items():
        cfg = RunConfig.model_validate(settings)
        assert cfg.model.task == task
        for path, names in keys.items():
            model = dict(_models())[path]
            assert set(names) <= set(model.model_fields), (task, path)
        assert load_config(overrides=[]) != cfg


@pytest.mark.parametrize(("field", "text"), [
    (RunConfig.model_fields["seed"], "int"),
    (LoraConfig.model_fields["r"], "int ≥ 1"),
    (LoraConfig.model_fields["dropout"], "float in [0, 1)"),
    (LoraConfig.model_fields["target_modules"], "list or null"),
    (PartitionConfig.model_fields["method"], "one of: iid, dirichlet, pathological, natural, quantity, group_clusters, "
                                             "group_iid, group_pairs, language_clusters, language_iid, "
                                             "language_multi_domain, contiguous, files"),
    (DataConfig.model_fields["text_column"], "text or null"),
    (DataConfig.model_fields["name"], ""),
    (EvalConfig.model_fields["metrics"], "list of: choice, perplexity, rouge; or null"),
    (EvalConfig.model_fields["enabled"], "true or false"),
])
def test_allowed_values_come_from_type_and_bounds(field, text):
    assert allowed(field) == text


def test_every_shipped_config_is_valid():
    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.*"))
    assert len(configs) >= 8
    for path in configs:
        load_config(path)  # raises one line naming the problem


@pytest.mark.parametrize("overrides, message", [
    (["model.finetune=mole", "lora.r=16"], r"^invalid config: lora.r is a setting of the LoRA adapters \(model.finetune: "
                                           r"lora\), but this run fine-tunes mole; the mixtures' own are under mole\.\*"),
    (["mole.top_k=1", "mole.r=4"], r"mole.r, mole.top_k are settings of the mixtures of LoRA experts"),
    (["model.finetune=full", "lora.alpha=32"], "but this run fine-tunes full; remove it$"),
    (["train.lr_decay=0.9"], "train.lr_decay applies to train.lr_schedule: exponential, not constant"),
    (["train.lr_schedule=exponential", "train.min_lr_ratio=0.2"], "train.min_lr_ratio applies to train.lr_schedule: cosine"),
])
def test_a_setting_the_run_would_ignore_is_a_one_line_error(overrides, message):
    with pytest.raises(FedtuneError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_a_resolved_config_with_every_section_written_loads_again(tmp_path):
    cfg = load_config(None, ["model.finetune=mole", "mole.r=4", "train.lr_schedule=exponential"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").mole.r == 4
