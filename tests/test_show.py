"""Runs you can read while and after they run: plain progress lines, `fedtune show`, per-client metrics, TensorBoard.

One tiny run (2 rounds, 3 clients, per-client evaluation) runs as ``fedtune run`` with stdout piped, so not a
terminal, then ``fedtune show`` reads its directory; several tests check that pair of processes.
"""

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from fedtune.progress import RunProgress, eval_line, round_line
from fedtune.units import human_bytes

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
NO_TENSORBOARD = "tensorboard is not installed (pip install tensorboard; it is in the test extra)"


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *map(str, args)], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)


@pytest.fixture(scope="module")
def piped(tmp_path_factory, tiny_model_dir, tiny_tsv_dataset):
    """``fedtune run`` with stdout piped, then ``fedtune show`` of its run directory."""
    cwd = tmp_path_factory.mktemp("show")
    (cwd / "c.yaml").write_text("name: piped\noutput_dir: runs\n")
    overrides = [f"model.name={tiny_model_dir}", f"data.name={tiny_tsv_dataset}", "data.text_column=sentence",
                 "data.label_column=label", "partition.num_clients=3", "partition.client_test_fraction=0.2",
                 "eval.per_client=true", "federation.rounds=2", "train.local_steps=2", "threads=1",
                 f"log.tensorboard={str(HAS_TENSORBOARD).lower()}"]
    run = _cli("run", "c.yaml", *(a for o in overrides for a in ("-o", o)), cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    show = _cli("show", "runs/piped", cwd=cwd)
    assert show.returncode == 0, show.stderr[-3000:]
    rows = [json.loads(line) for line in (cwd / "runs" / "piped" / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(run=run, show=show, rows=rows, run_dir=cwd / "runs" / "piped")


def test_piped_run_prints_one_plain_line_per_round(piped):
    lines = piped.run.stdout.splitlines()
    assert "\x1b[" not in piped.run.stdout  # no bars, no colours: plain text for files and CI logs
    round_lines = [line for line in lines if re.match(r"round \d+/2  (?!evaluating)", line)]
    assert [line.split()[1] for line in round_lines] == ["0/2", "1/2", "2/2"]
    first, middle, last = round_lines
    assert "train_loss" not in first and "eval/accuracy" in first and "client_eval/accuracy" in first
    assert f"train_loss {piped.rows[1]['train_loss']:.4f}" in middle
    assert f"eval/accuracy {piped.rows[1]['eval/accuracy']:.4f}" in middle
    assert re.search(r"  \d+\.\d s  \d+\.\d s left$", middle), middle  # the round's seconds, the run's time left
    assert "left" not in last
    assert "accuracy_std" not in middle  # spreads are in metrics.jsonl and `fedtune show`, not the progress line


def test_piped_run_says_it_loads_the_model_and_what_it_evaluates(piped):
    lines = piped.run.stdout.splitlines()
    loading = next(i for i, line in enumerate(lines) if line.startswith("loading model "))
    assert loading < next(i for i, line in enumerate(lines) if line.startswith("round "))
    assert re.match(r"model .*: \d+\.\dM parameters, a new 2-label classification head; training [\d,]+ \(",
                    lines[loading + 1]), lines[loading + 1]
    n_client_tests = sum(c["n"] for c in piped.rows[0]["client_metrics"].values())
    for rnd in (0, 1, 2):
        assert f"round {rnd}/2  evaluating 40 examples of the eval split" in lines
        assert f"round {rnd}/2  evaluating {n_client_tests} examples of the test shards of 3 clients" in lines


def test_run_output_carries_no_transformers_load_report(piped):
    out = piped.run.stdout + piped.run.stderr
    assert "LOAD REPORT" not in out and "MISSING" not in out and "newly initialized" not in out
    assert "Warning" not in out, out


def test_metrics_rows_keep_each_clients_metrics(piped):
    for row in piped.rows:
        clients = row["client_metrics"]
        assert sorted(clients) == ["0", "1", "2"]
        n = np.array([c["n"] for c in clients.values()])
        acc = np.array([c["accuracy"] for c in clients.values()])
        assert n.min() > 0 and {"loss", "macro_f1"} <= set(clients["0"])
        # the logged mean and spread are those of the clients' own metrics
        assert row["client_eval/accuracy"] == pytest.approx(np.average(acc, weights=n))
        assert row["client_eval/accuracy_std"] == pytest.approx(acc.std())


def test_show_prints_the_round_table(piped):
    lines = piped.show.stdout.splitlines()
    assert lines[0].split() == ["piped", "·", "fedit", "·", "2/2", "rounds"]
    table = {int(m[1]): line for line in lines if (m := re.match(r"\s*(\d+)\s+\d+\s+(-|\d\.\d{4})\s", line))}
    assert sorted(table) == [0, 1, 2]
    for row in piped.rows:
        cells = table[row["round"]].split()
        assert f"{row['eval/accuracy']:.4f}" in cells and f"{row['client_eval/accuracy_std']:.4f}" in cells
    assert table[0].split()[2] == "-"  # round 0 trains nothing
    assert table[2].split()[2] == f"{piped.rows[2]['train_loss']:.4f}"
    assert f"{human_bytes(piped.rows[2]['cum_bytes_up'])}  " in table[2]
    for header in ("round", "clients", "train", "accuracy", "std", "(total)", "time"):
        assert header in piped.show.stdout


@pytest.mark.skipif(not HAS_TENSORBOARD, reason=NO_TENSORBOARD)
def test_log_tensorboard_writes_every_number_of_each_row(piped):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((piped.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/accuracy", "client_eval/accuracy_std", "train_loss", "cum_bytes_up", "time_round_s",
            "client_metrics/2/accuracy"} <= tags
    assert "round" not in tags
    logged = {e.step: e.value for e in acc.Scalars("eval/accuracy")}
    assert logged == {r["round"]: pytest.approx(r["eval/accuracy"], abs=1e-6) for r in piped.rows}
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]  # round 0 has no train loss


# --------------------------------------------------------------------------- the plain lines, directly


def test_round_line_formats_a_round():
    row = {"round": 3, "train_loss": 0.69251, "eval/accuracy": 0.8125, "client_eval/accuracy": 0.75,
           "client_eval/accuracy_std": 0.1, "client_metrics": {"0": {"accuracy": 0.75}}, "missing": [4],
           "rejected": [], "time_round_s": 14.21, "cum_bytes_up": 100}
    assert round_line(row, 10, left_s=114.0) == (
        "round 3/10  train_loss 0.6925  eval/accuracy 0.8125  client_eval/accuracy 0.7500  missing clients [4]  "
        "14.2 s  1m 54s left")
    initial = {"round": 0, "train_loss": None, "eval/loss": 0.7, "time_round_s": 2.0}
    assert round_line(initial, 10) == "round 0/10  eval/loss 0.7000  2.0 s"
    assert eval_line(4, 10, "the eval split", 1872) == "round 4/10  evaluating 1,872 examples of the eval split"


def test_run_progress_without_a_terminal_prints_plain_lines_and_the_time_left():
    out = io.StringIO()
    clock = iter([100.0, 130.0, 160.0])  # round 1 starts at 100 s; rounds 1 and 2 end at 130 s and 160 s
    decided = SimpleNamespace(decisions=lambda rnd, metrics: [f"round {rnd}: {metrics}"] if metrics else [])
    exp = SimpleNamespace(cfg=SimpleNamespace(federation=SimpleNamespace(rounds=5), train=SimpleNamespace()),
                          shards=[], steps_multiplier=1, algorithm=decided)
    with RunProgress(Console(file=out, width=40), exp, steps=False, now=lambda: next(clock)) as progress:
        assert not progress.bars
        progress.on_round_start(1, [])
        progress.on_eval_start(1, "the eval split", 8)
        progress.on_round_end({"round": 1, "train_loss": 0.5, "time_round_s": 30.0, "agg/clusters": 2})
        progress.on_round_end({"round": 2, "train_loss": 0.4, "time_round_s": 30.0})
    assert out.getvalue().splitlines() == [
        "round 1/5  evaluating 8 examples of the eval split",
        "round 1/5  train_loss 0.5000  30.0 s  2m 00s left",  # 4 rounds to go at 30 s each; never wrapped
        "round 1: {'clusters': 2}",  # the algorithm's own line on what it decided, from the row's agg/ keys
        "round 2/5  train_loss 0.4000  30.0 s  1m 30s left",
    ]


def test_model_loading_is_quiet_and_leaves_transformers_logging_as_it_was(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    from fedtune.config import ModelConfig
    from fedtune.models.base import load_classifier

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        load_classifier(ModelConfig(name=str(tiny_model_dir)), num_labels=3)
        assert hf_logging.get_verbosity() == hf_logging.WARNING  # silenced while loading, not for the process
    finally:
        hf_logging.set_verbosity(before)
    captured = capfd.readouterr()
    assert "MISSING" not in captured.out + captured.err
