"""The registered datasets: one :class:`DatasetSpec` per name.

A spec says where a dataset's files lie under a data root, how to read them,
which columns hold the text and the label, the label set, and the Hugging Face
Hub id that is its online equivalent. Adding a dataset is adding one entry to
``REGISTRY``; nothing else in the package names a dataset. A parallel
multilingual dataset (:class:`ParallelSpec`, in ``PARALLEL``) is a set of
registered datasets, one per language, whose row i is the same item; a
mixture (the same class, ``aligned=False``) is a set of unrelated datasets of
one kind and label count, loaded as one with a ``task`` column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["classification", "instruction", "multiple_choice"]


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one registered dataset, locally and from the Hub."""

    name: str
    kind: Kind
    description: str
    folder: str
    """Folder under a data root (``$FEDTUNE_DATA`` or ``../shared/data``)."""
    files: Mapping[str, str]
    """Split name -> file inside ``folder``; a glob pattern reads every matching file."""
    text_columns: tuple[str, ...]
    """Columns that hold the input text (one, or two for sentence pairs)."""
    label_column: str | None = None
    label_values: tuple[str, ...] = ()
    """The label as written in the files, in class-index order (``"0"``, ``"entailment"``, ``"A"``)."""
    label_names: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    """Further columns that must hold non-empty text (answer choices, instruction response)."""
    target_column: str | None = None
    """Instruction data: the column holding the response."""
    eval_split: str | None = None
    """Held-out split used when ``data.eval_split`` is not set."""
    instruction: str | None = None
    """Verbaliser for instruction tuning: the instruction, a format string over the row's columns."""
    input: str | None = None
    """Verbaliser: the optional input that follows the instruction (format string; None: no input)."""
    answers: tuple[str, ...] = ()
    """Verbaliser: the response for each class, in class-index order."""
    fieldnames: tuple[str, ...] | None = None
    """Column names of headerless files; None: the first line is the header."""
    quoting: str = "standard"
    """How quote characters in its CSV/TSV files are read (:data:`~fedtune.data.readers.QUOTING`): GLUE's TSV
    files hold sentences that begin with bare quotes, read as text (``none``)."""
    file_column: str | None = None
    """For a glob split: a column holding each row's file stem without its ``_<split>`` suffix."""
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: Mapping[str, str] = field(default_factory=dict)
    """Split name here -> split name on the Hub (only the Hub splits that carry labels)."""
    hub_columns: Callable[[dict[str, list[Any]]], dict[str, list[Any]]] | None = None
    """Turns the Hub's columns into this spec's columns; None: they already match."""
    meta_columns: tuple[str, ...] = ()
    """Columns about each row (a category, a source task) kept through instruction formatting, so that
    ``partition.by`` can split over them; a ``task`` column names each row's task in place of the dataset."""


def _mmlu_from_hub(cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``cais/mmlu`` keeps the four choices in one list column; spread them over A..D."""
    out = {"question": cols["question"], "subject": cols["subject"], "label": cols["answer"]}
    for i, letter in enumerate("ABCD"):
        out[letter] = [choices[i] for choices in cols["choices"]]
    return out


def _xquad_from_hub(cols: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``google/xquad`` (SQuAD format) as instructions: question, context paragraph, first gold answer."""
    return {
        "instruction": cols["question"],
        "input": cols["context"],
        "output": [a["text"][0] if a["text"] else "" for a in cols["answers"]],
    }


XQUAD_LANGUAGES = {
    "en": "English", "es": "Spanish", "tr": "Turkish", "de": "German", "zh": "Chinese", "vi": "Vietnamese",
}

_SST2 = dict(
    kind="classification",
    files={"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
    quoting="none",
    text_columns=("sentence",),
    label_column="label",
    label_values=("0", "1"),
    label_names=("negative", "positive"),
    eval_split="dev",
    instruction="Is the sentiment of this movie review positive or negative?",
    input="{sentence}",
    answers=("negative", "positive"),
)

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="sst2",
            description="GLUE SST-2 movie-review sentiment (binary)",
            folder="sst2",
            hub_id="stanfordnlp/sst2",
            hub_splits={"train": "train", "dev": "validation"},
            **_SST2,
        ),
        DatasetSpec(
            name="sst2_pt",
            description="SST-2 machine-translated to Portuguese (PLUE), aligned with sst2",
            folder="sst2_pt",
            hub_id="dlb/plue",
            hub_config="sst2",
            hub_splits={"train": "train", "dev": "validation"},
            **{**_SST2, "files": {"train": "train.tsv", "dev": "dev.tsv"}},
        ),
        DatasetSpec(
            name="cola",
            kind="classification",
            description="CoLA grammatical acceptability (binary, in-domain)",
            folder="cola",
            files={"train": "train.tsv", "dev": "dev.tsv"},
            fieldnames=("source", "label", "mark", "sentence"),
            quoting="none",
            text_columns=("sentence",),
            label_column="label",
            label_values=("0", "1"),
            label_names=("unacceptable", "acceptable"),
            eval_split="dev",
            instruction="Is this sentence grammatically acceptable or unacceptable?",
            input="{sentence}",
            answers=("unacceptable", "acceptable"),
            hub_id="nyu-mll/glue",
            hub_config="cola",
            hub_splits={"train": "train", "dev": "validation"},
        ),
        DatasetSpec(
            name="snli",
            kind="classification",
            description="SNLI natural language inference (premise/hypothesis, 3 classes)",
            folder="snli",
            files={"train": "train.jsonl", "test": "test.jsonl"},
            text_columns=("premise", "hypothesis"),
            label_column="label",
            label_values=("entailment", "neutral", "contradiction"),
            label_names=("entailment", "neutral", "contradiction"),
            eval_split="test",
            instruction='Suppose "{premise}" Can we infer that "{hypothesis}"? Yes, No, or Maybe?',
            answers=("Yes", "Maybe", "No"),
            hub_id="stanfordnlp/snli",
            hub_splits={"train": "validation", "test": "test"},
        ),
        DatasetSpec(
            name="mmlu",
            kind="multiple_choice",
            description="MMLU 4-way multiple choice over 57 subjects (choices in columns A-D)",
            folder="mmlu",
            files={"dev": "dev/*_dev.csv", "val": "val/*_val.csv", "test": "test/*_test.csv"},
            fieldnames=("question", "A", "B", "C", "D", "label"),
            file_column="subject",
            text_columns=("question",),
            label_column="label",
            label_values=("A", "B", "C", "D"),
            label_names=("A", "B", "C", "D"),
            required=("A", "B", "C", "D"),
            eval_split="test",
            hub_id="cais/mmlu",
            hub_config="all",
            hub_splits={"dev": "dev", "val": "validation", "test": "test"},
            hub_columns=_mmlu_from_hub,
        ),
        *(
            DatasetSpec(
                name=f"alpaca_{lang}",
                kind="instruction",
                description=f"Alpaca-format instruction demo set ({language})",
                folder="instruct",
                files={"train": f"alpaca_{lang}_demo.json"},
                text_columns=("instruction", "input"),
                required=("output",),
                target_column="output",
            )
            for lang, language in [("en", "English"), ("zh", "Chinese")]
        ),
        DatasetSpec(
            name="dolly",
            kind="instruction",
            description="Dolly-15k: 15,011 human-written instructions in 8 categories (a category column)",
            folder="dolly",
            files={"train": "databricks-dolly-15k.jsonl"},
            text_columns=("instruction", "context"),
            required=("response",),
            target_column="response",
            meta_columns=("category",),
            hub_id="databricks/databricks-dolly-15k",
            hub_splits={"train": "train"},
        ),
        DatasetSpec(
            name="natural_instructions",
            kind="instruction",
            description="Super-NaturalInstructions: 20 English tasks, up to 1,000 rows each (a task column)",
            folder="natural_instructions",
            files={"train": "train.jsonl"},
            text_columns=("instruction", "input"),
            target_column="output",  # 6 rows of task511 have an empty output, as in the source: kept
            meta_columns=("task",),
        ),
        *(
            DatasetSpec(
                name=f"xquad_{lang}",
                kind="instruction",
                description=f"XQuAD extractive QA as instructions ({language}; question, paragraph, answer)",
                folder="multilingual",
                files={"train": f"{lang}.json"},
                text_columns=("instruction", "input"),
                required=("output",),
                target_column="output",
                hub_id="google/xquad",
                hub_config=f"xquad.{lang}",
                hub_splits={"train": "validation"},
                hub_columns=_xquad_from_hub,
            )
            for lang, language in XQUAD_LANGUAGES.items()
        ),
    ]
}


@dataclass(frozen=True)
class ParallelSpec:
    """Registered datasets loaded as one, with a column naming each row's member: translations aligned row by
    row (``language``), or a mixture of tasks (``task``)."""

    name: str
    description: str
    members: Mapping[str, str]
    """Member name (language code, task) -> registered dataset."""
    column: str = "language"
    """The column that names each row's member."""
    aligned: bool = True
    """Row i of every member is the same item (question, sentence) translated; False: a mixture of unrelated
    datasets of one kind and one label count (class i of each is label i of the one head)."""

    @property
    def kind(self) -> Kind:
        return REGISTRY[next(iter(self.members.values()))].kind


PARALLEL: dict[str, ParallelSpec] = {
    spec.name: spec
    for spec in [
        ParallelSpec(
            name="multilingual",
            description="XQuAD as instructions in en, es, tr, de, zh, vi: the same 1,190 questions in each (parallel)",
            members={lang: f"xquad_{lang}" for lang in XQUAD_LANGUAGES},
        ),
        ParallelSpec(
            name="sst2_multilingual",
            description="SST-2 in English and Portuguese (sst2 + sst2_pt, row-aligned; parallel)",
            members={"en": "sst2", "pt": "sst2_pt"},
        ),
        ParallelSpec(
            name="sst2_cola",
            description="SST-2 sentiment and CoLA acceptability under one binary head, with a task column (mixture)",
            members={"sst2": "sst2", "cola": "cola"},
            column="task",
            aligned=False,
        ),
    ]
}


def verbaliser_spec(name: str) -> DatasetSpec | None:
    """The spec whose verbaliser (instruction, answers) a dataset uses: its own, or a parallel set's first member's
    (None for a mixture: its members ask different questions, so the prompt names the joint label set)."""
    if name in PARALLEL:
        spec = PARALLEL[name]
        return REGISTRY[next(iter(spec.members.values()))] if spec.aligned else None
    return REGISTRY.get(name)


def list_datasets() -> list[tuple[str, str, str | None, str]]:
    """``(name, kind, hub_id, description)`` for every registered dataset, then the parallel ones."""
    rows = [(s.name, s.kind, s.hub_id, s.description) for s in REGISTRY.values()]
    for p in PARALLEL.values():
        hub_ids = dict.fromkeys(REGISTRY[m].hub_id for m in p.members.values())
        rows.append((p.name, p.kind, " + ".join(h for h in hub_ids if h) or None, p.description))
    return rows
