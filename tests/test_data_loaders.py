"""Loading registered datasets and user files; malformed rows; finding data offline."""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
from rich.console import Console

from fedtune import hub
from fedtune.config import DataConfig
from fedtune.data import REGISTRY, describe, describe_table, list_datasets, load_task_data, sources
from fedtune.data.columns import detect_instruction, detect_label, detect_text
from fedtune.data.holdout import held_out
from fedtune.errors import FedtuneError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_data() -> Path:
    root = Path(os.environ.get("FEDTUNE_DATA") or REPO.parent / "shared" / "data")
    if not (root / "sst2").is_dir():
        pytest.skip(f"shared data not found at {root} (set FEDTUNE_DATA)")
    return root


@pytest.fixture
def data_env(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDTUNE_DATA", str(shared_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return shared_data


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data root holds anything and nothing may reach the Hub."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("FEDTUNE_DATA", raising=False)
    monkeypatch.setattr(sources, "_repo_root", lambda: None)

    def no_download(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    return work


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(cfg: DataConfig) -> str:
    with pytest.raises(FedtuneError) as info:
        load_task_data(cfg, seed=0)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- registered datasets


@pytest.mark.parametrize(
    "name, split, n_train, n_eval, labels, text",
    [
        ("sst2", "train", 67_349, 872, ["negative", "positive"], ("sentence",)),
        ("sst2_pt", "train", 67_349, 872, ["negative", "positive"], ("sentence",)),
        ("cola", "train", 8_551, 527, ["unacceptable", "acceptable"], ("sentence",)),
        ("snli", "train", 9_842, 9_824, ["entailment", "neutral", "contradiction"], ("premise", "hypothesis")),
        ("mmlu", "val", 1_542, 14_079, ["A", "B", "C", "D"], ("question",)),
        ("alpaca_en", "train", 899, 100, [], ("instruction", "input")),  # a single file: 10% held out
        ("alpaca_zh", "train", 900, 100, [], ("instruction", "input")),
        ("xquad_tr", "train", 1_071, 119, [], ("instruction", "input")),
    ],
)
def test_registered_sizes_and_labels(data_env, name, split, n_train, n_eval, labels, text):
    task = load_task_data(DataConfig(name=name, train_split=split), seed=0)
    assert (len(task.train), task.eval and len(task.eval)) == (n_train, n_eval)
    assert task.label_names == labels and task.text_columns == text
    assert task.kind == REGISTRY[name].kind and task.skipped_rows == 0
    assert Path(task.source).resolve().is_relative_to(data_env.resolve())  # data_env may sit behind a symlink
    if labels:
        assert set(task.train.unique(task.label_column)) == set(range(len(labels)))
    else:
        assert task.label_column is None and task.target_column == "output"


def test_sst2_loads_whole(data_env):
    """All 67,349 training rows (the load time: ``benchmarks/load_speed.py``)."""
    task = load_task_data(DataConfig(name="sst2"), seed=0)
    assert len(task.train) == 67_349 and sum(task.train["label"][:]) == 37_569


def test_tsv_quotes_are_text(data_env):
    sentences = load_task_data(DataConfig(name="cola"), seed=0).train["sentence"][:]
    assert 'Susan whispered "Shut up".' in sentences


def test_mmlu_subjects_and_choices(data_env):
    task = load_task_data(DataConfig(name="mmlu", train_split="dev"), seed=0)
    assert len(task.train) == 285 and len(task.eval) == 14_079
    assert len(set(task.eval["subject"])) == 57
    assert {"A", "B", "C", "D", "subject"} <= set(task.eval.column_names)
    assert task.kind == "multiple_choice"


def test_mmlu_has_no_train_split(data_env):
    message = error_of(DataConfig(name="mmlu"))
    assert "no split 'train'" in message and "dev, val, test" in message


def test_registered_columns_cannot_be_renamed(data_env):
    assert "remove data.text_column" in error_of(DataConfig(name="sst2", text_column="text"))


def test_subsets_are_seeded(data_env):
    def rows(seed: int) -> list[str]:
        cfg = DataConfig(name="cola", max_train_examples=100, max_eval_examples=50)
        task = load_task_data(cfg, seed=seed)
        assert (len(task.train), len(task.eval)) == (100, 50)
        return task.train["sentence"][:]

    full = load_task_data(DataConfig(name="cola"), seed=0).train["sentence"][:]
    first = rows(1)
    assert first == rows(1) and first != rows(2)
    positions = [full.index(s) for s in first]
    assert positions == sorted(positions)


def test_describe_registered(data_env):
    info = describe("sst2")
    assert info["splits"] == {s: {"rows": n, "malformed": 0} for s, n in [("train", 67_349), ("dev", 872), ("test", 1_821)]}
    assert info["label_counts"] == {"negative": 29_780, "positive": 37_569}
    assert len(info["examples"]) == 3 and json.dumps(info)
    out = io.StringIO()
    Console(file=out, width=120).print(describe_table(info))
    assert "67,349" in out.getvalue()


def test_list_datasets():
    names = [row[0] for row in list_datasets()]
    assert names == ["sst2", "sst2_pt", "cola", "snli", "mmlu", "alpaca_en", "alpaca_zh", "dolly", "natural_instructions",
                     "xquad_en", "xquad_es", "xquad_tr", "xquad_de", "xquad_zh", "xquad_vi", "multilingual",
                     "sst2_multilingual", "sst2_cola"]
    assert dict((r[0], r[2]) for r in list_datasets())["snli"] == "stanfordnlp/snli"


def test_dolly_and_natural_instructions_keep_their_category_and_task_for_partitioning():
    from collections import Counter

    from fedtune.config import PartitionConfig
    from fedtune.data import partition_clients
    from fedtune.data.instructions import load_instruction_data

    dolly = load_instruction_data(DataConfig(name="dolly", eval_fraction=0), seed=0)
    assert len(dolly.train) == 15_011 and dolly.train["task"][0] == "dolly"
    assert Counter(dolly.train["category"])["creative_writing"] == 709
    row = next(r for r in dolly.train if r["input"])  # the context paragraph is the instruction's input
    assert row["output"] and row["instruction"]
    parts = partition_clients(dolly.train, PartitionConfig(method="natural", by="category"), seed=0)
    assert len(parts) == 8

    ni = load_instruction_data(DataConfig(name="natural_instructions", eval_fraction=0), seed=0)
    assert len(ni.train) == 19_313 and len(set(ni.train["task"])) == 20
    assert Counter(ni.train["task"])["task181_outcome_extraction"] == 338
    assert sum(1 for o in ni.train["output"] if not o) == 6  # task511's empty outputs, kept as in the source


# --------------------------------------------------------------------------- user files


def test_local_csv_string_labels(tmp_path):
    path = write(tmp_path / "reviews.csv", 'text,sentiment\n"great, really",pos\nbad,neg\nfine,neu\nawful,neg\n')
    cfg = DataConfig(name=str(path), text_column="text", label_column="sentiment", eval_fraction=0)
    task = load_task_data(cfg, seed=0)
    assert task.label_names == ["neg", "neu", "pos"]
    assert task.train["sentiment"] == [2, 0, 1, 0] and task.train["text"][0] == "great, really"
    assert task.eval is None and task.source == str(path)


def test_local_tsv_keeps_quotes_and_sorts_integer_labels(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\nhe said "hi\t10\nok\t9\nno\t2\n')
    task = load_task_data(DataConfig(name=str(path), text_column="sentence", label_column="label"), seed=0)
    assert task.train["sentence"][0] == 'he said "hi'
    assert task.label_names == ["2", "9", "10"] and task.train["label"] == [2, 1, 0]


def test_local_json_and_jsonl(tmp_path):
    records = [{"a": "x y", "b": "z", "y": 1}, {"a": "u", "b": "v", "y": 0}]
    write(tmp_path / "d.json", json.dumps(records, indent=2))
    write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    for suffix in ("json", "jsonl"):
        cfg = DataConfig(name=str(tmp_path / f"d.{suffix}"), text_column="a", text_pair_column="b", label_column="y")
        task = load_task_data(cfg, seed=0)
        assert task.text_columns == ("a", "b") and task.train["y"] == [1, 0] and task.label_names == ["0", "1"]


def test_local_folder_has_eval_split(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder / "train.csv", "t,l\na,x\nb,y\n")
    write(folder / "dev.csv", "t,l\nc,y\n")
    task = load_task_data(DataConfig(name=str(folder), text_column="t", label_column="l"), seed=0)
    assert len(task.train) == 2 and task.eval["l"] == [1]


def test_folder_in_data_root(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    write(tmp_path / "mine" / "train.jsonl", '{"t": "a", "l": "x"}\n{"t": "b", "l": "y"}\n')
    monkeypatch.setenv("FEDTUNE_DATA", str(tmp_path))
    task = load_task_data(DataConfig(name="mine", text_column="t", label_column="l"), seed=0)
    assert len(task.train) == 2 and task.eval is None  # one row per label: none can be held out


def test_local_instruction_file(tmp_path):
    path = write(tmp_path / "inst.json", json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    task = load_task_data(DataConfig(name=str(path)), seed=0)
    assert task.kind == "instruction" and task.target_column == "output" and task.label_column is None


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({}, "data.text_column and data.label_column are required"),
        ({"text_column": "t"}, "data.text_column and data.label_column are required"),
        ({"text_column": "txt", "label_column": "l"}, "data.text_column 'txt' is not a column"),
        ({"text_column": "t", "label_column": "lab"}, "data.label_column 'lab' is not a column"),
    ],
)
def test_columns_must_be_named(tmp_path, cfg, expected):
    path = write(tmp_path / "d.csv", "t,l\na,x\n")
    message = error_of(DataConfig(name=str(path), **cfg))
    assert expected in message and "(columns: t, l)" in message


@pytest.mark.parametrize(
    "name, text, line, reason",
    [
        ("d.tsv", "t\tl\na\tx\nb\tx\textra\nc\ty\n", 3, "expected 2 tab-separated fields, found 3"),
        ("d.csv", 't,l\n"multi\nline",x\n,y\nc,y\n', 4, "column 't' is empty"),
        ("d.jsonl", '{"t": "a", "l": "x"}\n{"t": "b", "l": \n{"t": "c", "l": "y"}\n', 2, "not valid JSON"),
        ("d.json", '[\n  {"t": "a", "l": "x"},\n  ["b", "x"],\n  {"t": "c", "l": "y"}\n]', 3, "expected a JSON object"),
        ("d.jsonl", '{"t": "a", "l": "x"}\n{"t": "b"}\n{"t": "c", "l": "y"}\n', 2, "missing label"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, name, text, line, reason):
    path = write(tmp_path / name, text)
    cfg = DataConfig(name=str(path), text_column="t", label_column="l")
    message = error_of(cfg)
    assert f"{path} line {line}: {reason}" in message and "data.on_malformed=skip" in message
    task = load_task_data(cfg.model_copy(update={"on_malformed": "skip"}), seed=0)
    assert task.skipped_rows == 1 and len(task.train) == 2


def test_eval_label_outside_training_labels(tmp_path):
    write(tmp_path / "train.csv", "t,l\na,x\nb,y\n")
    write(tmp_path / "test.csv", "t,l\nc,z\nd,x\n")
    cfg = DataConfig(name=str(tmp_path), text_column="t", label_column="l")
    assert f"{tmp_path / 'test.csv'} line 2: label 'z' is not one of x, y" in error_of(cfg)
    task = load_task_data(cfg.model_copy(update={"on_malformed": "skip"}), seed=0)
    assert task.skipped_rows == 1 and task.eval["l"] == [0]


def test_broken_json_file_is_fatal(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"t": "a", "l": "x"},\n {"t": "b" "l": "x"}\n]')
    cfg = DataConfig(name=str(path), text_column="t", label_column="l", on_malformed="skip")
    assert f"{path} line 3: not valid JSON" in error_of(cfg)


def test_describe_user_file_without_columns(tmp_path):
    path = write(tmp_path / "d.csv", "t,l\na,x\nb\n")
    info = describe(str(path))
    assert info["kind"] is None and info["splits"] == {"train": {"rows": 1, "malformed": 1}}
    Console(file=io.StringIO()).print(describe_table(info))


REVIEWS = [  # fields with everything a quoting parser must handle: quotes, doubled quotes, tabs, commas, newlines
    ('The "best" flight, ever', "positive"),
    ('Seat 3A:\t"cramped"\nbut the crew — "lovely" — helped', "positive"),
    ("Lost my bag.\r\nTwice.", "negative"),
    ('He said ""no"" then left', "negative"),
    ("plain words", "positive"),
]


def test_a_quoted_multi_line_tsv_reads_as_the_same_rows_as_csv(tmp_path):
    """A TSV written as Excel and pandas write it (fields in double quotes where they hold a quote, tab or line
    break; quotes doubled) is read field by field, exactly as the same rows in a CSV."""
    def quoted(field: str, sep: str) -> str:
        return f'"{field.replace(chr(34), 2 * chr(34))}"' if any(c in field for c in f'"{sep}\r\n') else field

    for suffix, sep in ((".tsv", "\t"), (".csv", ",")):
        lines = [f"text{sep}label"] + [f"{quoted(t, sep)}{sep}{y}" for t, y in REVIEWS]
        (tmp_path / f"d{suffix}").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    tsv, csv_ = (load_task_data(DataConfig(name=str(tmp_path / f"d{s}"), eval_fraction=0), seed=0) for s in
                 (".tsv", ".csv"))
    assert tsv.train["text"][:] == csv_.train["text"][:] == [t for t, _ in REVIEWS]
    assert tsv.train["label"][:] == csv_.train["label"][:] == [1, 1, 0, 0, 1]
    assert tsv.label_names == ["negative", "positive"] and tsv.skipped_rows == 0


def test_quoting_none_reads_quotes_as_text_and_a_stray_quote_is_an_error_naming_the_fix(tmp_path):
    path = write(tmp_path / "glue.tsv", 'sentence\tlabel\n"a" film\t1\n"it" was "fine"\t0\nok\t1\n')
    assert ("line 2: cannot be parsed as tab-separated values with data.quoting=standard ('\t' expected after '\"'); "
            "fix the file or set data.quoting=none if its quote characters are plain text") in error_of(
        DataConfig(name=str(path)))
    task = load_task_data(DataConfig(name=str(path), quoting="none", eval_fraction=0), seed=0)
    assert task.train["sentence"][:] == ['"a" film', '"it" was "fine"', "ok"]
    unclosed = write(tmp_path / "open.csv", 'text,label\n"never closed,1\nmore,0\n')
    assert f"{unclosed} line 2: cannot be parsed as comma-separated values" in error_of(DataConfig(name=str(unclosed)))
    assert "dataset 'cola' reads its files with quoting 'none'; remove data.quoting" in error_of(
        DataConfig(name="cola", quoting="standard"))


def test_a_latin1_file_names_the_line_and_reads_with_data_encoding(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nnice,pos\nun café exquis,pos\nbad,neg\n".encode("latin-1"))
    assert error_of(DataConfig(name=str(path))) == (
        f"{path} line 3: byte 0xe9 is not utf-8 text; set data.encoding to the file's encoding (e.g. latin-1 or "
        "cp1252), or re-save it as UTF-8")
    task = load_task_data(DataConfig(name=str(path), encoding="latin-1", eval_fraction=0), seed=0)
    assert task.train["text"][1] == "un café exquis"
    bom = write(tmp_path / "bom.csv", "\ufefftext,label\na,x\nb,y\n")
    assert load_task_data(DataConfig(name=str(bom), eval_fraction=0), seed=0).train["text"][:] == ["a", "b"]
    with pytest.raises(ValueError, match="'klingon' is not a text encoding Python knows"):
        DataConfig(encoding="klingon")


def test_skip_says_how_many_rows_it_dropped_and_refuses_a_large_share(tmp_path):
    good = "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(100))
    few = write(tmp_path / "few.csv", "text,label\n" + good + "x,a,extra\n" * 3)
    task = load_task_data(DataConfig(name=str(few), on_malformed="skip", eval_fraction=0), seed=0)
    assert task.skipped_rows == 3 and len(task.train) == 100
    assert task.notes[-1:] == [f"data: skipped 3 malformed rows (3 of 103 in 'train'; data.on_malformed=skip), the first at "
                          f"{few} line 102: expected 2 comma-separated fields, found 3"]
    many = write(tmp_path / "many.csv", "text,label\n" + good + "x,a,extra\n" * 12)
    assert error_of(DataConfig(name=str(many), on_malformed="skip")) == (
        f"data.on_malformed=skip would drop 12 of the 112 rows of split 'train' of {many} (11%; more than 10% is "
        f"refused), the first at {many} line 102: expected 2 comma-separated fields, found 3; the file is not read as "
        "written: check its columns, data.quoting and data.encoding")


# --------------------------------------------------------------------------- held-out eval split


def test_held_out_is_stratified_disjoint_complete_and_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    train, held = held_out(100, 0.1, seed=3, labels=labels)
    assert np.bincount(labels[held]).tolist() == [6, 3, 1]
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(100))
    assert all((np.diff(a) > 0).all() for a in (train, held))
    again = held_out(100, 0.1, seed=3, labels=labels)
    assert (again[1] == held).all() and (held_out(100, 0.1, seed=4, labels=labels)[1] != held).any()
    assert len(held_out(100, 0.1, seed=3, labels=labels, limit=5)[1]) == 5


def test_held_out_keeps_every_label_in_training():
    labels = np.array([0] * 7 + [1] * 5 + [2] * 3)
    train, held = held_out(15, 0.2, seed=0, labels=labels)  # 3 rows: one per label by largest remainder
    assert np.bincount(labels[held]).tolist() == [1, 1, 1] and set(labels[train]) == {0, 1, 2}
    assert len(held_out(2, 0.5, seed=0, labels=[0, 1])[1]) == 0  # a label's last row stays
    assert len(held_out(4, 0.1, seed=0, labels=[0, 1, 0, 1])[1]) == 1  # at least one row when fraction > 0


def test_held_out_without_labels_and_turned_off():
    train, held = held_out(10, 0.3, seed=1)
    assert len(held) == 3 and len(train) == 7 and not set(train) & set(held)
    assert len(held_out(10, 0.0, seed=1)[1]) == 0 and len(held_out(1, 0.5, seed=1)[1]) == 0


def _rows_csv(path: Path, n: int, labels=("neg", "pos", "neu")) -> Path:
    lines = [f"row {i} text,{labels[i % len(labels)]},site_{i % 2}" for i in range(n)]
    return write(path, "text,label,site\n" + "\n".join(lines) + "\n")


def test_single_file_gets_a_stratified_eval_split_disjoint_from_training(tmp_path):
    path = _rows_csv(tmp_path / "d.csv", 60)
    task = load_task_data(DataConfig(name=str(path)), seed=5)
    assert (len(task.train), len(task.eval)) == (54, 6)
    assert sorted(task.eval["label"][:]) == [0, 0, 1, 1, 2, 2]
    assert not set(task.train["text"][:]) & set(task.eval["text"][:])
    assert task.eval_origin == [{"dataset": str(path), "held_out": "train", "rows": 6, "of_rows": 60,
                                 "fraction": 0.1, "stratified_by": "label", "seed": 5}]
    assert task.notes[-1] == (f"eval: held out 6 of the 60 rows of {path} as the eval split (data.eval_fraction=0.1, "
                              "stratified by label, seed 5); set data.eval_fraction=0 to train on every row")
    other = load_task_data(DataConfig(name=str(path)), seed=6)
    assert other.eval["text"][:] != task.eval["text"][:]
    off = load_task_data(DataConfig(name=str(path), eval_fraction=0), seed=5)
    assert (len(off.train), off.eval, off.eval_origin) == (60, None, [])


def test_folder_with_a_dev_file_keeps_it(tmp_path):
    _rows_csv(tmp_path / "train.csv", 30)
    _rows_csv(tmp_path / "dev.csv", 9)
    task = load_task_data(DataConfig(name=str(tmp_path)), seed=0)
    assert (len(task.train), len(task.eval)) == (30, 9)
    assert task.eval_origin == [{"dataset": str(tmp_path), "split": "dev", "rows": 9}]
    assert not any(line.startswith("eval:") for line in task.notes)


def test_instruction_file_gets_a_random_eval_split(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(20)]
    path = write(tmp_path / "inst.json", json.dumps(rows))
    task = load_task_data(DataConfig(name=str(path), eval_fraction=0.25), seed=0)
    assert (len(task.train), len(task.eval)) == (15, 5) and task.eval_origin[0]["stratified_by"] is None
    assert "at random, seed 0" in task.notes[-1]


# --------------------------------------------------------------------------- columns found by name


@pytest.mark.parametrize(
    "columns, text",
    [
        (["id", "text", "label"], ("text",)),
        (["sentence", "label"], ("sentence",)),
        (["text", "sentence"], ("text",)),
        (["sentence1", "sentence2", "label"], ("sentence1", "sentence2")),
        (["premise", "hypothesis", "label", "text"], ("premise", "hypothesis")),
        (["premise", "label"], None),
        (["Text", "body"], None),
    ],
)
def test_detect_text(columns, text):
    assert detect_text(columns) == text


def test_detect_label_and_instruction():
    assert detect_label(["text", "label"]) == "label" and detect_label(["text", "labels"]) is None
    assert detect_instruction(["instruction", "input", "output"]) == ("instruction", "input")
    assert detect_instruction(["instruction", "output"]) == ("instruction",)
    assert detect_instruction(["instruction", "input"]) is None


def test_text_and_label_columns_are_found_by_name(tmp_path):
    path = _rows_csv(tmp_path / "d.csv", 6)
    task = load_task_data(DataConfig(name=str(path), eval_fraction=0), seed=0)
    assert task.kind == "classification" and (task.text_columns, task.label_column) == (("text",), "label")
    assert task.label_names == ["neg", "neu", "pos"]
    assert task.notes == [f"data: text column 'text', label column 'label' (found by name in {path}; "
                          "set data.text_column / data.label_column to choose others)"]
    named = load_task_data(DataConfig(name=str(path), text_column="site", eval_fraction=0), seed=0)
    assert named.text_columns == ("site",) and named.notes == [
        f"data: label column 'label' (found by name in {path}; set data.label_column to choose others)"]
    given = load_task_data(DataConfig(name=str(path), text_column="text", label_column="site", eval_fraction=0), 0)
    assert given.label_names == ["site_0", "site_1"] and given.notes == []


def test_pair_and_instruction_columns_are_found_by_name(tmp_path):
    pair = write(tmp_path / "nli.jsonl", "\n".join(json.dumps({"premise": f"p{i}", "hypothesis": "h", "label": i % 2})
                                                for i in range(4)))
    task = load_task_data(DataConfig(name=str(pair), eval_fraction=0), seed=0)
    assert task.text_columns == ("premise", "hypothesis")
    assert task.notes[0].startswith("data: text columns 'premise', 'hypothesis', label column 'label'")
    assert "set data.text_column / data.text_pair_column / data.label_column" in task.notes[0]
    inst = write(tmp_path / "inst.json", json.dumps([{"instruction": "Say hi", "output": "hi"}]))
    assert load_task_data(DataConfig(name=str(inst)), seed=0).notes[0] == (
        f"data: instruction columns 'instruction', response column 'output' (found by name in {inst})")


def test_describe_finds_columns_and_names_the_held_out_split(tmp_path):
    info = describe(str(_rows_csv(tmp_path / "d.csv", 6)))
    assert info["kind"] == "classification" and info["text_columns"] == ["text"] and info["label_column"] == "label"
    out = io.StringIO()
    Console(file=out, width=200).print(describe_table(info))
    assert "train / 10% of train, held out (data.eval_fraction)" in out.getvalue()


# --------------------------------------------------------------------------- labels


def test_one_label_is_refused(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\ngood,pos\nfine,pos\ngreat,pos\n")
    assert error_of(DataConfig(name=str(path))) == (
        f"label column 'label' of {path} holds one value ('pos') in all its 3 usable rows; a classifier needs at "
        "least two labels: set data.label_column to the column of labels, or add rows of the other labels")
    skipped = write(tmp_path / "e.csv", "text,label\ngood,pos\n,neg\n")  # the only 'neg' row is malformed
    assert "holds one value ('pos')" in error_of(DataConfig(name=str(skipped), on_malformed="skip"))


def test_a_rare_label_close_to_another_is_refused_as_a_typo(tmp_path):
    rows = [f"review {i},{('positive', 'negative')[i % 2]}\n" for i in range(60)]
    path = write(tmp_path / "d.csv", "text,label\n" + "".join(rows[:20]) + "oops,positve\n" + "".join(rows[20:]))
    assert error_of(DataConfig(name=str(path))) == (
        f"label 'positve' (1 row, the first at {path} line 22) looks like a typo of 'positive' (30 rows); correct it "
        "in the file, or set the classes with -o data.labels=[negative,positive] (a row with another label is then "
        "malformed)")
    given = DataConfig(name=str(path), labels=["negative", "positive"])
    assert f"malformed row at {path} line 22: label 'positve' is not one of negative, positive" in error_of(given)
    cased = write(tmp_path / "c.csv", "text,label\n" + "".join(rows) + "oops,Negative\n")
    assert "label 'Negative' (1 row, the first at" in error_of(DataConfig(name=str(cased)))


@pytest.mark.parametrize("rare", ["unacceptable", "7", "neutral"])
def test_a_rare_label_of_its_own_is_a_class(tmp_path, rare):
    """A prefix makes a class of its own, integers are never typos of each other, a distant word is a class."""
    common = {"unacceptable": "acceptable", "7": "1", "neutral": "negative"}[rare]
    rows = "".join(f"s{i},{common if i % 2 else 'other'}\n" for i in range(60))
    task = load_task_data(DataConfig(name=str(write(tmp_path / "d.csv", "text,label\n" + rows + f"z,{rare}\n")),
                                     eval_fraction=0), seed=0)
    assert rare in task.label_names and len(task.label_names) == 3


def test_a_label_column_of_text_is_refused(tmp_path):
    rows = "".join(f"review {i},fragment number {i} of a sentence\n" for i in range(40))
    path = write(tmp_path / "d.csv", "text,label\n" + rows + "another,fragment number 0 of a sentence\n")
    assert error_of(DataConfig(name=str(path))) == (
        f"label column 'label' of {path} holds 40 distinct values in 41 rows, 39 of them in one row only (e.g. "
        "'fragment number 1 of a senten…', 'fragment number 2 of a senten…', 'fragment number 3 of a senten…'): that "
        "is not a column of labels; set data.label_column to the column of labels, check data.quoting if fields hold "
        "quoted text, or list the classes in data.labels")


# --------------------------------------------------------------------------- finding data


def test_unknown_name_lists_registered(no_data):
    message = error_of(DataConfig(name="nosuch"))
    assert "sst2, sst2_pt, cola, snli, mmlu, alpaca_en, alpaca_zh" in message


def test_missing_file(no_data):
    assert "data file not found" in error_of(DataConfig(name="nope/data.csv"))


def never_probe(monkeypatch) -> None:
    """Fail the test if the Hub is asked over HTTP: the offline variables must decide alone."""
    def probe(*args, **kwargs):
        raise AssertionError("the Hub was probed although an offline variable is set")

    monkeypatch.setattr(hub, "_probe", probe)


def test_missing_registered_dataset_names_every_place(no_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    never_probe(monkeypatch)
    message = error_of(DataConfig(name="sst2"))
    expected = ["$FEDTUNE_DATA (not set)", str(no_data.parent / "shared" / "data" / "sst2"), "stanfordnlp/sst2"]
    assert all(e in message for e in expected)
    assert "HF_HUB_OFFLINE is set" in message and "set FEDTUNE_DATA" in message


def test_hub_id_offline_fails_fast(no_data, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    never_probe(monkeypatch)
    message = error_of(DataConfig(name="someone/some-data", text_column="t", label_column="l"))
    assert "HF_DATASETS_OFFLINE is set" in message


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://no-hub.invalid"])
def test_unreachable_hub_fails_fast(no_data, monkeypatch, endpoint):
    """Without the offline variables an HTTP probe decides: a refused connection or unknown host is an answer
    ("is unreachable"), given before the probe's timeout would say "did not answer"."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 30.0)  # only the answer itself can end the probe early
    message = error_of(DataConfig(name="cola"))
    assert f"offline: {endpoint} is unreachable" in message


def test_silent_hub_times_out(no_data, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    released = threading.Event()
    # A Hub that never answers while the probe waits; released afterwards, it would answer (so a probe that did not
    # give up at its timeout would report success, not "did not answer").
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda *a, **k: (released.wait(60), io.BytesIO())[1])
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.3)
    try:
        message = error_of(DataConfig(name="cola"))
    finally:
        released.set()
    assert "did not answer within 0.3 s" in message


def test_reachable_hub_is_asked_and_its_failure_reported(no_data, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked = []

    def load_dataset(hub_id, config):
        asked.append((hub_id, config))
        raise FileNotFoundError(f"Dataset '{hub_id}' doesn't exist on the Hub")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    try:
        message = error_of(DataConfig(name="cola"))
    finally:
        server.shutdown()
    assert asked == [("nyu-mll/glue", "cola")]
    assert "loading nyu-mll/glue from the Hugging Face Hub failed (FileNotFoundError" in message


def test_hub_splits_become_registered_columns(no_data, monkeypatch):
    """A Hub download is read like the local files: split names, columns and labels as registered."""
    hub = {
        ("stanfordnlp/snli", None): datasets.DatasetDict(
            validation=datasets.Dataset.from_dict({"premise": ["p", "q", "s"], "hypothesis": ["h", "i", "k"],
                                                   "label": [2, -1, 1]}),
            test=datasets.Dataset.from_dict({"premise": ["r"], "hypothesis": ["j"], "label": [0]}),
        ),
        ("cais/mmlu", "all"): datasets.DatasetDict(
            dev=datasets.Dataset.from_dict(
                {"question": ["q?"], "subject": ["law"], "choices": [["w", "x", "y", "z"]], "answer": [3]}
            ),
        ),
    }
    monkeypatch.setattr(sources, "hub_unavailable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config: hub[hub_id, config])
    assert "stanfordnlp/snli[validation] line 2: label '-1' is not one of" in error_of(DataConfig(name="snli"))
    snli = load_task_data(DataConfig(name="snli", on_malformed="skip"), seed=0)
    assert snli.train["label"][:] == [2, 1] and snli.eval["label"][:] == [0] and snli.skipped_rows == 1
    assert snli.source == "hub:stanfordnlp/snli"
    mmlu = load_task_data(DataConfig(name="mmlu", train_split="dev"), seed=0)
    assert mmlu.train[0] == {"question": "q?", "subject": "law", "label": 3, "A": "w", "B": "x", "C": "y", "D": "z"}
