"""``full``: full-parameter fine-tuning, no adapter; every parameter of the model trains and travels.

Saved as a complete model folder (``config.json`` + safetensors) that ``AutoModelForSequenceClassification`` /
``AutoModelForCausalLM.from_pretrained`` load alone.
"""

from __future__ import annotations

from typing import Any

from fedtune.models.kinds.base import AdapterKind
from fedtune.models.kinds.lora import ADAPTER_CONFIG

MODEL_CONFIG = "config.json"


class Full(AdapterKind):
    name = "full"
    trains = "every parameter"
    unquantizable = "trains every parameter"
    complete = True
    library, tag, config_file = "transformers", "full-fine-tuning", MODEL_CONFIG

    def build(self, model, task, rank=None):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def describe(self, ranks=None):
        return "full fine-tuning"

    def save(self, model, tokenizer, folder, base_name, classification):
        model.config.name_or_path = base_name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    @classmethod
    def saved_in(cls, folder):
        return (folder / MODEL_CONFIG).is_file() and not (folder / ADAPTER_CONFIG).is_file()

    @classmethod
    def saved_config(cls, folder):
        return {}

    @classmethod
    def load(cls, model, folder, task):
        return model  # the folder is the model

    @classmethod
    def card_title(cls, base):
        return f"{base}, fine-tuned in full"

    @classmethod
    def card_row(cls, saved: dict[str, Any], cfg) -> tuple[str, str]:
        return ("fine-tuning", "every parameter (`model.finetune: full`)")
