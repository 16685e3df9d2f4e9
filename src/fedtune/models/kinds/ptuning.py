"""``ptuning``: P-tuning (Liu et al., 2021, "GPT Understands, Too"): v virtual tokens made by a prompt encoder,
P = f(E), E ∈ R^{v×d} trainable, f an MLP (or a bidirectional LSTM and an MLP), in front of every input, the
base frozen (through peft; the forward pass and the padding rules: :mod:`fedtune.models.prompt`). FedIT
federates E, f and the head unchanged: FedPTuning.

Saved as ``ptuning_config.json`` (peft's config of the encoder, and the base's name) and
``ptuning_model.safetensors``: E, f's parameters and a classifier's head as they are, which :meth:`PTuning.load`
puts back on the base. Not peft's format: its ``save_pretrained`` keeps the encoder's output f(E), which its
loader puts back into E, so f would be applied twice and the logits change.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.errors import FedtuneError
from fedtune.models.kinds.base import CLASSIFIER_CONFIG
from fedtune.models.kinds.prompt import PromptLearning
from fedtune.sections import Section

PTUNING_CONFIG = "ptuning_config.json"
PTUNING_WEIGHTS = "ptuning_model.safetensors"


class PTuningConfig(Section):
    """P-tuning (``model.finetune: ptuning``): ``num_virtual_tokens`` embeddings through a prompt encoder in front
    of every input; the base stays frozen."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    """Virtual tokens in front of every input (the FedAMoLE reference code's: 20)."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The prompt encoder f: ``mlp`` (d → h → h → d with ReLUs), or ``lstm`` (a bidirectional LSTM of
    ``encoder_num_layers`` layers, then an MLP 2h → 2h → d)."""
    encoder_hidden_size: int = Field(default=1024, ge=1)
    """h, the encoder's hidden size (the FedAMoLE reference code's: 1024)."""
    encoder_num_layers: int = Field(default=2, ge=1)
    """``encoder: lstm``: its layers (the MLP has three linear layers whatever this says)."""
    encoder_dropout: float = Field(default=0.0, ge=0, lt=1)
    """``encoder: lstm``: dropout between its layers."""
    train_head: bool = True
    """Train (and federate) the task head of a classification model."""

    @model_validator(mode="after")
    def _lstm_options(self) -> "PTuningConfig":
        for key in ("encoder_num_layers", "encoder_dropout"):
            if self.encoder != "lstm" and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"ptuning.{key} applies to ptuning.encoder: lstm, not {self.encoder}; remove it")
        return self


class PTuning(PromptLearning):
    name = "ptuning"
    Options = PTuningConfig
    section_title, owner = "P-tuning", "P-tuning's"
    library, tag, config_file = "fedtune", "p-tuning", PTUNING_CONFIG
    peft_type = "P_TUNING"

    def peft_config(self, task):
        from peft import PromptEncoderConfig

        o = self.options
        return PromptEncoderConfig(task_type=self.task_type(task), num_virtual_tokens=o.num_virtual_tokens,
                                   encoder_reparameterization_type=o.encoder.upper(),
                                   encoder_hidden_size=o.encoder_hidden_size, encoder_num_layers=o.encoder_num_layers,
                                   encoder_dropout=o.encoder_dropout)

    def describe(self, ranks=None):
        o = self.options
        return (f"P-tuning ({o.num_virtual_tokens} virtual tokens, {o.encoder.upper()} encoder of width "
                f"{o.encoder_hidden_size})")

    def save(self, model, tokenizer, folder, base_name, classification):
        """The encoder's own parameters (E and f) and the head, as they are; peft's config of the encoder."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(saved_tensors(model), str(folder / PTUNING_WEIGHTS))
        config = model.active_peft_config.to_dict()
        config["base_model_name_or_path"] = base_name
        (folder / PTUNING_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
        tokenizer.save_pretrained(folder)
        if classification:
            model.get_base_model().config.to_json_file(folder / CLASSIFIER_CONFIG)

    @classmethod
    def load(cls, model, folder, task):
        from peft import PromptEncoderConfig
        from safetensors.torch import load_file

        from fedtune.models.lora import load_trainable
        from fedtune.models.prompt import apply_prompt_learning

        info = cls.saved_config(folder)
        known = {f.name for f in dataclasses.fields(PromptEncoderConfig)}
        config = PromptEncoderConfig(**{k: v for k, v in info.items() if k in known and k != "inference_mode"})
        model = apply_prompt_learning(model, config)
        tensors = load_file(str(folder / PTUNING_WEIGHTS))
        params = dict(model.named_parameters())
        if set(tensors) - set(params) or any(params[n].shape != t.shape for n, t in tensors.items() if n in params):
            raise FedtuneError(f"the P-tuning encoder in {folder} does not fit this model; load it on the base it "
                               f"was trained on ({info.get('base_model_name_or_path')})")
        load_trainable(model, tensors)
        return model

    @classmethod
    def card_title(cls, base):
        return f"a P-tuning prompt encoder for {base}"

    @classmethod
    def card_row(cls, saved: dict[str, Any], cfg) -> tuple[str, str]:
        encoder = str(saved["encoder_reparameterization_type"]).rsplit(".", 1)[-1].upper()
        head = cfg.model.task == "classification" and cfg.ptuning.train_head
        return ("P-tuning", f"{saved['num_virtual_tokens']} virtual tokens through an {encoder} encoder of width "
                f"{saved['encoder_hidden_size']}" + ("; classifier head trained" if head else ""))


def saved_tensors(model) -> dict[str, Any]:
    """The prompt encoder's parameters (E and f) and a classifier head's, by parameter name, as CPU tensors."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()
            if n.startswith("prompt_encoder.") or ".modules_to_save." in n}
