"""Any dataset as instructions: Alpaca-format data, verbalised classification, multitask mixtures.

Instruction tuning (``model.task: sft``) trains on rows with the columns of
:data:`COLUMNS`:

- ``instruction``, ``input`` (may be empty) and ``output``, the response;
- ``choices``: the candidate responses of a closed task (a classification
  dataset's verbalised labels), empty for open-ended instructions;
- ``answer``: the index of ``output`` in ``choices``, -1 when open-ended;
- ``task``: the dataset the row came from (partition a mixture with
  ``partition.by: task``).

Rows of a parallel dataset also keep its ``language`` and ``row_id`` columns
(``TaskData.meta_columns``), for ``partition.by: language``.

A registered classification dataset is verbalised by its spec
(``instruction``, ``input``, ``answers``; SNLI → ``Suppose "{premise}" Can we
infer that "{hypothesis}"? Yes, No, or Maybe?`` answered Yes / Maybe / No); a
user's classification file by a generic prompt naming its label set.
"""

from __future__ import annotations

from dataclasses import replace

import datasets

from fedtune.config import DataConfig
from fedtune.data.loaders import TaskData, load_task_data
from fedtune.data.registry import verbaliser_spec
from fedtune.errors import FedtuneError

COLUMNS = ("instruction", "input", "output", "choices", "answer", "task")
MULTITASK = "multitask"


def load_instruction_data(cfg: DataConfig, seed: int) -> TaskData:
    """The dataset named by ``cfg`` as instructions; ``name: multitask`` mixes the datasets of ``cfg.tasks``."""
    if cfg.name != MULTITASK:
        if cfg.tasks is not None:
            raise FedtuneError(f"data.tasks is for data.name={MULTITASK}; remove it, or set data.name={MULTITASK}")
        return as_instructions(load_task_data(cfg, seed))
    if not cfg.tasks:
        raise FedtuneError(f"data.name={MULTITASK} needs data.tasks, the datasets to mix (e.g. [sst2, snli, alpaca_en])")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise FedtuneError(f"data.tasks lists a dataset twice: {cfg.tasks}")
    parts = [
        as_instructions(load_task_data(cfg.model_copy(update={"name": name, "tasks": None}), seed))
        for name in cfg.tasks
    ]
    evals = [p.eval for p in parts if p.eval is not None]
    return TaskData(
        name=MULTITASK,
        kind="instruction",
        train=_concat([p.train for p in parts]),
        eval=_concat(evals) if evals else None,
        text_columns=("instruction", "input"),
        label_column=None,
        label_names=[],
        source=" + ".join(p.source for p in parts),
        skipped_rows=sum(p.skipped_rows for p in parts),
        target_column="output",
        eval_origin=[o for p in parts for o in p.eval_origin],
        notes=[line for p in parts for line in p.notes],
    )


def as_instructions(task: TaskData) -> TaskData:
    """``task`` with its rows rewritten into :data:`COLUMNS` (label columns are kept for partitioning)."""
    if task.kind == "instruction":
        convert = _open_ended
    elif task.kind == "classification":
        convert = _verbaliser(task)
    else:
        raise FedtuneError(
            f"dataset '{task.name}' is a {task.kind} dataset and cannot be used for instruction tuning; "
            "evaluate on it with `fedtune eval mmlu`, or train on a classification or instruction dataset"
        )
    label_column = task.label_column if task.kind == "classification" else None
    return replace(
        task,
        kind="instruction",
        train=convert(task.train, task, label_column),
        eval=None if task.eval is None else convert(task.eval, task, label_column),
        text_columns=("instruction", "input"),
        target_column="output",
    )


def _open_ended(ds: datasets.Dataset, task: TaskData, label_column: str | None) -> datasets.Dataset:
    """Instruction rows: the first text column is the instruction, the second (if any) its input."""
    n = len(ds)
    instruction, *rest = task.text_columns
    inputs = ds[rest[0]][:] if rest and rest[0] in ds.column_names else [""] * n
    return datasets.Dataset.from_dict({
        "instruction": ds[instruction][:],
        "input": [x or "" for x in inputs],
        "output": [x or "" for x in ds[task.target_column][:]],
        "choices": [[] for _ in range(n)],
        "answer": [-1] * n,
        "task": ds["task"][:] if "task" in task.meta_columns else [task.name] * n,
        **{c: ds[c][:] for c in task.meta_columns if c != "task"},
    }, features=_features(ds, task))


def _features(ds: datasets.Dataset, task: TaskData, **more: datasets.Value) -> datasets.Features:
    """:data:`COLUMNS`' types, the task's meta columns' own types, and ``more``."""
    meta = {c: ds.features[c] for c in task.meta_columns if c != "task"}
    return datasets.Features({**_FEATURES, **meta, **more})


def _verbaliser(task: TaskData):
    spec = verbaliser_spec(task.name)
    if spec is not None and spec.answers:
        instruction, input_, answers = spec.instruction, spec.input, list(spec.answers)
    else:  # a user's classification file: name the label set in the prompt
        answers = list(task.label_names)
        instruction = f"Classify the text as one of: {', '.join(answers)}."
        input_ = "\n".join("{" + c + "}" for c in task.text_columns)

    def convert(ds: datasets.Dataset, task: TaskData, label_column: str | None) -> datasets.Dataset:
        cols = {c: ds[c][:] for c in ds.column_names}
        rows = [{c: cols[c][i] for c in task.text_columns} for i in range(len(ds))]
        labels = cols[label_column]
        out = {
            "instruction": [instruction.format(**r) for r in rows],
            "input": [input_.format(**r) if input_ else "" for r in rows],
            "output": [answers[y] for y in labels],
            "choices": [answers] * len(ds),
            "answer": list(labels),
            "task": cols["task"] if "task" in task.meta_columns else [task.name] * len(ds),
            label_column: list(labels),
            **{c: cols[c] for c in task.meta_columns if c != "task"},
        }
        return datasets.Dataset.from_dict(out, features=_features(ds, task, **{label_column: datasets.Value("int64")}))

    return convert


_FEATURES = datasets.Features({
    "instruction": datasets.Value("string"),
    "input": datasets.Value("string"),
    "output": datasets.Value("string"),
    "choices": datasets.Sequence(datasets.Value("string")),
    "answer": datasets.Value("int64"),
    "task": datasets.Value("string"),
})


def _concat(parts: list[datasets.Dataset]) -> datasets.Dataset:
    """The rows of several instruction sets one after another, in :data:`COLUMNS` only."""
    return datasets.concatenate_datasets([p.select_columns(list(COLUMNS)) for p in parts])
