"""Splitting the training examples across clients.

:func:`partition_clients` returns one sorted index array per client. Every
method is deterministic for a seed; every method but ``natural`` and ``contiguous`` changes with
the seed. Clients are disjoint, and together they hold every example, except
under ``pathological``, where the rows of a value of ``by`` that no client
draws stay unused (possible only when ``num_clients`` is smaller than the
number of values; :func:`partition_summary` reports the count).

- ``iid``: a seeded permutation cut into near-equal shards.
- ``dirichlet``: per value of ``by``, client shares ~ Dir(alpha); the draw is
  repeated (up to 10 times) until every client has ``min_client_size`` rows.
- ``pathological``: each client holds ``classes_per_client`` distinct values of
  ``by``; client i's first value is value ``i mod V`` (so all values are used
  when ``num_clients >= V``), the others are drawn at random.
- ``natural``: one client per distinct value of ``by`` (sorted), when
  ``num_clients`` is not set; with fewer clients than values, value j goes to
  client ``j mod num_clients``. It does not depend on the seed.
- ``quantity``: IID labels; client i (from 1) gets a share proportional to
  ``i ** -quantity_skew``.
- ``contiguous``: client i holds the i-th of ``num_clients`` consecutive,
  near-equal blocks of the rows in file order (the FedKDLoRA seed's split).

Group splits (FedMLLM's language splits, over any group column ``by``:
language, task, domain). The G groups are the sorted distinct values of
``by``; each group's rows are shuffled and dealt round-robin to the clients
that hold it, so those clients' shares differ by at most one row.

- ``group_clusters`` (alias ``language_clusters``): client k holds group
  ``k mod G`` only; every group gets ``num_clients // G`` clients, the first
  ``num_clients mod G`` groups one more. Needs ``num_clients >= G``.
- ``group_iid`` (alias ``language_iid``): every client holds every group; the
  dealing is rotated from group to group, so client sizes differ by at most one.
- ``group_pairs`` (alias ``language_multi_domain``): client k holds the two
  neighbouring groups ``k mod G`` and ``(k + 1) mod G``. Needs ``G >= 2`` and
  ``num_clients >= G``, so every group is held.

The ``language_*`` aliases partition by ``language`` unless ``by`` is given
(:class:`~fedtune.config.PartitionConfig`).

``dirichlet``, ``pathological`` and ``quantity`` are flwr-datasets partitioners
run on a seeded permutation of the rows, so which rows of a value a client gets
is random rather than file order. ``iid`` and ``natural`` are written here:
flwr's ``IidPartitioner`` cuts contiguous unshuffled shards, and
``NaturalIdPartitioner`` cannot group values into a given number of clients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
from rich.table import Table

from fedtune.config import PartitionConfig
from fedtune.errors import FedtuneError


def partition_clients(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    """One sorted int64 index array into ``train`` per client (see the module doc for each method)."""
    n, k = len(train), cfg.num_clients
    if k is not None and k > n:
        raise FedtuneError(
            f"partition.num_clients={k} is more than the {n} training examples; lower partition.num_clients"
        )
    parts = _METHODS[cfg.method](train, cfg, seed)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def server_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(the server's rows, the clients' rows) of n training rows: the first ⌊fraction · n⌉ rows, contiguous in
    file order, are the server's (``partition.server_fraction``); the clients' partition splits the rest."""
    k = int(round(fraction * n))
    if fraction > 0 and not 0 < k < n:
        raise FedtuneError(f"partition.server_fraction={fraction} of {n} training rows leaves "
                           f"{'the server no rows' if k == 0 else 'the clients no rows'}; adjust it or add rows")
    return np.arange(k, dtype=np.int64), np.arange(k, n, dtype=np.int64)


def split_client_test(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into (train, test), ``fraction`` of them (rounded) held out.

    With ``fraction > 0`` and at least two indices, both sides keep at least one.
    Pass a different seed per client (e.g. ``seed * 100_003 + client_id``).
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_test = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(indices[order[n_test:]]), np.sort(indices[order[:n_test]])


def partition_summary(
    train: datasets.Dataset,
    parts: Sequence[np.ndarray],
    label_column: str | None,
    label_names: Sequence[str],
    by: str | None = None,
) -> dict[str, Any]:
    """Client sizes and, given a label column, each client's label counts and entropy (JSON-serialisable).

    ``mean_label_entropy`` is the mean over non-empty clients of the entropy (bits)
    of their label distribution: low under label skew, near log2(K) when IID.

    Given ``by`` (``partition.by``), a column other than the label column, the
    summary also holds each client's groups: ``group_column``, ``group_names``
    (its sorted values), ``client_groups`` (per client, the values it holds, sorted)
    and ``group_counts`` (per client, value -> rows, non-zero only).
    """
    counts = None
    if label_column is not None:
        labels = _values(train, label_column, "label column").astype(np.int64)
        num_labels = max(len(label_names), int(labels.max()) + 1 if len(labels) else 0)
        counts = [np.bincount(labels[p], minlength=num_labels).tolist() for p in parts]
    summary = counts_summary([len(p) for p in parts], counts, label_column, label_names)
    summary["num_examples"] = len(train)
    if by is not None and by != label_column and by in train.column_names:
        summary.update(_group_summary(_values(train, by, "partition.by"), parts, by))
    return summary


def counts_summary(sizes: Sequence[int], label_counts: Sequence[Sequence[int]] | None, label_column: str | None,
                   label_names: Sequence[str], method: str | None = None) -> dict[str, Any]:
    """Client sizes and, given per-client label counts, the label statistics of :func:`partition_summary`
    (``method: "files"``: node-local data, whose clients reported their own counts)."""
    sizes = np.array(sizes, dtype=np.int64)
    summary: dict[str, Any] = {
        "num_clients": len(sizes),
        "num_examples": int(sizes.sum()),
        "assigned": int(sizes.sum()),
        "sizes": sizes.tolist(),
        "size_min": int(sizes.min()),
        "size_mean": float(sizes.mean()),
        "size_max": int(sizes.max()),
        "size_std": float(sizes.std()),
    }
    if method is not None:
        summary["method"] = method
    if label_counts is None or label_column is None:
        return summary
    counts = np.asarray(label_counts, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(shares > 0, shares * np.log2(shares), 0.0), axis=1)
    summary.update(
        label_column=label_column,
        label_names=list(label_names) or [str(i) for i in range(counts.shape[1])],
        label_counts=counts.tolist(),
        labels_per_client=(counts > 0).sum(axis=1).tolist(),
        mean_label_entropy=float(entropy[sizes > 0].mean()),
    )
    return summary


def _group_summary(values: np.ndarray, parts: Sequence[np.ndarray], by: str) -> dict[str, Any]:
    distinct, inverse = np.unique(values.astype(str), return_inverse=True)
    inverse = inverse.ravel()
    names = distinct.tolist()
    counts = [np.bincount(inverse[p], minlength=len(names)) for p in parts]
    return {
        "group_column": by,
        "group_names": names,
        "client_groups": [[names[j] for j in np.flatnonzero(c)] for c in counts],
        "group_counts": [{names[j]: int(c[j]) for j in np.flatnonzero(c)} for c in counts],
    }


def add_client_splits(summary: dict[str, Any], train: Sequence[int], test: Sequence[int],
                      aux: Sequence[int] | None = None) -> None:
    """Record how each client's shard (``sizes``) divides: rows it trains on (``train_sizes``), its own test
    rows (``test_sizes``, ``partition.client_test_fraction``) and auxiliary rows (``aux_sizes``, where known)."""
    summary.update(train_sizes=[int(n) for n in train], test_sizes=[int(n) for n in test])
    if aux is not None:
        summary["aux_sizes"] = [int(n) for n in aux]


def summary_table(summary: dict[str, Any], max_rows: int = 20, max_labels: int = 10) -> Table:
    """A rich table of :func:`partition_summary`: one row per client (the first ``max_rows``); where clients
    hold rows out of training (:func:`add_client_splits`), their training and test rows in separate columns."""
    caption = (
        f"{summary['num_clients']} clients · {summary['assigned']:,} of {summary['num_examples']:,} examples · "
        f"size min {summary['size_min']:,} / mean {summary['size_mean']:,.1f} / max {summary['size_max']:,}"
    )
    kept = {name: summary.get(f"{name}_sizes") or [] for name in ("test", "aux")}
    kept = {name: sizes for name, sizes in kept.items() if any(sizes)}  # rows the clients hold out of training
    if kept:
        caption += (f" · {sum(summary['train_sizes']):,} to train on, "
                    + ", ".join(f"{sum(sizes):,} held out as {name} rows" for name, sizes in kept.items()))
    if "mean_label_entropy" in summary:
        caption += f" · mean label entropy {summary['mean_label_entropy']:.3f} bits"
    if summary.get("server_examples"):
        caption += f" · the server holds {summary['server_examples']:,} more (partition.server_fraction)"
    table = Table(caption=caption)
    table.add_column("client", justify="right")
    for column in (["train", *kept] if kept else ["examples"]):
        table.add_column(column, justify="right")
    names = summary.get("label_names", [])
    per_label = 0 < len(names) <= max_labels
    if per_label:
        for name in names:
            table.add_column(str(name), justify="right")
    elif names:
        table.add_column("distinct labels", justify="right")
    groups = summary.get("client_groups")
    if groups is not None:
        table.add_column(summary["group_column"])
    for cid, size in enumerate(summary["sizes"][:max_rows]):
        cells = [str(cid), *(f"{summary[f'{c}_sizes'][cid]:,}" for c in ["train", *kept])] if kept else [
            str(cid), f"{size:,}"]
        if per_label:
            cells += [f"{c:,}" for c in summary["label_counts"][cid]]
        elif names:
            cells.append(str(summary["labels_per_client"][cid]))
        if groups is not None:
            held = groups[cid]
            cells.append(", ".join(held) if len(held) <= max_labels else f"{len(held)} values")
        table.add_row(*cells)
    if summary["num_clients"] > max_rows:
        table.add_row("…", f"{summary['num_clients'] - max_rows} more clients")
    return table


# --------------------------------------------------------------------------- methods

_BY = "by"
"""The one column of the small table handed to flwr-datasets partitioners."""


def _iid(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(len(train)), cfg.num_clients)


def _contiguous(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    return np.array_split(np.arange(len(train)), cfg.num_clients)


def _natural(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    values = _values(train, cfg.by, "partition.by")
    distinct, inverse = np.unique(values, return_inverse=True)
    k = len(distinct) if cfg.num_clients is None else cfg.num_clients
    if k > len(distinct):
        raise FedtuneError(
            f"partition.method=natural needs at most one client per value of '{cfg.by}', which has "
            f"{len(distinct)}; set partition.num_clients to at most {len(distinct)}, or leave it unset for one each"
        )
    client = inverse.ravel() % k
    order = np.argsort(client, kind="stable")
    return np.split(order, np.cumsum(np.bincount(client, minlength=k))[:-1])


def _group_clusters(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    names, group = _groups(train, cfg)
    g, k = len(names), cfg.num_clients
    if k < g:
        raise FedtuneError(
            f"partition.method={cfg.method} gives each client one value of '{cfg.by}' and each value a client, but "
            f"'{cfg.by}' has {g} values and partition.num_clients is {k}; set it to at least {g} "
            f"(a multiple of {g} gives every value the same number of clients)"
        )
    return _deal_groups(names, group, [list(range(j, k, g)) for j in range(g)], cfg, seed)


def _group_iid(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    names, group = _groups(train, cfg)
    return _deal_groups(names, group, [list(range(cfg.num_clients))] * len(names), cfg, seed)


def _group_pairs(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    names, group = _groups(train, cfg)
    g, k = len(names), cfg.num_clients
    if g < 2:
        raise FedtuneError(
            f"partition.method={cfg.method} gives each client two neighbouring values of '{cfg.by}', which has only "
            f"{g}; partition by a column with at least two values"
        )
    if k < g:
        raise FedtuneError(
            f"partition.method={cfg.method} needs at least one client per value of '{cfg.by}' ({g} values) so that "
            f"every value is held, but partition.num_clients is {k}; set partition.num_clients to at least {g}"
        )
    holders = [[c for c in range(k) if j in (c % g, (c + 1) % g)] for j in range(g)]
    return _deal_groups(names, group, holders, cfg, seed)


def _groups(train: datasets.Dataset, cfg: PartitionConfig) -> tuple[list[str], np.ndarray]:
    """The sorted distinct values of ``cfg.by`` (as text) and each row's index among them."""
    values = _values(train, cfg.by, "partition.by").astype(str)
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct.tolist(), inverse.ravel()


def _deal_groups(
    names: list[str], group: np.ndarray, holders: list[list[int]], cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Shuffle each group's rows and deal them round-robin to the clients in ``holders[group]``.

    Each group's dealing starts where the previous one's extra rows ended, so a
    client holding every group is at most one row off the others.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(cfg.num_clients)]
    start = 0
    for j, clients in enumerate(holders):
        rows = rng.permutation(np.flatnonzero(group == j))
        m = len(clients)
        if len(rows) < m:
            raise FedtuneError(
                f"value '{names[j]}' of '{cfg.by}' has {len(rows)} rows, fewer than the {m} clients that hold it "
                f"under partition.method={cfg.method}; lower partition.num_clients or use more data"
            )
        start %= m
        order = clients[start:] + clients[:start]
        for i, client in enumerate(order):
            parts[client].append(rows[i::m])
        start += len(rows) % m
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _dirichlet(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    values = _values(train, cfg.by, "partition.by")
    if cfg.min_client_size * cfg.num_clients > len(values):
        raise FedtuneError(
            f"partition.min_client_size={cfg.min_client_size} × {cfg.num_clients} clients exceeds the "
            f"{len(values)} training examples; lower partition.min_client_size or partition.num_clients"
        )
    partitioner = DirichletPartitioner(
        num_partitions=cfg.num_clients,
        partition_by=_BY,
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_client_size,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    hint = (
        f"no Dirichlet draw gave all {cfg.num_clients} clients at least {cfg.min_client_size} examples "
        f"(alpha={cfg.alpha}); raise partition.alpha, or lower partition.min_client_size or partition.num_clients"
    )
    return _run_flwr(partitioner, values, seed, hint)


def _pathological(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    values = _values(train, cfg.by, "partition.by")
    distinct = len(np.unique(values))
    if cfg.classes_per_client > distinct:
        raise FedtuneError(
            f"partition.classes_per_client={cfg.classes_per_client} is more than the {distinct} values of "
            f"'{cfg.by}'; set it to at most {distinct}"
        )
    partitioner = PathologicalPartitioner(
        num_partitions=cfg.num_clients,
        partition_by=_BY,
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=False,
        seed=seed,
    )
    hint = (
        f"some value of '{cfg.by}' is drawn by more clients than it has examples; "
        "lower partition.num_clients or partition.classes_per_client"
    )
    return _run_flwr(partitioner, values, seed, hint)


def _quantity(train: datasets.Dataset, cfg: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IdToSizeFncPartitioner

    skew = float(cfg.quantity_skew)
    partitioner = IdToSizeFncPartitioner(
        num_partitions=cfg.num_clients, partition_id_to_size_fn=lambda ids: ids**-skew
    )
    hint = (
        f"quantity_skew={skew} leaves some of the {cfg.num_clients} clients without examples; "
        "lower partition.quantity_skew or partition.num_clients"
    )
    return _run_flwr(partitioner, np.zeros(len(train), dtype=np.int8), seed, hint)


_METHODS: dict[str, Callable[[datasets.Dataset, PartitionConfig, int], list[np.ndarray]]] = {
    "iid": _iid,
    "contiguous": _contiguous,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "natural": _natural,
    "quantity": _quantity,
    "group_clusters": _group_clusters,
    "group_iid": _group_iid,
    "group_pairs": _group_pairs,
    "language_clusters": _group_clusters,
    "language_iid": _group_iid,
    "language_multi_domain": _group_pairs,
}


def _run_flwr(partitioner: Any, values: np.ndarray, seed: int, hint: str) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner over a seeded permutation of ``values``; indices into the original rows.

    flwr exposes a partition only as a ``Dataset.select`` (a new dataset per client), so the
    assignment it computed is read from its ``_partition_id_to_indices``.
    """
    order = np.random.default_rng(seed).permutation(len(values))
    partitioner.dataset = datasets.Dataset.from_dict({_BY: values[order]}).with_format("arrow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on each Dirichlet redraw and on unused values; outcomes are checked
        try:
            num_partitions = partitioner.num_partitions  # computes the whole assignment
        except ValueError:
            raise FedtuneError(hint) from None
    assignment = partitioner._partition_id_to_indices
    return [order[np.asarray(assignment[i], dtype=np.int64)] for i in range(num_partitions)]


def _values(train: datasets.Dataset, column: str, what: str) -> np.ndarray:
    """A column as a numpy array, read through Arrow (``Dataset[column]`` is slow for large datasets)."""
    if column not in train.column_names:
        raise FedtuneError(
            f"{what} '{column}' is not a column of the training data "
            f"(columns: {', '.join(train.column_names)}); set it to one of them"
        )
    return train.with_format("arrow")[column].to_numpy()
