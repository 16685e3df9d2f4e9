"""What an adapter kind is: everything fedtune does with one way of fine-tuning, in one class.

A kind owns its config section (:attr:`AdapterKind.Options`, the run config's ``<name>:``), how it is built into
the base model (:meth:`~AdapterKind.build`), the training forward pass of each task (:meth:`~AdapterKind.forward`),
how a model of its kind is saved (:meth:`~AdapterKind.save`), recognised on disk (:meth:`~AdapterKind.saved_in`)
and loaded back (:meth:`~AdapterKind.load`), what the model card says of it, and its capabilities (factorised,
averaged, ...), which the algorithms and the run's checks read instead of its name.

Every kind exposes its trainable state the same way, as the parameters that require gradients
(:func:`~fedtune.models.lora.trainable_state`), so the federation moves any kind's tensors unchanged.
Module-level imports stay light (pydantic only): the config imports every kind to validate ``model.finetune``;
torch, transformers and peft are imported by the methods that use them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedtune.sections import Section

if TYPE_CHECKING:
    import torch

    from fedtune.training import Forward

CLASSIFIER_CONFIG = "classifier_config.json"
"""Beside a classifier saved on its base: the base config as the classifier was trained with it (label names,
``pad_token_id``), for ``AutoConfig.from_pretrained``. Not ``config.json``: transformers would take the folder
for a complete model."""


class AdapterKind(ABC):
    """One way of fine-tuning (``model.finetune: <name>``), with its section of the config as ``options``."""

    name: ClassVar[str]
    Options: ClassVar[type[Section] | None] = None
    """Its config section, ``<name>:`` in a run's config; None: the kind has no options."""
    section_title: ClassVar[str] = ""
    """What its section configures, for errors (e.g. ``the LoRA adapters``)."""
    owner: ClassVar[str] = ""
    """Whose settings its section holds, for errors (e.g. ``LoRA's``)."""
    checked_by_run: ClassVar[frozenset[str]] = frozenset()
    """Settings of its section that a run of another kind checks itself, with its own error (LoRA's client ranks)."""
    trains: ClassVar[str] = ""
    """What trains, in words, for errors (e.g. ``every parameter``)."""
    factorised: ClassVar[bool] = False
    """Its trainable state holds LoRA factors A, B per module: heterogeneous ranks and the algorithms that combine
    factors (stacking, SVD, freezing A) apply."""
    averaged: ClassVar[bool] = True
    """Every client holds every trainable tensor, so a FedAvg-family algorithm federates it (mixtures of experts,
    whose clients hold subsets of the experts, need their own algorithm)."""
    shares_prompt_prefix: ClassVar[bool] = True
    """Causal LM training may run the prompt prefix a batch shares once for all its rows
    (:func:`~fedtune.training.causal_lm_forward`); False where a loss needs each row's own forward pass."""
    no_per_row_gradients: ClassVar[str | None] = None
    """Why record-level DP-SGD (per-row gradients, :mod:`fedtune.dp_sgd`) cannot train this kind, as the end of
    an error; None: it can (its per-row gradients are tested against one backward pass per row)."""
    unquantizable: ClassVar[str | None] = None
    """Why a quantised base (``model.quantization``) cannot serve this kind, as the end of an error; None: it can."""
    complete: ClassVar[bool] = False
    """A saved folder holds a complete model (no base model is loaded first)."""
    library: ClassVar[str] = "peft"
    """What loads a saved folder alone: ``peft`` (on its base), ``transformers`` or ``fedtune``."""
    tag: ClassVar[str] = ""
    """The model card's tag for the kind."""
    config_file: ClassVar[str] = ""
    """The file a saved folder of this kind describes itself in."""

    def __init__(self, options: Section | None = None):
        self.options = options if options is not None or self.Options is None else self.Options()

    @classmethod
    def from_config(cls, cfg: Any) -> AdapterKind:
        """The kind with its section of the run config ``cfg``."""
        return cls(getattr(cfg, cls.name) if cls.Options is not None else None)

    # ------------------------------------------------------------------ building and training
    @abstractmethod
    def build(self, model: torch.nn.Module, task: str, rank: int | None = None) -> torch.nn.Module:
        """``model`` ready to train: its trainable parameters are the ones that require grad. Initialised from the
        current torch RNG state; ``rank``: the LoRA rank of the model when clients train several."""

    def forward(self, task: str) -> Forward:
        """The training forward pass of ``task`` on a model of this kind (outputs carry ``.loss``)."""
        from functools import partial

        from fedtune.training import causal_lm_forward, model_forward

        if task != "sft":
            return model_forward
        return causal_lm_forward if self.shares_prompt_prefix else partial(causal_lm_forward, share_prefix=False)

    @abstractmethod
    def describe(self, ranks: list[int] | None = None) -> str:
        """What trains, for the line that describes the loaded model (e.g. ``LoRA r=8``)."""

    # ------------------------------------------------------------------ saving and loading
    @abstractmethod
    def save(self, model: torch.nn.Module, tokenizer, folder: Path, base_name: str, classification: bool) -> None:
        """Save ``model`` as it is now, with ``tokenizer``, in ``folder``; ``base_name`` is the base model as
        ``from_pretrained`` is given it."""

    @classmethod
    def saved_in(cls, folder: Path) -> bool:
        """``folder`` holds a model this kind saved."""
        return (folder / cls.config_file).is_file()

    @classmethod
    def saved_config(cls, folder: Path) -> dict[str, Any]:
        """What a saved folder says of itself (its :attr:`config_file`; empty for a complete model)."""
        return json.loads((folder / cls.config_file).read_text())

    @classmethod
    def base_named(cls, folder: Path) -> str | None:
        """The base model a saved folder names (None: it names none, or is a complete model)."""
        return cls.saved_config(folder).get("base_model_name_or_path")

    @classmethod
    @abstractmethod
    def load(cls, model: torch.nn.Module, folder: Path, task: str) -> torch.nn.Module:
        """``model`` (the base, or the complete model of a :attr:`complete` kind) with what ``folder`` holds."""

    # ------------------------------------------------------------------ the model card
    @classmethod
    @abstractmethod
    def card_title(cls, base: str) -> str:
        """What the saved model is, for the card's title (e.g. ``a LoRA adapter for <base>``)."""

    @classmethod
    @abstractmethod
    def card_row(cls, saved: dict[str, Any], cfg: Any) -> tuple[str, str]:
        """The card's row on what trained, from :meth:`saved_config` and the run config."""
