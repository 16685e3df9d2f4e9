"""An evaluation split carved out of the training rows of a dataset that has none.

:func:`held_out` picks ``m = round(fraction · n)`` of ``n`` rows (at least one
when ``fraction > 0``, at most ``limit``), seeded. Given labels it is
stratified: label ``c`` with ``n_c`` rows gives ``floor(m · n_c / n)`` rows,
and the rows still owed go, one each, to the labels with the largest
remainders (ties broken at random). No label gives its last row, so every
label stays in training; labels of one row each (or a single row) give no eval rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def held_out(n: int, fraction: float, seed: int, labels: Sequence[int] | None = None,
             limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, eval) row indices of ``range(n)``: disjoint, together every row."""
    rng = np.random.default_rng(seed)
    target = max(1, round(fraction * n)) if fraction > 0 and n else 0
    if limit is not None:
        target = min(target, limit)
    picked = [np.empty(0, dtype=np.int64)]
    if labels is None:
        picked.append(rng.permutation(n)[: min(target, max(n - 1, 0))])
    elif target:
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels)
        cap = np.maximum(counts - 1, 0)
        quota = counts * (target / n)
        take = np.minimum(np.floor(quota).astype(np.int64), cap)
        owed = target - int(take.sum())
        if owed > 0:
            room = np.flatnonzero(take < cap)
            order = room[np.lexsort((rng.random(len(room)), -(quota - take)[room]))]
            take[order[:owed]] += 1
        picked += [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in enumerate(take)]
    mask = np.zeros(n, dtype=bool)
    mask[np.concatenate(picked)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
