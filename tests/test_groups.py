"""Group splits (FedMLLM's language splits) and the parallel multilingual datasets."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from rich.console import Console

from fedtune.config import DataConfig, PartitionConfig, load_config
from fedtune.data import describe, describe_table, list_datasets, load_task_data, partition_clients, partition_summary
from fedtune.data import summary_table
from fedtune.data.holdout import held_out
from fedtune.data.instructions import load_instruction_data
from fedtune.errors import FedtuneError

REPO = Path(__file__).resolve().parents[1]
SIZES = {"de": 50, "en": 40, "tr": 31}
"""Three groups of uneven size; sorted, so group index j is ("de", "en", "tr")[j]."""
NAMES = sorted(SIZES)


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    rng = np.random.default_rng(3)
    langs = [lang for lang, n in SIZES.items() for _ in range(n)]
    rng.shuffle(langs)
    return datasets.Dataset.from_dict({
        "text": [f"row {i}" for i in range(len(langs))],
        "label": rng.integers(0, 2, len(langs)).tolist(),
        "language": langs,
    })


def split(train: datasets.Dataset, method: str, k: int, seed: int = 0):
    """Partition, check disjoint and complete; the parts, each client's set of groups, every row's group."""
    parts = partition_clients(train, PartitionConfig(method=method, num_clients=k, by="language"), seed)
    assert len(parts) == k and all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(train)))
    langs = np.asarray(train["language"][:])
    return parts, [set(langs[p]) for p in parts], langs


@pytest.mark.parametrize("k", [3, 7, 9])
def test_group_clusters_one_group_per_client_clients_spread_evenly(train, k):
    parts, held, langs = split(train, "group_clusters", k)
    assert held == [{NAMES[c % 3]} for c in range(k)]
    per_group = Counter(NAMES[c % 3] for c in range(k))
    assert max(per_group.values()) - min(per_group.values()) <= 1 and sum(per_group.values()) == k
    for lang in NAMES:
        sizes = [len(p) for p, h in zip(parts, held) if h == {lang}]
        assert sum(sizes) == SIZES[lang] and max(sizes) - min(sizes) <= 1


def test_group_iid_every_client_holds_every_group(train):
    parts, held, langs = split(train, "group_iid", 4)
    assert held == [set(NAMES)] * 4
    counts = np.array([[np.sum(langs[p] == lang) for lang in NAMES] for p in parts])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all() and counts.sum(axis=0).tolist() == [50, 40, 31]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("k", [3, 5])
def test_group_pairs_each_client_holds_two_neighbouring_groups(train, k):
    parts, held, langs = split(train, "group_pairs", k)
    assert held == [{NAMES[c % 3], NAMES[(c + 1) % 3]} for c in range(k)]
    for lang in NAMES:
        shares = [np.sum(langs[p] == lang) for p, h in zip(parts, held) if lang in h]
        assert sum(shares) == SIZES[lang] and max(shares) - min(shares) <= 1


@pytest.mark.parametrize("method", ["group_clusters", "group_iid", "group_pairs"])
def test_group_splits_are_seeded(train, method):
    first, _, _ = split(train, method, 4, seed=0)
    again, _, _ = split(train, method, 4, seed=0)
    other, _, _ = split(train, method, 4, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("alias, method", [("language_clusters", "group_clusters"), ("language_iid", "group_iid"),
                                           ("language_multi_domain", "group_pairs")])
def test_language_aliases_are_the_group_splits_by_language(train, alias, method):
    cfg = PartitionConfig(method=alias, num_clients=5)
    assert cfg.by == "language" and PartitionConfig(method=alias, by="task").by == "task"
    assert PartitionConfig(method=method).by == "label"  # the group_* names take partition.by as given
    ours = partition_clients(train, cfg, 0)
    theirs = partition_clients(train, PartitionConfig(method=method, num_clients=5, by="language"), 0)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert load_config(None, [f"partition.method={alias}"]).partition.by == "language"


@pytest.mark.parametrize("method, k, by, expected", [
    ("group_clusters", 2, "language", "'language' has 3 values and partition.num_clients is 2; set it to at least 3"),
    ("language_clusters", 2, None, "partition.method=language_clusters gives each client one value"),
    ("group_pairs", 2, "language", "needs at least one client per value of 'language' (3 values)"),
    ("group_pairs", 4, "source", "which has only 1; partition by a column with at least two values"),
    ("group_iid", 35, "language", "value 'tr' of 'language' has 31 rows, fewer than the 35 clients that hold it"),
    ("group_iid", 3, "domain", "'domain' is not a column of the training data (columns: text, label, language)"),
])
def test_group_split_errors_are_one_line(train, method, k, by, expected):
    cfg = PartitionConfig(method=method, num_clients=k, **({"by": by} if by else {}))
    with pytest.raises(FedtuneError) as info:
        partition_clients(train.add_column("source", ["x"] * len(train)) if by == "source" else train, cfg, 0)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_summary_records_each_clients_groups(train):
    parts = partition_clients(train, PartitionConfig(method="group_pairs", num_clients=4, by="language"), 0)
    summary = partition_summary(train, parts, "label", ["neg", "pos"], by="language")
    json.dumps(summary)
    assert summary["group_column"] == "language" and summary["group_names"] == NAMES
    assert summary["client_groups"] == [["de", "en"], ["en", "tr"], ["de", "tr"], ["de", "en"]]
    assert [sum(c.values()) for c in summary["group_counts"]] == summary["sizes"]
    assert sum(c.get("tr", 0) for c in summary["group_counts"]) == 31
    out = io.StringIO()
    Console(file=out, width=120).print(summary_table(summary))
    assert "language" in out.getvalue() and "en, tr" in out.getvalue()
    by_label = partition_summary(train, parts, "label", ["neg", "pos"], by="label")
    assert "client_groups" not in by_label and "label_counts" in by_label  # labels are counted already
    assert "client_groups" not in partition_summary(train, parts, None, [], by="missing")


# --------------------------------------------------------------------------- the parallel datasets


def test_multilingual_from_the_hub_is_xquad_per_language(tmp_path, monkeypatch):
    """Online, each language is its google/xquad config (SQuAD format) read as question / context / first answer."""
    from fedtune.data import sources

    def xquad(lang: str) -> datasets.DatasetDict:
        return datasets.DatasetDict(validation=datasets.Dataset.from_dict({
            "id": ["a", "b"], "context": [f"{lang} paragraph 1", f"{lang} paragraph 2"],
            "question": [f"{lang} q1?", f"{lang} q2?"],
            "answers": [{"text": ["one", "uno"], "answer_start": [0, 0]}, {"text": ["two"], "answer_start": [3]}],
        }))

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDTUNE_DATA", raising=False)
    monkeypatch.setattr(sources, "_repo_root", lambda: None)
    monkeypatch.setattr(sources, "hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config: {
        ("google/xquad", f"xquad.{lang}"): xquad(lang) for lang in ("en", "de")}[hub_id, config])
    task = load_task_data(DataConfig(name="multilingual", languages=["de", "en"], eval_fraction=0), 0)
    assert task.train.to_dict() == {
        "instruction": ["de q1?", "de q2?", "en q1?", "en q2?"],
        "input": ["de paragraph 1", "de paragraph 2", "en paragraph 1", "en paragraph 2"],
        "output": ["one", "two"] * 2, "language": ["de", "de", "en", "en"], "row_id": [0, 1, 0, 1],
    }
    assert task.source == "hub:google/xquad/xquad.de + hub:google/xquad/xquad.en"


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """The shared data folder, set as FEDTUNE_DATA with the Hub off for the module's tests."""
    root = Path(os.environ.get("FEDTUNE_DATA") or REPO.parent / "shared" / "data")
    if not all((root / d).is_dir() for d in ("multilingual", "sst2", "sst2_pt")):
        pytest.skip(f"shared data not found at {root} (set FEDTUNE_DATA)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTUNE_DATA", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def sst2_ml(shared_data):
    return load_task_data(DataConfig(name="sst2_multilingual"), seed=0)


def test_multilingual_has_six_aligned_languages(shared_data):
    task = load_instruction_data(DataConfig(name="multilingual", eval_fraction=0), 0)
    assert Counter(task.train["language"]) == {lang: 1190 for lang in ["en", "es", "tr", "de", "zh", "vi"]}
    assert task.eval is None and task.kind == "instruction"
    rows = task.train.to_pandas()
    first = rows[rows.row_id == 0].set_index("language")
    assert first.loc["en", "instruction"] == "How many points did the Panthers defense surrender?"
    assert first.loc["tr", "instruction"] == "Panthers savunması kaç sayı bırakmıştır?"
    assert set(first.output) == {"308"}  # the same question and answer in every language


def test_multilingual_holds_out_the_same_questions_in_every_language(shared_data):
    """XQuAD has one split: each language holds out data.eval_fraction of it, the same row ids in all."""
    whole = load_task_data(DataConfig(name="multilingual", languages=["en", "tr"], eval_fraction=0), 0).train
    task = load_task_data(DataConfig(name="multilingual", languages=["en", "tr"]), 0)
    assert Counter(task.train["language"]) == {"en": 1071, "tr": 1071}
    assert Counter(task.eval["language"]) == {"en": 119, "tr": 119}
    held = held_out(1190, 0.1, seed=0)[1]
    for lang in ("en", "tr"):
        rows = whole.filter(lambda r: r["language"] == lang)["instruction"]
        assert task.eval.filter(lambda r: r["language"] == lang)["instruction"] == [rows[i] for i in held]
    assert len(task.eval_origin) == 2 and all(o["rows"] == 119 for o in task.eval_origin)


def test_data_languages_selects_and_max_examples_keep_rows_aligned(shared_data):
    task = load_task_data(DataConfig(name="multilingual", languages=["de", "en"], max_train_examples=50), 3)
    langs, ids = np.asarray(task.train["language"][:]), np.asarray(task.train["row_id"][:])
    assert Counter(langs) == {"de": 50, "en": 50}
    assert np.array_equal(ids[langs == "de"], ids[langs == "en"])  # the same 50 questions in both
    for bad, message in [(["en", "pt"], "'pt' is not a language of multilingual (languages: en, es, tr, de, zh, vi)"),
                         ([], "data.languages is empty"), (["en", "en"], "lists a language twice")]:
        with pytest.raises(FedtuneError, match=re.escape(message)):
            load_task_data(DataConfig(name="multilingual", languages=bad), 0)
    with pytest.raises(FedtuneError, match="data.languages and data.parallel are for the parallel datasets"):
        load_task_data(DataConfig(name="alpaca_en", languages=["en"]), 0)


def test_parallel_disjoint_gives_each_row_one_language(shared_data):
    task = load_task_data(DataConfig(name="multilingual", languages=["en", "es", "zh"], parallel="disjoint"), 0)
    ids = task.train["row_id"][:]
    assert sorted(ids) == list(range(1071))  # 119 questions held out in every language
    assert sorted(Counter(task.train["language"]).values()) == [357, 357, 357]
    assert sorted(task.eval["row_id"][:]) == list(range(119))


def test_sst2_multilingual_is_sst2_and_sst2_pt_row_aligned(sst2_ml):
    assert len(sst2_ml.train) == 2 * 67_349 and len(sst2_ml.eval) == 2 * 872
    assert sst2_ml.kind == "classification" and sst2_ml.label_names == ["negative", "positive"]
    for ds in (sst2_ml.train, sst2_ml.eval):
        rows = ds.to_pandas()
        en, pt = rows[rows.language == "en"], rows[rows.language == "pt"]
        assert en.row_id.tolist() == pt.row_id.tolist() == list(range(len(en)))
        assert np.mean(en.label.to_numpy() == pt.label.to_numpy()) == 1.0
    pt = load_task_data(DataConfig(name="sst2_multilingual", languages=["pt"]), 0)
    assert set(pt.eval["language"]) == {"pt"} and pt.eval["sentence"][1] == "inflexivelmente sombrio e desesperado"


def test_language_splits_on_the_real_data_record_true_groups(sst2_ml):
    cfg = PartitionConfig(method="language_clusters", num_clients=4)
    parts = partition_clients(sst2_ml.train, cfg, 0)
    summary = partition_summary(sst2_ml.train, parts, "label", sst2_ml.label_names, by=cfg.by)
    assert summary["client_groups"] == [["en"], ["pt"], ["en"], ["pt"]]
    assert summary["assigned"] == len(sst2_ml.train)


def test_sst2_cola_is_a_mixture_of_two_tasks_under_one_binary_head(shared_data):
    if not (shared_data / "cola").is_dir():
        pytest.skip("CoLA not in the shared data")
    task = load_task_data(DataConfig(name="sst2_cola", max_train_examples=300, max_eval_examples=100), 0)
    assert task.label_names == ["negative/unacceptable", "positive/acceptable"] and task.meta_columns == ("task", "row_id")
    assert task.train.column_names == ["sentence", "label", "task", "row_id"]  # CoLA's source and mark are dropped
    assert Counter(task.train["task"]) == {"sst2": 300, "cola": 300} and Counter(task.eval["task"]) == {"sst2": 100,
                                                                                                      "cola": 100}
    cola = load_task_data(DataConfig(name="cola"), 0).train
    rows = task.train.to_pandas()
    for _, r in rows[rows.task == "cola"].head(20).iterrows():  # each row as CoLA has it, label included
        assert (cola[int(r.row_id)]["sentence"], cola[int(r.row_id)]["label"]) == (r.sentence, r.label)
    parts = partition_clients(task.train, PartitionConfig(method="group_clusters", by="task", num_clients=4), 0)
    summary = partition_summary(task.train, parts, "label", task.label_names, by="task")
    assert sorted(map(tuple, summary["client_groups"])) == [("cola",), ("cola",), ("sst2",), ("sst2",)]
    info = describe("sst2_cola")
    assert info["groups"] == {"task": {"sst2": 67_349, "cola": 8_551}} and info["columns"][-2:] == ["task", "row_id"]
    assert info["label_names"] == task.label_names and sum(info["label_counts"].values()) == 67_349 + 8_551
    with pytest.raises(FedtuneError, match="'sst2_cola' is a mixture of different datasets"):
        load_task_data(DataConfig(name="sst2_cola", parallel="disjoint"), 0)


def test_data_list_and_show_name_the_parallel_datasets(shared_data):
    rows = {r[0]: r for r in list_datasets()}
    assert rows["multilingual"][1] == "instruction" and rows["sst2_multilingual"][1] == "classification"
    assert rows["sst2_multilingual"][2] == "stanfordnlp/sst2 + dlb/plue" and "xquad_tr" in rows
    info = describe("multilingual")
    assert info["splits"] == {"train": {"rows": 7140, "malformed": 0}}
    assert info["groups"] == {"language": {lang: 1190 for lang in ["en", "es", "tr", "de", "zh", "vi"]}}
    assert [e["language"] for e in info["examples"]] == ["en", "es", "tr"] and json.dumps(info)
    out = io.StringIO()
    Console(file=out, width=120).print(describe_table(info))
    assert "en 1,190 · es 1,190" in out.getvalue()


def test_sft_experiment_keeps_the_language_column_for_its_partition(shared_data, tiny_llama_dir):
    from fedtune.experiment import build_experiment

    cfg = load_config(None, [
        f"model.name={tiny_llama_dir}", "model.task=sft", "model.max_length=64", "data.name=multilingual",
        "data.languages=[en, zh]", "data.max_train_examples=12", "partition.method=language_multi_domain",
        "partition.num_clients=3",
    ])
    with pytest.raises(FedtuneError, match="needs at least one client per value of 'language'"):
        build_experiment(cfg.model_copy(update={"partition": cfg.partition.model_copy(update={"num_clients": 1})}))
    cfg.data.languages = ["en", "zh", "vi"]
    exp = build_experiment(cfg)
    assert exp.partition["client_groups"] == [["en", "vi"], ["vi", "zh"], ["en", "zh"]]
    assert sum(len(c.train) for c in exp.clients.values()) == 36
