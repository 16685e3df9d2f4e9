"""Partitioning training examples across clients."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pytest
from rich.console import Console

from fedtune.config import PartitionConfig
from fedtune.data import partition_clients, partition_summary, split_client_test, summary_table
from fedtune.errors import FedtuneError

LANGS = ["de", "en", "es", "fr", "it", "pt"]


def make_train(n: int, seed: int = 0) -> datasets.Dataset:
    """Five unevenly frequent labels and a six-valued ``lang`` column."""
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict(
        {
            "text": [f"example {i}" for i in range(n)],
            "label": rng.choice(5, size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08]),
            "lang": rng.choice(LANGS, size=n),
        }
    )


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    return make_train(3000)


METHODS = [
    {"method": "iid"},
    {"method": "dirichlet", "alpha": 0.5},
    {"method": "dirichlet", "alpha": 0.3, "by": "lang"},
    {"method": "pathological", "classes_per_client": 2},
    {"method": "natural", "by": "lang", "num_clients": 6},
    {"method": "natural", "by": "lang", "num_clients": 4},
    {"method": "quantity", "quantity_skew": 1.0},
]


def config(**kw) -> PartitionConfig:
    return PartitionConfig(**{"num_clients": 10, **kw})


def entropy(summary: dict) -> float:
    return summary["mean_label_entropy"]


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_disjoint_complete_deterministic(train, kw):
    cfg = config(**kw)
    parts = partition_clients(train, cfg, seed=0)
    assert len(parts) == cfg.num_clients and all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything) == len(train)
    again = partition_clients(train, cfg, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_clients(train, cfg, seed=1)
    same = all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert same == (cfg.method == "natural")


def test_dirichlet_small_alpha_skews_labels(train):
    def mean_entropy(alpha: float) -> float:
        cfg = config(method="dirichlet", alpha=alpha, min_client_size=5)
        parts = partition_clients(train, cfg, seed=0)
        return entropy(partition_summary(train, parts, "label", []))

    skewed, even = mean_entropy(0.1), mean_entropy(100.0)
    assert skewed < 0.6 * even and even > 0.95 * partition_summary(
        train, [np.arange(len(train))], "label", []
    )["mean_label_entropy"]


def test_dirichlet_min_client_size(train):
    parts = partition_clients(train, config(method="dirichlet", alpha=1.0, min_client_size=100), seed=3)
    assert min(len(p) for p in parts) >= 100


def test_dirichlet_impossible_min_size(train):
    with pytest.raises(FedtuneError, match="raise partition.alpha"):
        partition_clients(train, config(method="dirichlet", alpha=0.01, num_clients=50, min_client_size=50), seed=0)
    with pytest.raises(FedtuneError, match="exceeds the 3000 training examples"):
        partition_clients(train, config(method="dirichlet", min_client_size=400), seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_values_per_client(train, k):
    parts = partition_clients(train, config(method="pathological", classes_per_client=k), seed=0)
    summary = partition_summary(train, parts, "label", [])
    assert max(summary["labels_per_client"]) <= k
    assert summary["assigned"] == len(train)


def test_pathological_fewer_clients_than_values_leaves_rows_unused(train):
    parts = partition_clients(train, config(method="pathological", by="lang", classes_per_client=1, num_clients=3), seed=0)
    langs = np.asarray(train["lang"][:])
    assert all(len(set(langs[p])) == 1 for p in parts)
    assigned = np.concatenate(parts)
    assert len(np.unique(assigned)) == len(assigned) < len(train)


def test_pathological_too_many_values(train):
    with pytest.raises(FedtuneError, match="more than the 5 values of 'label'"):
        partition_clients(train, config(method="pathological", classes_per_client=6), seed=0)


def test_natural_groups_by_value(train):
    langs = np.asarray(train["lang"][:])
    parts = partition_clients(train, config(method="natural", by="lang", num_clients=6), seed=0)
    assert [sorted(set(langs[p])) for p in parts] == [[lang] for lang in LANGS]
    grouped = partition_clients(train, config(method="natural", by="lang", num_clients=4), seed=0)
    assert [sorted(set(langs[p])) for p in grouped] == [["de", "it"], ["en", "pt"], ["es"], ["fr"]]
    with pytest.raises(FedtuneError, match="at most 6"):
        partition_clients(train, config(method="natural", by="lang", num_clients=7), seed=0)


def test_natural_defaults_to_one_client_per_value(train):
    cfg = PartitionConfig(method="natural", by="lang")
    assert cfg.num_clients is None and PartitionConfig(method="iid").num_clients == 8
    parts = partition_clients(train, cfg, seed=0)
    assert len(parts) == len(LANGS)
    summary = partition_summary(train, parts, "label", [], by="lang")
    assert summary["group_column"] == "lang" and summary["client_groups"] == [[lang] for lang in LANGS]


def test_quantity_sizes_follow_power_law(train):
    parts = partition_clients(train, config(method="quantity", quantity_skew=1.0), seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes[0] == max(sizes) and sizes[0] / sizes[4] == pytest.approx(5, rel=0.05)
    with pytest.raises(FedtuneError, match="lower partition.quantity_skew"):
        partition_clients(train, config(method="quantity", quantity_skew=5.0, num_clients=50), seed=0)


def test_unknown_column_lists_columns(train):
    with pytest.raises(FedtuneError) as info:
        partition_clients(train, config(method="dirichlet", by="topic"), seed=0)
    assert "'topic' is not a column" in str(info.value) and "(columns: text, label, lang)" in str(info.value)
    assert "\n" not in str(info.value)


def test_more_clients_than_examples():
    with pytest.raises(FedtuneError, match="num_clients=20 is more than the 10 training examples"):
        partition_clients(make_train(10), config(num_clients=20), seed=0)


def test_split_client_test():
    indices = np.arange(100, 200, 2)
    train_idx, test_idx = split_client_test(indices, 0.2, seed=4)
    assert (len(train_idx), len(test_idx)) == (40, 10)
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), indices)
    again = split_client_test(indices, 0.2, seed=4)
    assert np.array_equal(again[1], test_idx) and not np.array_equal(split_client_test(indices, 0.2, 5)[1], test_idx)
    assert [len(x) for x in split_client_test(np.array([7, 9]), 0.01, 0)] == [1, 1]
    assert [len(x) for x in split_client_test(indices, 0.0, 0)] == [50, 0]


def test_summary_is_json_and_renders(train):
    parts = partition_clients(train, config(method="dirichlet"), seed=0)
    summary = partition_summary(train, parts, "label", ["a", "b", "c", "d", "e"])
    json.dumps(summary)
    assert [sum(c) for c in summary["label_counts"]] == summary["sizes"]
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(summary, max_rows=5))
    assert "5 more clients" in out.getvalue() and "mean label entropy" in out.getvalue()


def test_clients_test_rows_are_not_counted_as_training_rows(train):
    from fedtune.data.partition import add_client_splits

    parts = partition_clients(train, config(method="iid", num_clients=3), seed=0)
    summary = partition_summary(train, parts, "label", ["a", "b", "c", "d", "e"])
    splits = [split_client_test(p, 0.2, seed=c) for c, p in enumerate(parts)]
    add_client_splits(summary, [len(tr) for tr, _ in splits], [len(te) for _, te in splits])
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table(summary))
    text = out.getvalue()
    header = next(line for line in text.splitlines() if "client" in line)
    assert "train" in header and "test" in header and "examples" not in header
    rows = [line.split("│")[1:4] for line in text.splitlines() if line.split("│")[1:2] == ["      0 "]]
    assert [cell.strip() for cell in rows[0]] == ["0", str(len(splits[0][0])), str(len(splits[0][1]))]
    trained = sum(len(tr) for tr, _ in splits)
    assert f"{trained:,} to train on, {len(train) - trained:,} held out as test rows" in " ".join(text.split())


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological", "natural", "quantity"])
def test_67k_rows_into_100_clients_cover_every_row_once(method):
    """SST-2's size (its time: ``benchmarks/load_speed.py``)."""
    big = make_train(67_349)
    cfg = PartitionConfig(method=method, num_clients=6 if method == "natural" else 100, by="lang" if method == "natural" else "label")
    parts = partition_clients(big, cfg, seed=0)
    assert len(parts) == cfg.num_clients
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(big)))
