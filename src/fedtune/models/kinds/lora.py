"""``lora``: peft LoRA on the target modules, and the head (the layer math: :mod:`fedtune.models.lora`).

Saved as a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) on the base model's name;
a classifier's head travels in it (peft's ``modules_to_save``), its config beside it
(:data:`~fedtune.models.kinds.base.CLASSIFIER_CONFIG`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from fedtune.errors import FedtuneError
from fedtune.models.kinds.base import CLASSIFIER_CONFIG, AdapterKind
from fedtune.sections import Section

ADAPTER_CONFIG = "adapter_config.json"
"""A peft adapter folder's description of itself."""


class RankTier(Section):
    """One tier of ``lora.rank_tiers``: the next ``clients`` clients train rank ``rank``."""

    clients: int = Field(ge=1)
    """Number of consecutive clients in this tier."""
    rank: int = Field(ge=1)
    """The LoRA rank they train."""


class LoraConfig(Section):
    """LoRA adapters (peft): W + (alpha / r) · B A on each target module."""

    r: int = Field(default=8, ge=1)
    """Adapter rank; with ``client_ranks`` / ``rank_tiers`` it sets only the scale alpha / r."""
    alpha: float = Field(default=16.0, gt=0)
    """LoRA alpha: the update is scaled by alpha / r."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """Module names to adapt; default: the attention projections of the architecture."""
    train_head: bool = True
    """Train (and federate) the task head, e.g. the classifier of a classification model."""
    client_ranks: list[int] | None = None
    """Heterogeneous ranks: client i trains rank ``client_ranks[i]`` (one entry per client). Every client keeps
    the scale alpha / r, so ranks change capacity, not step size."""
    rank_tiers: list[RankTier] | None = None
    """Heterogeneous ranks by client index, e.g. ``[{clients: 10, rank: 64}, {clients: 90, rank: 4}]``:
    the first 10 clients train rank 64, the rest rank 4. Set this or ``client_ranks``."""

    @model_validator(mode="after")
    def _ranks_or_tiers(self) -> "LoraConfig":
        if self.client_ranks is not None and self.rank_tiers is not None:
            raise ValueError("set only one of lora.client_ranks and lora.rank_tiers")
        if self.client_ranks is not None and (not self.client_ranks or min(self.client_ranks) < 1):
            raise ValueError("lora.client_ranks must be a non-empty list of positive ranks")
        return self

    def ranks(self, num_clients: int | None) -> list[int] | None:
        """Each client's rank, or None when every client trains rank ``r`` (``num_clients`` None: not checked)."""
        if self.rank_tiers is not None:
            ranks = [t.rank for t in self.rank_tiers for _ in range(t.clients)]
        elif self.client_ranks is not None:
            ranks = list(self.client_ranks)
        else:
            return None
        if num_clients is not None and len(ranks) != num_clients:
            what = "lora.rank_tiers cover" if self.rank_tiers is not None else "lora.client_ranks has"
            raise FedtuneError(f"{what} {len(ranks)} clients but partition.num_clients is {num_clients}; "
                               "give one rank per client")
        return ranks


class Lora(AdapterKind):
    name = "lora"
    Options = LoraConfig
    section_title = "the LoRA adapters"
    owner = "LoRA's"
    checked_by_run = frozenset({"client_ranks", "rank_tiers"})
    trains = "LoRA factors (and the head)"
    factorised = True
    library, tag, config_file = "peft", "lora", ADAPTER_CONFIG

    def build(self, model, task, rank=None):
        from fedtune.models.lora import apply_lora

        return apply_lora(model, self.options, task, rank=rank)

    def describe(self, ranks=None):
        rank = f"r={self.options.r}" if ranks is None else f"ranks {min(ranks)}-{max(ranks)} (counted at rank {max(ranks)})"
        return f"LoRA {rank}"

    def save(self, model, tokenizer, folder, base_name, classification):
        save_peft_adapter(model, tokenizer, folder, base_name, classification)

    @classmethod
    def saved_in(cls, folder):
        path = folder / ADAPTER_CONFIG
        return path.is_file() and json.loads(path.read_text()).get("peft_type", "LORA") == "LORA"

    @classmethod
    def load(cls, model, folder, task):
        from fedtune.models.lora import load_adapter

        return load_adapter(model, folder)

    @classmethod
    def card_title(cls, base):
        return f"a LoRA adapter for {base}"

    @classmethod
    def card_row(cls, saved: dict[str, Any], cfg) -> tuple[str, str]:
        ranks = cfg.lora.ranks(cfg.partition.num_clients)
        return ("LoRA", f"r = {saved['r']}, α = {saved['lora_alpha']:g} on {', '.join(sorted(saved['target_modules']))}"
                + (f" (clients train ranks {min(ranks)}–{max(ranks)})" if ranks else "")
                + ("; classifier head trained" if cfg.model.task == "classification" and cfg.lora.train_head else ""))


def save_peft_adapter(model, tokenizer, folder, base_name: str, classification: bool) -> None:
    """A peft model as peft saves it, naming ``base_name`` as its base, with the tokenizer and (a classifier) the
    base config it was trained with (:data:`~fedtune.models.kinds.base.CLASSIFIER_CONFIG`)."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_name
    # peft's "auto" would ask the Hub for the base's config.json to decide whether to save the embeddings;
    # they travel only when LoRA targets them, which peft then detects from target_modules itself.
    targets = {t for cfg in model.peft_config.values() for t in (getattr(cfg, "target_modules", None) or ())}
    model.save_pretrained(folder, save_embedding_layers="auto" if targets & set(EMBEDDING_LAYER_NAMES) else False)
    tokenizer.save_pretrained(folder)
    if classification:
        model.get_base_model().config.to_json_file(folder / CLASSIFIER_CONFIG)
