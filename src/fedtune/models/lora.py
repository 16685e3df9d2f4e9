"""LoRA adapters via peft, and the model's trainable state as named tensors.

A LoRA layer computes ``W x + (alpha / r) · B A x`` with ``A ∈ R^{r×d_in}``
(random init) and ``B ∈ R^{d_out×r}`` (zero init), so training starts from
the base model. Federated algorithms see only :func:`trainable_state` — the
named tensors that require gradients (LoRA factors, and the task head when
``lora.train_head``) — and write back with :func:`load_trainable`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model

from fedtune.aggregation import Tensors, fit_rank
from fedtune.models.kinds.lora import LoraConfig
from fedtune.errors import FedtuneError

# Attention projections per architecture (config.model_type); the LoRA paper's
# default of adapting queries and values.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

def default_targets(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise FedtuneError(
            f"no default LoRA target modules for architecture '{model_type}'; set lora.target_modules "
            f"(known defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


DEFAULT_ADAPTER = "default"
"""peft's name for a model's first adapter; a model may carry more, each under its own name."""

HEAD_NAMES = ("classifier", "score")
"""The names of a classification model's task head (BERT-style, Llama-style)."""


def check_targets(model: torch.nn.Module, targets: list[str] | None, key: str) -> list[str]:
    """``targets`` (default: the architecture's attention projections), each the name of a module of ``model``,
    or a one-line error naming ``key`` and the model's linear modules."""
    targets = targets or default_targets(model.config.model_type)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FedtuneError(f"{key} {missing} not found in the model; linear modules are: {', '.join(linear)}")
    return targets


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, task: str = "classification", rank: int | None = None,
               adapter_name: str = DEFAULT_ADAPTER) -> PeftModel:
    """Wrap ``model`` with LoRA adapters named ``adapter_name`` (initialised from the current torch RNG state);
    a peft model gets them beside the adapters it has (peft runs the active ones: ``set_adapter``).

    ``rank``: the adapters' rank when clients train different ranks (their largest);
    alpha is scaled with it, so the scale alpha / r of ``cfg`` holds at every rank.
    """
    rank = rank or cfg.r
    targets = check_targets(model, cfg.target_modules, "lora.target_modules")
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=cfg.alpha * rank / cfg.r,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=None,
    )
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, peft_cfg)
        peft_model = model
    else:
        peft_model = get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    if not cfg.train_head:
        for name, p in peft_model.named_parameters():
            if any(h in name for h in HEAD_NAMES):
                p.requires_grad_(False)
    return peft_model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter that requires grad, by name, whatever device the model is on."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (on any device) into the model's trainable parameters of the same names (a subset is
    allowed), onto the parameters' device and dtype."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                raise KeyError(f"model has no parameter '{name}'")
            params[name].copy_(t)


def load_adapter(model: torch.nn.Module, path: Path) -> PeftModel:
    """``model`` with the peft adapter at ``path``: a run directory (its ``adapter/``) or an adapter folder."""
    path = Path(path)
    run = (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter" / "config.json").is_file()
    folder = path / "adapter" if run else path
    if not (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file():
        raise FedtuneError(f"{folder} holds a complete model (a model.finetune=full run), not a peft adapter: "
                           f"load it as the model itself (e.g. --model {folder})")
    if not (folder / "adapter_config.json").is_file():
        clients = sorted(p.name for p in (path / "adapters").glob("client_*")) if (path / "adapters").is_dir() else []
        hint = f"; this run saved one adapter per client: give {path / 'adapters'}/<client_i>" if clients else ""
        raise FedtuneError(f"no peft adapter at {path} (expected adapter_config.json there or in {path / 'adapter'}){hint}")
    try:
        peft_model = PeftModel.from_pretrained(model, folder)
        if (folder / MERGED_FILE).is_file():
            from safetensors.torch import load_file

            params = dict(peft_model.named_parameters())
            with torch.no_grad():
                for key, delta in load_file(str(folder / MERGED_FILE)).items():
                    params[key[len(MERGED):]].add_(delta)
    except (RuntimeError, ValueError, KeyError) as e:
        raise FedtuneError(f"adapter {folder} does not fit this model: {' '.join(str(e).split())[:300]}") from None
    return peft_model


# --------------------------------------------------------------------------- factors by module and rank

FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")
"""The parameter name of a LoRA factor: ``<module>.lora_A.<adapter>.weight`` / ``lora_B``."""
MERGED = "merged/"
"""Key prefix of a dense update ΔW merged into a base weight: ``merged/<base weight name>``."""
MERGED_FILE = "merged.safetensors"
"""Beside a saved adapter: the updates merged into its base weights (``merged/<W>`` → ΔW)."""


def lora_modules(tensors: Tensors, adapter: str = DEFAULT_ADAPTER) -> dict[str, tuple[str, str]]:
    """Adapted module → (name of A, name of B), for the factors of ``adapter`` among ``tensors``."""
    return {m["module"]: lora_factor_names(m["module"], adapter) for n in tensors
            if (m := FACTOR.match(n)) and m["factor"] == "A" and m["adapter"] == adapter}


def lora_adapters(tensors: Tensors) -> list[str]:
    """The names of the adapters whose LoRA factors are among ``tensors``, in order of appearance."""
    return list(dict.fromkeys(m["adapter"] for n in tensors if (m := FACTOR.match(n))))


def lora_factor_names(module: str, adapter: str = DEFAULT_ADAPTER) -> tuple[str, str]:
    """The parameter names of an adapted module's A and B in ``adapter``."""
    return f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight"


def base_weight_name(module: str) -> str:
    """The frozen weight W of an adapted module (peft keeps it as ``<module>.base_layer.weight``)."""
    return module + ".base_layer.weight"


def fit_lora_rank(tensors: Tensors, rank: int) -> Tensors:
    """Every LoRA factor cut to ``rank`` (A's first rows, B's first columns) or zero-padded up to it.

    A rank-r client inside a rank-R model (R ≥ r) is exact: the padded rows of A and
    columns of B are zero, so they add nothing to B·A and their gradients stay zero.
    """
    out = dict(tensors)
    for adapter in lora_adapters(tensors):
        for a, b in lora_modules(tensors, adapter).values():
            out[a], out[b] = fit_rank(tensors[a], tensors[b], rank)
    return out


def adapted_base_weights(model: torch.nn.Module) -> Tensors:
    """CPU copies of the frozen weights W of every LoRA-adapted module, by parameter name."""
    params = dict(model.named_parameters())
    names = {base_weight_name(m) for adapter in lora_adapters(params) for m in lora_modules(params, adapter)}
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if n in names}


def load_state(model: torch.nn.Module, tensors: Tensors, base: Tensors | None = None) -> None:
    """Load trainable ``tensors``; given ``base`` (pristine W by name), also set every W to
    ``base[W] + tensors["merged/" + W]`` (just ``base[W]`` when no update is merged)."""
    load_trainable(model, {k: v for k, v in tensors.items() if not k.startswith(MERGED)})
    if not base:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in base.items():
            delta = tensors.get(MERGED + name)
            params[name].copy_(w if delta is None else w + delta)
