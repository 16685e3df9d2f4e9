"""The registry of adapter kinds (``model.finetune``): one module per kind, one line here.

Each kind (:class:`~fedtune.models.kinds.base.AdapterKind`) owns its config section, how it is built, the forward
pass its task trains with, how it is saved, recognised and loaded back, its model card's words and its
capabilities. The config, the run, the saved-model loader, the card and the algorithms' requirements all read
this registry; none of them names a kind.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.models.kinds.base import CLASSIFIER_CONFIG, AdapterKind
from fedtune.models.kinds.full import Full
from fedtune.models.kinds.lora import Lora
from fedtune.models.kinds.mole import Mole
from fedtune.models.kinds.prompt import Prompt
from fedtune.models.kinds.ptuning import PTuning

KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (Lora, Full, Mole, Prompt, PTuning)}


def kind_named(name: str) -> type[AdapterKind]:
    """The kind called ``name``; a one-line error naming the kinds otherwise."""
    if name not in KINDS:
        close = difflib.get_close_matches(name, KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FedtuneError(f"unknown kind of fine-tuning '{name}'{hint} (choose one of: {', '.join(KINDS)})")
    return KINDS[name]


def kind_for(cfg: Any) -> AdapterKind:
    """The run's kind of fine-tuning (``model.finetune``), with its section of the config."""
    return kind_named(cfg.model.finetune).from_config(cfg)


def kinds_with(capability: str) -> tuple[str, ...]:
    """The names of the kinds that have ``capability`` (e.g. ``factorised``), in registry order."""
    return tuple(name for name, kind in KINDS.items() if getattr(kind, capability))


def saved_kind(folder: Path) -> type[AdapterKind] | None:
    """The kind that saved the model in ``folder``; None: no kind did (not a saved model)."""
    return next((kind for kind in KINDS.values() if kind.saved_in(folder)), None)


__all__ = ["CLASSIFIER_CONFIG", "KINDS", "AdapterKind", "kind_for", "kind_named", "kinds_with", "saved_kind"]
