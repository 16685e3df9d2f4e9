"""What a run shows while it runs: bars with the time left on a terminal, plain lines elsewhere.

On a terminal two bars: the rounds, with the run's time left, and the current
phase: the round's local steps with the round's time left, then "evaluating N
examples". The run's time left is (rounds to go) × (wall time per round so far
in this process): rich's own estimate forgets progress older than 30 s, so it
would have none for rounds that take longer. Where the console is not a
terminal (a file, CI logs, a dumb terminal) the bars are off, and each evaluation and each round
print one plain line (:func:`round_line`). After a round, the algorithm's own lines on what it
decided (:meth:`~fedtune.algorithms.Algorithm.decisions`, e.g. clustered FL's clusters) follow. A quiet
console prints nothing.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fedtune.experiment import Experiment
from fedtune.runlog import AGG, GROUP_SEP
from fedtune.runlog import METRIC_PREFIXES as _SHOWN
from fedtune.training import local_steps
from fedtune.units import human_seconds



def round_line(row: dict[str, Any], rounds: int, left_s: float | None = None) -> str:
    """One round in plain text: round k/N, train loss, the eval metrics (spreads ``*_std`` and per-group ones aside),
    clients that sent nothing usable, the round's seconds, and the run's time left when known, e.g.
    ``round 2/10  train_loss 0.6925  eval/accuracy 0.8125  14.2 s  1m 54s left``."""
    parts = [f"round {row['round']}/{rounds}"]
    loss = row.get("train_loss")
    if loss is not None:
        parts.append(f"train_loss {loss:.4f}")
    parts += [f"{k} {v:.4f}" for k, v in row.items()
              if k.startswith(_SHOWN) and not k.endswith("_std") and GROUP_SEP not in k and isinstance(v, (int, float))]
    for key in ("missing", "rejected"):
        if row.get(key):
            parts.append(f"{key} clients {row[key]}")
    parts.append(human_seconds(row.get("time_round_s", 0.0)))
    if left_s is not None and math.isfinite(left_s):
        parts.append(f"{human_seconds(left_s)} left")
    return "  ".join(parts)


def eval_line(rnd: int, rounds: int, what: str, n_examples: int) -> str:
    """``round 4/10  evaluating 872 examples of the eval split``."""
    return f"round {rnd}/{rounds}  evaluating {n_examples:,} examples of {what}"


class _TimeLeft(TimeRemainingColumn):
    """Rich's time remaining, except for a task that carries its own ``finish_at`` (a ``time.monotonic()``)."""

    def render(self, task: Task) -> Text:
        if "finish_at" not in task.fields:
            return super().render(task)
        at = task.fields["finish_at"]
        if at is None:
            return Text("-:--:--", style="progress.remaining")
        return Text(str(timedelta(seconds=max(0, round(at - time.monotonic())))), style="progress.remaining")


class RunProgress:
    """The :class:`~fedtune.runtime.server.RoundHooks` of a run that people watch; a context manager.

    ``steps``: the runtime reports local steps (:meth:`on_step`); ``done``: rounds
    completed before this process started (resume). ``now``: the clock (seconds).
    """

    def __init__(self, console: Console, exp: Experiment, steps: bool = True, done: int = 0,
                 now=time.monotonic):
        self.console, self.exp, self.show_steps, self.now = console, exp, steps, now
        self.rounds_total = exp.cfg.federation.rounds
        self.bars = console.is_interactive and not console.quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("left"), _TimeLeft(),
                                 console=console, transient=True, disable=not self.bars)
        self.rounds = self.progress.add_task("rounds", total=self.rounds_total, completed=done, finish_at=None)
        self.steps = self.progress.add_task("local steps", total=1, visible=False)
        self.evaluating = self.progress.add_task("evaluating", total=None, visible=False)
        self.first: tuple[int, float] | None = None  # (first round run here, when it started)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=not self.bars)

    def time_left(self, rnd: int) -> float | None:
        """The run's seconds left after round ``rnd``, at the mean wall time of the rounds run here so far."""
        if self.first is None or rnd < self.first[0]:
            return None
        first, started = self.first
        return (self.now() - started) / (rnd - first + 1) * (self.rounds_total - rnd)

    def on_step(self) -> None:
        self.progress.advance(self.steps)

    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        if self.first is None:
            self.first = (rnd, self.now())
        total = sum(local_steps(self.exp.cfg.train, self.exp.client_sizes[c][0]) for c in clients)
        self.progress.update(self.evaluating, visible=False)
        self.progress.reset(self.steps, total=total * self.exp.steps_multiplier, visible=self.show_steps,
                            description=f"round {rnd}: {len(clients)} clients")

    def on_eval_start(self, rnd: int, what: str, n_examples: int) -> None:
        if self.bars:
            self.progress.update(self.steps, visible=False)
            self.progress.reset(self.evaluating, visible=True,
                                description=f"round {rnd}: evaluating {n_examples:,} examples")
        else:
            self._print(eval_line(rnd, self.rounds_total, what, n_examples))

    def on_round_end(self, row: dict) -> None:
        rnd = row["round"]
        left = self.time_left(rnd) if 0 < rnd < self.rounds_total else None
        if rnd:
            self.progress.update(self.rounds, advance=1, finish_at=None if left is None else time.monotonic() + left)
        if rnd or any(k.startswith(_SHOWN) for k in row):
            self._print(round_line(row, self.rounds_total, left))
        for line in self.exp.algorithm.decisions(rnd, {k[len(AGG):]: v for k, v in row.items() if k.startswith(AGG)}):
            self._print(line)
