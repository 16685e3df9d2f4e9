"""A run from config to run directory: build, federate, save adapters, summarise.

``runs/<name>/`` receives ``config.yaml`` (resolved), ``partition.json``,
``metrics.jsonl`` (one row per round), ``adapter/`` (peft format; per client
under ``adapters/client_<i>/`` for personalised algorithms) and
``summary.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.config import RunConfig
from fedtune.data import summary_table
from fedtune.experiment import Experiment, build_experiment
from fedtune.models.lora import load_trainable
from fedtune.runlog import RunLog
from fedtune.runtime.inprocess import InProcessPool
from fedtune.runtime.server import run_rounds
from fedtune.training import local_steps


@dataclass
class RunResult:
    run_dir: Path
    final: dict
    seconds: float


class _ProgressHooks:
    """Rich progress bars: rounds, and local steps within the round."""

    def __init__(self, progress: Progress, exp: Experiment, console: Console):
        self.progress, self.exp, self.console = progress, exp, console
        self.rounds = progress.add_task("rounds", total=exp.cfg.federation.rounds)
        self.steps = progress.add_task("local steps", total=1)

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


def execute(cfg: RunConfig, overwrite: bool = False, console: Console | None = None) -> RunResult:
    """Run ``cfg`` on the in-process runtime and write its run directory."""
    console = console or Console(quiet=True)
    t0 = time.perf_counter()
    log = RunLog(cfg.run_dir, overwrite=overwrite)
    log.write_config(cfg.to_dict())
    exp = build_experiment(cfg)
    log.write_json("partition.json", {**exp.partition, "skipped_rows": exp.task.skipped_rows,
                                      "source": exp.task.source})
    console.print(summary_table(exp.partition))
    if exp.task.skipped_rows:
        console.print(f"[yellow]skipped {exp.task.skipped_rows} malformed rows (data.on_malformed=skip)")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=console.quiet) as progress:
        hooks = _ProgressHooks(progress, exp, console)
        pool = InProcessPool(exp, on_step=hooks.on_step)
        state, last = run_rounds(exp, pool, log, hooks)

    save_adapters(exp, state.global_tensors, pool.client_states, cfg.run_dir)
    final = {k: v for k, v in last.items() if k.startswith(("eval/", "client_eval/"))}
    seconds = time.perf_counter() - t0
    log.write_summary({"final": final, "rounds": cfg.federation.rounds, "seconds": seconds,
                       "cum_bytes_up": last["cum_bytes_up"], "cum_bytes_down": last["cum_bytes_down"]})
    return RunResult(cfg.run_dir, final, seconds)


def save_adapters(exp: Experiment, global_tensors, client_states, run_dir: Path) -> None:
    """Save the final model(s) in peft format, loadable by ``PeftModel.from_pretrained``."""
    if exp.algorithm.personalized:
        for cid, state in client_states.items():
            load_trainable(exp.model, state or exp.initial)
            exp.model.save_pretrained(run_dir / "adapters" / f"client_{cid}")
    else:
        load_trainable(exp.model, global_tensors)
        exp.model.save_pretrained(run_dir / "adapter")
