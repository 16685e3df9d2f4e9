"""A user's own CSV (``text,label,site``) end to end, as ``fedtune run`` in a real process.

Two runs start together (each pays seconds of imports): one on defaults with a
natural partition by site (an eval split is held out, the columns are found by
name, each client's site is named), one with ``data.eval_fraction=0`` (no
evaluation: said before training, and the report falls back to train loss).
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedtune.cli import app

SITES = ("site_a", "site_b", "site_c")
WORDS = {"pos": ["good", "great", "fine"], "neg": ["bad", "dull", "poor"]}


def write_csv(path, n: int = 90) -> None:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        words = rng.choices(["the", "film", "was", "quite", "a", "plot"], k=4) + [rng.choice(WORDS[label])]
        rows.append(f"{' '.join(words)},{label},{SITES[i % 3]}")
    path.write_text("text,label,site\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    cwd = tmp_path_factory.mktemp("user_data")
    write_csv(cwd / "mine.csv")
    config = {
        "name": "mine", "output_dir": "runs", "threads": 1,
        "data": {"name": "mine.csv"},
        "model": {"name": str(tiny_model_dir), "max_length": 32},
        "partition": {"method": "natural", "by": "site"},
        "federation": {"rounds": 1},
        "train": {"local_steps": 2, "batch_size": 8},
    }
    (cwd / "c.yaml").write_text(yaml.safe_dump(config))
    cases = {
        "natural": [],
        "no_eval": ["-o", "name=noeval", "-o", "data.eval_fraction=0", "-o", "partition.method=iid",
                    "-o", "partition.num_clients=2"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = {
        case: subprocess.Popen([sys.executable, "-m", "fedtune.cli", "run", "c.yaml", *args], cwd=cwd, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for case, args in cases.items()
    }
    results = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        results[case] = stdout.splitlines()
    return cwd, results


def read(path):
    return json.loads(path.read_text())


def test_a_single_csv_gets_an_eval_split_and_final_metrics(runs):
    cwd, out = runs
    assert ("eval: held out 9 of the 90 rows of mine.csv as the eval split (data.eval_fraction=0.1, stratified by "
            "label, seed 0); set data.eval_fraction=0 to train on every row") in out["natural"]
    assert not any("no evaluation" in line for line in out["natural"])
    final = read(cwd / "runs" / "mine" / "summary.json")["final"]
    assert {"eval/accuracy", "eval/loss"} <= set(final)
    partition = read(cwd / "runs" / "mine" / "partition.json")
    assert partition["eval"] == [{"dataset": "mine.csv", "held_out": "train", "rows": 9, "of_rows": 90,
                                  "fraction": 0.1, "stratified_by": "label", "seed": 0}]
    assert partition["num_examples"] == 81


def test_text_and_label_columns_are_detected(runs):
    _, out = runs
    assert ("data: text column 'text', label column 'label' (found by name in mine.csv; "
            "set data.text_column / data.label_column to choose others)") in out["natural"]


def test_natural_partition_names_each_clients_site(runs):
    cwd, out = runs
    partition = read(cwd / "runs" / "mine" / "partition.json")
    assert partition["num_clients"] == 3 and partition["group_column"] == "site"
    assert partition["client_groups"] == [[site] for site in SITES]
    assert yaml.safe_load((cwd / "runs" / "mine" / "config.yaml").read_text())["partition"]["num_clients"] is None
    table = [line for line in out["natural"] if "site_" in line]
    assert [line.split()[1] for line in table] == ["0", "1", "2"]
    assert all(site in line for site, line in zip(SITES, table))
    report = CliRunner().invoke(app, ["report", str(cwd / "runs" / "mine")])
    assert report.exit_code == 0, report.output
    assert "eval/accuracy — 1 run" in report.output and "mine: clients by site" in report.output
    assert all(site in report.output for site in SITES)
    final = read(cwd / "runs" / "mine" / "summary.json")["final"]  # the held-out rows keep their site
    assert "mine: eval accuracy by site" in report.output and all(f"eval/accuracy@{s}" in final for s in SITES)


def test_a_run_without_evaluation_says_so_and_is_reported_on_train_loss(runs):
    cwd, out = runs
    note = ("note: no evaluation in this run: mine.csv has no dev/test/validation split and data.eval_fraction is 0; "
            "set data.eval_fraction (e.g. 0.1) or data.eval_split")
    assert note in out["no_eval"]
    assert out["no_eval"].index(note) < next(i for i, line in enumerate(out["no_eval"]) if line.startswith("run dir"))
    assert read(cwd / "runs" / "noeval" / "summary.json")["final"] == {}
    report = CliRunner().invoke(app, ["report", str(cwd / "runs" / "noeval")])
    assert report.exit_code == 0, report.output
    assert report.output.splitlines()[0] == ("note: no eval metrics in run noeval: showing train_loss and bytes "
                                            "instead (set data.eval_fraction or data.eval_split to evaluate a run)")
    assert "train_loss — 1 run" in report.output and " kB" in report.output


# --------------------------------------------------------------------------- in process: the other outcomes


def _experiment(tmp_path, model_dir, csv_text, *overrides):
    from fedtune.config import load_config
    from fedtune.experiment import build_experiment

    (tmp_path / "d.csv").write_text(csv_text)
    return build_experiment(load_config(None, [f"data.name={tmp_path / 'd.csv'}", f"model.name={model_dir}",
                                               "partition.method=natural", "partition.by=site", *overrides]))


def test_too_small_to_hold_out_or_evaluation_off_is_said(tmp_path, tiny_model_dir):
    tiny = "text,label,site\ngood,pos,a\nbad,neg,b\n"
    exp = _experiment(tmp_path, tiny_model_dir, tiny)
    assert exp.eval is None and exp.evaluation_gap() == (
        f"no evaluation in this run: {tmp_path / 'd.csv'} is too small to hold out data.eval_fraction=0.1 of its rows "
        "and keep every label in training; set data.name to a folder with train and dev files, or add rows")
    rows = "text,label,site\n" + "".join(f"w{i},{'pn'[i % 2]},{'ab'[i % 2]}\n" for i in range(20))
    assert _experiment(tmp_path, tiny_model_dir, rows).evaluation_gap() is None
    assert _experiment(tmp_path, tiny_model_dir, rows, "eval.enabled=false").evaluation_gap() == (
        "no evaluation in this run: eval.enabled is false; set eval.enabled=true to evaluate")


def test_heterogeneous_ranks_must_match_the_natural_client_count(tmp_path, tiny_model_dir):
    from fedtune.errors import FedtuneError

    rows = "text,label,site\n" + "".join(f"w{i},{'pn'[i % 2]},{'abc'[i % 3]}\n" for i in range(12))
    with pytest.raises(FedtuneError, match=r"give 2 ranks but partition.method=natural gives 3 clients \(one per "
                                           r"value of 'site'\); give one rank per client"):
        _experiment(tmp_path, tiny_model_dir, rows, "lora.client_ranks=[4, 2]")
    assert _experiment(tmp_path, tiny_model_dir, rows, "lora.client_ranks=[4, 2, 2]").num_clients == 3


def test_the_share_of_inputs_cut_by_max_length_is_said_before_training(tmp_path, tiny_model_dir):
    """The note counts, per split, the inputs the tokenizer makes longer than model.max_length, and names the
    length that keeps 95% of them whole; both checked against the tokenizer itself."""
    from transformers import AutoTokenizer

    from fedtune.config import load_config
    from fedtune.experiment import build_experiment

    words = "the film was long and the plot went on".split()
    texts = [" ".join(words[: 1 + i % 9] * (1 + i % 4)) for i in range(60)]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{'pn'[i % 2]}\n" for i, t in
                                                                 enumerate(texts[:40])))
    (tmp_path / "dev.csv").write_text("text,label\n" + "".join(f"{t},{'pn'[i % 2]}\n" for i, t in
                                                               enumerate(texts[40:])))
    lines = []
    exp = build_experiment(load_config(None, [f"data.name={tmp_path}", f"model.name={tiny_model_dir}",
                                              "model.max_length=12", "partition.num_clients=2"]), note=lines.append)
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(tiny_model_dir)(texts).input_ids]
    train, dev = np.array(lengths[:40]), np.array(lengths[40:])
    keep = int(np.sort(lengths)[int(np.ceil(0.95 * len(lengths))) - 1])
    assert (train > 12).any() and (dev > 12).any() and keep > 12
    assert (f"inputs: model.max_length=12 tokens cuts {np.mean(train > 12):.1%} of the 40 training inputs and "
            f"{np.mean(dev > 12):.1%} of the 20 eval inputs; model.max_length={keep} would keep 95% whole") in lines
    assert max(exp.eval.lengths) == 12 and max(exp.client(0).examples.lengths) <= 12
    lines.clear()
    build_experiment(load_config(None, [f"data.name={tmp_path}", f"model.name={tiny_model_dir}",
                                        "model.max_length=64", "partition.num_clients=2"]), note=lines.append)
    assert (f"inputs: none of the 40 training and 20 eval inputs is longer than model.max_length=64 tokens; 95% fit "
            f"in {keep}") in lines


def test_encoding_long_inputs_truncates_as_the_tokenizer_does(tiny_model_dir):
    """Inputs are tokenised whole (to count their length) and the long ones again with truncation: the features
    are the tokenizer's own truncated ones, single texts and pairs alike."""
    from transformers import AutoTokenizer

    from fedtune.training import encode_classification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    firsts = ["short", "a much longer first text that goes on and on and on", "mid length text here"]
    seconds = ["b", "second part that is long as well, very long indeed", "x"]
    for texts in ([firsts], [firsts, seconds]):
        enc = encode_classification(tokenizer, texts, [0, 1, 0], max_length=10)
        want = tokenizer(*texts, truncation=True, max_length=10)
        assert enc.features["input_ids"] == want["input_ids"]
        assert enc.full_lengths.tolist() == [len(ids) for ids in tokenizer(*texts).input_ids]
        if len(texts) == 2:
            assert enc.features["token_type_ids"] == want["token_type_ids"]
