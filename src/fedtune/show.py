"""One run, round by round: the table ``fedtune show RUN_DIR`` prints, drawn from its ``metrics.jsonl``.

Columns: the train loss, every ``eval/`` and ``client_eval/`` metric but the per-group ones of the eval split
(``…@<group>``, which ``fedtune report`` tabulates), for clustered runs the clusters found with their ARI
and NMI against the clients' groups on the rounds that clustered, and for differentially private runs the ε
spent so far (``privacy/epsilon``; :func:`privacy_line` says at which δ, for which unit and sampling).
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from fedtune.runlog import AGG, GROUP_SEP, METRIC_PREFIXES, Run

CLUSTERING = {f"{AGG}clusters": "clusters", f"{AGG}ari": "ARI", f"{AGG}nmi": "NMI"}
"""What a clustering round recorded, by column header."""

from fedtune.privacy import EPSILON, UNIT, guarantee
from fedtune.units import human_bytes, human_seconds
from fedtune.usage import PEAK


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def _header(metric: str) -> str:
    """``client_eval/macro_f1`` → 'clients macro f1': words, so that a narrow terminal wraps headers."""
    if metric in CLUSTERING:
        return CLUSTERING[metric]
    if metric == EPSILON:
        return "ε"
    prefix, _, name = metric.partition("/")
    words = {"client_eval": "clients", "client_ft": "clients trained", "client_eval_unweighted": "clients unweighted",
             "client_ft_unweighted": "clients trained unweighted"}.get(prefix, prefix)
    return f"{words} {name.replace('_', ' ')}"


def metrics_of(run: Run) -> list[str]:
    """The run's ``eval/`` and ``client_eval/`` keys, first seen first (per-group ones aside), then the
    clustering columns it has."""
    keys = dict.fromkeys(k for row in run.rows for k in row if k.startswith(METRIC_PREFIXES) and GROUP_SEP not in k)
    return [*keys, *(k for k in [*CLUSTERING, EPSILON] if any(k in row for row in run.rows))]


def round_table(run: Run, metrics: list[str] | None = None, totals: bool = True) -> Table:
    """Rows: the logged rounds (0: the initial model). Columns: round, clients aggregated, train loss, each of
    ``metrics`` (default: all, :func:`metrics_of`; '-' on rounds not evaluated) and, with ``totals``, the bytes
    sent up and down so far, the round's wall time, and its clients' training throughput (real tokens per second)
    and peak memory (:mod:`fedtune.usage`)."""
    metrics = metrics_of(run) if metrics is None else metrics
    planned = run.config.get("federation", {}).get("rounds")
    done = max((row["round"] for row in run.rows), default=0)
    title = " · ".join([run.name, run.config.get("algorithm", {}).get("name", "?"),
                        f"{done}/{planned or '?'} rounds" + ("" if run.summary is not None else " (unfinished)")])
    headers = ["round", "clients", "train loss", *map(_header, metrics)]
    cells = [[str(row["round"]), str(row.get("num_clients", "-")), _number(row.get("train_loss")),
              *(_number(row.get(m)) for m in metrics)] for row in run.rows]
    if totals:
        headers += ["sent up (total)", "sent down (total)", "time"]
        for c, row in zip(cells, run.rows):
            c += [human_bytes(row.get("cum_bytes_up", 0)), human_bytes(row.get("cum_bytes_down", 0)),
                  human_seconds(row.get("time_round_s", 0.0))]
        if any(PEAK in row for row in run.rows):  # runs logged before fedtune measured usage have none
            headers += ["tokens per s", "peak memory"]
            for c, row in zip(cells, run.rows):
                rate, peak = row.get("tokens_per_s"), row.get(PEAK)
                c += ["-" if rate is None else f"{rate:,.0f}", "-" if peak is None else human_bytes(peak)]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for i, header in enumerate(headers):
        # As wide as its widest cell or header word: headers wrap, numbers are never cut.
        width = max([len(c[i]) for c in cells] + [len(w) for w in header.split()])
        table.add_column(header, justify="right", width=width)
    for c in cells:
        table.add_row(*c)
    return table


def fitted_tables(run: Run, console: Console) -> list[Table]:
    """:func:`round_table` of every metric, or where that is wider than ``console``, one table of the
    ``eval/`` metrics (with the totals) and one of the clients' (``client_eval/``, ``client_ft/``)."""
    table = round_table(run)
    metrics = metrics_of(run)
    first = ("eval/", AGG, EPSILON)
    groups = [[m for m in metrics if m.startswith(first)], [m for m in metrics if not m.startswith(first)]]
    wide = console.measure(table, options=console.options.update_width(10_000)).maximum > console.width
    if not wide or not all(groups):
        return [table]
    return [round_table(run, groups[0]), round_table(run, groups[1], totals=False)]


def privacy_line(run: Run) -> str | None:
    """What the ε column means: the guarantee of a finished run (:func:`~fedtune.privacy.guarantee`), or for one
    still running, the unit and δ its ε is for; None for a run without differential privacy."""
    record = (run.summary or {}).get("privacy")
    if record:
        return f"privacy: {guarantee(record)}"
    last = next((row for row in reversed(run.rows) if EPSILON in row), None)
    if last is None:
        return None
    delta = run.config.get("privacy", {}).get("delta")
    return f"privacy: ε so far for one {last[UNIT]} at δ = {delta:g} (the run has not finished)"
