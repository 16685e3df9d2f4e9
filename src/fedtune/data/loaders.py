"""A dataset as a task: train and eval splits, which columns are text and label, label names.

:func:`load_task_data` finds the data (:mod:`fedtune.data.sources`), reads the
train and eval splits (:mod:`fedtune.data.readers`), checks every row (the text
columns hold non-empty text, the label is in the label set), maps labels to
integers 0..K-1 and draws the seeded subsets asked for by ``max_train_examples``
and ``max_eval_examples``. A user's columns named ``text``/``sentence``/``label``
(and the like, :mod:`fedtune.data.columns`) need not be named in the config. A
dataset without an eval split gets one held out of its training rows
(``eval_fraction``, :mod:`fedtune.data.holdout`). A classification label column
needs two values or more; classes read from the data (no ``data.labels``) are
checked for typos and for a column that holds no labels
(:mod:`fedtune.data.labels`). A malformed row stops the load, naming file and
line, or with ``on_malformed="skip"`` is dropped, counted in
``TaskData.skipped_rows`` and said in a note; a split that would lose more
than :data:`MAX_SKIPPED_SHARE` of its rows is refused. :func:`describe` returns
plain data about a dataset for ``fedtune data show``; :func:`describe_table`
renders it.

A parallel dataset (``registry.PARALLEL``: ``multilingual``,
``sst2_multilingual``) loads each selected language's registered dataset
(``data.languages``, default all) and stacks them, adding ``language`` (the
code) and ``row_id`` (the row's index in its language's split: the same item
in every language). ``max_*_examples`` cap each language; under ``data.parallel:
aligned`` they draw the same row ids in every language. Translations leak:
with ``aligned`` (the default) a client's held-out row in one language may be
another client's training row in another, and ``group_iid`` gives one client
the same question in several languages. That is what a language-clustering
benchmark wants, but not a measure of generalisation to unseen items; for that
use ``data.parallel: disjoint``, which gives each row id one language (a seeded,
balanced draw, per split), so every item appears once.

A mixture (``sst2_cola``) stacks unrelated datasets of one kind and label
count the same way, with a ``task`` column instead of ``language``; class i
of every member is label i of the one head, named by the members' names
joined (``negative/unacceptable``). ``max_*_examples`` cap each member.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from rich.table import Table

from fedtune.config import DataConfig
from fedtune.data.columns import detect_instruction, detect_label, detect_text
from fedtune.data.holdout import held_out
from fedtune.data.labels import check_labels
from fedtune.data.readers import Problem, RawTable, TextFormat
from fedtune.data.registry import PARALLEL, Kind, ParallelSpec
from fedtune.data.sources import Location, locate
from fedtune.errors import FedtuneError

_EVAL_SPLITS = ("dev", "validation", "val", "test")
"""Held-out split names tried, in order, for a dataset without a registered default."""

_INT = re.compile(r"[+-]?\d+")


@dataclass
class TaskData:
    """The examples of one task, ready for partitioning and tokenisation.

    Classification: ``label_column`` holds integers 0..K-1 naming ``label_names``.
    Multiple choice: the same, and the choice texts lie in the columns named by
    ``label_names`` (MMLU: ``A``..``D``). Instruction: ``label_column`` is None and
    ``target_column`` holds the response. Extra columns (e.g. MMLU's ``subject``)
    are kept so partitioners can use them.
    """

    name: str
    kind: Kind
    train: datasets.Dataset
    eval: datasets.Dataset | None
    text_columns: tuple[str, ...]
    label_column: str | None
    label_names: list[str]
    source: str
    skipped_rows: int = 0
    target_column: str | None = None
    eval_origin: list[dict[str, Any]] = field(default_factory=list)
    """Where the eval rows came from, one entry per dataset that has some: its ``split``, or the
    rows ``held_out`` of its training split (with ``fraction``, ``of_rows``, ``stratified_by``, ``seed``)."""
    notes: list[str] = field(default_factory=list)
    """One line each that a run prints before training: columns found by name, an eval split held out."""
    meta_columns: tuple[str, ...] = ()
    """Columns about each row's origin (a parallel dataset's ``language``, ``row_id``), kept through
    :func:`~fedtune.data.instructions.as_instructions` so partitions can use them."""


ROW_ID = "row_id"


@dataclass(frozen=True)
class _Schema:
    """What every row of a task must hold."""

    kind: Kind
    text_columns: tuple[str, ...]
    required: tuple[str, ...]
    """Columns that must hold non-empty text."""
    label_column: str | None = None
    label_values: tuple[str, ...] | None = None
    """Labels as written in the data, in class order; None: the sorted labels of the training split."""
    label_names: tuple[str, ...] | None = None
    target_column: str | None = None
    detected: tuple[str, ...] = ()
    """The config keys (``text_column``, ``label_column``, ``instruction``) whose columns were found by name."""


def load_task_data(cfg: DataConfig, seed: int) -> TaskData:
    """Load the train and eval splits named by ``cfg``; subsets are drawn with ``np.random.default_rng(seed)``."""
    if cfg.name in PARALLEL:
        return _load_parallel(PARALLEL[cfg.name], cfg, seed)
    if cfg.languages is not None or cfg.parallel != "aligned":
        raise FedtuneError(
            f"data.languages and data.parallel are for the parallel datasets ({', '.join(PARALLEL)}), "
            f"not '{cfg.name}'; remove them"
        )
    loc = locate(cfg.name)
    fmt = _text_format(cfg, loc)
    train_tables = loc.read(cfg.train_split, fmt)
    schema = _schema(loc, cfg, train_tables[0])
    if schema is None:
        raise FedtuneError(
            f"data.text_column and data.label_column are required to train on {train_tables[0].origin} "
            f"(columns: {', '.join(train_tables[0].columns)}); set them to the input text and label columns "
            "(columns named text or sentence, and label, are found without them)"
        )
    given = tuple(cfg.labels) if cfg.labels and schema.label_column else None
    if schema.kind == "classification" and given is None and not schema.label_values:  # classes read from the data
        check_labels(_label_cells(train_tables, schema.label_column), schema.label_column)
    values = given or schema.label_values or _label_order(train_tables, schema.label_column)
    train, problems = _rows(train_tables, schema, values)
    splits = {cfg.train_split: (_length(train), problems)}
    eval_split = cfg.eval_split or _default_eval(loc, cfg.train_split)
    evaluation = None
    if eval_split is not None:
        evaluation, eval_problems = _rows(loc.read(eval_split, fmt), schema, values)
        splits[eval_split] = (_length(evaluation), eval_problems)
        problems = problems + eval_problems
    notes = [_columns_note(schema, loc.source)] if schema.detected else []
    if problems:
        notes.append(_malformed_note(cfg, loc.source, splits))
    if not _length(train):
        raise FedtuneError(f"split '{cfg.train_split}' of {loc.source} has no usable rows; check the file")
    if schema.kind == "classification" and given is None:  # given labels fix the classes, whatever a file holds
        _check_two_labels(train, schema.label_column, values, loc.source)
    origin: list[dict[str, Any]] = []
    if evaluation is not None:
        evaluation = _subset(evaluation, cfg.max_eval_examples, seed)
        origin.append({"dataset": cfg.name, "split": eval_split, "rows": _length(evaluation)})
    elif cfg.eval_fraction > 0:
        train, evaluation, held = _hold_out(train, schema.label_column, cfg, seed)
        if evaluation is not None:
            origin.append(held)
            how = f"stratified by {schema.label_column}" if schema.label_column else "at random"
            notes.append(
                f"eval: held out {held['rows']} of the {held['of_rows']} rows of {loc.source} as the eval split "
                f"(data.eval_fraction={cfg.eval_fraction}, {how}, seed {seed}); "
                "set data.eval_fraction=0 to train on every row"
            )
    return TaskData(
        name=cfg.name,
        kind=schema.kind,
        train=_dataset(_subset(train, cfg.max_train_examples, seed), loc.source),
        eval=None if evaluation is None else _dataset(evaluation, loc.source),
        text_columns=schema.text_columns,
        label_column=schema.label_column,
        label_names=list(schema.label_names if schema.label_names and given in (None, schema.label_values) else values),
        source=loc.source,
        skipped_rows=len(problems),
        target_column=schema.target_column,
        eval_origin=origin,
        notes=notes,
        meta_columns=loc.spec.meta_columns if loc.spec is not None else (),
    )


def _hold_out(train: dict[str, list], label_column: str | None, cfg: DataConfig,
              seed: int) -> tuple[dict[str, list], dict[str, list] | None, dict[str, Any]]:
    """(train, eval, origin): :func:`~fedtune.data.holdout.held_out` rows of ``train``; eval None if it held none."""
    n = _length(train)
    labels = train[label_column] if label_column else None
    keep, held = held_out(n, cfg.eval_fraction, seed, labels, limit=cfg.max_eval_examples)
    origin = {"dataset": cfg.name, "held_out": cfg.train_split, "rows": len(held), "of_rows": n,
              "fraction": cfg.eval_fraction, "stratified_by": label_column, "seed": seed}
    if not len(held):
        return train, None, origin
    return _take(train, keep), _take(train, held), origin


MAX_SKIPPED_SHARE = 0.1
"""``on_malformed: skip`` refuses a split with more than this share of its rows malformed (and over
``MAX_SKIPPED_ROWS`` rows): the file is then not read as it was written (columns, quoting, encoding)."""
MAX_SKIPPED_ROWS = 10


def _malformed_note(cfg: DataConfig, source: str, splits: dict[str, tuple[int, list[Problem]]]) -> str:
    """The line saying how many malformed rows ``on_malformed: skip`` dropped, per split; an error under
    ``error``, or when a split loses too many (:data:`MAX_SKIPPED_SHARE`)."""
    problems = [p for _, found in splits.values() for p in found]
    if cfg.on_malformed == "error":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FedtuneError(
            f"malformed row at {problems[0]}{more}; fix the data or set data.on_malformed=skip to drop such rows"
        )
    for split, (kept, found) in splits.items():
        total = kept + len(found)
        if len(found) > MAX_SKIPPED_ROWS and len(found) > MAX_SKIPPED_SHARE * total:
            raise FedtuneError(
                f"data.on_malformed=skip would drop {len(found):,} of the {total:,} rows of split '{split}' of "
                f"{source} ({len(found) / total:.0%}; more than {MAX_SKIPPED_SHARE:.0%} is refused), the first at "
                f"{found[0]}; the file is not read as written: check its columns, data.quoting and data.encoding"
            )
    counts = ", ".join(f"{len(found):,} of {kept + len(found):,} in '{split}'" for split, (kept, found) in
                       splits.items() if found)
    return f"data: skipped {len(problems):,} malformed rows ({counts}; data.on_malformed=skip), the first at {problems[0]}"


def _text_format(cfg: DataConfig, loc: Location) -> TextFormat:
    """How ``loc``'s files are read: ``data.encoding``, and ``data.quoting`` (default ``standard``), which a
    registered dataset sets itself."""
    if cfg.quoting is not None and loc.spec is not None and cfg.quoting != loc.spec.quoting:
        raise FedtuneError(f"dataset '{loc.spec.name}' reads its files with quoting '{loc.spec.quoting}'; remove "
                           "data.quoting, or load the files by path to choose it")
    return TextFormat(cfg.encoding, cfg.quoting or "standard")


def _label_cells(tables: Sequence[RawTable], column: str) -> list[tuple[str, str, int]]:
    """(label as text, file, line) of every row with a label."""
    return [(raw, t.origin, line) for t in tables for v, line in zip(t.columns.get(column, ()), t.lines)
            if (raw := _raw_label(v)) is not None]


def _check_two_labels(train: dict[str, list], column: str, values: tuple[str, ...], source: str) -> None:
    present = sorted(set(train[column]))
    if len(present) < 2:
        raise FedtuneError(
            f"label column '{column}' of {source} holds one value ('{values[present[0]]}') in all its "
            f"{_length(train)} usable rows; a classifier needs at least two labels: set data.label_column "
            "to the column of labels, or add rows of the other labels"
        )


def _columns_note(schema: _Schema, source: str) -> str:
    """The line that says which columns were found by name."""

    def quoted(columns: Sequence[str]) -> str:
        return ", ".join(f"'{c}'" for c in columns)

    if schema.kind == "instruction":
        return (f"data: instruction columns {quoted(schema.text_columns)}, response column "
                f"'{schema.target_column}' (found by name in {source})")
    parts, keys = [], []
    if "text_column" in schema.detected:
        pair = len(schema.text_columns) > 1
        parts.append(f"text column{'s' * pair} {quoted(schema.text_columns)}")
        keys += ["data.text_column"] + ["data.text_pair_column"] * pair
    if "label_column" in schema.detected:
        parts.append(f"label column '{schema.label_column}'")
        keys.append("data.label_column")
    return f"data: {', '.join(parts)} (found by name in {source}; set {' / '.join(keys)} to choose others)"


def describe(data: str | DataConfig) -> dict[str, Any]:
    """Plain facts about a dataset: split sizes, malformed rows, columns, labels and the first 3 rows.

    A name or path is described as it would load with default settings; pass a
    :class:`DataConfig` to name the text and label columns of a user's file.
    Malformed rows are counted per split, not raised.
    """
    cfg = data if isinstance(data, DataConfig) else DataConfig(name=data)
    if cfg.name in PARALLEL:
        return _describe_parallel(PARALLEL[cfg.name], cfg)
    loc = locate(cfg.name)
    train_split = cfg.train_split if cfg.train_split in loc.splits else loc.splits[0]
    fmt = _text_format(cfg, loc)
    tables = {split: loc.read(split, fmt) for split in loc.splits}
    schema = _schema(loc, cfg, tables[train_split][0])
    values: tuple[str, ...] = ()
    if schema is not None:
        values = schema.label_values or _label_order(tables[train_split], schema.label_column)
    splits, columns = {}, {}
    for split, split_tables in tables.items():
        if schema is None:
            rows, problems = _concat([t.columns for t in split_tables]), [p for t in split_tables for p in t.problems]
        else:
            rows, problems = _rows(split_tables, schema, values)
        splits[split] = {"rows": _length(rows), "malformed": len(problems)}
        columns[split] = rows
    train = columns[train_split]
    label_column = schema.label_column if schema else None
    label_names = list(schema.label_names or values) if schema else []
    counts = Counter(train[label_column]) if label_column else Counter()
    return {
        "name": cfg.name,
        "source": loc.source,
        "kind": schema.kind if schema else None,
        "description": loc.spec.description if loc.spec else "",
        "splits": splits,
        "train_split": train_split,
        "eval_split": cfg.eval_split or _default_eval(loc, train_split),
        "eval_fraction": cfg.eval_fraction,
        "columns": list(train),
        "text_columns": list(schema.text_columns) if schema else [],
        "label_column": label_column,
        "label_names": label_names,
        "label_counts": {name: counts[i] for i, name in enumerate(label_names)} if label_column else {},
        "examples": [{c: v[i] for c, v in train.items()} for i in range(min(3, _length(train)))],
    }


def describe_table(info: dict[str, Any], width: int = 100) -> Table:
    """A rich table of :func:`describe`'s result; long example fields are cut to ``width`` characters."""
    kind = info["kind"] or "unknown: set data.text_column and data.label_column to train on it"
    table = Table(title=f"{info['name']} ({kind})", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    sizes = [
        f"{split} {s['rows']:,}" + (f" ({s['malformed']} malformed)" if s["malformed"] else "")
        for split, s in info["splits"].items()
    ]
    rows = [
        ("description", info["description"]),
        ("source", info["source"]),
        ("splits", " · ".join(sizes)),
        ("train / eval", f"{info['train_split']} / {info['eval_split'] or _held_out_text(info)}"),
        ("columns", ", ".join(info["columns"])),
        ("text", ", ".join(info["text_columns"])),
        ("label", info["label_column"] or "-"),
        ("labels", ", ".join(f"{i} {n} ({c:,})" for i, (n, c) in enumerate(info["label_counts"].items()))),
        *((column, " · ".join(f"{g} {n:,}" for g, n in counts.items()))
          for column, counts in info.get("groups", {}).items()),
    ]
    names, label = info["label_names"], info["label_column"]
    for i, example in enumerate(info["examples"]):
        fields = [
            f"{c}: {_clip(v, width)}" + (f" ({names[v]})" if c == label and v is not None else "")
            for c, v in example.items()
        ]
        rows.append((f"example {i + 1}", "\n".join(fields)))
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def _held_out_text(info: dict[str, Any]) -> str:
    fraction = info.get("eval_fraction")
    return f"{fraction:.0%} of {info['train_split']}, held out (data.eval_fraction)" if fraction else "-"


def _load_parallel(spec: ParallelSpec, cfg: DataConfig, seed: int) -> TaskData:
    """The selected members' datasets stacked, with a member column and ``row_id`` (see the module doc)."""
    members = _members(spec, cfg)
    whole = {"languages": None, "parallel": "aligned", "max_train_examples": None, "max_eval_examples": None}
    # a language without an eval split holds out the same row ids as every other (same rows, same seed)
    tasks = {m: load_task_data(cfg.model_copy(update={"name": spec.members[m], **whole}), seed) for m in members}
    first = tasks[members[0]]
    if len({t.text_columns for t in tasks.values()}) > 1:
        raise FedtuneError(f"dataset '{spec.name}': its members read different text columns; a mixture needs one")
    evals = {m: t.eval for m, t in tasks.items()}
    if len({e is None for e in evals.values()}) > 1:
        raise FedtuneError(
            f"dataset '{spec.name}': only some members have an eval split; "
            "set data.eval_split to a split they all have"
        )
    return TaskData(
        name=spec.name,
        kind=first.kind,
        train=_stack(spec, {m: t.train for m, t in tasks.items()}, cfg, cfg.max_train_examples, seed),
        eval=None if first.eval is None else _stack(spec, evals, cfg, cfg.max_eval_examples, seed),
        text_columns=first.text_columns,
        label_column=first.label_column,
        label_names=_joint_label_names(spec, [t.label_names for t in tasks.values()]),
        source=" + ".join(dict.fromkeys(t.source for t in tasks.values())),
        skipped_rows=sum(t.skipped_rows for t in tasks.values()),
        target_column=first.target_column,
        eval_origin=[o for t in tasks.values() for o in t.eval_origin],
        notes=[line for t in tasks.values() for line in t.notes],
        meta_columns=(spec.column, ROW_ID),
    )


def _joint_label_names(spec: ParallelSpec, names: list[list[str]]) -> list[str]:
    """One head's label names: the members' names of each class, joined by "/" where they differ."""
    if len({len(n) for n in names}) > 1:
        raise FedtuneError(f"dataset '{spec.name}': its members have different numbers of labels; "
                           "a mixture needs one label set")
    return ["/".join(dict.fromkeys(column)) for column in zip(*names)]


def _stack(
    spec: ParallelSpec, parts: dict[str, datasets.Dataset], cfg: DataConfig, limit: int | None, seed: int
) -> datasets.Dataset:
    """One split of every member, one after another: row ids per member (all, or a disjoint share), capped."""
    sizes = {lang: len(ds) for lang, ds in parts.items()}
    if spec.aligned and len(set(sizes.values())) > 1:
        raise FedtuneError(
            f"dataset '{spec.name}' is not row-aligned "
            f"({', '.join(f'{lang} {n:,} rows' for lang, n in sizes.items())}); "
            "every language's file must hold the same items in the same order (with data.on_malformed=skip, fix the "
            "malformed rows instead)"
        )
    if cfg.parallel == "disjoint":
        n = next(iter(sizes.values()))
        shares = np.array_split(np.random.default_rng(seed).permutation(n), len(parts))
        ids = {lang: np.sort(share) for lang, share in zip(parts, shares)}
    else:
        ids = {lang: np.arange(n) for lang, n in sizes.items()}
    common = [c for c in next(iter(parts.values())).column_names if all(c in ds.column_names for ds in parts.values())]
    stacked = []
    for lang, ds in parts.items():
        keep = ids[lang]
        if limit is not None and len(keep) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(keep, size=limit, replace=False))
        rows = ds.select(keep).select_columns(common).to_dict()  # a mixture keeps the columns all members have
        stacked.append({**rows, spec.column: [lang] * len(keep), ROW_ID: keep.tolist()})
    return datasets.Dataset.from_dict(_concat(stacked), features=datasets.Features(
        {**{c: next(iter(parts.values())).features[c] for c in common}, spec.column: datasets.Value("string"),
         ROW_ID: datasets.Value("int64")}
    ))


def _members(spec: ParallelSpec, cfg: DataConfig) -> list[str]:
    """The members to load: the languages of ``data.languages`` (default all); every task of a mixture."""
    if not spec.aligned:
        if cfg.languages is not None or cfg.parallel != "aligned":
            raise FedtuneError(
                f"data.languages and data.parallel are for translations; '{spec.name}' is a mixture of different "
                f"datasets ({', '.join(spec.members)}) and loads all of them; remove them"
            )
        return list(spec.members)
    requested = cfg.languages
    available = ", ".join(spec.members)
    if requested is None:
        return list(spec.members)
    if not requested:
        raise FedtuneError(f"data.languages is empty; list some of {spec.name}'s languages ({available}), or remove it")
    unknown = [lang for lang in requested if lang not in spec.members]
    if unknown:
        raise FedtuneError(
            f"data.languages: '{unknown[0]}' is not a language of {spec.name} (languages: {available}); "
            "choose among them"
        )
    if len(set(requested)) != len(requested):
        raise FedtuneError(f"data.languages lists a language twice: {requested}")
    return list(requested)


def _describe_parallel(spec: ParallelSpec, cfg: DataConfig) -> dict[str, Any]:
    """:func:`describe` of each member, summed; the examples show row 0 in the first members."""
    languages = _members(spec, cfg)
    infos = {
        lang: describe(cfg.model_copy(update={"name": spec.members[lang], "languages": None, "parallel": "aligned"}))
        for lang in languages
    }
    first = infos[languages[0]]
    common = [split for split in first["splits"] if all(split in i["splits"] for i in infos.values())]
    splits = {
        split: {key: sum(i["splits"][split][key] for i in infos.values()) for key in ("rows", "malformed")}
        for split in common
    }
    examples = []
    for k in range(min(3, len(languages) * len(first["examples"]))):
        lang, row = languages[k % len(languages)], k // len(languages)
        examples.append({**infos[lang]["examples"][row], spec.column: lang, ROW_ID: row})
    return {
        **first,
        "name": spec.name,
        "source": " + ".join(dict.fromkeys(i["source"] for i in infos.values())),
        "description": spec.description,
        "splits": splits,
        "columns": [c for c in first["columns"] if all(c in i["columns"] for i in infos.values())] + [spec.column, ROW_ID],
        "label_names": _joint_label_names(spec, [i["label_names"] for i in infos.values()]),
        "label_counts": {joint: sum(list(i["label_counts"].values())[k] for i in infos.values())
                         for k, joint in enumerate(_joint_label_names(spec, [list(i["label_counts"]) for i in
                                                                            infos.values()]))},
        "examples": examples,
        "groups": {spec.column: {lang: i["splits"][first["train_split"]]["rows"] for lang, i in infos.items()}},
    }


def _schema(loc: Location, cfg: DataConfig, first: RawTable) -> _Schema | None:
    """The registered task, or one read from ``cfg`` and the columns of a user's data (None: not enough said)."""
    spec = loc.spec
    if spec is not None:
        given = _given_columns(cfg)
        own = {
            "text_column": spec.text_columns[0],
            "text_pair_column": spec.text_columns[1] if len(spec.text_columns) > 1 else None,
            "label_column": spec.label_column,
        }
        for key, value in given.items():
            if value is not None and value != own[key]:
                raise FedtuneError(
                    f"dataset '{spec.name}' sets its own columns (text: {', '.join(spec.text_columns)}; "
                    f"label: {spec.label_column or '-'}); remove data.{key}, or load the files by path to choose columns"
                )
        return _Schema(
            kind=spec.kind,
            text_columns=spec.text_columns,
            required=_required(spec.kind, spec.text_columns) + spec.required,
            label_column=spec.label_column,
            label_values=spec.label_values or None,
            label_names=spec.label_names or None,
            target_column=spec.target_column,
        )
    columns = list(first.columns)

    def check(key: str, column: str) -> None:
        if column not in columns:
            raise FedtuneError(
                f"data.{key} '{column}' is not a column of {first.origin} (columns: {', '.join(columns)}); "
                f"set data.{key} to one of them"
            )

    named = {key: value for key, value in _given_columns(cfg).items() if value is not None}
    for key, column in named.items():
        check(key, column)
    instruction = detect_instruction(columns)
    if not named and instruction:
        return _Schema("instruction", instruction, _required("instruction", instruction) + ("output",),
                       target_column="output", detected=("instruction",))
    detected = []
    text, label = None, cfg.label_column
    if cfg.text_column is not None:
        text = (cfg.text_column,) + ((cfg.text_pair_column,) if cfg.text_pair_column else ())
    elif cfg.text_pair_column is None:
        text = detect_text(columns)
        detected += ["text_column"] * (text is not None)
    if label is None:
        label = detect_label(columns)
        detected += ["label_column"] * (label is not None)
    if text is None or label is None:
        return None
    names = loc.class_names(label)
    return _Schema(
        kind="classification",
        text_columns=text,
        required=text,
        label_column=label,
        label_values=tuple(str(i) for i in range(len(names))) if names else None,
        label_names=names,
        detected=tuple(detected),
    )


def _given_columns(cfg: DataConfig) -> dict[str, str | None]:
    """The column keys of ``cfg``, by name."""
    return {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column, "label_column": cfg.label_column}


def _required(kind: Kind, text_columns: tuple[str, ...]) -> tuple[str, ...]:
    """Text columns that must be non-empty: all of them, except an instruction's optional ``input``."""
    return text_columns[:1] if kind == "instruction" else text_columns


def _default_eval(loc: Location, train_split: str) -> str | None:
    candidates = [loc.spec.eval_split] if loc.spec else list(_EVAL_SPLITS)
    return next((s for s in candidates if s in loc.splits and s != train_split), None)


def _raw_label(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = "" if value is None else str(value).strip()
    return text or None


def _label_order(tables: Sequence[RawTable], column: str | None) -> tuple[str, ...]:
    """The distinct labels of the training split: numerically sorted if all are integers, else sorted as text."""
    if column is None:
        return ()
    seen = {_raw_label(v) for t in tables for v in t.columns.get(column, ())} - {None}
    numeric = all(_INT.fullmatch(v) for v in seen)
    return tuple(sorted(seen, key=int if numeric else None))


def _rows(tables: Sequence[RawTable], schema: _Schema, values: tuple[str, ...]) -> tuple[dict[str, list], list[Problem]]:
    """The valid rows of a split's tables, labels as class indices, and every malformed row found."""
    index = {v: i for i, v in enumerate(values)}
    parts, problems = [], []
    for table in tables:
        columns, table_problems = _check(table, schema, index)
        parts.append(columns)
        problems += table_problems
    return _concat(parts), problems


def _check(table: RawTable, schema: _Schema, index: dict[str, int]) -> tuple[dict[str, list], list[Problem]]:
    needed = schema.required + ((schema.label_column,) if schema.label_column else ())
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise FedtuneError(
            f"{table.origin} has no column '{missing[0]}' (columns: {', '.join(table.columns)}); fix the file"
        )
    bad: dict[int, str] = {}
    for column in schema.required:
        for i, v in enumerate(table.columns[column]):
            if not isinstance(v, str) or not v.strip():
                what = "is empty" if v is None or isinstance(v, str) else f"holds {type(v).__name__}, not text"
                bad.setdefault(i, f"column '{column}' {what}")
    columns = dict(table.columns)
    if schema.label_column:
        labels = []
        for i, v in enumerate(table.columns[schema.label_column]):
            raw = _raw_label(v)
            label = index.get(raw) if raw is not None else None
            if label is None:
                bad.setdefault(i, "missing label" if raw is None else f"label '{raw}' is not one of {', '.join(index)}")
            labels.append(label)
        columns[schema.label_column] = labels
    problems = table.problems + [Problem(table.origin, table.lines[i], reason) for i, reason in bad.items()]
    problems.sort(key=lambda p: p.line)
    if bad:
        keep = [i for i in range(len(table)) if i not in bad]
        columns = {c: [v[i] for i in keep] for c, v in columns.items()}
    return columns, problems


def _concat(parts: Sequence[dict[str, list]]) -> dict[str, list]:
    """Columns of several tables one after another; a column some table lacks is None there."""
    if len(parts) == 1:
        return parts[0]
    names = list(dict.fromkeys(c for part in parts for c in part))
    out: dict[str, list] = {c: [] for c in names}
    for part in parts:
        n = _length(part)
        for c in names:
            out[c].extend(part.get(c, [None] * n))
    return out


def _length(columns: dict[str, list]) -> int:
    return len(next(iter(columns.values()), []))


def _take(columns: dict[str, list], rows: np.ndarray) -> dict[str, list]:
    return {c: [v[i] for i in rows] for c, v in columns.items()}


def _subset(columns: dict[str, list], limit: int | None, seed: int) -> dict[str, list]:
    """A seeded random subset of at most ``limit`` rows, in their original order."""
    n = _length(columns)
    if limit is None or n <= limit:
        return columns
    return _take(columns, np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)))


def _dataset(columns: dict[str, list], source: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_dict(columns)
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError for mixed value types
        detail = " ".join(str(e).split())[:200]
        raise FedtuneError(f"{source}: a column mixes value types ({detail}); make every column hold one type") from None


def _clip(value: Any, width: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"
