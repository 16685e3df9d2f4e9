"""``prompt``: prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
v trainable virtual tokens in front of every input, the base frozen (through peft; the forward pass and the
padding rules: :mod:`fedtune.models.prompt`). FedIT federates it unchanged: FedPrompt.

Saved as a peft adapter folder (``adapter_config.json`` with ``peft_type: PROMPT_TUNING``, the virtual tokens and
a classifier's head in ``adapter_model.safetensors``), which ``PeftModel.from_pretrained`` loads on the base:
peft saves prompt tuning's trainable tensor itself, so its format round-trips (P-tuning's does not:
:mod:`fedtune.models.kinds.ptuning`).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import Field

from fedtune.models.kinds.base import AdapterKind
from fedtune.models.kinds.lora import ADAPTER_CONFIG, save_peft_adapter
from fedtune.sections import Section


class PromptConfig(Section):
    """Prompt tuning (``model.finetune: prompt``): ``num_virtual_tokens`` trainable embeddings in front of every
    input; the base stays frozen."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    """Virtual tokens in front of every input (each a trainable vector of the model's hidden size)."""
    init: Literal["vocab", "random"] = "vocab"
    """How the virtual tokens start: ``vocab``, each as the embedding of a random vocabulary token (seeded);
    ``random``, drawn from N(0, 1) (peft's RANDOM). The FedAMoLE reference code starts them from the tokens of a
    task-specific text instead."""
    train_head: bool = True
    """Train (and federate) the task head of a classification model."""


class PromptLearning(AdapterKind):
    """What prompt tuning and P-tuning share: peft's virtual tokens on a frozen base."""

    trains = "virtual tokens (and the head)"
    unquantizable = "puts its virtual tokens on full-precision bases only (QLoRA is for model.finetune=lora)"
    no_per_row_gradients = ("its virtual tokens are one tensor that every row of a batch shares, and their per-row "
                            "gradients are not tested against a loop of single-row passes; use model.finetune: lora")
    peft_type: ClassVar[str]
    """peft's name of the method (``PROMPT_TUNING``, ``P_TUNING``)."""

    def build(self, model, task, rank=None):
        from fedtune.models.prompt import apply_prompt_learning

        return apply_prompt_learning(model, self.peft_config(task), self.options.train_head)

    @abstractmethod
    def peft_config(self, task: str):
        """peft's config of the method for ``task``."""

    @staticmethod
    def task_type(task: str):
        from peft import TaskType

        return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


class Prompt(PromptLearning):
    name = "prompt"
    Options = PromptConfig
    section_title, owner = "prompt tuning", "prompt tuning's"
    library, tag, config_file = "peft", "prompt-tuning", ADAPTER_CONFIG
    peft_type = "PROMPT_TUNING"

    def peft_config(self, task):
        from peft import PromptTuningConfig, PromptTuningInit

        init = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}[self.options.init]
        return PromptTuningConfig(task_type=self.task_type(task), num_virtual_tokens=self.options.num_virtual_tokens,
                                  prompt_tuning_init=init)

    def describe(self, ranks=None):
        return f"prompt tuning ({self.options.num_virtual_tokens} virtual tokens)"

    def save(self, model, tokenizer, folder, base_name, classification):
        save_peft_adapter(model, tokenizer, folder, base_name, classification)

    @classmethod
    def saved_in(cls, folder):
        path = folder / ADAPTER_CONFIG
        return path.is_file() and json.loads(path.read_text()).get("peft_type") == cls.peft_type

    @classmethod
    def load(cls, model, folder, task):
        from peft import PeftModel

        from fedtune.models.prompt import with_last_token_pooling

        return with_last_token_pooling(PeftModel.from_pretrained(model, folder))

    @classmethod
    def card_title(cls, base):
        return f"a prompt-tuning adapter for {base}"

    @classmethod
    def card_row(cls, saved: dict[str, Any], cfg) -> tuple[str, str]:
        return ("prompt tuning", f"{saved['num_virtual_tokens']} virtual tokens"
                + ("; classifier head trained" if cfg.model.task == "classification" and cfg.prompt.train_head else ""))
