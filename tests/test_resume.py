"""Checkpoint and resume: a run killed after round 2 of 4 and resumed ends like an uninterrupted one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.run import execute
from fedtune.runlog import RunLog, load_run
from fedtune.runtime.checkpoint import load_checkpoint
from test_flower import adapter, max_diff, tiny_cfg

KILLED_RUN = textwrap.dedent("""
    import sys, time
    import fedtune.runtime.inprocess as inprocess
    from fedtune.config import RunConfig
    from fedtune.run import execute

    real = inprocess.client_round

    def slow_from_round_3(exp, cid, rnd, *args, **kw):
        if rnd >= 3:
            time.sleep(600)  # the test SIGKILLs us here
        return real(exp, cid, rnd, *args, **kw)

    inprocess.client_round = slow_from_round_3
    execute(RunConfig.model_validate_json(sys.argv[1]))
""")


class Stop(BaseException):
    """Stands for the process being stopped (the in-process pool absorbs only Exceptions)."""


def execute_stopped_at(cfg, rnd: int, monkeypatch) -> None:
    """Run ``cfg`` in-process and stop it (:class:`Stop`) as round ``rnd`` begins: rounds before it are checkpointed."""
    import fedtune.runtime.inprocess as inprocess

    real = inprocess.client_round

    def stop_at(exp, cid, r, *args, **kw):
        if r >= rnd:
            raise Stop
        return real(exp, cid, r, *args, **kw)

    monkeypatch.setattr(inprocess, "client_round", stop_at)
    with pytest.raises(Stop):
        execute(cfg)
    monkeypatch.undo()


def _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, **over):
    # a stateful algorithm too: LocalOnly's per-client adapters must come back from the checkpoint
    return tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, name, federation={"rounds": 4},
                    train={"local_steps": 2, "batch_size": 8, "lr": 2e-2, "lr_schedule": "cosine"}, **over)


def _kill_after_round_2(cfg):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, cfg.model_dump_json()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    meta = cfg.run_dir / "checkpoint" / "checkpoint.json"
    try:
        deadline = time.monotonic() + 120
        while not (meta.is_file() and json.loads(meta.read_text())["round"] == 2):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never checkpointed round 2"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (cfg.run_dir / "summary.json").exists()


@pytest.mark.parametrize("algorithm", ["fedit", "local", "fedadam"])  # fedadam: server moments in the checkpoint
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, tiny_tsv_dataset, algorithm):
    over = {"algorithm": {"name": algorithm}}
    if algorithm == "local":
        over["partition__client_test_fraction"] = 0.25
    full = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, f"full_{algorithm}", **over)
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, f"cut_{algorithm}", **over)
    execute(full)
    _kill_after_round_2(cut)
    with pytest.raises(FedtuneError, match="already holds a run"):
        execute(cut)  # neither resume nor overwrite: refused
    execute(cut, resume=True)

    subs = ["adapter"] if algorithm != "local" else [f"adapters/client_{c}" for c in range(3)]
    for sub in subs:
        assert max_diff(adapter(full.run_dir, sub), adapter(cut.run_dir, sub)) <= 1e-6
    rows_full, rows_cut = load_run(full.run_dir).rows, load_run(cut.run_dir).rows
    assert [r["round"] for r in rows_cut] == [0, 1, 2, 3, 4]
    for a, b in zip(rows_full, rows_cut):
        assert (a["cum_bytes_up"], a["lr"], a["clients"]) == (b["cum_bytes_up"], b["lr"], b["clients"])
    assert load_run(cut.run_dir).summary["resumed_after_round"] == 2


def _files(run_dir):
    """Every file of a run directory with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_says_when_a_run_never_started(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "r")
    with pytest.raises(FedtuneError) as err:
        execute(cfg, resume=True)
    assert str(err.value) == f"cannot resume: there is no run at {cfg.run_dir}; start it without --resume"
    RunLog(cfg.run_dir).write_config(cfg.to_dict())  # what a run that crashed before round 0 ended leaves
    with pytest.raises(FedtuneError) as err:
        execute(cfg, resume=True)
    assert str(err.value) == (f"run {cfg.run_dir} has no completed round to resume; start it without --resume "
                              "(add --overwrite to replace the directory)")


def test_resume_names_the_differing_keys_and_leaves_a_finished_run_untouched(
        tmp_path, tiny_model_dir, tiny_tsv_dataset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "r")
    execute(cfg)
    ckpt = load_checkpoint(cfg.run_dir)
    assert ckpt.round == 2 and ckpt.client_states is not None
    before = _files(cfg.run_dir)

    changed = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "r", seed=4, lora={"r": 8, "alpha": 8})
    with pytest.raises(FedtuneError) as err:
        execute(changed, resume=True)
    assert f"cannot resume {cfg.run_dir}: its config differs (seed: 3 in the run, 4 now; lora.r: 4 in the run, " \
           "8 now); resume with the run's settings" in str(err.value)

    neutral = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "r", threads=2)  # cannot change results
    result = execute(neutral, resume=True)
    assert result.already_finished and result.final == load_run(cfg.run_dir).summary["final"]
    assert _files(cfg.run_dir) == before  # nothing rewritten


def test_a_moved_run_resumes_under_its_new_name_and_threads(tmp_path, tiny_model_dir, tiny_tsv_dataset):
    """Output paths and threads may differ on resume; config.yaml then records where the run is now."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "before")
    execute(cfg)
    moved = tiny_cfg(tmp_path / "elsewhere", tiny_model_dir, tiny_tsv_dataset, "after", threads=None)
    shutil.copytree(cfg.run_dir, moved.run_dir)
    (moved.run_dir / "summary.json").unlink()  # stopped after its last round, before the summary
    result = execute(moved, resume=True)
    assert not result.already_finished
    assert load_run(moved.run_dir).summary["resumed_after_round"] == 2
    assert load_config(moved.run_dir / "config.yaml") == moved
    assert max_diff(adapter(cfg.run_dir), adapter(moved.run_dir)) == 0


def test_stopped_inprocess_run_resumes_on_flower_simulation(tmp_path, tiny_model_dir, tiny_tsv_dataset, monkeypatch):
    """Stopped (a hook raising) after round 2 of 4 in-process; resumed on Flower's simulation engine."""
    full = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "full")
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut")
    execute(full)
    execute_stopped_at(cut, 3, monkeypatch)
    assert load_checkpoint(cut.run_dir).round == 2
    execute(cut, runtime="flower", resume=True)
    assert max_diff(adapter(full.run_dir), adapter(cut.run_dir)) <= 1e-6
    rows = load_run(cut.run_dir).rows
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert "wire_bytes_up" in rows[3] and "wire_bytes_up" not in rows[2]  # rounds 3-4 went over Flower
    assert rows[-1]["cum_bytes_up"] == load_run(full.run_dir).rows[-1]["cum_bytes_up"]


def test_per_client_state_of_an_inprocess_checkpoint_is_never_dropped_on_flower(
        tmp_path, tiny_model_dir, tiny_tsv_dataset, monkeypatch):
    """LocalOnly's adapters live in the in-process checkpoint; Flower's nodes cannot take them: refused, not lost."""
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut", algorithm={"name": "local"},
                       partition__client_test_fraction=0.25)
    execute_stopped_at(cut, 2, monkeypatch)
    with pytest.raises(FedtuneError, match=r"per-client state of clients \[0, 1, 2\].*--runtime inprocess"):
        execute(cut, runtime="flower", resume=True)
    execute(cut, resume=True)  # the checkpoint is intact
    assert [r["round"] for r in load_run(cut.run_dir).rows] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- nothing half-written

KILLED_IN_LOG_REWRITE = textwrap.dedent("""
    import os, signal, sys
    import fedtune.files as files
    from fedtune.config import RunConfig
    from fedtune.run import execute

    real = files.fsync_file

    def die_before_the_new_log_replaces_the_old(path):
        real(path)
        if "metrics.jsonl" in path.name:
            os.kill(os.getpid(), signal.SIGKILL)  # the new log is written, not yet in place

    files.fsync_file = die_before_the_new_log_replaces_the_old
    execute(RunConfig.model_validate_json(sys.argv[1]), resume=True)
""")


def test_a_resume_killed_while_it_rewrites_the_log_loses_no_history(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                    monkeypatch):
    full = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "full")
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut")
    execute(full)
    execute_stopped_at(cut, 3, monkeypatch)
    before = (cut.run_dir / "metrics.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_LOG_REWRITE, cut.model_dump_json()], capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.decode()[-2000:] + proc.stderr.decode()[-2000:]
    assert (cut.run_dir / "metrics.jsonl").read_text() == before  # the old log, whole
    execute(cut, resume=True)
    assert [r["round"] for r in load_run(cut.run_dir).rows] == [0, 1, 2, 3, 4]
    assert max_diff(adapter(full.run_dir), adapter(cut.run_dir)) <= 1e-6


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_a_bit, _truncate])
def test_a_corrupt_checkpoint_is_refused_and_the_run_resumes_from_the_round_before(
        damage, tmp_path, tiny_model_dir, tiny_tsv_dataset, monkeypatch):
    from rich.console import Console

    full = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "full")
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut")
    execute(full)
    execute_stopped_at(cut, 4, monkeypatch)  # checkpoints of rounds 3 (latest) and 2 (previous)
    damage(cut.run_dir / "checkpoint" / "state.safetensors")
    console = Console(record=True, width=300)
    execute(cut, resume=True, console=console)
    said = [line for line in console.export_text().splitlines() if "state.safetensors" in line]
    assert len(said) == 1 and "(round 3)" in said[0] and "resuming from the previous checkpoint, after round 2" \
        in said[0], said
    assert load_run(cut.run_dir).summary["resumed_after_round"] == 2
    assert [r["round"] for r in load_run(cut.run_dir).rows] == [0, 1, 2, 3, 4]
    assert max_diff(adapter(full.run_dir), adapter(cut.run_dir)) <= 1e-6


def test_with_both_checkpoints_corrupt_a_resume_is_one_line(tmp_path, tiny_model_dir, tiny_tsv_dataset, monkeypatch):
    cut = _four_rounds(tmp_path, tiny_model_dir, tiny_tsv_dataset, "cut")
    execute_stopped_at(cut, 4, monkeypatch)
    _flip_a_bit(cut.run_dir / "checkpoint" / "state.safetensors")
    _truncate(cut.run_dir / "checkpoint" / "previous.safetensors")
    with pytest.raises(FedtuneError) as err:
        execute(cut, resume=True)
    assert "\n" not in str(err.value) and "(round 3) does not match its digest" in str(err.value)
    assert "previous.safetensors cannot be read" in str(err.value) and "--overwrite" in str(err.value)


def test_a_failed_adapter_save_leaves_the_previous_folder_intact(tmp_path, tiny_model_dir, tiny_tsv_dataset,
                                                                 monkeypatch):
    import fedtune.run as run
    from fedtune.experiment import build_experiment
    from fedtune.runtime.checkpoint import load_checkpoint

    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_tsv_dataset, "saved")
    execute(cfg)
    before = _files(cfg.run_dir / "adapter")
    real = run.save_model_folder

    def half_then_fail(model, tokenizer, folder, *args):
        real(model, tokenizer, folder, *args)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(run, "save_model_folder", half_then_fail)
    exp = build_experiment(cfg)
    with pytest.raises(OSError, match="disk full"):
        run.save_adapters(exp, load_checkpoint(cfg.run_dir).state, {}, cfg.run_dir)
    assert _files(cfg.run_dir / "adapter") == before
    assert sorted(p.name for p in cfg.run_dir.iterdir() if p.name.startswith(".")) == []  # nothing left beside it
