"""Which columns of a user's file hold the text and the label, when the config names none.

Columns are found by their exact names: the text is the first present of the
pairs ``sentence1``/``sentence2`` and ``premise``/``hypothesis``, else of the
single columns ``text`` and ``sentence``; the label is ``label``. Instruction
data is recognised by ``instruction`` and ``output`` (``input`` is optional).
"""

from __future__ import annotations

from collections.abc import Sequence

TEXT_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"))
TEXT = ("text", "sentence")
LABEL = "label"
INSTRUCTION = ("instruction", "input", "output")


def detect_text(columns: Sequence[str]) -> tuple[str, ...] | None:
    """The text column(s) found by name: a pair, or one column; None when no known name is present."""
    for pair in TEXT_PAIRS:
        if set(pair) <= set(columns):
            return pair
    return next(((c,) for c in TEXT if c in columns), None)


def detect_label(columns: Sequence[str]) -> str | None:
    return LABEL if LABEL in columns else None


def detect_instruction(columns: Sequence[str]) -> tuple[str, ...] | None:
    """``(instruction, input)`` or ``(instruction,)`` when the columns are instruction data; else None."""
    instruction, input_, output = INSTRUCTION
    if not {instruction, output} <= set(columns):
        return None
    return (instruction, input_) if input_ in columns else (instruction,)
