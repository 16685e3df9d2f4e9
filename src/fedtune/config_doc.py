"""The config as commented YAML: ``fedtune config show`` (every field, resolved) and ``fedtune config init``.

Each field's comment is its docstring in :mod:`fedtune.config` (pydantic's
``use_attribute_docstrings``) followed by its allowed values, read from its
type and bounds, so the comments cannot drift from what is validated. The
YAML written loads back to the config it shows.
"""

from __future__ import annotations

import textwrap
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedtune.config import RunConfig, yaml_flow

WIDTH = 100

STARTERS: dict[str, tuple[dict[str, Any], dict[str, list[str]]]] = {
    "classification": (
        {"name": "my_classification",
         "partition": {"method": "dirichlet", "alpha": 0.5},
         "model": {"max_length": 64},
         "train": {"local_steps": 25, "lr": 3e-3, "lr_schedule": "cosine"},
         "federation": {"rounds": 12, "fraction": 0.5},
         "eval": {"every": 4, "batch_size": 128}},
        {"": ["name", "output_dir", "seed", "threads"],
         "data": ["name", "text_column", "label_column", "labels", "eval_fraction", "max_train_examples",
                  "max_eval_examples", "quoting", "encoding"],
         "partition": ["method", "num_clients", "by", "alpha", "client_test_fraction"],
         "model": ["name", "task", "max_length"],
         "lora": ["r", "alpha", "target_modules"],
         "train": ["local_steps", "batch_size", "lr", "optimizer", "lr_schedule"],
         "federation": ["rounds", "fraction"],
         "algorithm": ["name", "options"],
         "eval": ["every", "batch_size", "per_client"]},
    ),
    "sft": (
        {"name": "my_sft",
         "data": {"name": "alpaca_en"},
         "partition": {"num_clients": 4, "client_test_fraction": 0.1},
         "model": {"name": "smollm2-135m", "task": "sft", "max_length": 256},
         "sft": {"template": "chat"},
         "train": {"local_steps": 10, "batch_size": 4, "lr": 2e-3},
         "federation": {"rounds": 5},
         "eval": {"every": 0, "batch_size": 16, "per_client": True}},
        {"": ["name", "output_dir", "seed", "threads"],
         "data": ["name", "eval_fraction", "max_train_examples", "max_eval_examples"],
         "partition": ["method", "num_clients", "client_test_fraction"],
         "model": ["name", "task", "max_length"],
         "sft": ["template", "system_prompt", "train_on_inputs"],
         "lora": ["r", "alpha", "target_modules"],
         "train": ["local_steps", "batch_size", "lr", "optimizer", "lr_schedule"],
         "federation": ["rounds", "clients_per_round"],
         "algorithm": ["name", "options"],
         "eval": ["every", "batch_size", "per_client", "metrics"]},
    ),
}
"""``fedtune config init --task T``: the starter's settings, and the fields it shows per section ("": top level)."""


def _text(doc: str | None) -> str:
    return " ".join((doc or "").split()).replace("``", "`")


def meaning(field: FieldInfo) -> str:
    """A field's docstring on one line, in plain backticks."""
    return _text(field.description)


def allowed(field: FieldInfo) -> str:
    """The values a field takes, from its type and bounds: ``one of: a, b``, ``int ≥ 1``, ``float in (0, 1]``, ...;
    '' for free text."""
    ann, nullable = field.annotation, False
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        nullable, ann = len(args) < len(get_args(ann)), args[0] if len(args) == 1 else ann
    if get_origin(ann) is Literal:
        text = "one of: " + ", ".join(map(str, get_args(ann)))
    elif get_origin(ann) is list:
        (item,) = get_args(ann)
        text = "list of: " + ", ".join(map(str, get_args(item))) if get_origin(item) is Literal else "list"
    elif ann is str:
        text = "text" if nullable else ""
    elif ann is bool:
        text = "true or false"
    elif ann in (int, float):
        low = high = None
        for m in field.metadata:
            for attr, sign in (("gt", "("), ("ge", "[")):
                if getattr(m, attr, None) is not None:
                    low = (sign, getattr(m, attr))
            for attr, sign in (("lt", ")"), ("le", "]")):
                if getattr(m, attr, None) is not None:
                    high = (sign, getattr(m, attr))
        if low and high:
            text = f"{ann.__name__} in {low[0]}{low[1]}, {high[1]}{high[0]}"
        elif low:
            text = f"{ann.__name__} {'>' if low[0] == '(' else '≥'} {low[1]}"
        elif high:
            text = f"{ann.__name__} {'<' if high[0] == ')' else '≤'} {high[1]}"
        else:
            text = ann.__name__
    else:
        text = ""
    if not nullable:
        return text
    return f"{text}; or null" if "," in text else f"{text} or null"


def _comment(text: str, indent: str, kind: str = "") -> list[str]:
    """Comment lines of ``text`` followed by ``[kind]``, which is never split across lines."""
    if kind:
        text = f"{text} [{kind}]".strip().replace(f"[{kind}]", f"[{kind}]".replace(" ", "\u00a0"))
    lines = textwrap.wrap(text, WIDTH - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                          break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines]


def _section(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _fields(model: type[BaseModel], values: dict[str, Any], indent: str, keys: dict[str, list[str]] | None,
            path: str, options: BaseModel | None) -> list[str]:
    lines: list[str] = []
    shown = keys.get(path) if keys is not None else None
    fields = sorted(model.model_fields.items(), key=lambda item: _section(item[1]) is not None)  # sections last
    for name, field in fields:
        section = _section(field)
        key = f"{path}.{name}" if path else name
        if section is not None:
            if keys is not None and key not in keys:
                continue
            lines += ["", *_comment(_text(section.__doc__), indent), f"{indent}{name}:"]
            lines += _fields(section, values[name], indent + "  ", keys, key, options)
            continue
        if shown is not None and name not in shown:
            continue
        lines += _comment(meaning(field), indent, allowed(field))
        if key == "algorithm.options" and options is not None and type(options).model_fields:
            lines.append(f"{indent}{name}:")
            lines += _fields(type(options), options.model_dump(mode="json"), indent + "  ", None, key, None)
        else:
            lines.append(f"{indent}{name}: {yaml_flow(values[name])}")
    return lines


def commented_yaml(cfg: RunConfig, keys: dict[str, list[str]] | None = None, options: BaseModel | None = None,
                   header: str = "") -> str:
    """``cfg`` as YAML with a comment above every field; ``keys``: only these fields per section (``""``: top
    level; a section not named is left out), default all. ``options``: the algorithm's validated options, shown
    with their own comments under ``algorithm.options``."""
    lines = [*_comment(header, ""), ""] if header else []
    lines += _fields(RunConfig, cfg.to_dict(), "", keys, "", options)
    return "\n".join(lines) + "\n"


def _sampling(cfg: RunConfig) -> str:
    """What a starter's header says of whom it trains and scores: the clients sampled per round, and what
    per-client accuracy needs when it is off."""
    fed, parts = cfg.federation, []
    if fed.fraction is not None:
        parts.append(f"Each round trains a sampled {fed.fraction:.0%} of the clients (federation.fraction; "
                     "remove it to train all).")
    elif fed.clients_per_round is not None:
        parts.append(f"Each round trains {fed.clients_per_round} sampled clients (federation.clients_per_round).")
    if not (cfg.eval.per_client and cfg.partition.client_test_fraction > 0):
        parts.append("Accuracy per client needs partition.client_test_fraction > 0 (each client's own test rows) "
                     "and eval.per_client: true.")
    return " ".join(parts)


def starter(task: str) -> str:
    """The commented starting config of ``fedtune config init --task TASK``: it runs as it is."""
    settings, keys = STARTERS[task]
    cfg = RunConfig.model_validate(settings)
    header = (f"A starting {task} config: run it with `fedtune run FILE`, change any field, and see every field, "
              "resolved, with `fedtune config show FILE`. Fields left out keep their defaults. "
              + _sampling(cfg))
    return commented_yaml(cfg, keys, header=header)
