"""Checks on a classification label column whose classes are read from the data (no ``data.labels``).

Every distinct value of such a column becomes a class of the head, so two
mistakes would silently change the task; both stop the load with one line:

- **Not a label column**: more than ``MAX_CLASSES_UNCHECKED`` distinct values, more
  than half of them in one row only (text, ids, or a file read with the wrong
  quoting or columns).
- **A typo**: a value ``v`` that is rare — in at most 1% of the rows (one row at
  least) — next to a value ``w`` close to it that holds at least ``TYPO_RATIO``
  times as many rows. Close: equal but for case and surrounding spaces; or, for
  values of 4 characters or more that are not integers, within edit distance 1
  (2 from 10 characters) of each other, unless ``w`` ends with ``v`` (a prefix
  makes a class of its own: ``acceptable``, ``unacceptable``).

With ``data.labels`` set the classes are given, and a row with another label is
malformed (:mod:`fedtune.data.loaders`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from fedtune.errors import FedtuneError

MAX_CLASSES_UNCHECKED = 20
"""Up to this many distinct values a label column is never called implausible."""
TYPO_RATIO = 5
"""A rare value is a typo of a close value that holds at least this many times its rows."""
RARE_SHARE = 0.01
"""A value in at most this share of the rows (and at least in one) is rare."""

_INT = re.compile(r"[+-]?\d+")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def close(rare: str, common: str) -> bool:
    """``rare`` looks like a misspelling of ``common`` (see the module doc)."""
    a, b = rare.strip().casefold(), common.strip().casefold()
    if a == b:
        return True
    if min(len(a), len(b)) < 4 or _INT.fullmatch(a) or _INT.fullmatch(b) or b.endswith(a) or a.endswith(b):
        return False
    return edit_distance(a, b) <= (1 if max(len(a), len(b)) < 10 else 2)


def check_labels(cells: Iterable[tuple[str, str, int]], column: str) -> None:
    """Refuse a label column that is implausible or holds a typo; ``cells``: (value, file, line) of every row."""
    counts: Counter[str] = Counter()
    first: dict[str, tuple[str, int]] = {}
    for value, origin, line in cells:
        counts[value] += 1
        first.setdefault(value, (origin, line))
    rows = sum(counts.values())
    once = [v for v, c in counts.items() if c == 1]
    if len(counts) > MAX_CLASSES_UNCHECKED and 2 * len(once) > len(counts):
        origin = first[once[0]][0]
        examples = ", ".join(repr(_clip(v)) for v in once[:3])
        raise FedtuneError(
            f"label column '{column}' of {origin} holds {len(counts):,} distinct values in {rows:,} rows, "
            f"{len(once):,} of them in one row only (e.g. {examples}): that is not a column of labels; set "
            "data.label_column to the column of labels, check data.quoting if fields hold quoted text, or list the "
            "classes in data.labels"
        )
    rare_limit = max(1, int(RARE_SHARE * rows))
    for value, count in sorted(counts.items(), key=lambda item: (item[1], item[0])):
        if count > rare_limit:
            break
        match = next((w for w, c in counts.most_common() if w != value and c >= TYPO_RATIO * count
                      and close(value, w)), None)
        if match is None:
            continue
        origin, line = first[value]
        classes = [v for v in sorted(counts) if not any(
            counts[v] <= rare_limit and close(v, w) and counts[w] >= TYPO_RATIO * counts[v] for w in counts if w != v)]
        raise FedtuneError(
            f"label '{value}' ({count} row{'s' * (count != 1)}, the first at {origin} line {line}) looks like a typo "
            f"of '{match}' ({counts[match]:,} rows); correct it in the file, or set the classes with "
            f"-o data.labels=[{','.join(classes)}] (a row with another label is then malformed)"
        )


def _clip(value: str, width: int = 30) -> str:
    text = " ".join(value.split())
    return text if len(text) <= width else text[: width - 1] + "…"
