"""MMLU (Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR 2021).

57 subjects of 4-way multiple-choice questions. A question is asked in the
paper's format (a header naming the subject, k solved examples from the
subject's ``dev`` split, then the question and ``Answer:``) and the model's
answer is the letter among `` A`` … `` D`` with the highest next-token
log-likelihood (:func:`fedtune.evaluation.choice_losses`, one forward pass per
question; the header and shots that a subject's questions share run once).
Accuracy is reported per subject, per category (the mean of its subjects) and
as the macro average over the 57 subjects.

``subset``: a seeded ⌈10%⌉ of each subject's test questions, the
1,444-question protocol of FLoRIST (Ramesh et al., 2025) for quick runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.config import DataConfig
from fedtune.data import load_task_data
from fedtune.evaluation import choice_losses

LETTERS = ("A", "B", "C", "D")

_STEM = (
    "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning"
)
_HUMANITIES = (
    "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
    "professional_law world_religions"
)
_SOCIAL = (
    "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
    "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
    "security_studies sociology us_foreign_policy"
)
_OTHER = (
    "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
    "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
)
CATEGORIES: dict[str, str] = {
    subject: category
    for category, names in (("STEM", _STEM), ("humanities", _HUMANITIES), ("social sciences", _SOCIAL),
                            ("other", _OTHER))
    for subject in names.split()
}
"""Subject → category, as in the MMLU paper (57 subjects, 4 categories)."""


def _question(row: dict) -> str:
    return row["question"].strip() + "".join(f"\n{x}. {row[x]}" for x in LETTERS) + "\nAnswer:"


def prompt(subject: str, row: dict, shots: list[dict]) -> str:
    """The paper's prompt: header, solved ``shots``, then ``row``'s question ending in ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    solved = "".join(f"{_question(s)} {LETTERS[s['label']]}\n\n" for s in shots)
    return header + solved + _question(row)


def subset_indices(subjects: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded ⌈fraction · n_s⌉ questions of each subject s, in their original order."""
    subjects_arr = np.asarray(subjects)
    rng = np.random.default_rng(seed)
    keep = []
    for s in sorted(set(subjects)):
        rows = np.flatnonzero(subjects_arr == s)
        keep.append(rng.choice(rows, size=math.ceil(fraction * len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def question_indices(row_subjects: list[str], subset: bool, subjects: list[str] | None, seed: int) -> np.ndarray:
    """The test rows to ask: all, or the seeded subset; then only those of ``subjects`` (None: all).

    The subset is drawn over every subject before the filter, so a subject gets the same questions
    whichever other subjects are asked with it.
    """
    idx = subset_indices(row_subjects, 0.1, seed) if subset else np.arange(len(row_subjects))
    if subjects is not None:
        keep = set(subjects)
        idx = idx[[row_subjects[i] in keep for i in idx]]
    return idx


@dataclass
class MMLUResult:
    subjects: dict[str, float]
    """Accuracy per subject."""
    counts: dict[str, int]
    categories: dict[str, float]
    """Mean subject accuracy per category."""
    macro: float
    """Mean accuracy over subjects."""
    questions: int
    shots: int
    prompt_tokens: int
    """Σ prompt lengths: the tokens a model without prefix sharing would run."""

    def to_dict(self) -> dict:
        return {"macro_accuracy": self.macro, "questions": self.questions, "shots": self.shots,
                "prompt_tokens": self.prompt_tokens,
                "categories": self.categories, "subjects": self.subjects, "counts": self.counts}


@torch.no_grad()
def evaluate_mmlu(model: torch.nn.Module, tokenizer, shots: int = 0, subset: bool = False, seed: int = 0,
                  batch_size: int = 16, max_length: int = 2048, subjects: list[str] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> MMLUResult:
    """Accuracy of a causal LM on the MMLU test split (``subjects``: only those; default all 57).

    A k-shot prompt longer than ``max_length`` tokens drops shots, oldest first, until it fits.
    ``progress(done, total)`` is called as questions are scored.
    """
    data = load_task_data(DataConfig(name="mmlu", train_split="test", eval_split="dev"), seed)
    test = data.train.to_dict()
    dev = data.eval.to_dict()
    rows = [{k: test[k][i] for k in test} for i in range(len(data.train))]
    idx = question_indices([r["subject"] for r in rows], subset, subjects, seed)
    dev_rows: dict[str, list[dict]] = {}
    for i in range(len(data.eval)):
        dev_rows.setdefault(dev["subject"][i], []).append({k: dev[k][i] for k in dev})

    letters = [tokenizer(" " + x, add_special_tokens=False).input_ids[-1:] for x in LETTERS]
    prompts = []
    for i in idx:
        row = rows[i]
        solved = dev_rows.get(row["subject"], [])[:shots]
        while True:
            ids = tokenizer(prompt(row["subject"], row, solved)).input_ids
            if len(ids) <= max_length or not solved:
                break
            solved = solved[1:]
        prompts.append(ids[-max_length:])
    subj = [rows[i]["subject"] for i in idx]  # a subject's questions share their header and shots: computed once
    done = 0

    def scored(k: int) -> None:
        nonlocal done
        done += k
        progress(done, len(prompts))

    losses = choice_losses(model, prompts, [letters] * len(prompts), tokenizer.pad_token_id, batch_size, groups=subj,
                           progress=scored if progress is not None else None)
    correct = np.array([int(np.argmin(x)) == rows[i]["label"] for x, i in zip(losses, idx)])
    subj = np.asarray(subj)
    per_subject = {s: float(correct[subj == s].mean()) for s in sorted(set(subj))}
    counts = {s: int((subj == s).sum()) for s in per_subject}
    by_category: dict[str, list[float]] = {}
    for s, acc in per_subject.items():
        by_category.setdefault(CATEGORIES.get(s, "other"), []).append(acc)
    return MMLUResult(
        subjects=per_subject,
        counts=counts,
        categories={c: float(np.mean(v)) for c, v in sorted(by_category.items())},
        macro=float(np.mean(list(per_subject.values()))),
        questions=len(idx),
        shots=shots,
        prompt_tokens=sum(len(x) for x in prompts),
    )
