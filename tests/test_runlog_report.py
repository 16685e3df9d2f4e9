import json
import sys

import numpy as np
import pytest
from rich.console import Console

from fedtune.errors import FedtuneError
from fedtune.report import build_report
from fedtune.runlog import RunLog, load_run, scalars, write_models
from fedtune.units import human_bytes, human_seconds


def fake_rows(accuracies, bytes_per_round):
    """Metrics rows as the engine writes them: round 0 evaluates the initial model and sends nothing."""
    rows, up, down = [], 0, 0
    for rnd, acc in enumerate(accuracies):
        sent = 0 if rnd == 0 else bytes_per_round
        up, down = up + sent, down + 2 * sent
        row = {
            "round": rnd, "lr": 5e-4, "clients": [] if rnd == 0 else [0, 1], "num_clients": 0 if rnd == 0 else 2,
            "train_loss": None if rnd == 0 else 1.0 / rnd, "train_examples": 0 if rnd == 0 else 64,
            "bytes_up": sent, "bytes_down": 2 * sent, "cum_bytes_up": up, "cum_bytes_down": down,
            "time_train_s": 1.0, "time_aggregate_s": 0.1, "time_eval_s": 0.4, "time_round_s": 1.5,
        }
        if acc is not None:
            row |= {"eval/accuracy": acc, "eval/loss": 1.0 - acc, "eval/n": 100}
        rows.append(row)
    return rows


def write_run(run_dir, algorithm, accuracies, bytes_per_round):
    log = RunLog(run_dir)
    log.write_config({"name": run_dir.name, "algorithm": {"name": algorithm, "options": {}}})
    log.write_json("partition.json", {"0": [1, 2], "1": [3]})
    for row in fake_rows(accuracies, bytes_per_round):
        log.log_round(row)
    log.write_summary({"final/eval/accuracy": accuracies[-1]})
    return run_dir


# --------------------------------------------------------------------------- RunLog


def test_runlog_writes_and_reads_back(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    log = RunLog(run_dir)
    log.write_config({"name": "a", "algorithm": {"name": "fedit"}})
    log.write_json("partition.json", {"sizes": np.array([3, 4]).tolist(), "n": np.int64(7)})
    log.log_round({"round": 0, "eval/accuracy": np.float32(0.5)})
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # on disk after each call
    log.log_round({"round": 1, "eval/accuracy": 0.75})
    log.write_summary({"rounds": 1})

    run = load_run(run_dir)
    assert run.name == "a"
    assert run.config == {"name": "a", "algorithm": {"name": "fedit"}}
    assert run.rows == [{"round": 0, "eval/accuracy": 0.5}, {"round": 1, "eval/accuracy": 0.75}]
    assert run.summary == {"rounds": 1}
    assert json.loads((run_dir / "partition.json").read_text()) == {"sizes": [3, 4], "n": 7}


def test_runlog_refuses_to_overwrite_a_run(tmp_path):
    log = RunLog(tmp_path / "a")
    log.log_round({"round": 0})
    with pytest.raises(FedtuneError, match=r"already holds a run.*-o name=.*--overwrite") as e:
        RunLog(tmp_path / "a")
    assert "\n" not in str(e.value)

    RunLog(tmp_path / "a", overwrite=True).log_round({"round": 0, "fresh": True})
    assert load_run(tmp_path / "a").rows == [{"round": 0, "fresh": True}]


def test_runlog_writes_into_a_folder_without_a_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("kept")
    RunLog(tmp_path / "a").log_round({"round": 0})
    assert (tmp_path / "a" / "notes.txt").read_text() == "kept"


def test_runlog_unwritable_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FedtuneError, match=r"cannot write run directory .*file/run: .*-o output_dir=") as e:
        RunLog(blocker / "run")
    assert "\n" not in str(e.value)


def test_load_run_rejects_non_run_dirs(tmp_path):
    with pytest.raises(FedtuneError, match="is not a run directory"):
        load_run(tmp_path)
    with pytest.raises(FedtuneError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": \n')
    with pytest.raises(FedtuneError, match=r"metrics.jsonl:2 is not a round's row"):
        load_run(tmp_path)


def test_a_torn_last_line_is_left_out_and_said(tmp_path):
    """A run killed while writing a row leaves its last line cut short: the rows before it load, and the run
    says so (``Run.torn``); a bad line anywhere else is still an error."""
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "train_lo')
    run = load_run(tmp_path)
    assert [r["round"] for r in run.rows] == [0, 1] and run.torn
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    assert not load_run(tmp_path).torn


def test_scalars_are_every_number_of_a_row_but_its_round():
    row = {"round": 2, "lr": 5e-4, "clients": [0, 1], "train_loss": None, "num_clients": 2, "ok": True,
           "eval/accuracy": np.float64(0.75), "client_metrics": {"0": {"accuracy": 0.5, "n": 4}}}
    assert dict(scalars(row)) == {"lr": 5e-4, "num_clients": 2.0, "eval/accuracy": 0.75,
                                  "client_metrics/0/accuracy": 0.5, "client_metrics/0/n": 4.0}


def test_runlog_tensorboard_needs_the_package_before_it_writes(tmp_path, monkeypatch):
    RunLog(tmp_path / "a").log_round({"round": 0})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(FedtuneError, match=r"log.tensorboard .* not installed; pip install tensorboard") as e:
        RunLog(tmp_path / "a", overwrite=True, tensorboard=True)
    assert "\n" not in str(e.value)
    assert load_run(tmp_path / "a").rows == [{"round": 0}]  # the run it would have replaced is still there


def _event_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps += [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    return steps


def test_runlog_tensorboard_mirrors_metrics_jsonl_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    log = RunLog(tmp_path / "a", tensorboard=True)
    rows = [{"round": r, "eval/accuracy": 0.5 + r / 10} for r in range(4)]
    for row in rows:
        log.log_round(row)
    assert _event_steps(tmp_path / "a" / "tensorboard", "eval/accuracy") == [0, 1, 2, 3]  # flushed per row
    log.close()
    # a resume keeps rows up to its checkpoint (round 1) and logs them again into a fresh run log
    (tmp_path / "a" / "metrics.jsonl").unlink()
    log = RunLog(tmp_path / "a", tensorboard=True)
    for row in rows[:2]:
        log.log_round(row)
    log.close()
    assert _event_steps(tmp_path / "a" / "tensorboard", "eval/accuracy") == [0, 1]


# --------------------------------------------------------------------------- report


def test_human_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3_210_000) == "3.2 MB"
    assert human_seconds(8.44) == "8.4 s"
    assert human_seconds(185) == "3m 05s"
    assert human_seconds(7620) == "2h 07m"


def test_report_compares_two_runs(tmp_path):
    a = write_run(tmp_path / "runs" / "fedit-a", "fedit", [0.5, 0.7, None, 0.9, 0.8], 1_000_000)
    b = write_run(tmp_path / "runs" / "local-b", "local", [0.5, 0.6, 0.65], 0)  # never communicates

    report = build_report([a, b])
    assert report.metric == "eval/accuracy"
    assert report.out_dir == tmp_path / "runs" / "report" / "fedit-a+local-b"
    ra, rb = report.rows
    assert (ra["name"], ra["algorithm"], ra["rounds"]) == ("fedit-a", "fedit", 4)
    assert (ra["final"], ra["best"], ra["best_round"]) == (0.8, 0.9, 3)
    assert (ra["bytes_up"], ra["bytes_down"]) == (4_000_000, 8_000_000)
    assert ra["wall_time_s"] == pytest.approx(5 * 1.5)
    assert (rb["name"], rb["algorithm"], rb["rounds"]) == ("local-b", "local", 2)
    assert (rb["final"], rb["best_round"]) == (0.65, 2)
    assert (rb["bytes_up"], rb["bytes_down"]) == (0, 0)

    console = Console(record=True, width=200)
    console.print(report.table)
    text = console.export_text()
    assert "fedit-a" in text and "local-b" in text and "4.0 MB" in text and "0 B" in text and "0.9000 (3)" in text
    assert report.table.row_count == 2

    assert [p.name for p in report.plots] == ["eval_accuracy_vs_round.png", "eval_accuracy_vs_bytes.png"]
    for p in report.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    saved = json.loads((report.out_dir / "report.json").read_text())
    assert saved["metric"] == "eval/accuracy" and saved["runs"] == report.rows


def test_report_single_run_lower_is_better_and_metric_choice(tmp_path):
    a = write_run(tmp_path / "a", "fedit", [0.5, 0.9, 0.7], 100)
    report = build_report([a], metric="eval/loss")
    assert report.out_dir == a
    assert (report.rows[0]["best"], report.rows[0]["best_round"]) == (pytest.approx(0.1), 1)
    assert (a / "eval_loss_vs_round.png").stat().st_size > 0


def test_report_missing_metric_lists_available(tmp_path):
    a = write_run(tmp_path / "a", "fedit", [0.5, 0.9], 100)
    expected = r"run a has no metric 'eval/rouge_l'; available: eval/accuracy, eval/loss$"
    with pytest.raises(FedtuneError, match=expected) as e:
        build_report([a], metric="eval/rouge_l")
    assert "\n" not in str(e.value)


def test_reports_of_different_runs_do_not_overwrite_each_others_plots(tmp_path):
    runs = [write_run(tmp_path / "runs" / name, "fedit", [0.5, 0.6], 1000) for name in ("a", "b", "c")]
    first, second = build_report(runs[:2]), build_report(runs[1:])
    assert first.out_dir == tmp_path / "runs" / "report" / "a+b" and second.out_dir.name == "b+c"
    assert all(p.is_file() for p in first.plots + second.plots) and not set(first.plots) & set(second.plots)
    many = [write_run(tmp_path / "runs" / f"a-long-run-name-{i:02d}", "fedit", [0.5], 0) for i in range(6)]
    folder = build_report(many).out_dir.name
    assert folder.startswith("a-long-run-name-00+5-more-") and len(folder) < 80


def test_report_without_eval_metrics_shows_train_loss_and_bytes(tmp_path):
    a = write_run(tmp_path / "a", "fedit", [None, None, None], 1000)
    report = build_report([a])
    assert report.metric == "train_loss"
    assert report.note == ("no eval metrics in run a: showing train_loss and bytes instead "
                           "(set data.eval_fraction or data.eval_split to evaluate a run)")
    row = report.rows[0]
    assert (row["final"], row["best"], row["best_round"], row["bytes_up"]) == (0.5, 0.5, 2, 2000)
    assert [p.name for p in report.plots] == ["train_loss_vs_round.png", "train_loss_vs_bytes.png"]
    b = write_run(tmp_path / "b", "fedit", [0.5, 0.7], 1000)
    assert build_report([a, b]).note.startswith("no eval metrics in run a:")
    assert build_report([b]).note is None


def test_report_lists_the_value_each_client_holds(tmp_path):
    a = write_run(tmp_path / "a", "fedit", [0.5, 0.7], 1000)
    partition = {"sizes": [40, 38], "group_column": "site", "client_groups": [["site_a"], ["site_b"]]}
    (a / "partition.json").write_text(json.dumps(partition))
    report = build_report([a])
    console = Console(record=True, width=120)
    for table in report.clients:
        console.print(table)
    text = console.export_text()
    assert "a: clients by site" in text
    rows = [line.split() for line in text.splitlines() if "site_" in line]
    assert rows == [["0", "site_a", "40"], ["1", "site_b", "38"]]
    assert build_report([write_run(tmp_path / "b", "fedit", [0.5], 0)]).clients == []
    (a / "partition.json").write_text(json.dumps({**partition, "train_sizes": [32, 30], "test_sizes": [8, 8]}))
    console = Console(record=True, width=120)
    for table in build_report([a]).clients:
        console.print(table)
    text = console.export_text()
    assert [line.split() for line in text.splitlines() if "site_" in line] == [["0", "site_a", "32", "8"],
                                                                            ["1", "site_b", "30", "8"]]
    assert "train   test" in text


def test_report_gives_each_clients_model_and_final_metric_and_the_mean_per_group(tmp_path):
    log = RunLog(tmp_path / "c")
    log.write_config({"name": "c", "algorithm": {"name": "clustered", "options": {}}})
    log.write_json("partition.json", {"sizes": [10, 20, 30], "group_column": "language",
                                      "client_groups": [["en"], ["pt"], ["en", "pt"]]})
    write_models(tmp_path / "c", {0: "cluster_0", 1: "cluster_1", 2: "cluster_0"}, ["cluster_0", "cluster_1"])
    per_client = {"0": {"accuracy": 0.9, "n": 5}, "1": {"accuracy": 0.5, "n": 5}, "2": {"accuracy": 0.7, "n": 5}}
    log.log_round({"round": 1, "eval/cluster_0/accuracy": 0.4, "client_eval/accuracy": 0.6,
                   "client_metrics": {"0": {"accuracy": 0.1}}})
    log.log_round({"round": 2, "eval/cluster_0/accuracy": 0.5, "client_eval/accuracy": 0.7,
                   "client_metrics": per_client})
    report = build_report([tmp_path / "c"])
    assert report.metric == "client_eval/accuracy"  # the clients' mean, not the first of several models
    assert report.rows[0]["per_group"] == {"en": {"mean": pytest.approx(0.8), "clients": 2},
                                           "pt": {"mean": pytest.approx(0.6), "clients": 2}}
    console = Console(record=True, width=140)
    for table in report.clients:
        console.print(table)
    text = console.export_text()
    rows = [line.split() for line in text.splitlines() if "cluster_" in line]
    assert rows == [["0", "en", "10", "cluster_0", "0.9000"], ["1", "pt", "20", "cluster_1", "0.5000"],
                    ["2", "en,", "pt", "30", "cluster_0", "0.7000"]]
    assert "c: client_eval/accuracy by language (mean over its clients)" in " ".join(text.split())
    assert [line.split() for line in text.splitlines() if line.split()[:1] in (["en"], ["pt"])] == [
        ["en", "2", "0.8000"], ["pt", "2", "0.6000"]]
    assert json.loads((tmp_path / "c" / "report.json").read_text())["runs"][0]["per_group"]["en"]["clients"] == 2
    assert build_report([tmp_path / "c"], metric="client_eval/accuracy").rows[0]["per_group"]


def test_summary_best_and_report_unweighted_client_mean(tmp_path):
    from fedtune.runlog import best_values

    rows = fake_rows([0.5, 0.7, 0.6], 100)
    for row, (pooled, plain) in zip(rows, [(0.5, 0.4), (0.7, 0.6), (0.65, 0.75)]):
        row |= {"client_eval/accuracy": pooled, "client_eval_unweighted/accuracy": plain, "client_eval/n": 9}
    best = best_values(rows)
    assert best["client_eval_unweighted/accuracy"] == {"value": 0.75, "round": 2}
    assert best["eval/loss"] == {"value": pytest.approx(0.3), "round": 1} and "client_eval/n" not in best
    log = RunLog(tmp_path / "a")
    log.write_config({"name": "a", "algorithm": {"name": "fedit"}})
    for row in rows:
        log.log_round(row)
    report = build_report([tmp_path / "a"], metric="client_eval/accuracy")
    r = report.rows[0]
    assert (r["final"], r["best"], r["best_round"]) == (0.65, 0.7, 1)
    assert r["unweighted"] == {"metric": "client_eval_unweighted/accuracy", "final": 0.75, "final_round": 2,
                               "best": 0.75, "best_round": 2}
    console = Console(record=True, width=200)
    console.print(report.table)
    text = console.export_text()
    assert "0.7500 (2)" in text and "unweighted" in text
