"""Prompt templates: how an instruction (and its optional input) becomes the text a causal LM continues.

A template renders the *prompt*; the response follows it directly, prefixed
by :meth:`Template.response_prefix` and closed by the tokenizer's EOS token,
so training, choice scoring and generation all see the same boundary.

- ``alpaca``: the Stanford Alpaca prompt (two variants: with and without input).
- ``vicuna``: the Vicuna v1.1 conversation (``USER: … ASSISTANT:``), response after a space.
- ``chat``: the tokenizer's own chat template (one user turn, generation prompt
  added), with an optional system message replacing the template's default.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.errors import FedtuneError

_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {message} ASSISTANT:"
)

TEMPLATES = ("alpaca", "vicuna", "chat")


@dataclass(frozen=True)
class Template:
    """A named prompt format bound to a tokenizer (the ``chat`` template lives in the tokenizer)."""

    name: str
    tokenizer: object = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.name not in TEMPLATES:
            raise FedtuneError(f"unknown prompt template '{self.name}'; choose one of: {', '.join(TEMPLATES)}")
        if self.name == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise FedtuneError("sft.template=chat needs a tokenizer with a chat template; this model has none "
                               "(use sft.template=alpaca or vicuna)")

    @property
    def response_prefix(self) -> str:
        return " " if self.name == "vicuna" else ""

    @property
    def prompt_has_special_tokens(self) -> bool:
        """The rendered prompt already holds the special tokens (chat templates write their own)."""
        return self.name == "chat"

    def prompt(self, instruction: str, input: str = "") -> str:
        """The text before the response."""
        if self.name == "alpaca":
            return _ALPACA_INPUT.format(instruction=instruction, input=input) if input else _ALPACA.format(
                instruction=instruction)
        message = f"{instruction}\n\n{input}" if input else instruction
        if self.name == "vicuna":
            return _VICUNA.format(message=message)
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return self.tokenizer.apply_chat_template(
            system + [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
