"""``mole``: mixtures of LoRA experts on the target modules (FedAMoLE's AMoLE; the layer: :mod:`fedtune.models.mole`).

A client holds the experts it is assigned, the shared expert, the router and the head. Saved as
``mole_config.json`` and ``mole_model.safetensors`` (the experts the model holds), which :meth:`Mole.load` puts
back on the base; mixtures have no transformers or peft format.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from fedtune.errors import FedtuneError
from fedtune.models.kinds.base import CLASSIFIER_CONFIG, AdapterKind
from fedtune.sections import Section

MOLE_CONFIG = "mole_config.json"
MOLE_WEIGHTS = "mole_model.safetensors"


class MoleConfig(Section):
    """Mixtures of LoRA experts (``model.finetune: mole``): FedAMoLE's AMoLE on each target module, y = W₀x +
    s·B_s A_s x + Σ_{e ∈ top-k} p̃_e s·B_e A_e x over the experts a client holds, routed per token."""

    num_experts: int = Field(default=30, ge=1)
    """Domain experts per target module (the server assigns each client a subset)."""
    r: int = Field(default=8, ge=1)
    """Rank of every expert (and of the router's token projection)."""
    alpha: float = Field(default=16.0, gt=0)
    """Every expert's update is scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the experts' input (not on the router's)."""
    top_k: int = Field(default=2, ge=1)
    """Experts mixed per token, among the client's own; their router probabilities are renormalised."""
    balance_weight: float = Field(default=0.001, ge=0)
    """Weight of the load-balancing loss N · Σ_e f_e P_e, summed over the target modules."""
    target_modules: list[str] | None = None
    """Linear modules to put mixtures on; default: the attention projections of the architecture (as LoRA's)."""
    train_head: bool = True
    """Train (and federate) the task head of a classification model."""


class Mole(AdapterKind):
    """Mixtures of LoRA experts: clients hold subsets of the experts, so only ``fedamole`` federates them."""

    name = "mole"
    Options = MoleConfig
    section_title = "the mixtures of LoRA experts"
    owner = "the mixtures'"
    trains = "mixtures of LoRA experts"
    averaged = False
    shares_prompt_prefix = False  # the load-balancing loss counts every position of the batch
    unquantizable = "builds its mixtures on full-precision linear layers"
    library, tag, config_file = "fedtune", "mixture-of-experts", MOLE_CONFIG

    def build(self, model, task, rank=None):
        from fedtune.models.mole import apply_mole

        return apply_mole(model, self.options, task)

    def describe(self, ranks=None):
        c = self.options
        return f"{c.num_experts} LoRA experts (r={c.r}, top-{c.top_k}) and a shared one per module"

    def save(self, model, tokenizer, folder, base_name, classification):
        """The experts the model holds now (``local`` of each mixture), the shared ones, routers and head."""
        from safetensors.torch import save_file

        from fedtune.models.mole import held_state, mole_layers

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

    @classmethod
    def load(cls, model, folder, task):
        """``model`` (the base) with the mixtures saved in ``folder`` (:meth:`save`), routing as they did."""
        from safetensors.torch import load_file

        from fedtune.models.lora import load_trainable
        from fedtune.models.mole import apply_mole, set_local_experts

        info = cls.saved_config(folder)
        cfg = MoleConfig(num_experts=info["num_experts"], r=info["r"], alpha=info["alpha"], top_k=info["top_k"],
                         dropout=0.0, target_modules=info["target_modules"])
        model = apply_mole(model, cfg, task)
        try:
            load_trainable(model, load_file(str(folder / MOLE_WEIGHTS)))
        except (KeyError, RuntimeError) as e:
            raise FedtuneError(f"mixtures in {folder} do not fit this model: {' '.join(str(e).split())[:300]}") from None
        set_local_experts(model, info["experts"])
        return model

    @classmethod
    def card_title(cls, base):
        return f"mixtures of LoRA experts for {base}"

    @classmethod
    def card_row(cls, saved: dict[str, Any], cfg) -> tuple[str, str]:
        held = [len(e) for e in saved["experts"].values()]
        return ("mixtures", f"{saved['num_experts']} LoRA experts (r = {saved['r']}, α = {saved['alpha']:g}, "
                f"top-{saved['top_k']}) and a shared one on {', '.join(saved['target_modules'])}; this model holds "
                f"{sum(held) / len(held):.1f} experts per module")
