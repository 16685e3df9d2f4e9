"""Compare runs: a table and two plots, drawn only from run directories.

:func:`build_report` reads run directories (see :mod:`fedtune.runlog`) and
writes, into ``out_dir``:

- ``report.json``: the table's data, raw numbers (bytes, seconds)
- ``<metric>_vs_round.png``: the metric over rounds, one line per run
- ``<metric>_vs_bytes.png``: the metric over cumulative communication
  (up + down, log axis; round 0, with nothing sent yet, is not drawn there,
  and a run that never communicates is a dashed line at its final value)

where ``<metric>`` is the metric name with ``/`` replaced by ``_``, e.g.
``eval_accuracy_vs_round.png``. ``out_dir`` defaults to the run's own directory
for one run, and to ``report/`` beside the first run (``runs/report/``) for several.
"Best" is the minimum for losses, perplexities and spreads (``*_std``), the maximum otherwise.
Runs that share no eval metric (a run without evaluation) are compared on
``train_loss``, and the report says so. A run whose ``partition.json`` records
client groups (``partition.by`` other than the label) also gets a table of the
value(s) of that column each client holds, the model it ended with (runs of
several models) and its own final value of a ``client_eval/`` metric; and,
per group, the mean of that value over the group's clients (``per_group`` in
``report.json``; a client holding several groups counts in each).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.table import Table

from fedtune.errors import FedtuneError
from fedtune.runlog import METRIC_PREFIXES as _METRIC_PREFIXES
from fedtune.runlog import Run, load_models, load_run, model_assignment
from fedtune.units import human_bytes, human_seconds

_PREFERRED = ("eval/accuracy", "eval/loss", "client_eval/accuracy", "client_eval/loss")
_TRAIN_LOSS = "train_loss"
_LOWER_IS_BETTER = ("loss", "perplexity", "_std")


@dataclass
class Report:
    """A built report: the rich table, the per-run rows behind it, the metric, and the files written."""

    metric: str
    table: Table
    rows: list[dict[str, Any]]
    plots: list[Path]
    out_dir: Path
    note: str | None = None
    """Why the metric is not the one asked for by default (no shared eval metric)."""
    clients: list[Table] = field(default_factory=list)
    """Per run whose partition records client groups: the value(s) of ``partition.by`` each client holds."""


def available_metrics(run: Run) -> list[str]:
    """The ``eval/`` and ``client_eval/`` keys in any row of the run, first seen first; example counts ``*/n`` aside."""
    keys = (k for row in run.rows for k in row if k.startswith(_METRIC_PREFIXES) and not k.endswith("/n"))
    return list(dict.fromkeys(keys))


def _default_metric(runs: list[Run]) -> tuple[str, str | None]:
    """The first of ``eval/accuracy``, ``eval/loss``, ``client_eval/accuracy``, ``client_eval/loss`` that every
    run has (a run of several models, e.g. clustered, has ``eval/<model>/…`` instead, and its clients' means), else
    the first metric all runs share, else ``train_loss`` (with a note naming the runs without eval metrics)."""
    shared = [m for m in available_metrics(runs[0]) if all(m in available_metrics(r) for r in runs[1:])]
    for m in _PREFERRED:
        if m in shared:
            return m, None
    if shared:
        return shared[0], None
    if all(_evaluated(r, _TRAIN_LOSS) for r in runs):
        bare = [r.name for r in runs if not available_metrics(r)]
        which = f"no eval metrics in run {', '.join(bare)}" if bare else "no eval metric shared by these runs"
        return _TRAIN_LOSS, (f"{which}: showing train_loss and bytes instead "
                             "(set data.eval_fraction or data.eval_split to evaluate a run)")
    raise FedtuneError(
        f"runs {', '.join(r.name for r in runs)} share no eval/ or client_eval/ metric; "
        "report them separately or name one with --metric"
    )


def _evaluated(run: Run, metric: str) -> list[dict[str, Any]]:
    return [row for row in run.rows if row.get(metric) is not None]


def _summarise(run: Run, metric: str) -> dict[str, Any]:
    points = [(row["round"], row[metric]) for row in _evaluated(run, metric)]
    if not points:
        raise FedtuneError(
            f"run {run.name} has no metric '{metric}'; available: {', '.join(available_metrics(run)) or 'none'}"
        )
    pick = min if metric.endswith(_LOWER_IS_BETTER) else max
    best_round, best = pick(points, key=lambda p: p[1])
    last = run.rows[-1]
    return {
        "name": run.name,
        "path": str(run.path),
        "algorithm": run.config.get("algorithm", {}).get("name", "?"),
        "rounds": max(row["round"] for row in run.rows),
        "final": points[-1][1],
        "best": best,
        "best_round": best_round,
        "bytes_up": last.get("cum_bytes_up", 0),
        "bytes_down": last.get("cum_bytes_down", 0),
        "wall_time_s": sum(row.get("time_round_s", 0.0) for row in run.rows),
        "clients_left_out": left_out(run),
        "models": load_models(run.path),
        "per_group": group_metrics(run, metric),
    }


def _partition(run: Run) -> dict[str, Any]:
    path = run.path / "partition.json"
    try:
        partition = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise FedtuneError(f"{path} is not valid JSON; restore it from the run, or delete it") from None
    return partition if isinstance(partition, dict) else {}


def client_finals(run: Run, metric: str) -> dict[int, float]:
    """Each client's own value of a ``client_eval/<m>`` metric in the last round that recorded them; {} otherwise."""
    if not metric.startswith("client_eval/"):
        return {}
    key = metric[len("client_eval/"):]
    last = next((row["client_metrics"] for row in reversed(run.rows) if row.get("client_metrics")), {})
    return {int(c): m[key] for c, m in last.items() if m.get(key) is not None}


def group_metrics(run: Run, metric: str) -> dict[str, dict[str, float]]:
    """Per group (``partition.json``'s ``client_groups``): the mean of its clients' final ``metric`` and their
    number; {} for a run without groups or without per-client values of ``metric``."""
    groups, finals = _partition(run).get("client_groups"), client_finals(run, metric)
    if not isinstance(groups, list) or not finals:
        return {}
    members: dict[str, list[float]] = {}
    for cid, held in enumerate(groups):
        if cid in finals:
            for g in held:
                members.setdefault(str(g), []).append(finals[cid])
    return {g: {"mean": float(np.mean(v)), "clients": len(v)} for g, v in sorted(members.items())}


def left_out(run: Run) -> list[dict[str, Any]]:
    """Every time a client was left out of a round's training or evaluation (failed, dropped, rejected), in order."""
    return [p for row in run.rows for p in row.get("client_problems", [])]


def left_out_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per client left out of a round, per run: what the report prints under its table."""
    return [f"{r['name']}: round {p['round']}, client {p['client']} {p['kind']} in {p['phase']}: "
            f"{p['reason'].strip().splitlines()[-1] if p['reason'].strip() else '?'}"
            for r in rows for p in r["clients_left_out"]]


def _table(rows: list[dict[str, Any]], metric: str) -> Table:
    title = f"{metric} — {len(rows)} run{'s' * (len(rows) != 1)}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("run", style="bold", overflow="fold")
    table.add_column("algorithm", no_wrap=True)
    for col in ("rounds", "final", "best\n(round)", "bytes\nup", "bytes\ndown", "wall\ntime", "clients\nleft out"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"],
            r["algorithm"],
            str(r["rounds"]),
            f"{r['final']:.4f}",
            f"{r['best']:.4f} ({r['best_round']})",
            human_bytes(r["bytes_up"]),
            human_bytes(r["bytes_down"]),
            human_seconds(r["wall_time_s"]),
            str(len(r["clients_left_out"])),
        )
    return table


def _axes(metric: str, title: str, xlabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=f"{metric} vs {title}", xlabel=xlabel, ylabel=metric)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _line(ax: Any, xs: list[float], ys: list[float], i: int, label: str) -> None:
    """Run i keeps colour C<i> on every plot; points are marked while there are few."""
    ax.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) <= 30 else None, markersize=3, label=label)


def _save(fig: Figure, ax: Any, path: Path) -> Path:
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def _plot_vs_round(runs: list[Run], metric: str, path: Path) -> Path:
    fig, ax = _axes(metric, "round", "round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, run in enumerate(runs):
        rows = _evaluated(run, metric)
        _line(ax, [row["round"] for row in rows], [row[metric] for row in rows], i, run.name)
    return _save(fig, ax, path)


def _plot_vs_bytes(runs: list[Run], metric: str, path: Path) -> Path:
    """x = cum_bytes_up + cum_bytes_down on a log axis. Points with nothing sent yet (round 0) are left out;
    a run that never communicates (local training) is a dashed line at its final value."""
    fig, ax = _axes(metric, "communication", "cumulative communication, up + down (bytes)")
    for i, run in enumerate(runs):
        rows = _evaluated(run, metric)
        pts = [(row.get("cum_bytes_up", 0) + row.get("cum_bytes_down", 0), row[metric]) for row in rows]
        pts = [(x, y) for x, y in pts if x > 0]
        if pts:
            _line(ax, *map(list, zip(*pts)), i, run.name)
            ax.set_xscale("log")
        else:
            ax.axhline(rows[-1][metric], color=f"C{i % 10}", linestyle="--", label=f"{run.name} (no communication)")
    return _save(fig, ax, path)


def clustering_plots(run: Run, out_dir: Path, prefix: str = "") -> list[Path]:
    """For each round that clustered the clients (rows with ``agg/similarity``): the cosine-similarity heat map
    and the Ward dendrogram (:mod:`fedtune.clustering`), as ``<prefix>clustering_round<r>_{similarity,dendrogram}.png``."""
    from scipy.cluster.hierarchy import dendrogram

    from fedtune.clustering import ward_linkage

    paths = []
    for row in run.rows:
        if "agg/similarity" not in row:
            continue
        sim = np.asarray(row["agg/similarity"], dtype=float)
        clients = [str(c) for c in row.get("agg/similarity_clients", range(len(sim)))]
        cluster_of = row.get("agg/cluster_of", {})
        labels = [f"{c} ({cluster_of[c].removeprefix('cluster_')})" if c in cluster_of else c for c in clients]
        rnd = row["round"]
        fig = Figure(figsize=(5.6, 4.8), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"{run.name}: cosine similarity of updates, round {rnd}", xlabel="client (cluster)",
               ylabel="client (cluster)", xticks=range(len(sim)), yticks=range(len(sim)))
        ax.set_xticklabels(labels, rotation=90, fontsize="small")
        ax.set_yticklabels(labels, fontsize="small")
        fig.colorbar(im, ax=ax)
        paths.append(out_dir / f"{prefix}clustering_round{rnd}_similarity.png")
        fig.savefig(paths[-1], dpi=120)
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        if len(sim) >= 2:
            dendrogram(ward_linkage(sim), labels=labels, ax=ax, leaf_rotation=90)
        ax.set(title=f"{run.name}: Ward dendrogram, round {rnd}", ylabel="Ward distance on √(2 − 2 cos)")
        paths.append(out_dir / f"{prefix}clustering_round{rnd}_dendrogram.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def build_report(run_dirs: list[Path], metric: str | None = None, out_dir: Path | None = None) -> Report:
    """Load ``run_dirs``, tabulate and plot ``metric`` (default: :func:`_default_metric`), write into ``out_dir``."""
    if not run_dirs:
        raise FedtuneError("no run directories given; pass one or more, e.g. fedtune report runs/a runs/b")
    runs = [load_run(d) for d in run_dirs]
    note = None
    if metric is None:
        metric, note = _default_metric(runs)
    rows = [_summarise(run, metric) for run in runs]
    if out_dir is None:
        out_dir = runs[0].path if len(runs) == 1 else runs[0].path.parent / "report"
    out_dir = Path(out_dir)
    stem = metric.replace("/", "_")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = [
            _plot_vs_round(runs, metric, out_dir / f"{stem}_vs_round.png"),
            _plot_vs_bytes(runs, metric, out_dir / f"{stem}_vs_bytes.png"),
        ]
        for run in runs:
            plots += clustering_plots(run, out_dir, prefix="" if len(runs) == 1 else f"{run.name}_")
        (out_dir / "report.json").write_text(json.dumps({"metric": metric, "runs": rows}, indent=2) + "\n")
    except OSError as e:
        reason = e.strerror or str(e)
        raise FedtuneError(f"cannot write report to {out_dir}: {reason}; choose another folder with --out") from None
    clients = [t for run, row in zip(runs, rows) for t in _clients_table(run, metric, row["per_group"])]
    return Report(metric=metric, table=_table(rows, metric), rows=rows, plots=plots, out_dir=out_dir,
                  note=note, clients=clients)


def _clients_table(run: Run, metric: str, per_group: dict[str, dict[str, float]]) -> list[Table]:
    """The value(s) of the partition column each client of ``run`` holds (``partition.json``), if recorded, with
    its model and final ``metric``; then ``per_group`` (:func:`group_metrics`)."""
    partition = _partition(run)
    groups = partition.get("client_groups")
    if not isinstance(groups, list):
        return []
    column = str(partition.get("group_column", "value"))
    sizes = partition.get("sizes") or [None] * len(groups)
    model_of = model_assignment(run.path)
    finals = client_finals(run, metric)
    table = Table(title=f"{run.name}: clients by {column}", box=box.SIMPLE_HEAD, show_edge=False,
                  title_justify="left")
    table.add_column("client", justify="right")
    table.add_column(column, overflow="fold")
    table.add_column("examples", justify="right")
    if model_of:
        table.add_column("model")
    if finals:
        table.add_column(metric, justify="right")
    for cid, (held, size) in enumerate(zip(groups, sizes)):
        cells = [str(cid), ", ".join(map(str, held)), "-" if size is None else f"{size:,}"]
        cells += [model_of.get(cid, "-")] if model_of else []
        cells += [f"{finals[cid]:.4f}" if cid in finals else "-"] if finals else []
        table.add_row(*cells)
    if not per_group:
        return [table]
    by_group = Table(title=f"{run.name}: {metric} by {column} (mean over its clients)", box=box.SIMPLE_HEAD,
                     show_edge=False, title_justify="left")
    for col, justify in ((column, "left"), ("clients", "right"), (metric, "right")):
        by_group.add_column(col, justify=justify)
    for g, v in per_group.items():
        by_group.add_row(g, str(v["clients"]), f"{v['mean']:.4f}")
    return [table, by_group]
