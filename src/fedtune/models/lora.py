"""LoRA adapters via peft, and the model's trainable state as named tensors.

A LoRA layer computes ``W x + (alpha / r) · B A x`` with ``A ∈ R^{r×d_in}``
(random init) and ``B ∈ R^{d_out×r}`` (zero init), so training starts from
the base model. Federated algorithms see only :func:`trainable_state` — the
named tensors that require gradients (LoRA factors, and the task head when
``lora.train_head``) — and write back with :func:`load_trainable`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model

from fedtune.config import LoraConfig
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

_HEAD_NAMES = ("classifier", "score")


def default_targets(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise FedtuneError(
            f"no default LoRA target modules for architecture '{model_type}'; set lora.target_modules "
            f"(known defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, task: str = "classification") -> PeftModel:
    """Wrap ``model`` with LoRA adapters (initialised from the current torch RNG state)."""
    targets = cfg.target_modules or default_targets(model.config.model_type)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FedtuneError(
            f"lora.target_modules {missing} not found in the model; linear modules are: {', '.join(linear)}"
        )
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=None,
    )
    peft_model = get_peft_model(model, peft_cfg)
    if not cfg.train_head:
        for name, p in peft_model.named_parameters():
            if any(h in name for h in _HEAD_NAMES):
                p.requires_grad_(False)
    return peft_model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter that requires grad, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's trainable parameters of the same names (a subset is allowed)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                raise KeyError(f"model has no parameter '{name}'")
            params[name].copy_(t)


def load_adapter(model: torch.nn.Module, path: Path) -> PeftModel:
    """``model`` with the peft adapter at ``path``: a run directory (its ``adapter/``) or an adapter folder."""
    path = Path(path)
    folder = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    if not (folder / "adapter_config.json").is_file():
        clients = sorted(p.name for p in (path / "adapters").glob("client_*")) if (path / "adapters").is_dir() else []
        hint = f"; this run saved one adapter per client: give {path / 'adapters'}/<client_i>" if clients else ""
        raise FedtuneError(f"no peft adapter at {path} (expected adapter_config.json there or in {path / 'adapter'}){hint}")
    try:
        return PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError, KeyError) as e:
        raise FedtuneError(f"adapter {folder} does not fit this model: {' '.join(str(e).split())[:300]}") from None
