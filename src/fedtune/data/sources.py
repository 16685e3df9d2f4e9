"""Where a dataset is read from: a path, a local data root, or the Hugging Face Hub.

A registered name is looked for as ``<root>/<spec.folder>/`` in each data root,
in this order: ``$FEDTUNE_DATA``, ``../shared/data`` from the working directory,
``../shared/data`` from the repository root; then on the Hub. Any other name is
an existing file or folder (a folder holds ``<split>.<ext>`` files), a folder
in a data root, or an ``owner/name`` Hub id. The Hub is tried only when it is
reachable: with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or without an
HTTP answer from it (``HF_ENDPOINT``, through any configured proxy) within
``HUB_TIMEOUT_S``, it is skipped at once rather than retried, and the error
names every place that was looked at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from fedtune.data.readers import SUFFIXES, RawTable, TextFormat, read_table
from fedtune.data.registry import PARALLEL, REGISTRY, DatasetSpec
from fedtune.errors import FedtuneError
from fedtune.hub import hub_unavailable

"""Seconds to wait for any HTTP answer from the Hub before calling it unreachable."""

_FIX = "set FEDTUNE_DATA to the folder holding the datasets, pass a file or folder path as data.name, or go online"


@dataclass
class Location:
    """A dataset found: its split files on disk, or its splits downloaded from the Hub."""

    name: str
    source: str
    spec: DatasetSpec | None = None
    files: dict[str, list[Path]] = field(default_factory=dict)
    hub: datasets.DatasetDict | None = None

    @property
    def splits(self) -> list[str]:
        if self.hub is None:
            return list(self.files)
        if self.spec is None:
            return list(self.hub)
        return [split for split, hub_split in self.spec.hub_splits.items() if hub_split in self.hub]

    def read(self, split: str, fmt: TextFormat = TextFormat()) -> list[RawTable]:
        """The raw tables of one split (several for a split stored as one file per subject), files read with
        ``fmt`` (a registered dataset's files with its own quoting)."""
        if split not in self.splits:
            raise FedtuneError(
                f"dataset '{self.name}' has no split '{split}' (splits: {', '.join(self.splits)}); "
                "set data.train_split / data.eval_split to one of them"
            )
        if self.hub is not None:
            return [self._hub_table(split)]
        paths = self.files[split]
        if not paths:
            pattern = self.spec.files[split] if self.spec else split
            raise FedtuneError(f"no file {pattern} for split '{split}' in {self.source}; restore the file")
        return [self._file_table(path, split, fmt) for path in paths]

    def class_names(self, column: str) -> tuple[str, ...] | None:
        """Names of a Hub ``ClassLabel`` column, in class-index order; None otherwise."""
        if self.hub is None:
            return None
        feature = next(iter(self.hub.values())).features.get(column)
        return tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def _file_table(self, path: Path, split: str, fmt: TextFormat) -> RawTable:
        spec = self.spec
        if spec is not None:
            fmt = TextFormat(fmt.encoding, spec.quoting)
        table = read_table(path, spec.fieldnames if spec else None, fmt)
        if spec and spec.file_column:
            table.columns[spec.file_column] = [path.stem.removesuffix(f"_{split}")] * len(table)
        return table

    def _hub_table(self, split: str) -> RawTable:
        spec = self.spec
        hub_split = spec.hub_splits[split] if spec else split
        columns = self.hub[hub_split].with_format("arrow")[:].to_pydict()
        if spec and spec.hub_columns:
            columns = spec.hub_columns(columns)
        if spec and spec.label_column:
            values = spec.label_values
            columns[spec.label_column] = [
                values[v] if 0 <= v < len(values) else str(v) for v in columns[spec.label_column]
            ]
        n = len(next(iter(columns.values()), []))
        return RawTable(f"{self.source}[{hub_split}]", columns, list(range(1, n + 1)))


def locate(name: str) -> Location:
    """Find a dataset by registered name, path, data-root folder or Hub id (see the module doc)."""
    spec = REGISTRY.get(name)
    if spec is not None:
        return _locate_registered(spec)
    path = Path(name).expanduser()
    if path.exists():
        return _local(name, path)
    if path.suffix.lower() in SUFFIXES:
        raise FedtuneError(f"data file not found: {path} (working directory {Path.cwd()}); check the path")
    looked = _looked_env()
    for root in data_roots():
        if (root / name).is_dir():
            return _local(name, root / name)
        looked.append(str(root / name))
    if "/" in name:
        return _locate_hub(name, None, None, looked)
    raise FedtuneError(
        f"unknown dataset '{name}': not a registered name ({', '.join([*REGISTRY, *PARALLEL])}), not a file or folder, "
        f"not in {', '.join(looked)}; give a registered name, a path to a CSV/TSV/JSON/JSONL file or folder, "
        "or a Hub id owner/name"
    )


def data_roots() -> list[Path]:
    """Local folders that hold one sub-folder per dataset, in search order, without duplicates."""
    candidates = []
    if os.environ.get("FEDTUNE_DATA"):
        candidates.append(Path(os.environ["FEDTUNE_DATA"]).expanduser())
    candidates.append(Path.cwd().parent / "shared" / "data")
    repo = _repo_root()
    if repo is not None:
        candidates.append(repo.parent / "shared" / "data")
    roots: list[Path] = []
    for c in candidates:
        c = c.resolve()
        if c not in roots:
            roots.append(c)
    return roots


def _repo_root() -> Path | None:
    """The folder holding ``pyproject.toml`` above this package (a source checkout), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def _looked_env() -> list[str]:
    return [] if os.environ.get("FEDTUNE_DATA") else ["$FEDTUNE_DATA (not set)"]


def _locate_registered(spec: DatasetSpec) -> Location:
    looked = _looked_env()
    for root in data_roots():
        folder = root / spec.folder
        if folder.is_dir():
            files = {split: sorted(folder.glob(pattern)) for split, pattern in spec.files.items()}
            return Location(spec.name, str(folder), spec=spec, files=files)
        looked.append(str(folder))
    if spec.hub_id is None:
        raise FedtuneError(
            f"dataset '{spec.name}' not found; looked in {', '.join(looked)} (it has no Hub equivalent); "
            f"set FEDTUNE_DATA to the folder holding {spec.folder}/, or pass the file path as data.name"
        )
    return _locate_hub(spec.hub_id, spec.hub_config, spec, looked)


def _locate_hub(hub_id: str, config: str | None, spec: DatasetSpec | None, looked: list[str]) -> Location:
    name = spec.name if spec else hub_id
    reason = hub_unavailable()
    if reason is not None:
        raise FedtuneError(
            f"dataset '{name}' not found; looked in {', '.join(looked)} and on the Hugging Face Hub as {hub_id} "
            f"({reason}); {_FIX}"
        )
    try:
        hub = datasets.load_dataset(hub_id, config)
    except Exception as e:  # the datasets library raises many types for a missing, gated or broken dataset
        detail = " ".join(str(e).split())[:300]
        raise FedtuneError(
            f"dataset '{name}' not found in {', '.join(looked)}, and loading {hub_id} from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {detail}); check the Hub id, or {_FIX}"
        ) from None
    return Location(name, f"hub:{hub_id}" + (f"/{config}" if config else ""), spec=spec, hub=hub)


def _local(name: str, path: Path) -> Location:
    """A user's file (its train split) or folder of ``<split>.<ext>`` files."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise FedtuneError(f"cannot read {path}: a data file must end in {', '.join(SUFFIXES)}")
        return Location(name, str(path), files={"train": [path]})
    files: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        if p.suffix.lower() not in SUFFIXES:
            continue
        if p.stem in files:
            raise FedtuneError(f"folder {path} has two files for split '{p.stem}' ({files[p.stem][0].name}, {p.name}); keep one")
        files[p.stem] = [p]
    if not files:
        raise FedtuneError(f"folder {path} holds no {'/'.join(SUFFIXES)} files; put <split>.csv (or .tsv/.json/.jsonl) files in it")
    return Location(name, str(path), files=files)
