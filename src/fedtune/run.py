"""A run from config to run directory: build, federate, save adapters, summarise.

``runs/<name>/`` receives ``config.yaml`` (resolved), ``partition.json``,
``metrics.jsonl`` (one row per round), ``checkpoint/`` (the server state after
the last completed round; see :mod:`fedtune.runtime.checkpoint`), ``adapter/``
(peft format; per client under ``adapters/client_<i>/`` for personalised
algorithms) and ``summary.json``.

Runtimes: ``inprocess`` (every client in this process) and ``flower``
(Flower's simulation engine, one virtual SuperNode per client). Both drive the
same :func:`~fedtune.runtime.server.run_rounds`; :func:`execute_with` takes any
other way of reaching a pool (e.g. a deployed Flower Grid, see
:mod:`fedtune.runtime.flower_app`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.config import RunConfig
from fedtune.data import summary_table
from fedtune.errors import FedtuneError
from fedtune.experiment import Experiment, build_experiment
from fedtune.algorithms import ClientContext
from fedtune.models.lora import MERGED, MERGED_FILE
from fedtune.runlog import METRICS, RunLog
from fedtune.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.runtime.inprocess import InProcessPool
from fedtune.runtime.server import ClientPool, run_rounds
from fedtune.training import local_steps


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    seconds: float


class _ProgressHooks:
    """Rich progress bars: rounds, and local steps within the round."""

    def __init__(self, progress: Progress, exp: Experiment, console: Console, steps: bool = True, done: int = 0):
        self.progress, self.exp, self.console = progress, exp, console
        self.rounds = progress.add_task("rounds", total=exp.cfg.federation.rounds, completed=done)
        self.steps = progress.add_task("local steps", total=1, visible=steps)

    def on_step(self) -> None:
        self.progress.advance(self.steps)

    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        total = sum(local_steps(self.exp.cfg.train, len(self.exp.shards[c])) for c in clients)
        self.progress.reset(self.steps, total=total * self.exp.steps_multiplier,
                            description=f"round {rnd}: {len(clients)} clients")

    def on_round_end(self, row: dict) -> None:
        if row["round"]:
            self.progress.advance(self.rounds)
        shown = {k: v for k, v in row.items() if k.startswith(("eval/", "client_eval/"))}
        if shown or row["round"]:
            parts = [f"round {row['round']}"]
            if row.get("train_loss") is not None:
                parts.append(f"train_loss {row['train_loss']:.4f}")
            parts += [f"{k} {v:.4f}" for k, v in shown.items() if not k.endswith("_std")]
            self.console.log("  ".join(parts))


RUNTIMES = ("inprocess", "flower")

Driver = Callable[[Experiment, _ProgressHooks, Callable[[ClientPool], Any]], Any]
"""How a runtime runs the federation: ``driver(exp, hooks, body)`` builds its pool and returns ``body(pool)``."""


def _inprocess(exp: Experiment, hooks: _ProgressHooks, body: Callable[[ClientPool], Any]) -> Any:
    return body(InProcessPool(exp, on_step=hooks.on_step))


def _flower_simulation(exp: Experiment, hooks: _ProgressHooks, body: Callable[[ClientPool], Any]) -> Any:
    from fedtune.runtime.flower import run_simulation_engine

    return run_simulation_engine(exp, body)


def execute(cfg: RunConfig, overwrite: bool = False, console: Console | None = None,
            runtime: str = "inprocess", resume: bool = False) -> RunResult:
    """Run ``cfg`` on ``runtime`` (``inprocess`` or ``flower``: Flower's simulation engine) and write its run directory.

    ``resume=True`` continues the run in ``cfg.run_dir`` after its last checkpointed round.
    """
    drivers: dict[str, Driver] = {"inprocess": _inprocess, "flower": _flower_simulation}
    if runtime not in drivers:
        raise FedtuneError(f"unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}")
    return execute_with(cfg, drivers[runtime], runtime, overwrite=overwrite, console=console, resume=resume)


def _reopen_log(cfg: RunConfig, ckpt: Checkpoint) -> RunLog:
    """The run log of a resumed run: its config must be unchanged; rows after the checkpoint are dropped."""
    run_dir = cfg.run_dir
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    if saved != cfg.to_dict():
        raise FedtuneError(f"cannot resume {run_dir}: its config.yaml differs from this run's config; "
                           "resume with the same config, or start afresh with --overwrite")
    metrics = run_dir / METRICS
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    metrics.unlink(missing_ok=True)
    log = RunLog(run_dir)
    for row in rows:
        if row["round"] <= ckpt.round:
            log.log_round(row)
    return log


def execute_with(cfg: RunConfig, driver: Driver, runtime: str, overwrite: bool = False,
                 console: Console | None = None, resume: bool = False) -> RunResult:
    """Build ``cfg``'s experiment, federate it through ``driver``, save adapters and summary."""
    console = console or Console(quiet=True)
    t0 = time.perf_counter()
    ckpt = None
    if resume:
        ckpt = load_checkpoint(cfg.run_dir)
        log = _reopen_log(cfg, ckpt)
        if ckpt.clients_with_state_on_nodes:
            raise FedtuneError(
                f"cannot resume {cfg.run_dir}: algorithm '{cfg.algorithm.name}' kept per-client state on the Flower "
                f"nodes of clients {ckpt.clients_with_state_on_nodes}, which the checkpoint does not hold; rerun it"
            )
        console.print(f"resuming {cfg.run_dir} after round {ckpt.round}")
    else:
        log = RunLog(cfg.run_dir, overwrite=overwrite)
        log.write_config(cfg.to_dict())
    exp = build_experiment(cfg)
    log.write_json("partition.json", {**exp.partition, "skipped_rows": exp.task.skipped_rows,
                                      "source": exp.task.source, "eval": exp.task.eval_origin})
    for line in exp.task.notes:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(summary_table(exp.partition))
    gap = exp.evaluation_gap()
    if gap:
        console.print(f"note: {gap}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if exp.task.skipped_rows:
        console.print(f"[yellow]skipped {exp.task.skipped_rows} malformed rows (data.on_malformed=skip)")
    for line in exp.algorithm.advice(cfg.train):
        console.print(f"[yellow]note: {line}")

    def federate(pool: ClientPool):
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

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=console.quiet) as progress:
        hooks = _ProgressHooks(progress, exp, console, steps=driver is _inprocess, done=ckpt.round if ckpt else 0)
        state, last, client_states = driver(exp, hooks, federate)

    save_adapters(exp, state.global_tensors, client_states, cfg.run_dir)
    final = {k: v for k, v in last.items() if k.startswith(("eval/", "client_eval/"))}
    seconds = time.perf_counter() - t0
    log.write_summary({"final": final, "rounds": cfg.federation.rounds, "seconds": seconds, "runtime": runtime,
                       "resumed_after_round": ckpt.round if ckpt else None,
                       "cum_bytes_up": last["cum_bytes_up"], "cum_bytes_down": last["cum_bytes_down"]})
    return RunResult(cfg.run_dir, final, seconds)


def save_adapters(exp: Experiment, global_tensors, client_states, run_dir: Path) -> None:
    """Save the final model(s) in peft format, loadable by ``PeftModel.from_pretrained``.

    Updates merged into base weights (``merged/`` tensors) go beside the adapter in
    ``merged.safetensors`` (:func:`~fedtune.models.lora.load_adapter` applies them).
    """
    if exp.algorithm.personalized:
        for cid, state in client_states.items():
            exp.algorithm.load(ClientContext(cid, 0, exp.model, exp.initial, {}, exp.base),
                               state or exp.algorithm.at_client_rank(cid, exp.initial))
            exp.model.save_pretrained(run_dir / "adapters" / f"client_{cid}")
        return
    exp.load(global_tensors)
    exp.model.save_pretrained(run_dir / "adapter")
    merged = {k: v.contiguous() for k, v in global_tensors.items() if k.startswith(MERGED)}
    if merged:
        save_file(merged, str(run_dir / "adapter" / MERGED_FILE))
    exp.load(exp.initial)
