"""The run directory: everything needed to understand and redraw a run.

Layout of ``<output_dir>/<name>/``::

    config.yaml     the resolved RunConfig
    metrics.jsonl   one JSON object per round (round 0 = the initial model, untrained)
    summary.json    final results, written when the run ends
    tensorboard/    with ``log.tensorboard: true``: the rows' numbers as TensorBoard scalars, step = round
    *.json          anything else the engine records (e.g. partition.json)

A metrics row is flat: ``round``, ``lr``, ``clients``, ``num_clients``,
``train_loss``, ``train_examples``, ``bytes_up``/``bytes_down`` and their running
totals ``cum_bytes_up``/``cum_bytes_down``, ``time_{train,aggregate,eval,round}_s``,
and, on evaluated rounds, ``eval/<metric>`` and ``client_eval/<metric>`` keys (the clients' example-weighted
mean, and ``_std`` their spread; ``client_eval_unweighted/<metric>``, their plain mean, each client once) with
each client's own metrics under ``client_metrics: {"<id>": {...}}``, and ``client_ft/<metric>`` (and
``client_ft_unweighted/``) with ``eval.after_local_training`` (the round's clients scored right after training);
``eval/…/accuracy@<group>`` where the eval split has the column of the clients' groups; and ``agg/…``, what the
algorithm's aggregation recorded (clustered FL: ``agg/clusters``, ``agg/cluster_of``, ``agg/ari``, ``agg/nmi``).
``summary.json`` holds every metric's ``final`` value and its ``best`` over the evaluated rounds, with the round.
:class:`RunLog` writes a directory, :func:`load_run` reads one back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

METRIC_PREFIXES = ("eval/", "client_eval/", "client_ft/", "client_eval_unweighted/", "client_ft_unweighted/")
"""The metrics of a row, by where they were measured: the held-out split (``eval/``), each client's own test shard
with the model it is evaluated with (``client_eval/``), or right after its local training (``client_ft/``); the
clients' means over their pooled test rows, or over the clients, each once (``…_unweighted/``)."""
LOWER_IS_BETTER = ("loss", "perplexity", "_std")
"""Metric names ending so are better when lower (losses, perplexities, spreads); every other metric when higher."""


def best_values(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Every metric's best value over the rows that hold it (:data:`LOWER_IS_BETTER`; example counts ``*/n`` and
    NaN aside), and its round (the first, on ties): ``{metric: {"value": v, "round": r}}``."""
    best: dict[str, dict[str, float | int]] = {}
    for row in rows:
        for key, value in row.items():
            if (not key.startswith(METRIC_PREFIXES) or key.endswith("/n") or not isinstance(value, (int, float))
                    or value != value):
                continue
            held = best.get(key)
            if held is None or (value < held["value"] if key.endswith(LOWER_IS_BETTER) else value > held["value"]):
                best[key] = {"value": value, "round": row["round"]}
    return best

from fedtune.errors import FedtuneError
from fedtune.files import atomic_write_text

AGG = "agg/"
"""Prefix of what an algorithm's aggregation recorded in a round's row (its ``ServerState.metrics``), e.g.
clustered FL's ``agg/clusters``, ``agg/ari``, ``agg/nmi``."""

GROUP_SEP = "@"
"""``eval/<metric>@<group>``: a metric on the eval split's rows of one group (a value of ``partition.by``)."""

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
MODELS = "models.json"
TENSORBOARD = "tensorboard"


def _plain(obj: Any) -> Any:
    """JSON fallback for numpy/torch scalars and paths."""
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def scalars(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a metrics row but its round, by tag; nested mappings join their keys with '/'
    (``client_metrics/3/accuracy``). Booleans, strings, lists and None are not scalars."""
    for key, value in row.items():
        if isinstance(value, Mapping):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and f"{prefix}{key}" != "round":
            yield f"{prefix}{key}", float(value)


class _TensorBoard:
    """Event files beside ``metrics.jsonl``: each row's :func:`scalars` at step = its round, flushed per row."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: Mapping[str, Any]) -> None:
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """Writer of one run directory.

    The directory is created if needed. A directory that already holds a run
    (a ``metrics.jsonl``) is refused unless ``overwrite=True``, which deletes it
    and starts afresh, or ``reopen=True`` (a resume), which writes on into it;
    a directory without one is written into as it is.
    ``tensorboard=True`` also mirrors every row into ``tensorboard/`` (started
    afresh with the ``metrics.jsonl`` it mirrors); it needs the ``tensorboard``
    package, checked before anything is written.
    """

    def __init__(self, run_dir: str | Path, overwrite: bool = False, tensorboard: bool = False, reopen: bool = False):
        self.run_dir = Path(run_dir)
        if tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise FedtuneError("log.tensorboard is on but the tensorboard package is not installed; "
                               "pip install tensorboard, or set log.tensorboard: false")
        if (self.run_dir / METRICS).exists() and not reopen:
            if not overwrite:
                raise FedtuneError(
                    f"run directory {self.run_dir} already holds a run; "
                    "pick a new name with -o name=... or pass --overwrite"
                )
            self._guard(shutil.rmtree, self.run_dir)
        self._guard(self.run_dir.mkdir, parents=True, exist_ok=True)
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            self._fail(PermissionError("permission denied"))
        self._tensorboard = None
        if tensorboard:
            if (self.run_dir / TENSORBOARD).exists():
                self._guard(shutil.rmtree, self.run_dir / TENSORBOARD)
            self._tensorboard = self._guard(_TensorBoard, self.run_dir / TENSORBOARD)

    def _fail(self, err: OSError) -> None:
        reason = err.strerror or str(err)
        raise FedtuneError(
            f"cannot write run directory {self.run_dir}: {reason}; choose another with -o output_dir=..."
        ) from None

    def _guard(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            self._fail(e)

    def _write(self, name: str, text: str) -> Path:
        path = self.run_dir / name
        self._guard(atomic_write_text, path, text)
        return path

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved config as ``config.yaml``."""
        return self._write(CONFIG, yaml.safe_dump(dict(config), sort_keys=False))

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as the JSON file ``name`` (e.g. ``partition.json``) in the run directory."""
        return self._write(name, json.dumps(obj, indent=2, default=_plain) + "\n")

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's row to ``metrics.jsonl``; it is on disk (fsynced) when this returns."""
        line = json.dumps(dict(row), default=_plain) + "\n"
        try:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if self._tensorboard is not None:
                self._tensorboard.write(row)
        except OSError as e:
            self._fail(e)

    def keep_rows(self, rows: list[Mapping[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by ``rows`` (a resume drops the rows after its checkpoint), atomically: a
        crash leaves the old log or the new one, never a partial one (and the TensorBoard mirror restarts)."""
        text = "".join(json.dumps(dict(row), default=_plain) + "\n" for row in rows)
        self._guard(atomic_write_text, self.run_dir / METRICS, text)
        if self._tensorboard is not None:
            for row in rows:
                self._tensorboard.write(row)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write the end-of-run results as ``summary.json``."""
        return self.write_json(SUMMARY, dict(summary))

    def close(self) -> None:
        """Close the TensorBoard event file, if any (every row is on disk already)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


@dataclass
class Run:
    """A run directory read back: its config, its metrics rows in order, and its summary (None while unfinished)."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    torn: bool = False
    """The log's last line was cut short (the run stopped while writing it) and is left out of ``rows``."""

    @property
    def name(self) -> str:
        return self.path.name


def read_rows(metrics: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a ``metrics.jsonl`` and whether its last line was torn (cut short while it was written: no
    newline at its end and not valid JSON; it is left out). Any other line that is not JSON is a one-line error."""
    try:
        text = metrics.read_text()
    except UnicodeDecodeError:
        raise FedtuneError(f"{metrics} is not text; it is not a metrics log written by fedtune") from None
    lines = text.split("\n")
    rows, torn = [], False
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "round" not in row:
                raise ValueError("not a round's row")
        except ValueError as e:
            if i == len(lines):  # the last line, with no newline after it: the run stopped while writing it
                torn = True
                continue
            raise FedtuneError(f"{metrics}:{i} is not a round's row ({getattr(e, 'msg', e)}); fix or delete that "
                               "line") from None
        rows.append(row)
    return rows, torn


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory written by :class:`RunLog` (a torn last line of its log: :attr:`Run.torn`)."""
    path = Path(run_dir)
    metrics = path / METRICS
    if not metrics.is_file():
        what = "does not exist" if not path.exists() else f"is not a run directory (no {METRICS})"
        raise FedtuneError(f"{path} {what}; give a folder written by 'fedtune run', e.g. runs/<name>")
    rows, torn = read_rows(metrics)
    config = yaml.safe_load((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    try:
        summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else None
    except ValueError:
        raise FedtuneError(f"{path / SUMMARY} is not valid JSON; delete it and finish the run with --resume") from None
    return Run(path=path, config=config or {}, rows=rows, summary=summary, torn=torn)


def write_models(run_dir: str | Path, assignment: dict[int, str], names: list[str]) -> Path:
    """Write ``models.json`` for a run that ends with several models: their ``names`` and each client's model."""
    path = Path(run_dir) / MODELS
    atomic_write_text(path, json.dumps({"models": sorted(names),
                                        "assignment": {str(c): n for c, n in sorted(assignment.items())}},
                                       indent=2) + "\n")
    return path


def load_models(run_dir: str | Path) -> dict[str, list[int]]:
    """The models a run ended with (``models.json``), each with its clients; ``{}`` for a run with one model."""
    path = Path(run_dir) / MODELS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {name: sorted(int(c) for c, m in saved["assignment"].items() if m == name) for name in saved["models"]}


def model_assignment(run_dir: str | Path) -> dict[int, str]:
    """Client → the name of its model, for a run that saved several (``models.json``); clients not listed use
    the global model."""
    return {c: name for name, clients in load_models(run_dir).items() for c in clients}
