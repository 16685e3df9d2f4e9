"""The fedtune command line.

User errors are checked through the console script's ``main`` (one line ``error: ...``
on stderr, status 2, no traceback): two of them each in its own process, as a user runs
them, and the others in one more process that calls ``main`` once per case, because each
process pays seconds of imports (on 2 cores, eleven processes took a minute). The
processes start together. So are ``fedtune config init`` piped to a file and run as it
is, and the resume messages. Listings and reports run in-process through CliRunner.
"""

import json
import os
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field
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
    "list field given a comma string": (["config", "show", "c.yaml", "-o", "lora.target_modules=q,v"],
                                        "lora.target_modules is a list: write -o lora.target_modules=[q,v]"),
    "unknown runtime": (["run", "c.yaml", "--runtime", "bogus"], "Invalid value for '--runtime': 'bogus'"),
    "unknown algorithm": (["run", "c.yaml", "-o", "algorithm.name=nope"], "unknown algorithm 'nope'"),
    "unknown dataset": (["run", "c.yaml", "-o", "data.name=nope"], "unknown dataset 'nope'"),
    "unknown model": (["run", "c.yaml", *TINY_DATA, "-o", "model.name=nope"], "unknown model 'nope'"),
    "unwritable output folder": (["run", "c.yaml", "-o", "output_dir=afile/runs"], "cannot write run directory"),
    "report on a non-run folder": (["report", "notarun"], "is not a run directory"),
    "one-label CSV": (["run", "c.yaml", "-o", "data.name=one.csv"],
                      "label column 'label' of one.csv holds one value ('pos') in all its 3 usable rows; "
                      "a classifier needs at least two labels"),
    "show on a non-run folder": (["show", "notarun"], "is not a run directory"),
}


OWN_PROCESS = ("missing config file", "unknown model")
"""Cases run as ``python -m fedtune.cli`` on their own: the lightest path, and the one that imports and loads most."""

MAIN_PER_CASE = """\
import contextlib, io, json, sys, traceback
from fedtune.cli import main
results = {}
for case, args in json.loads(sys.argv[1]).items():
    out, err, sys.argv = io.StringIO(), io.StringIO(), ["fedtune", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # what the interpreter would print and exit with
            traceback.print_exc()
            code = 1
    results[case] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""
"""Calls ``fedtune.cli.main`` once per case (``argv[1]``: ``{case: arguments}``) in one process; prints
``{case: [status, stdout, stderr]}`` as JSON."""


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    """Every error case, all at once, in a folder holding its inputs: (status, stdout, stderr) per case."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "c.yaml").write_text(CONFIG)
    (cwd / "d.csv").write_text("text,label\ngood fun,pos\nawful,neg\nfine film,pos\ndull,neg\n")
    (cwd / "one.csv").write_text("text,label\ngood fun,pos\nfine film,pos\ngreat,pos\n")
    (cwd / "afile").write_text("a regular file, not a folder\n")
    (cwd / "notarun").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def start(*args):
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    own = {case: start("-m", "fedtune.cli", *ERROR_CASES[case][0]) for case in OWN_PROCESS}
    shared = start("-c", MAIN_PER_CASE, json.dumps({c: a for c, (a, _) in ERROR_CASES.items() if c not in own}))
    out, err = shared.communicate(timeout=300)
    assert shared.returncode == 0, err[-3000:]
    results = {case: tuple(r) for case, r in json.loads(out).items()}
    for case, proc in own.items():
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


# --------------------------------------------------------------------------- config init → run → resume

SMALL = ["-o", "federation.rounds=1", "-o", "train.local_steps=1", "-o", "data.max_train_examples=800",
         "-o", "data.max_eval_examples=32", "-o", "threads=1", "-q"]


def _cli(cwd, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(procs):
    """(status, stdout, stderr) of each process, once all have ended."""
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[key] = (proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def starters(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    """``fedtune config init`` for each task piped to a file and run as it is (tiny model, small sizes), then
    resumed: as it was (finished), with a changed key, and under a name that never ran."""
    cwd = tmp_path_factory.mktemp("starters")
    models = {"classification": tiny_model_dir, "sft": tiny_llama_dir}
    inits = _wait({task: _cli(cwd, "config", "init", "--task", task) for task in models})
    for task, (code, out, err) in inits.items():
        assert code == 0 and not err, err
        (cwd / f"{task}.yaml").write_text(out)
    args = {task: [f"{task}.yaml", "-o", f"model.name={model}", *SMALL] for task, model in models.items()}
    a = args["classification"]
    runs = _wait({**{task: _cli(cwd, "run", *a) for task, a in args.items()},
                  "never ran": _cli(cwd, "run", *a, "-o", "name=never", "--resume")})
    resumes = _wait({
        "finished": _cli(cwd, "run", *a, "-o", "threads=2", "--resume"),
        "changed": _cli(cwd, "run", *a, "-o", "lora.r=4", "-o", "train.lr=0.01", "--resume"),
    })
    return cwd, inits, runs, resumes


def test_config_init_runs_as_it_is(starters):
    cwd, inits, runs, _ = starters
    for task, metric in (("classification", "eval/accuracy"), ("sft", "client_eval/perplexity")):
        code, out, err = runs[task]
        assert code == 0, err[-3000:]
        assert out.startswith(f"run dir runs/my_{task}") and metric in out, out
        assert (cwd / "runs" / f"my_{task}" / "summary.json").is_file()
        assert inits[task][1].startswith("# A starting") and "# The run's folder name" in inits[task][1]
    header = " ".join(line.lstrip("# ") for line in inits["classification"][1].split("\n\n")[0].splitlines())
    assert ("Each round trains a sampled 50% of the clients (federation.fraction; remove it to train all). Accuracy "
            "per client needs partition.client_test_fraction > 0 (each client's own test rows) and eval.per_client: "
            "true.") in header
    assert "Each round trains" not in inits["sft"][1] and "Accuracy per client needs" not in inits["sft"][1]


def test_resuming_a_finished_run_says_so_and_changes_nothing(starters):
    cwd, _, _, resumes = starters
    code, out, err = resumes["finished"]
    assert (code, out, err) == (0, "run runs/my_classification is finished (1 round); nothing to resume\n", "")


def test_resume_with_a_changed_config_names_the_keys(starters):
    code, _, err = starters[3]["changed"]
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: cannot resume runs/my_classification: its config differs (lora.r: 8 in the run, "
                          "4 now; train.lr: 0.003 in the run, 0.01 now); resume with the run's settings")


def test_resume_of_a_run_that_never_started_says_so(starters):
    code, _, err = starters[2]["never ran"]
    assert (code, err) == (2, "error: cannot resume: there is no run at runs/never; start it without --resume\n")


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
    latin = tmp_path / "l.tsv"
    latin.write_bytes('text\tlabel\n"un café\texquis"\tpos\nbad\tneg\n'.encode("latin-1"))
    out = invoke("data", "show", str(latin), "--encoding", "latin-1")
    assert "train 2" in out and "un café exquis" in " ".join(out.split())


def test_algorithms_lists_requirements_and_options_with_meaning_and_allowed_values(monkeypatch):
    from fedtune.algorithms import ALGORITHMS, Algorithm

    class ProxOptions(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        mu: float = Field(default=0.01, ge=0)
        """Weight of the proximal term."""
        warmup: Literal["none", "linear"] = "none"

    class Prox(Algorithm):
        name = "proxy"
        summary = "a test algorithm with options"
        Options = ProxOptions
        requires = "train.optimizer: sgd"
        personalized = True

        def aggregate(self, rnd, updates, state):
            return state

    monkeypatch.setitem(ALGORITHMS, "proxy", Prox)
    out = invoke("algorithms")
    assert all(f"\n{name}: {cls.summary}\n" in out for name, cls in ALGORITHMS.items())
    assert "  requires: partition.client_test_fraction > 0 (each client is evaluated on its own test shard); " \
           "train.optimizer: sgd\n" in out
    assert "    mu=0.01 [float ≥ 0]: Weight of the proximal term.\n" in out
    assert "    warmup=none [one of: none, linear]\n" in out
    assert "\nflora: " in out and "meant for heterogeneous ranks: lora.client_ranks" in out
    assert "fedit: FedAvg of the trained tensors (LoRA A, B and head, or every parameter), weighted by client data "\
           "size\n  requires: nothing beyond the " \
           "defaults\n  options: none\n" in out


def test_models_give_kind_size_and_weights(monkeypatch):
    from fedtune.models.base import PACKAGED

    monkeypatch.setenv("COLUMNS", "250")
    out = invoke("models")
    for name, pkg in PACKAGED.items():
        assert name in out and pkg.kind in out and pkg.weights in out
    assert "22.7M" in out and "134.5M" in out
    assert "Q4_1 GGUF" in " ".join(out.split())  # the SmolLM2 figures are on dequantised Q4_1 weights


def test_packaged_parameter_counts_match_the_weight_files():
    """Counted from the files' tensor headers, without loading the weights."""
    import math

    import gguf
    from safetensors import safe_open

    from fedtune.models.base import PACKAGED

    minilm, smollm = PACKAGED["minilm"], PACKAGED["smollm2-135m"]
    with safe_open(str(minilm.folder() / "model.safetensors"), "pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == minilm.parameters
    reader = gguf.GGUFReader(smollm.folder() / smollm.gguf)
    assert sum(int(t.n_elements) for t in reader.tensors) == smollm.parameters


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


def test_ctrl_c_during_a_run_says_how_to_resume_it(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedtune.config.load_config", interrupt)
    code, captured = run_main(monkeypatch, capsys, "run", "my.yaml", "-o", "name=a b", "--overwrite")
    assert code == 130 and captured.err == ("interrupted; continue the run after its last completed round with: "
                                            "fedtune run my.yaml -o 'name=a b' --resume\n")


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
