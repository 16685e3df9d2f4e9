"""A run from config to run directory: build, federate, save adapters, summarise.

``runs/<name>/`` receives ``config.yaml`` (resolved), ``partition.json``,
``metrics.jsonl`` (one row per round), ``checkpoint/`` (the server state after
the last completed round; see :mod:`fedtune.runtime.checkpoint`), ``adapter/``
(peft format with tokenizer and model card, see :mod:`fedtune.saved_model`;
several models also under ``adapters/<name>/``: per client for personalised
algorithms, per cluster) and ``summary.json``.

Runtimes: ``inprocess`` (every client in this process) and ``flower``
(Flower's simulation engine, one virtual SuperNode per client). Both drive the
same :func:`~fedtune.runtime.server.run_rounds`; :func:`execute_with` takes any
other way of reaching a pool (e.g. a deployed Flower Grid, see
:mod:`fedtune.serverapp`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from safetensors.torch import save_file
from rich.console import Console

from fedtune.aggregation import Tensors
from fedtune.config import RunConfig, differences
from fedtune.data import summary_table
from fedtune.dp_noise import NOISE_KEY
from fedtune.errors import FedtuneError
from fedtune.experiment import Experiment, build_experiment
from fedtune.files import replaced_folder
from fedtune.algorithms import ClientContext, ServerState
from fedtune.model_card import write_model_cards
from fedtune.models.base import public_model_name
from fedtune.models.lora import MERGED, MERGED_FILE
from fedtune.privacy import clients_add_noise
from fedtune.progress import RunProgress
from fedtune.report import clustering_plots
from fedtune.runlog import (CONFIG, METRIC_PREFIXES, METRICS, SUMMARY, RunLog, best_values, load_run, read_rows,
                            write_models)
from fedtune.runtime.checkpoint import Checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from fedtune.runtime.inprocess import InProcessPool
from fedtune.runtime.server import ClientPool, run_rounds
from fedtune.saved_model import save_model_folder


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    seconds: float
    already_finished: bool = False
    """A resume found the run finished: nothing ran and no file changed (``final`` is read from its summary)."""


RUNTIMES = ("inprocess", "flower")

Driver = Callable[[Experiment, RunProgress, Callable[[ClientPool], Any]], Any]
"""How a runtime runs the federation: ``driver(exp, hooks, body)`` builds its pool and returns ``body(pool)``."""


def _inprocess(exp: Experiment, hooks: RunProgress, body: Callable[[ClientPool], Any]) -> Any:
    return body(InProcessPool(exp, on_step=hooks.on_step))


def _flower_simulation(exp: Experiment, hooks: RunProgress, body: Callable[[ClientPool], Any]) -> Any:
    from fedtune.runtime.flower_server import run_simulation_engine

    return run_simulation_engine(exp, body)


def execute(cfg: RunConfig, overwrite: bool = False, console: Console | None = None,
            runtime: str = "inprocess", resume: bool = False) -> RunResult:
    """Run ``cfg`` on ``runtime`` (``inprocess`` or ``flower``: Flower's simulation engine) and write its run directory.

    ``resume=True`` continues the run in ``cfg.run_dir`` after its last checkpointed round; a finished run is
    left as it is (``already_finished``).
    """
    drivers: dict[str, Driver] = {"inprocess": _inprocess, "flower": _flower_simulation}
    if runtime not in drivers:
        raise FedtuneError(f"unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}")
    return execute_with(cfg, drivers[runtime], runtime, overwrite=overwrite, console=console, resume=resume)


def _resume_point(cfg: RunConfig, note: Callable[[str], None]) -> Checkpoint:
    """The checkpoint a resume continues from (a corrupt latest one: the previous, with a line to ``note``).
    One-line errors for a run that never started (no folder, or no completed round) and for a config that
    differs from the run's in a key that changes results."""
    run_dir = cfg.run_dir
    if not run_dir.is_dir():
        raise FedtuneError(f"cannot resume: there is no run at {run_dir}; start it without --resume")
    if not has_checkpoint(run_dir):
        raise FedtuneError(f"run {run_dir} has no completed round to resume; start it without --resume "
                           "(add --overwrite to replace the directory)")
    if not (run_dir / CONFIG).is_file():
        raise FedtuneError(f"cannot resume {run_dir}: it has a checkpoint but no {CONFIG}; "
                           "start afresh with --overwrite")
    saved = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    try:  # a run written before an option existed holds no value for it: compare with its default filled in
        saved = RunConfig.model_validate(saved).to_dict()
    except ValidationError:
        pass
    changed = differences(saved, cfg.to_dict())
    if changed:
        raise FedtuneError(f"cannot resume {run_dir}: its config differs ({'; '.join(changed)}); resume with the "
                           f"run's settings, e.g. fedtune run {run_dir / CONFIG} --resume, or start afresh with "
                           "--overwrite")
    return load_checkpoint(run_dir, note)


def _reopen_log(cfg: RunConfig, ckpt: Checkpoint, note: Callable[[str], None]) -> RunLog:
    """The run log of a resumed run: the rows after the checkpoint are dropped (the log is replaced at once,
    never deleted and rewritten); ``config.yaml`` takes the new result-neutral settings (threads, output paths)."""
    metrics = cfg.run_dir / METRICS
    rows, torn = read_rows(metrics) if metrics.is_file() else ([], False)
    if torn:
        note(f"{metrics}: its last line was cut short (the run stopped while writing it); it is rewritten")
    log = RunLog(cfg.run_dir, tensorboard=cfg.log.tensorboard, reopen=True)
    log.keep_rows([row for row in rows if row["round"] <= ckpt.round])
    log.write_config(cfg.to_dict())
    return log


def execute_with(cfg: RunConfig, driver: Driver, runtime: str, overwrite: bool = False,
                 console: Console | None = None, resume: bool = False) -> RunResult:
    """Build ``cfg``'s experiment, federate it through ``driver``, save adapters and summary."""
    console = console or Console(quiet=True)
    say = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    t0 = time.perf_counter()
    ckpt = None
    if resume:
        ckpt = _resume_point(cfg, say)
        if ckpt.round == cfg.federation.rounds and (cfg.run_dir / SUMMARY).is_file():
            summary = json.loads((cfg.run_dir / SUMMARY).read_text())
            return RunResult(cfg.run_dir, summary.get("final", {}), 0.0, already_finished=True)
        if ckpt.clients_with_state_on_nodes:
            raise FedtuneError(
                f"cannot resume {cfg.run_dir}: algorithm '{cfg.algorithm.name}' kept per-client state on the Flower "
                f"nodes of clients {ckpt.clients_with_state_on_nodes}, which the checkpoint does not hold; rerun it"
            )
        if clients_add_noise(cfg) and (ckpt.client_states is None or any(
                NOISE_KEY not in state for state in ckpt.client_states.values())):
            raise FedtuneError(
                f"cannot resume {cfg.run_dir}: its clients' DP keys are not in its checkpoint (a Flower run keeps them "
                "on its nodes, for that run only), so a resumed run would draw new ones and release the interrupted "
                "round again under other noise, which the ε does not count; rerun it (a rerun spends ε again)")
        log = _reopen_log(cfg, ckpt, say)
        console.print(f"resuming {cfg.run_dir} after round {ckpt.round}")
    else:
        log = RunLog(cfg.run_dir, overwrite=overwrite, tensorboard=cfg.log.tensorboard)
        log.write_config(cfg.to_dict())
    # on Flower the clients' data lives on their nodes: the server loads none of it
    exp = build_experiment(cfg, note=say, holds="all" if runtime == "inprocess" else "none")
    def federate(pool: ClientPool):
        _describe_data(exp, log, console)  # after the pool: with node-local data the nodes report their sizes
        start = None
        if ckpt is not None:
            start = (ckpt.state, ckpt.row)
            if ckpt.client_states is not None:
                pool.restore_client_states(ckpt.client_states)

        def on_state(state, row):
            save_checkpoint(cfg.run_dir, Checkpoint(state, row, runtime, pool.held_client_states(),
                                                    pool.clients_with_state_on_nodes()))

        state, last = run_rounds(exp, pool, log, hooks, start=start, on_state=on_state)
        return state, last, pool.final_client_states() if exp.algorithm.personalized else {}

    with RunProgress(console, exp, steps=driver is _inprocess, done=ckpt.round if ckpt else 0) as hooks:
        state, last, client_states = driver(exp, hooks, federate)

    save_adapters(exp, state, client_states, cfg.run_dir)
    final = {k: v for k, v in last.items() if k.startswith(METRIC_PREFIXES)}
    seconds = time.perf_counter() - t0
    run = load_run(cfg.run_dir)
    problems = [p for row in run.rows for p in row.get("client_problems", [])]
    clustering_plots(run, cfg.run_dir)
    log.write_summary({"final": final, "best": best_values(run.rows), "rounds": last["round"],
                       "seconds": seconds, "runtime": runtime,
                       "resumed_after_round": ckpt.round if ckpt else None,
                       "cum_bytes_up": last["cum_bytes_up"], "cum_bytes_down": last["cum_bytes_down"],
                       "client_problems": problems, "attack": exp.attack.record() if exp.attack else None,
                       "privacy": (exp.privacy.record([tr for tr, _ in exp.client_sizes]) if exp.privacy
                                   else None)})
    write_model_cards(cfg.run_dir)
    if problems:
        clients = sorted({p["client"] for p in problems})
        console.print(f"[yellow]clients {clients} were left out of {len(problems)} client-rounds (failed, dropped or "
                      f"rejected); see client_problems in {cfg.run_dir / 'summary.json'}")
    log.close()
    return RunResult(cfg.run_dir, final, seconds)


def _describe_data(exp: Experiment, log: RunLog, console: Console) -> None:
    """Write ``partition.json`` and print the partition, the evaluation gap and the algorithm's advice."""
    task = exp.task
    log.write_json("partition.json", {**exp.partition, "skipped_rows": task.skipped_rows if task else 0,
                                      "source": task.source if task else None,
                                      "text_columns": list(task.text_columns) if task else [],
                                      "eval": task.eval_origin if task else [],
                                      "attack": exp.attack.record() if exp.attack else None})
    console.print(summary_table(exp.partition))
    gap = exp.evaluation_gap()
    if gap:
        console.print(f"note: {gap}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    for line in exp.algorithm.advice(exp.cfg.train):
        console.print(f"[yellow]note: {line}")
    if exp.privacy is not None:
        sizes = [tr for tr, _ in exp.client_sizes]
        console.print(exp.privacy.start_line(sizes), markup=False, highlight=False, soft_wrap=True)
        for line in exp.privacy.notes(sizes):
            console.print(f"note: {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def save_adapters(exp: Experiment, state: ServerState, client_states, run_dir: Path) -> None:
    """Save the final model(s) in peft format with the tokenizer, loadable by ``PeftModel.from_pretrained``
    (folder contents: :mod:`fedtune.saved_model`).

    ``adapter/`` holds the global model; a state with several models adds each under
    ``adapters/<name>/`` and ``models.json`` ({"assignment": {client: name}}); a
    personalised algorithm saves each client's under ``adapters/client_<i>/``.
    Updates merged into base weights (``merged/`` tensors) go beside the adapter in
    ``merged.safetensors`` (:func:`~fedtune.models.lora.load_adapter` applies them).
    Each folder is written beside its place and swapped in (:func:`~fedtune.files.replaced_folder`): a save
    that fails leaves the folder it would have replaced as it was.
    """
    base_name = public_model_name(exp.cfg.model.name)
    classification = exp.cfg.model.task == "classification"

    def save(folder: Path, extra: Tensors | None = None) -> None:
        with replaced_folder(folder) as staged:
            save_model_folder(exp.model, exp.tokenizer, staged, base_name, classification, exp.kind)
            if extra:
                save_file(extra, str(staged / MERGED_FILE))

    for name, tensors in state.models.items():
        exp.load(tensors)
        save(run_dir / "adapters" / name)
    if state.models:
        write_models(run_dir, state.assignment, list(state.models))
    if exp.algorithm.personalized:
        for cid, personal in client_states.items():
            exp.algorithm.load(ClientContext(cid, 0, exp.model, exp.initial, {}, exp.base),
                               personal or exp.algorithm.at_client_rank(cid, exp.initial))
            save(run_dir / "adapters" / f"client_{cid}")
        return
    exp.load(state.global_tensors)
    save(run_dir / "adapter", {k: v.contiguous() for k, v in state.global_tensors.items() if k.startswith(MERGED)})
    exp.load(exp.initial)
