"""What the clients train (``model.finetune``): an adapter kind builds it into the base model and saves it.

Every kind exposes its trainable state the same way, as the parameters that
require gradients (:func:`~fedtune.models.lora.trainable_state`), so every
FedAvg-family algorithm federates any kind; an algorithm that works on LoRA
factors names the kinds it accepts (:attr:`Algorithm.adapters
<fedtune.algorithms.Algorithm.adapters>`).

- ``lora``: peft LoRA on the target modules, and the head (:mod:`fedtune.models.lora`).
  Saved as a peft adapter folder on the base model's name.
- ``full``: every parameter of the model trains and travels (full-parameter FedAvg).
  Saved as a complete model folder (``config.json`` + safetensors) that
  ``AutoModelForSequenceClassification`` / ``AutoModelForCausalLM.from_pretrained`` load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from fedtune.config import LoraConfig
from fedtune.models.lora import apply_lora

CLASSIFIER_CONFIG = "classifier_config.json"
"""Beside a LoRA classifier's adapter: the base config as the classifier was trained with it (label names,
``pad_token_id``), for ``AutoConfig.from_pretrained``. Not ``config.json``: transformers would take the folder
for a complete model."""


class AdapterKind(ABC):
    """One way of fine-tuning: how it is built into the base model, described and saved."""

    name: ClassVar[str]

    @abstractmethod
    def build(self, model: torch.nn.Module, lora: LoraConfig, task: str, rank: int | None) -> torch.nn.Module:
        """``model`` ready to train: its trainable parameters are the ones that require grad. Initialised from the
        current torch RNG state; ``rank``: the LoRA rank of the model when clients train several."""

    @abstractmethod
    def describe(self, lora: LoraConfig, ranks: list[int] | None) -> str:
        """What trains, for the line that describes the loaded model (e.g. ``LoRA r=8``)."""

    @abstractmethod
    def save(self, model: torch.nn.Module, tokenizer, folder: Path, base_name: str, classification: bool) -> None:
        """Save ``model`` as it is now, with ``tokenizer``, so that transformers (and peft) load it alone;
        ``base_name`` is the base model as ``from_pretrained`` is given it."""


class Lora(AdapterKind):
    name = "lora"

    def build(self, model, lora, task, rank):
        return apply_lora(model, lora, task, rank=rank)

    def describe(self, lora, ranks):
        rank = f"r={lora.r}" if ranks is None else f"ranks {min(ranks)}-{max(ranks)} (counted at rank {max(ranks)})"
        return f"LoRA {rank}"

    def save(self, model, tokenizer, folder, base_name, classification):
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = base_name
        # peft's "auto" would ask the Hub for the base's config.json to decide whether to save the embeddings;
        # they travel only when LoRA targets them, which peft then detects from target_modules itself.
        targets = {t for cfg in model.peft_config.values() for t in (cfg.target_modules or ())}
        model.save_pretrained(folder, save_embedding_layers="auto" if targets & set(EMBEDDING_LAYER_NAMES) else False)
        tokenizer.save_pretrained(folder)
        if classification:
            model.get_base_model().config.to_json_file(folder / CLASSIFIER_CONFIG)


class Full(AdapterKind):
    """Full-parameter fine-tuning: no adapter, every parameter of the model is trained and federated."""

    name = "full"

    def build(self, model, lora, task, rank):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def describe(self, lora, ranks):
        return "full fine-tuning"

    def save(self, model, tokenizer, folder, base_name, classification):
        model.config.name_or_path = base_name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


ADAPTERS: dict[str, AdapterKind] = {kind.name: kind for kind in (Lora(), Full())}
