"""Parsing CSV, TSV, JSON and JSON-lines files into columns.

Reading is structural only: a row with the wrong number of fields, a line that
is not JSON, or a record that is not an object becomes a :class:`Problem`
(file and line) instead of a row. What a row must hold (non-empty text, a
known label) is checked by the loader.

CSV and TSV are parsed by Python's :mod:`csv` module, with the quoting of
:class:`TextFormat`: ``standard`` (RFC 4180, as Excel and pandas write both
formats) reads a field enclosed in double quotes as one field, which may hold
the delimiter, line breaks and doubled quotes ``""``; it is strict, so a quote
that closes a field must be followed by the delimiter or the end of the line
(``"a"b`` is an error, not ``ab``). ``none`` reads quote characters as plain
text: a field ends at the next delimiter or line break (GLUE's TSV files, whose
sentences begin with bare quotes). Files are decoded with ``TextFormat.encoding``
(a UTF-8 byte-order mark is dropped).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedtune.errors import FedtuneError

SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")

QUOTING = {"standard": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}
"""``data.quoting``: how quote characters in CSV/TSV fields are read (see the module doc)."""

_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class Problem:
    """A malformed row: where it is and what is wrong with it."""

    origin: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.origin} line {self.line}: {self.reason}"


@dataclass
class RawTable:
    """The rows of one file (or Hub split) as columns, with each row's source line."""

    origin: str
    columns: dict[str, list[Any]]
    lines: list[int]
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)


@dataclass(frozen=True)
class TextFormat:
    """How a file's text is read: its encoding (a Python codec name) and, for CSV/TSV, its ``quoting``."""

    encoding: str = "utf-8"
    quoting: str = "standard"


def read_table(path: Path, fieldnames: Sequence[str] | None = None, fmt: TextFormat = TextFormat()) -> RawTable:
    """Read one data file; ``fieldnames`` names the columns of a headerless CSV/TSV file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise FedtuneError(f"cannot read {path}: the file must end in {', '.join(SUFFIXES)}")
    origin = str(path)
    text = _decode(path, fmt.encoding)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(origin, io.StringIO(text, newline=""), suffix == ".tsv", fieldnames, fmt.quoting)
    records = _jsonl_records(origin, text) if suffix == ".jsonl" else _json_list_records(origin, text)
    return _from_records(origin, records)


def _decode(path: Path, encoding: str) -> str:
    """The file's text in ``encoding`` (UTF-8 without its byte-order mark); one line naming the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FedtuneError(f"cannot read {path}: {e.strerror}") from None
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        return raw.decode("utf-8-sig" if utf8 else encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        fix = ("set data.encoding to the file's encoding (e.g. latin-1 or cp1252), or re-save it as UTF-8" if utf8
               else "set data.encoding to the file's encoding")
        raise FedtuneError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not {encoding} text; {fix}") from None


def _read_delimited(origin: str, f: TextIO, tsv: bool, fieldnames: Sequence[str] | None, quoting: str) -> RawTable:
    reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=QUOTING[quoting], strict=True)
    kind = "tab-separated" if tsv else "comma-separated"
    rows: list[list[str]] = []
    lines: list[int] = []
    problems: list[Problem] = []
    start = 1
    try:
        names = list(fieldnames) if fieldnames else next(reader, None)
        if not names:
            raise FedtuneError(f"{origin} is empty; it needs a header line naming the columns")
        if len(set(names)) != len(names):
            raise FedtuneError(f"{origin}: the header names a column twice ({', '.join(names)}); make the names "
                               "unique")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(names):
                problems.append(Problem(origin, line, f"expected {len(names)} {kind} fields, found {len(row)}"))
                continue
            rows.append(row)
            lines.append(line)
    except csv.Error as e:
        hint = (" or set data.quoting=none if its quote characters are plain text" if quoting == "standard" else "")
        raise FedtuneError(f"{origin} line {start}: cannot be parsed as {kind} values with data.quoting={quoting} "
                           f"({e}); fix the file{hint}") from None
    columns = {name: list(values) for name, values in zip(names, zip(*rows))} if rows else {n: [] for n in names}
    return RawTable(origin, columns, lines, problems)


def _jsonl_records(origin: str, text: str) -> Iterator[tuple[int, Any] | Problem]:
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            yield Problem(origin, line, f"not valid JSON ({e.msg})")


def _json_list_records(origin: str, text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        raise FedtuneError(f"{origin} must hold a JSON list of records [{{...}}, ...] (or use .jsonl, one object per line)")
    pos = _WS.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{origin} line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        yield line, record
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            where = 1 + text.count("\n", 0, pos)
            raise FedtuneError(f"{origin} line {where}: expected ',' or ']' between records; fix the file")
    if _WS.match(text, pos + 1).end() != len(text):
        raise FedtuneError(f"{origin}: unexpected text after the closing ']' of the record list; fix the file")


def _from_records(origin: str, records: Iterator[tuple[int, Any] | Problem]) -> RawTable:
    """Columns from JSON objects: the union of their keys, in order of first appearance."""
    objects: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: list[Problem] = []
    names: dict[str, None] = {}
    for item in records:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        line, record = item
        if not isinstance(record, dict):
            problems.append(Problem(origin, line, f"expected a JSON object, found {type(record).__name__}"))
            continue
        names.update(dict.fromkeys(record))
        objects.append(record)
        lines.append(line)
    columns = {name: [o.get(name) for o in objects] for name in names}
    return RawTable(origin, columns, lines, problems)
