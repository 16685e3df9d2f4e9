"""The fedtune command line.

User errors are checked on a real process (one line ``error: ...`` on stderr,
status 2, no traceback); the processes start together because each pays
seconds of imports. Listings and reports run in-process through CliRunner.
"""

import os
import subprocess
import sys

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from fedtune.cli import app, main
from fedtune.runlog import RunLog

CONFIG = "name: t\noutput_dir: out\nfederation:\n  rounds: 1\n"
TINY_DATA = ["-o", "data.name=d.csv", "-o", "data.text_column=text", "-o", "data.label_column=label",
             "-o", "partition.num_clients=2"]

# case: (arguments, a part of the expected message)
ERROR_CASES = {
    "missing config file": (["run", "missing.yaml"], "config file not found: missing.yaml"),
    "config typo": (["run", "c.yaml", "-o", "lora.rank=4"], "unknown key 'lora.rank'"),
    "unknown runtime": (["run", "c.yaml", "--runtime", "bogus"], "Invalid value for '--runtime': 'bogus'"),
    "unknown algorithm": (["run", "c.yaml", "-o", "algorithm.name=nope"], "unknown algorithm 'nope'"),
    "unknown dataset": (["run", "c.yaml", "-o", "data.name=nope"], "unknown dataset 'nope'"),
    "unknown model": (["run", "c.yaml", *TINY_DATA, "-o", "model.name=nope"], "unknown model 'nope'"),
    "unwritable output folder": (["run", "c.yaml", "-o", "output_dir=afile/runs"], "cannot write run directory"),
    "report on a non-run folder": (["report", "notarun"], "is not a run directory"),
    "one-label CSV": (["run", "c.yaml", "-o", "data.name=one.csv"],
                      "label column 'label' of one.csv holds one value ('pos') in all its 3 usable rows; "
                      "a classifier needs at least two labels"),
}


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    """Every error case, run at once as ``python -m fedtune.cli`` in a folder holding its inputs."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "c.yaml").write_text(CONFIG)
    (cwd / "d.csv").write_text("text,label\ngood fun,pos\nawful,neg\nfine film,pos\ndull,neg\n")
    (cwd / "one.csv").write_text("text,label\ngood fun,pos\nfine film,pos\ngreat,pos\n")
    (cwd / "afile").write_text("a regular file, not a folder\n")
    (cwd / "notarun").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = {
        case: subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for case, (args, _) in ERROR_CASES.items()
    }
    results = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[case] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_error_is_one_line_with_status_2(errors, case):
    _, expected = ERROR_CASES[case]
    returncode, stdout, stderr = errors[case]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert "Traceback" not in stdout + stderr
    assert returncode == 2


# --------------------------------------------------------------------------- in-process

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_data_list_shows_every_registered_dataset():
    from fedtune.data import REGISTRY

    out = invoke("data", "list")
    assert all(name in out for name in REGISTRY)


def test_data_show_describes_a_users_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood fun,pos\nawful,neg\nfine film,pos\n")
    out = invoke("data", "show", str(path), "--text-column", "text", "--label-column", "label")
    assert "(classification)" in out and "train 3" in out
    assert "0 neg (1), 1 pos (2)" in out
    assert "good fun" in out


def test_algorithms_lists_names_summaries_and_option_defaults(monkeypatch):
    from fedtune.algorithms import ALGORITHMS, Algorithm

    class ProxOptions(BaseModel):
        mu: float = 0.01
        warmup: int = 2

    class Prox(Algorithm):
        name = "proxy"
        summary = "a test algorithm with options"
        Options = ProxOptions

    monkeypatch.setitem(ALGORITHMS, "proxy", Prox)
    out = invoke("algorithms")
    assert all(name in out for name in ("fedit", "local", "centralized", "proxy"))
    assert "mu=0.01" in out and "warmup=2" in out


def test_models_lists_the_packaged_models():
    from fedtune.models.base import PACKAGED

    out = invoke("models")
    assert all(name in out for name in PACKAGED)


def write_run(run_dir):
    log = RunLog(run_dir)
    log.write_config({"name": run_dir.name, "algorithm": {"name": "fedit", "options": {}}})
    up = 0
    for rnd, acc in enumerate([0.5, 0.7, 0.8]):
        up += 1000 * (rnd > 0)
        log.log_round({"round": rnd, "cum_bytes_up": up, "cum_bytes_down": 2 * up, "time_round_s": 1.0,
                       "eval/accuracy": acc, "eval/loss": 1 - acc, "eval/n": 10})
    return run_dir


def test_report_prints_the_table_and_the_plots(tmp_path):
    run_dir = write_run(tmp_path / "runs" / "a")
    out = invoke("report", str(run_dir))
    assert "eval/accuracy — 1 run" in out and "0.8000" in out
    written = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
    assert written == [str(run_dir / "eval_accuracy_vs_round.png"), str(run_dir / "eval_accuracy_vs_bytes.png")]
    assert all(os.path.isfile(p) for p in written)


def test_report_metric_and_out(tmp_path):
    runs = [write_run(tmp_path / "runs" / name) for name in ("a", "b")]
    out = invoke("report", *map(str, runs), "--metric", "eval/loss", "--out", str(tmp_path / "cmp"))
    assert "eval/loss — 2 runs" in out
    assert (tmp_path / "cmp" / "eval_loss_vs_round.png").is_file()


def test_run_help_names_the_runtimes():
    out = invoke("run", "--help")
    assert "--runtime" in out and "inprocess" in out


# --------------------------------------------------------------------------- main()


def run_main(monkeypatch, capsys, *args: str):
    monkeypatch.setattr(sys, "argv", ["fedtune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr()


def test_main_prints_a_fedtune_error_as_one_line(monkeypatch, capsys):
    code, captured = run_main(monkeypatch, capsys, "run", "c.yaml", "--resume", "--overwrite")
    assert code == 2
    assert captured.err.startswith("error: --resume continues a run") and captured.err.count("\n") == 1


def test_main_reports_ctrl_c_as_interrupted_with_status_130(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr("fedtune.data.list_datasets", interrupt)
    code, captured = run_main(monkeypatch, capsys, "data", "list")
    assert code == 130 and captured.err == "interrupted\n"


def test_main_turns_a_pydantic_error_into_one_line(monkeypatch, capsys):
    class Limits(BaseModel):
        r: int

    monkeypatch.setattr("fedtune.data.list_datasets", lambda: Limits(r="many"))
    code, captured = run_main(monkeypatch, capsys, "data", "list")
    assert code == 2
    assert captured.err.startswith("error: r: Input should be a valid integer") and captured.err.count("\n") == 1


def test_main_exits_0_on_success_and_on_help(monkeypatch, capsys):
    code, captured = run_main(monkeypatch, capsys, "--help")
    assert code in (0, None) and "Usage" in captured.out
    code, _ = run_main(monkeypatch, capsys, "data", "list")
    assert code in (0, None)
