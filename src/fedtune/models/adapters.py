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
- ``mole``: mixtures of LoRA experts (:mod:`fedtune.models.mole`); a client holds the experts it is
  assigned, the shared expert, the router and the head. Saved as ``mole_config.json`` and
  ``mole_model.safetensors`` (the experts the model holds), which :func:`load_mole` puts back on the base.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from safetensors.torch import load_file, save_file

from fedtune.config import LoraConfig, MoleConfig, RunConfig
from fedtune.errors import FedtuneError
from fedtune.models.lora import apply_lora, load_trainable
from fedtune.models.mole import apply_mole, held_state, mole_layers, set_local_experts

CLASSIFIER_CONFIG = "classifier_config.json"
"""Beside a LoRA classifier's adapter: the base config as the classifier was trained with it (label names,
``pad_token_id``), for ``AutoConfig.from_pretrained``. Not ``config.json``: transformers would take the folder
for a complete model."""


class AdapterKind(ABC):
    """One way of fine-tuning: how it is built into the base model, described and saved."""

    name: ClassVar[str]
    shares_prompt_prefix: ClassVar[bool] = True
    """Training may run the prompt prefix a causal LM batch shares once for all its rows
    (:func:`~fedtune.training.causal_lm_forward`); False where a loss needs each row's own forward pass."""

    @abstractmethod
    def build(self, model: torch.nn.Module, task: str, rank: int | None = None) -> torch.nn.Module:
        """``model`` ready to train: its trainable parameters are the ones that require grad. Initialised from the
        current torch RNG state; ``rank``: the LoRA rank of the model when clients train several."""

    @abstractmethod
    def describe(self, ranks: list[int] | None = None) -> str:
        """What trains, for the line that describes the loaded model (e.g. ``LoRA r=8``)."""

    @abstractmethod
    def save(self, model: torch.nn.Module, tokenizer, folder: Path, base_name: str, classification: bool) -> None:
        """Save ``model`` as it is now, with ``tokenizer``, so that transformers (and peft) load it alone;
        ``base_name`` is the base model as ``from_pretrained`` is given it."""


class Lora(AdapterKind):
    name = "lora"

    def __init__(self, cfg: LoraConfig | None = None):
        self.cfg = cfg or LoraConfig()

    def build(self, model, task, rank=None):
        return apply_lora(model, self.cfg, task, rank=rank)

    def describe(self, ranks=None):
        rank = f"r={self.cfg.r}" if ranks is None else f"ranks {min(ranks)}-{max(ranks)} (counted at rank {max(ranks)})"
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


MOLE_CONFIG = "mole_config.json"
MOLE_WEIGHTS = "mole_model.safetensors"


class Mole(AdapterKind):
    """Mixtures of LoRA experts on the target modules (FedAMoLE's AMoLE)."""

    name = "mole"
    shares_prompt_prefix = False  # the load-balancing loss counts every position of the batch

    def __init__(self, cfg: MoleConfig | None = None):
        self.cfg = cfg or MoleConfig()

    def build(self, model, task, rank=None):
        return apply_mole(model, self.cfg, task)

    def describe(self, ranks=None):
        c = self.cfg
        return f"{c.num_experts} LoRA experts (r={c.r}, top-{c.top_k}) and a shared one per module"

    def save(self, model, tokenizer, folder, base_name, classification):
        """The experts the model holds now (``local`` of each mixture), the shared ones, routers and head."""
        folder.mkdir(parents=True, exist_ok=True)
        layers = mole_layers(model)
        held = {n: list(m.local) for n, m in layers.items()}
        save_file({n: t.contiguous() for n, t in held_state(model).items()}, str(folder / MOLE_WEIGHTS))
        first = next(iter(layers.values()))
        (folder / MOLE_CONFIG).write_text(json.dumps({
            "base_model_name_or_path": base_name, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
            "num_experts": len(first.experts), "r": first.r, "alpha": first.scale * first.r, "top_k": first.top_k,
            "experts": held}, indent=2) + "\n")
        tokenizer.save_pretrained(folder)
        if classification:
            model.config.to_json_file(folder / CLASSIFIER_CONFIG)


def load_mole(model: torch.nn.Module, folder: Path, task: str = "classification") -> torch.nn.Module:
    """``model`` (the base) with the mixtures saved in ``folder`` (:meth:`Mole.save`), routing as they did."""
    info = json.loads((folder / MOLE_CONFIG).read_text())
    cfg = MoleConfig(num_experts=info["num_experts"], r=info["r"], alpha=info["alpha"], top_k=info["top_k"],
                     dropout=0.0, target_modules=info["target_modules"])
    model = apply_mole(model, cfg, task)
    try:
        load_trainable(model, load_file(str(folder / MOLE_WEIGHTS)))
    except (KeyError, RuntimeError) as e:
        raise FedtuneError(f"mixtures in {folder} do not fit this model: {' '.join(str(e).split())[:300]}") from None
    set_local_experts(model, info["experts"])
    return model


def adapter_for(cfg: RunConfig) -> AdapterKind:
    """The run's kind of fine-tuning (``model.finetune``), with its section of the config."""
    return {"lora": lambda: Lora(cfg.lora), "full": Full, "mole": lambda: Mole(cfg.mole)}[cfg.model.finetune]()


def kind_of(model: torch.nn.Module) -> AdapterKind:
    """The kind a built model carries (peft LoRA, mixtures, or none: full), to save it as that kind."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return Lora()
    return Mole() if mole_layers(model) else Full()
