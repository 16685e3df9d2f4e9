"""Quantised base models (``model.quantization``): the frozen weights in 4 or 8 bits, LoRA trained on top.

QLoRA (Dettmers et al., 2023) through transformers' ``BitsAndBytesConfig``: every linear layer of the base
but the output head is stored by bitsandbytes as

- ``nf4`` / ``fp4``: 4-bit codes (NormalFloat, or a 4-bit float) with one absmax scale per block of 64
  weights; with ``model.double_quantization`` the scales themselves in 8 bits, per block of 256, and
  dequantised to ``model.compute_dtype`` for each matmul;
- ``int8``: LLM.int8(): 8-bit rows with a scale each, outlier features in fp16.

The model loads straight onto its device in that form (``device_map``), then peft's
``prepare_model_for_kbit_training`` freezes it and casts what stays unquantised (norms, embeddings, head)
to fp32. LoRA goes on top as on any base, so payloads, aggregation and saved adapters are the same as
without quantisation: a saved adapter loads on the plain or the quantised base. The packaged SmolLM2 is
quantised from the fp32 safetensors folder it is converted to once (:func:`~fedtune.models.base.resolve_model_path`),
so the 4-bit codes are of its Q4_1 values dequantised.

Refused (:func:`check_quantization`): training every parameter (4-bit codes have no gradient),
mixtures of experts (built on full-precision linear layers), and algorithms that add dense updates to the
base weights (re-quantising W + ΔW would round most of a small ΔW away).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.models.kinds import kind_named
from fedtune.models.lora import HEAD_NAMES

BITS = {"nf4": 4, "fp4": 4, "int8": 8}
BLOCK, BLOCK2 = 64, 256
"""bitsandbytes' 4-bit block sizes: weights per absmax scale, and scales per second-level scale (double quantisation)."""

warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # every int8 forward says it


def _bitsandbytes(quantization: str) -> None:
    """Import bitsandbytes, or say how to install it (its wheels do not cover every platform)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FedtuneError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes "
                           "(scripts/setup.sh installs the tested version)") from None


def check_quantization(cfg: RunConfig, algorithm) -> None:
    """A one-line error for a quantised base that the run cannot train soundly; nothing without quantisation."""
    q = cfg.model.quantization
    if q == "none":
        return
    bits = BITS[q]
    kind = kind_named(cfg.model.finetune)
    if kind.unquantizable:
        raise FedtuneError(f"model.quantization={q} stores the base weights in {bits} bits, which cannot be trained, "
                           f"but model.finetune={kind.name} {kind.unquantizable}; use model.finetune=lora (QLoRA) or "
                           "model.quantization=none")
    if algorithm.uses_base_weights:
        raise FedtuneError(f"algorithm '{algorithm.name}' adds its aggregated updates s·B·A to the base weights, which "
                           f"model.quantization={q} keeps in {bits} bits (re-quantising W + ΔW would round most of "
                           "the update away); use model.quantization=none, or an algorithm that keeps the base "
                           "frozen (e.g. fedit)")
    _bitsandbytes(q)


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype 4-bit layers compute in: ``model.compute_dtype``, else the autocast dtype of ``train.precision``."""
    if cfg.model.compute_dtype is not None:
        return getattr(torch, cfg.model.compute_dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)


def quantization_config(cfg: RunConfig, skip: list[str] | None = None):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None: not quantised); ``skip``: modules
    left in full precision besides the output head (a classifier's head)."""
    q = cfg.model.quantization
    if q == "none":
        return None
    _bitsandbytes(q)
    from transformers import BitsAndBytesConfig

    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q, llm_int8_skip_modules=skip,
                              bnb_4bit_use_double_quant=cfg.model.double_quantization is not False,
                              bnb_4bit_compute_dtype=compute_dtype(cfg))


def prepare_quantized(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's preparation of a quantised base for LoRA: every weight frozen, what is not quantised cast to fp32,
    and (``train.gradient_checkpointing``) activations recomputed in the backward pass.

    What is not quantised is first copied out of the checkpoint file it was loaded from (a memory-mapped view
    of it): otherwise the whole file, read to quantise it, stays mapped and resident beside the quantised model.
    """
    from peft import prepare_model_for_kbit_training

    from bitsandbytes.nn import Int8Params, Params4bit

    with torch.no_grad():  # the checkpoint file stays mapped while a tensor is a view of it: copy what is not quantised
        for p in model.parameters():
            if not isinstance(p, (Params4bit, Int8Params)):
                p.data = p.data.clone()
    for module in model.modules():
        # bitsandbytes repacks a 4-bit layer's codes in place on its first gradient-free forward pass in eval
        # mode on an AVX512-BF16 CPU, its scales rounded to bf16, into a layout that passes no gradient: the
        # model would compute with other weights after its first evaluation, and train no LoRA below that layer.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def is_quantized(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class WeightCount:
    """A model's parameters: the linear weights bitsandbytes quantises, layer by layer, and the rest."""

    layers: tuple[tuple[int, int], ...]
    """(weights, output rows) of each linear layer that gets quantised (every one but the output head)."""
    rest: int
    """Every other parameter: biases, norms, embeddings, the output head."""

    def bytes(self, precision: str, double_quantization: bool = True) -> int:
        """Bytes of the weights at ``precision``: ``fp32``, ``bf16``/``fp16``, ``int8``, ``nf4``/``fp4``.

        fp32: 4·N; bf16: 2·N. Quantised, the rest in fp32 (as prepared for training), per layer of w weights
        and o rows: int8: w + 4·o (a scale per row); 4 bits: ⌈w/2⌉ + the scales of its b = ⌈w/64⌉ blocks,
        4·b bytes, or with double quantisation b (8 bits) + 4·⌈b/256⌉ + 4 (their scales and offset).
        """
        n = sum(w for w, _ in self.layers) + self.rest
        if precision == "fp32":
            return 4 * n
        if precision in ("bf16", "fp16"):
            return 2 * n
        if precision == "int8":
            return sum(w + 4 * rows for w, rows in self.layers) + 4 * self.rest
        total = 4 * self.rest
        for w, _ in self.layers:
            blocks = -(-w // BLOCK)
            total += -(-w // 2) + (blocks + 4 * -(-blocks // BLOCK2) + 4 if double_quantization else 4 * blocks)
        return total


def count_weights(model: nn.Module) -> WeightCount:
    """:class:`WeightCount` of ``model`` (e.g. built on the meta device: nothing is allocated)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(head)} if head is not None else set()
    skip |= {id(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES}
    layers = tuple((m.weight.numel(), m.out_features) for m in model.modules()
                   if isinstance(m, nn.Linear) and id(m) not in skip)
    total = sum(p.numel() for p in model.parameters())
    return WeightCount(layers, total - sum(w for w, _ in layers))


def weight_count(config) -> WeightCount:
    """:class:`WeightCount` of the model a transformers ``config`` describes, built on the meta device (nothing
    is allocated): a causal LM as such, anything else with a classification head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    return count_weights(model)
