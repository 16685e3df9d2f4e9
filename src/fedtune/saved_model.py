"""A run's saved model: adapter folders that load without fedtune, and fedtune loading them back to predict.

An adapter folder (``adapter/``; ``adapters/<name>/`` for each of several models, e.g.
one per cluster; per client ``adapters/client_<i>/`` for personalised algorithms) holds:

- ``adapter_config.json`` and ``adapter_model.safetensors`` (peft), naming the base as
  :func:`~fedtune.models.base.public_model_name` gives it (a packaged model's Hub id);
  a classifier's head is in the adapter (peft's ``modules_to_save``);
- the tokenizer the run trained with;
- classification: ``classifier_config.json``, the base model's config as the classifier
  was trained with it (the run's label names as ``id2label``/``label2id``, its
  ``pad_token_id``): ``AutoConfig.from_pretrained`` reads it, to pass as ``config=``
  when loading the base. It is not named ``config.json``: transformers takes a folder
  holding one for a complete model and would not load the base;
- ``merged.safetensors`` where the algorithm merges updates into base weights;
- ``README.md``, the model card (:mod:`fedtune.model_card`).

That is ``lora``'s format; each adapter kind (:mod:`fedtune.models.kinds`) saves its own and recognises it: with
``model.finetune: full`` the same folders hold a complete model instead (``config.json``, ``model.safetensors``,
the tokenizer and the card), loadable by ``AutoModelForSequenceClassification`` /
``AutoModelForCausalLM.from_pretrained``; with ``mole`` they hold ``mole_config.json`` and
``mole_model.safetensors`` (the experts that model holds), which fedtune loads back on the base.

fedtune loads a run's model offline: a packaged base comes from its package (the
run's ``model.name``), not from the Hub id the adapter names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.config import RunConfig, load_config
from fedtune.data.templates import Template
from fedtune.errors import FedtuneError
from fedtune.models.kinds import AdapterKind, saved_kind
from fedtune.runlog import CONFIG, load_models, load_run, model_assignment

PARTITION = "partition.json"


def save_model_folder(model, tokenizer, folder: Path, base_name: str, classification: bool,
                      kind: AdapterKind) -> None:
    """Save ``model`` with its tokenizer as its adapter ``kind`` saves (a peft adapter, mixtures, a complete model)."""
    kind.save(model, tokenizer, folder, base_name, classification)


def _saved(folder: Path) -> bool:
    return saved_kind(folder) is not None


def adapter_folders(run_dir: Path) -> dict[str, Path]:
    """Every adapter folder a run saved, by name: ``""`` for ``adapter/`` (the global model), else its folder
    name under ``adapters/``: ``client_<i>`` (personalised), or one of several models (``models.json``)."""
    found = {"": run_dir / "adapter"} if _saved(run_dir / "adapter") else {}
    if (run_dir / "adapters").is_dir():
        found.update({p.name: p for p in sorted((run_dir / "adapters").iterdir()) if _saved(p)})
    return found


def personal_clients(folders: dict[str, Path]) -> list[int]:
    """The clients with a model of their own (``adapters/client_<i>/``, no global model), in order."""
    if "" in folders:
        return []
    return sorted(int(n[len("client_"):]) for n in folders if n.startswith("client_") and n[len("client_"):].isdigit())


GLOBAL_MODEL = "global"
"""``fedtune predict --model global``: the run's ``adapter/``."""


def adapter_folder(run_dir: Path, client: int | None, model: str | None = None) -> Path:
    """The folder of the model ``client`` uses, or of the model named ``model`` (``global``: ``adapter/``), or
    of the only model; a one-line error naming the choices where that is not one folder (a run of several
    models, e.g. one per cluster, asked for neither)."""
    folders = adapter_folders(run_dir)
    if not folders:
        raise FedtuneError(f"run {run_dir} has no saved adapter (adapter/ or adapters/<name>/); "
                           "a run saves it after its last round: finish it with 'fedtune run ... --resume'")
    if model is not None:
        if client is not None:
            raise FedtuneError("give --client (the model that client uses) or --model (a model by name), not both")
        names = {(n or GLOBAL_MODEL): folder for n, folder in folders.items()}
        if model not in names:
            raise FedtuneError(f"run {run_dir} has no model '{model}'; its models are {', '.join(names)}")
        return names[model]
    personal = personal_clients(folders)
    if personal:
        if client is None:
            raise FedtuneError(f"run {run_dir} saved one adapter per client ({_span(personal)}); "
                               "choose one with --client")
        if client not in personal:
            raise FedtuneError(f"run {run_dir} has no adapter for client {client}; its clients are {_span(personal)}")
        return folders[f"client_{client}"]
    assignment = model_assignment(run_dir)
    if client is None:
        if assignment:
            raise FedtuneError(f"run {run_dir} ended with several models: {_models_text(run_dir, folders)}; choose "
                               "the one a client uses with --client N, or one by name with --model NAME")
        return folders[""]
    if not assignment:
        raise FedtuneError(f"run {run_dir} saved one model for all clients; leave out --client")
    partition = json.loads((run_dir / PARTITION).read_text()) if (run_dir / PARTITION).is_file() else {}
    clients = list(range(partition.get("num_clients", max(assignment) + 1)))
    if client not in clients:
        raise FedtuneError(f"run {run_dir} has no client {client}; its clients are {_span(clients)}")
    return folders[assignment.get(client, "")]


def _models_text(run_dir: Path, folders: dict[str, Path]) -> str:
    """``cluster_0 (clients 0..3), cluster_1 (clients 4..7), global (adapter/, used by no client)``."""
    used = load_models(run_dir)
    parts = [f"{name} (clients {_span(clients)})" for name, clients in used.items()]
    if "" in folders:
        partition = json.loads((run_dir / PARTITION).read_text()) if (run_dir / PARTITION).is_file() else {}
        rest = sorted(set(range(partition.get("num_clients", 0))) - {c for cs in used.values() for c in cs})
        parts.append(f"{GLOBAL_MODEL} (adapter/, used by " + (f"clients {_span(rest)})" if rest else "no client)"))
    return ", ".join(parts)


def _span(clients: list[int]) -> str:
    if len(clients) == 1:
        return str(clients[0])
    return f"{clients[0]}..{clients[-1]}" if clients == list(range(clients[0], clients[-1] + 1)) else str(clients)


@dataclass
class RunModel:
    """A run's trained model loaded back: its config, the model (eval mode), tokenizer and input columns."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    folder: Path
    text_columns: list[str]

    @property
    def label_names(self) -> list[str]:
        config = self.model.config
        return [config.id2label[i] for i in range(config.num_labels)]


def load_run_model(run_dir: Path, client: int | None = None, model_name: str | None = None) -> RunModel:
    """The model a run saved (the one client ``client`` uses, or the one named ``model_name``; see
    :func:`adapter_folder`), on its base model resolved offline."""
    from fedtune.models.base import PACKAGED, load_causal_lm, load_classifier

    run_dir = Path(run_dir)
    load_run(run_dir)  # one line when it is not a run directory
    folder = adapter_folder(run_dir, client, model_name)
    cfg = load_config(run_dir / CONFIG)
    partition = json.loads((run_dir / PARTITION).read_text()) if (run_dir / PARTITION).is_file() else {}
    kind = saved_kind(folder)
    named = None if kind.complete else kind.base_named(folder)
    name = str(folder) if kind.complete else cfg.model.name if cfg.model.name in PACKAGED or not named else named
    base = cfg.model.model_copy(update={"name": name})
    if cfg.model.task == "sft":
        model, tok = load_causal_lm(base)
        columns = ["instruction", "input"]  # the input, optional, follows a tab
    else:
        if "text_columns" not in partition or "label_names" not in partition:
            raise FedtuneError(f"run {run_dir} was written by an older fedtune that did not record its input "
                               f"columns in {PARTITION}; rerun it to predict with it")
        names = partition["label_names"]
        model, tok = load_classifier(base, len(names), names)
        columns = partition["text_columns"]
    model = kind.load(model, folder, cfg.model.task)
    return RunModel(cfg, model.eval(), tok, folder, columns)


def split_inputs(texts: list[str], pair: bool) -> list[list[str]]:
    """Each input as its two parts, split at the first tab: a pair model's second text, an instruction's input.

    ``pair``: the model reads two texts, so the tab is required; otherwise the second part may be empty.
    """
    out = []
    for text in texts:
        first, tab, second = text.partition("\t")
        if pair and not tab:
            raise FedtuneError(f"this model reads pairs of texts; separate the two texts of each input with a tab: "
                               f"{text!r}")
        out.append([first, second])
    return out


@torch.no_grad()
def classify(rm: RunModel, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Per input: the predicted ``label``, its ``probability`` and every class's ``probabilities``."""
    from fedtune.training import encode_classification

    if len(rm.text_columns) > 1:
        firsts, seconds = zip(*split_inputs(texts, pair=True))
        columns = [list(firsts), list(seconds)]
    else:
        columns = [list(texts)]
    enc = encode_classification(rm.tokenizer, columns, [0] * len(texts), rm.cfg.model.max_length)
    device = next(rm.model.parameters()).device
    names = rm.label_names
    out = []
    for start in range(0, len(texts), batch_size):
        batch = enc.collate(list(range(start, min(start + batch_size, len(texts)))))
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        probs = rm.model(**inputs).logits.float().softmax(-1).cpu().numpy()
        for row in probs:
            k = int(np.argmax(row))
            out.append({"label": names[k], "probability": float(row[k]),
                        "probabilities": {n: float(p) for n, p in zip(names, row)}})
    return out


def generate(rm: RunModel, texts: list[str], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy responses to instructions (an input may follow a tab), prompted with the run's template."""
    from fedtune.evaluation import generate_greedy

    cfg = rm.cfg
    template = Template(cfg.sft.template, rm.tokenizer, cfg.sft.system_prompt)
    prompts = [template.prompt(instruction, input) for instruction, input in split_inputs(texts, pair=False)]
    ids = rm.tokenizer(prompts, add_special_tokens=not template.prompt_has_special_tokens).input_ids
    keep = max(1, cfg.model.max_length - max_new_tokens)
    return generate_greedy(rm.model, rm.tokenizer, [p[-keep:] for p in ids], max_new_tokens, batch_size)
