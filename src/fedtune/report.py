"""Compare runs: a table and two plots, drawn only from run directories.

:func:`build_report` reads run directories (see :mod:`fedtune.runlog`) and
writes, into ``out_dir``:

- ``report.json``: the table's data, raw numbers (bytes, seconds)
- ``<metric>_vs_round.png``: the metric over rounds, one line per run
- ``<metric>_vs_bytes.png``: the metric over cumulative communication
  (up + down, log axis; round 0, with nothing sent yet, is not drawn there,
  and a run that never communicates is a dashed line at its final value)
- ``<metric>_vs_epsilon.png``, where a run is differentially private: the
  metric over the ε spent by each evaluated round (``privacy/epsilon``); the
  table gives each run's final ε with its unit and δ

where ``<metric>`` is the metric name with ``/`` replaced by ``_``, e.g.
``eval_accuracy_vs_round.png``. ``out_dir`` defaults to the run's own directory
for one run, and for several to a folder named after them in ``report/`` beside
the first run (``runs/report/a+b/``; see :func:`default_out_dir`), so reports of
different runs do not overwrite each other's plots.
"Best" is the minimum for losses, perplexities and spreads (``*_std``), the maximum otherwise.
The default metric is one every run records in its last evaluated round: a run
of several models (clustered FL) no longer scores ``eval/accuracy`` after it
splits, so it is compared on its clients' own ``client_eval/`` metric, each
client scored with its model. For a ``client_eval/`` (or ``client_ft/``) metric,
which averages the clients' test rows, the table also gives the clients'
unweighted mean (``client_eval_unweighted/``, every client once), final and best.
Runs that share no eval metric (a run without
evaluation) are compared on ``train_loss``, and the report says so. A clustered
run's table row gives the clusters of its last clustering round with their ARI
and NMI against the clients' groups; where the eval split has the group column,
a table gives each model's accuracy per group on it (``eval/…/accuracy@<group>``).
A run whose ``partition.json`` records
client groups (``partition.by`` other than the label) also gets a table of the
value(s) of that column each client holds, the model it ended with (runs of
several models) and its own final value of a ``client_eval/`` metric; and,
per group, the mean of that value over the group's clients (``per_group`` in
``report.json``; a client holding several groups counts in each).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from fedtune.errors import FedtuneError
from fedtune.privacy import EPSILON, UNIT
from fedtune.runlog import LOWER_IS_BETTER
from fedtune.runlog import METRIC_PREFIXES as _METRIC_PREFIXES
from fedtune.runlog import AGG, GROUP_SEP, Run, load_models, load_run, model_assignment
from fedtune.units import human_bytes, human_seconds

_PREFERRED = ("eval/accuracy", "eval/loss", "client_eval/accuracy", "client_eval/loss")
_TRAIN_LOSS = "train_loss"
WARD_AXIS = {"similarity_rows": "the rows of cos", "unit_updates": "√(2 − 2 cos)"}


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
    clients: list[Group] = field(default_factory=list)
    """Per run whose partition records client groups: the value(s) of ``partition.by`` each client holds, and
    where the eval split has that column each model's accuracy per group on it (each a titled table)."""


def available_metrics(run: Run) -> list[str]:
    """The ``eval/`` and ``client_eval/`` keys in any row of the run, first seen first; example counts ``*/n`` aside."""
    keys = (k for row in run.rows for k in row if k.startswith(_METRIC_PREFIXES) and not k.endswith("/n"))
    return list(dict.fromkeys(keys))


def _last_evaluated(run: Run) -> dict[str, Any]:
    """The run's last row with eval metrics ({} when none has any)."""
    return next((row for row in reversed(run.rows) if any(k.startswith(_METRIC_PREFIXES) for k in row)), {})


def final_metrics(run: Run) -> list[str]:
    """The metrics of the run's last evaluated round, the ones it ends with (per-group ones aside)."""
    return [k for k in _last_evaluated(run) if k.startswith(_METRIC_PREFIXES) and not k.endswith("/n")
            and GROUP_SEP not in k]


def _default_metric(runs: list[Run]) -> tuple[str, str | None]:
    """The first of ``eval/accuracy``, ``eval/loss``, ``client_eval/accuracy``, ``client_eval/loss`` that every
    run ends with (a run of several models, e.g. clustered, ends with ``eval/<model>/…`` and its clients' means,
    so its clients' own metric), else the first final metric all runs share (with a note for a run of several
    models), else ``train_loss`` (with a note naming the runs without eval metrics)."""
    shared = [m for m in final_metrics(runs[0]) if all(m in final_metrics(r) for r in runs[1:])]
    for m in _PREFERRED:
        if m in shared:
            return m, None
    if shared:
        several = [r.name for r in runs if load_models(r.path)]
        note = (f"run {', '.join(several)} ends with several models and no per-client evaluation: showing "
                f"{shared[0]}; set eval.per_client and partition.client_test_fraction to compare the clients' own "
                "metric, or name one with --metric") if several else None
        return shared[0], note
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


def _final_and_best(run: Run, metric: str) -> dict[str, Any] | None:
    """``metric``'s value in the last round that has it, its best value (:data:`~fedtune.runlog.LOWER_IS_BETTER`)
    and that round; None when no round has it."""
    points = [(row["round"], row[metric]) for row in _evaluated(run, metric)]
    if not points:
        return None
    pick = min if metric.endswith(LOWER_IS_BETTER) else max
    best_round, best = pick(points, key=lambda p: p[1])
    return {"final": points[-1][1], "final_round": points[-1][0], "best": best, "best_round": best_round}


def unweighted_twin(metric: str) -> str | None:
    """``client_eval/m`` → ``client_eval_unweighted/m`` (the clients' plain mean beside their rows' mean)."""
    prefix, _, name = metric.partition("/")
    return f"{prefix}_unweighted/{name}" if prefix in ("client_eval", "client_ft") else None


def _summarise(run: Run, metric: str) -> dict[str, Any]:
    values = _final_and_best(run, metric)
    if values is None:
        raise FedtuneError(
            f"run {run.name} has no metric '{metric}'; available: {', '.join(available_metrics(run)) or 'none'}"
        )
    twin = unweighted_twin(metric)
    unweighted = _final_and_best(run, twin) if twin else None
    last = run.rows[-1]
    evaluated = _last_evaluated(run).get("round", values["final_round"])
    return {
        "name": run.name,
        "path": str(run.path),
        "algorithm": run.config.get("algorithm", {}).get("name", "?"),
        "rounds": max(row["round"] for row in run.rows),
        **values,
        "unweighted": {"metric": twin, **unweighted} if unweighted else None,
        "bytes_up": last.get("cum_bytes_up", 0),
        "bytes_down": last.get("cum_bytes_down", 0),
        "wall_time_s": sum(row.get("time_round_s", 0.0) for row in run.rows),
        "clients_left_out": left_out(run),
        "models": load_models(run.path),
        "per_group": group_metrics(run, metric),
        "last_evaluated_round": evaluated,
        "clustering": clustering_result(run),
        "eval_groups": eval_group_accuracy(run),
        "privacy": (run.summary or {}).get("privacy"),
    }


def clustering_result(run: Run) -> dict[str, Any] | None:
    """The last clustering round's decision: ``round``, ``clusters`` and, where the clients' groups are known,
    ``ari`` and ``nmi``; None for a run that never clustered."""
    row = next((row for row in reversed(run.rows) if f"{AGG}clusters" in row), None)
    if row is None:
        return None
    return {"round": row["round"], "clusters": row[f"{AGG}clusters"],
            **{k: row[f"{AGG}{k}"] for k in ("ari", "nmi") if f"{AGG}{k}" in row}}


def eval_group_accuracy(run: Run) -> dict[str, dict[str, float]]:
    """Per model (``""``: the global one) the accuracy on the eval split's rows of each group, in the last round
    that recorded it (``eval/[<model>/]accuracy@<group>``); {} when none did."""
    row = next((row for row in reversed(run.rows) if any(GROUP_SEP in k for k in row)), {})
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key.startswith("eval/") and GROUP_SEP in key:
            path, group = key[len("eval/"):].rsplit(GROUP_SEP, 1)
            model = path.rpartition("/")[0]
            out.setdefault(model, {})[group] = value
    return out


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


def _clusters_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    agreement = f" ({result['ari']:.2f}, {result['nmi']:.2f})" if "ari" in result else ""
    return f"{result['clusters']}{agreement}"


def _table(rows: list[dict[str, Any]], metric: str) -> Table:
    title = f"{metric} — {len(rows)} run{'s' * (len(rows) != 1)}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("run", style="bold", overflow="fold")
    table.add_column("algorithm", no_wrap=True)
    clustered = any(r["clustering"] for r in rows)
    private = any(r["privacy"] for r in rows)
    unweighted = any(r["unweighted"] for r in rows)  # client metrics: their plain mean over clients beside
    columns = ["rounds", "final", "best\n(round)"]
    columns += ["unweighted\nfinal", "unweighted\nbest (round)"] if unweighted else []
    columns += [*(["clusters\n(ARI, NMI)"] if clustered else []), *(["ε\n(unit, δ)"] if private else []), "bytes\nup", "bytes\ndown", "wall\ntime",
                "clients\nleft out"]
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        final = f"{r['final']:.4f}" + (f" (r{r['final_round']})" if r["final_round"] != r["last_evaluated_round"] else "")
        u = r["unweighted"]
        twin = ([f"{u['final']:.4f}", f"{u['best']:.4f} ({u['best_round']})"] if u else ["-", "-"]) if unweighted else []
        table.add_row(
            r["name"],
            r["algorithm"],
            str(r["rounds"]),
            final,
            f"{r['best']:.4f} ({r['best_round']})",
            *twin,
            *([_clusters_cell(r["clustering"])] if clustered else []),
            *([_epsilon_cell(r["privacy"])] if private else []),
            human_bytes(r["bytes_up"]),
            human_bytes(r["bytes_down"]),
            human_seconds(r["wall_time_s"]),
            str(len(r["clients_left_out"])),
        )
    return table


def _epsilon_cell(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    return f"{record['epsilon']:.3g} ({record['unit']}, {record['delta']:g})"


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


def _plot_vs_epsilon(runs: list[Run], metric: str, path: Path) -> Path | None:
    """x = the ε spent by each evaluated round (round 0: none yet); runs without differential privacy are left
    out. None when no run has any ε."""
    private = [(i, run) for i, run in enumerate(runs) if any(EPSILON in row for row in run.rows)]
    if not private:
        return None
    units = sorted({row[UNIT] for _, run in private for row in run.rows if UNIT in row})
    fig, ax = _axes(metric, "ε", f"ε spent (one {' / '.join(units)}; log axis)")
    for i, run in private:
        pts = [(row[EPSILON], row[metric]) for row in _evaluated(run, metric)
               if 0 < row.get(EPSILON, 0) < math.inf]
        if pts:
            _line(ax, *map(list, zip(*pts)), i, run.name)
    ax.set_xscale("log")
    return _save(fig, ax, path)


def update_plots(run: Run, out_dir: Path, prefix: str = "") -> list[Path]:
    """Each client's change norm and its cosine to the round's aggregate change, round by round (``update_norms``,
    ``update_cosines``); a client whose update was rejected, or a robust rule left out, is marked with an x at
    the round. Nothing for a run without these diagnostics."""
    rows = [r for r in run.rows if r.get("update_norms")]
    if not rows:
        return []
    fig = Figure(figsize=(7.2, 6.4), layout="constrained")
    norm_ax, cos_ax = fig.subplots(2, 1, sharex=True)
    clients = sorted({int(c) for r in rows for c in r["update_norms"]})
    for i, c in enumerate(clients):
        mine = [r for r in rows if str(c) in r["update_norms"]]
        colour = f"C{i % 10}"
        norm_ax.plot([r["round"] for r in mine], [r["update_norms"][str(c)] for r in mine], color=colour,
                     marker="o", markersize=3, label=f"client {c}")
        cos = [r for r in mine if str(c) in r.get("update_cosines", {})]
        cos_ax.plot([r["round"] for r in cos], [r["update_cosines"][str(c)] for r in cos], color=colour,
                    marker="o", markersize=3)
        out = [r["round"] for r in run.rows if c in r.get("rejected", []) or c in r.get("reducer", {}).get("left_out", [])]
        for ax in (norm_ax, cos_ax):
            for rnd in out:
                ax.axvline(rnd, color=colour, alpha=0.25, linestyle=":")
    norm_ax.set(title=f"{run.name}: each client's change (dotted: rejected or left out that round)",
                ylabel="‖θ_i − θ_i⁰‖")
    norm_ax.set_yscale("log")
    cos_ax.set(ylabel="cosine to the round's aggregate", xlabel="round", ylim=(-1.05, 1.05))
    cos_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (norm_ax, cos_ax):
        ax.grid(True, alpha=0.3)
    if len(clients) <= 12:
        norm_ax.legend(fontsize="x-small", ncol=2)
    path = out_dir / f"{prefix}updates_vs_round.png"
    fig.savefig(path, dpi=120)
    return [path]


def clustering_plots(run: Run, out_dir: Path, prefix: str = "") -> list[Path]:
    """For each round that clustered the clients (rows with ``agg/similarity``): the cosine-similarity heat map
    and the Ward dendrogram (:mod:`fedtune.clustering`), as ``<prefix>clustering_round<r>_{similarity,dendrogram}.png``;
    each client is labelled with its group (``partition.json``'s ``client_groups``) and the cluster it joined."""
    from scipy.cluster.hierarchy import dendrogram

    from fedtune.clustering import ward_linkage

    paths = []
    partition = _partition(run)
    groups = partition.get("client_groups")
    column = partition.get("group_column") if isinstance(groups, list) else None
    axis = f"client {column} (cluster)" if column else "client (cluster)"
    for row in run.rows:
        if "agg/similarity" not in row:
            continue
        sim = np.asarray(row["agg/similarity"], dtype=float)
        clients = [str(c) for c in row.get("agg/similarity_clients", range(len(sim)))]
        cluster_of = row.get("agg/cluster_of", {})
        labels = [_client_label(c, groups if column else None, cluster_of) for c in clients]
        rnd = row["round"]
        on = row.get("agg/ward_on", "unit_updates")  # runs before the option clustered unit updates
        fig = Figure(figsize=(5.6, 4.8), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"{run.name}\ncosine similarity of updates, round {rnd}", xlabel=axis,
               ylabel=axis, xticks=range(len(sim)), yticks=range(len(sim)))
        ax.set_xticklabels(labels, rotation=90, fontsize="small")
        ax.set_yticklabels(labels, fontsize="small")
        fig.colorbar(im, ax=ax)
        paths.append(out_dir / f"{prefix}clustering_round{rnd}_similarity.png")
        fig.savefig(paths[-1], dpi=120)
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        if len(sim) >= 2:
            dendrogram(ward_linkage(sim, on), labels=labels, ax=ax, leaf_rotation=90, leaf_font_size=8)
        ax.set(title=f"{run.name}\nWard dendrogram, round {rnd}", ylabel=f"Ward distance on {WARD_AXIS[on]}")
        paths.append(out_dir / f"{prefix}clustering_round{rnd}_dendrogram.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")  # scipy sets the leaf labels after the layout
    return paths


def default_out_dir(runs: list[Run]) -> Path:
    """One run's own folder; for several, ``report/<a>+<b>+…`` beside the first (past 80 characters:
    ``report/<a>+<n>-more-<hash of every name>``)."""
    if len(runs) == 1:
        return runs[0].path
    names = [r.name for r in runs]
    folder = "+".join(names)
    if len(folder) > 80:
        digest = hashlib.sha1("\0".join(str(r.path) for r in runs).encode()).hexdigest()[:8]
        folder = f"{names[0][:40]}+{len(names) - 1}-more-{digest}"
    return runs[0].path.parent / "report" / folder


def _client_label(client: str, groups: list | None, cluster_of: dict[str, str]) -> str:
    """``3 en (1)``: client 3, holding group ``en``, in cluster 1 (the group where the partition records one)."""
    held = f" {'+'.join(map(str, groups[int(client)]))}" if groups and int(client) < len(groups) else ""
    cluster = f" ({cluster_of[client].removeprefix('cluster_')})" if client in cluster_of else ""
    return f"{client}{held}{cluster}"


def build_report(run_dirs: list[Path], metric: str | None = None, out_dir: Path | None = None) -> Report:
    """Load ``run_dirs``, tabulate and plot ``metric`` (default: :func:`_default_metric`), write into ``out_dir``."""
    if not run_dirs:
        raise FedtuneError("no run directories given; pass one or more, e.g. fedtune report runs/a runs/b")
    runs = [load_run(d) for d in run_dirs]
    note = None
    if metric is None:
        metric, note = _default_metric(runs)
    rows = [_summarise(run, metric) for run in runs]
    stale = [r for r in rows if r["final_round"] != r["last_evaluated_round"]]
    if stale:
        notes = [note] if note else []
        notes += [f"run {r['name']} records {metric} only up to round {r['final_round']} (it is evaluated up to round "
                  f"{r['last_evaluated_round']} on other metrics): its final value is round {r['final_round']}'s"
                  for r in stale]
        note = "; ".join(notes)
    if out_dir is None:
        out_dir = default_out_dir(runs)
    out_dir = Path(out_dir)
    stem = metric.replace("/", "_")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = [
            _plot_vs_round(runs, metric, out_dir / f"{stem}_vs_round.png"),
            _plot_vs_bytes(runs, metric, out_dir / f"{stem}_vs_bytes.png"),
        ]
        plots += [p for p in [_plot_vs_epsilon(runs, metric, out_dir / f"{stem}_vs_epsilon.png")] if p]
        for run in runs:
            prefix = "" if len(runs) == 1 else f"{run.name}_"
            plots += clustering_plots(run, out_dir, prefix=prefix) + update_plots(run, out_dir, prefix=prefix)
        (out_dir / "report.json").write_text(json.dumps({"metric": metric, "runs": rows}, indent=2) + "\n")
    except OSError as e:
        reason = e.strerror or str(e)
        raise FedtuneError(f"cannot write report to {out_dir}: {reason}; choose another folder with --out") from None
    clients = [t for run, row in zip(runs, rows) for t in _clients_table(run, metric, row["per_group"])]
    clients += [t for run, row in zip(runs, rows) if row["eval_groups"] for t in [_eval_groups_table(run, row)]]
    return Report(metric=metric, table=_table(rows, metric), rows=rows, plots=plots, out_dir=out_dir,
                  note=note, clients=clients)


def _clients_table(run: Run, metric: str, per_group: dict[str, dict[str, float]]) -> list[Group]:
    """The value(s) of the partition column each client of ``run`` holds (``partition.json``), if recorded, with
    its model and final ``metric``; then ``per_group`` (:func:`group_metrics`)."""
    partition = _partition(run)
    groups = partition.get("client_groups")
    if not isinstance(groups, list):
        return []
    column = str(partition.get("group_column", "value"))
    sizes = partition.get("sizes") or [None] * len(groups)
    tested = any(partition.get("test_sizes") or [])  # the shard less its test rows is what the client trains on
    counts = ([partition["train_sizes"], partition["test_sizes"]] if tested else [sizes])
    model_of = model_assignment(run.path)
    finals = client_finals(run, metric)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("client", justify="right")
    table.add_column(column, overflow="fold")
    for name in (["train", "test"] if tested else ["examples"]):
        table.add_column(name, justify="right")
    if model_of:
        table.add_column("model")
    if finals:
        table.add_column(metric, justify="right")
    for cid, held in enumerate(groups):
        cells = [str(cid), ", ".join(map(str, held)),
                 *("-" if cid >= len(n) or n[cid] is None else f"{n[cid]:,}" for n in counts)]
        cells += [model_of.get(cid, "-")] if model_of else []
        cells += [f"{finals[cid]:.4f}" if cid in finals else "-"] if finals else []
        table.add_row(*cells)
    if not per_group:
        return [titled(f"{run.name}: clients by {column}", table)]
    by_group = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col, justify in ((column, "left"), ("clients", "right"), (metric, "right")):
        by_group.add_column(col, justify=justify)
    for g, v in per_group.items():
        by_group.add_row(g, str(v["clients"]), f"{v['mean']:.4f}")
    return [titled(f"{run.name}: clients by {column}", table),
            titled(f"{run.name}: {metric} by {column} (mean over its clients)", by_group)]


def _eval_groups_table(run: Run, row: dict[str, Any]) -> Group:
    """Each model's accuracy on the eval split's rows of each group (:func:`eval_group_accuracy`)."""
    by_model = row["eval_groups"]
    column = str(_partition(run).get("group_column", "group"))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column(column)
    for model in by_model:
        table.add_column(model or "model", justify="right")
    for group in sorted({g for groups in by_model.values() for g in groups}):
        table.add_row(group, *(f"{groups[group]:.4f}" if group in groups else "-" for groups in by_model.values()))
    return titled(f"{run.name}: eval accuracy by {column}", table)


def titled(title: str, table: Table) -> Group:
    """``table`` under its title as a line of its own, which wraps between words at the console's width (a
    table's own title is as narrow as the table and would break a long run name anywhere)."""
    return Group(Text(title, style="italic"), table)


def run_lines(report: Report) -> list[str]:
    """The report's table as one line per run, for a console too narrow for the table."""
    lines = [f"{report.metric} — {len(report.rows)} run{'s' * (len(report.rows) != 1)}"]
    for r in report.rows:
        parts = [f"{r['algorithm']}", f"{r['rounds']} rounds", f"final {r['final']:.4f}" +
                 (f" (round {r['final_round']})" if r["final_round"] != r["last_evaluated_round"] else ""),
                 f"best {r['best']:.4f} (round {r['best_round']})"]
        found = r["clustering"]
        if found:
            parts.append(f"{found['clusters']} clusters" + (f", ARI {found['ari']:.2f}, NMI {found['nmi']:.2f}"
                                                            if "ari" in found else ""))
        if r["privacy"]:
            parts.append(f"ε {_epsilon_cell(r['privacy'])}")
        parts += [f"{human_bytes(r['bytes_up'])} up, {human_bytes(r['bytes_down'])} down",
                  human_seconds(r["wall_time_s"]), f"{len(r['clients_left_out'])} clients left out"]
        lines.append(f"{r['name']}: " + " · ".join(parts))
    return lines
