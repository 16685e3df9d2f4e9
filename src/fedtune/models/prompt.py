"""Prompt learning through peft: v trainable virtual tokens P ∈ R^{v×d} in front of every input sequence.

Prompt tuning (Lester et al., 2021) trains P itself; P-tuning (Liu et al., 2021, "GPT Understands, Too")
trains an embedding E ∈ R^{v×d} and a prompt encoder f (an MLP, or a bidirectional LSTM and an MLP) and puts
P = f(E) in front. The trainable state is E (P for prompt tuning), f's parameters and the head: the raw
parameters (:func:`~fedtune.models.lora.trainable_state`), never peft's ``get_peft_model_state_dict``, which
for P-tuning returns the encoder's output f(E) and loads it back into E, so that f is applied twice.

Where the virtual tokens enter. peft inserts them in ``PeftModel.forward``; fedtune's causal-LM loss and
scorers run the transformer body and the output head apart (:func:`~fedtune.models.base.body_and_head`), so a
prompt-learning model's body is :class:`PromptedBody`, which puts them in front itself. With a mask m over
[virtual tokens, input] (ones for the virtual tokens), every position's id is the count of real tokens before
it, ``cumsum(m) − 1``: the same ids whatever the padding, left or right. peft's own sequence-classification
forward passes embeddings only, so a decoder classifier (transformers' last-token pooling, head ``score``)
cannot see the padding: it pools the last position (a pad under right padding) with position ids that count
the pads. :func:`apply_prompt_learning` gives such a model :func:`last_token_forward` instead, which pools the
last real token of each row.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from fedtune.models.lora import HEAD_NAMES


def is_prompt_learning(model: nn.Module) -> bool:
    """``model`` is a peft model whose active adapter is prompt learning (virtual tokens)."""
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def apply_prompt_learning(model: nn.Module, peft_config, train_head: bool = True) -> PeftModel:
    """``model`` with the virtual tokens of ``peft_config`` (a peft ``PromptTuningConfig`` or
    ``PromptEncoderConfig``), initialised from the current torch RNG state; a classifier's head trains with them
    unless ``train_head`` is false."""
    from peft import get_peft_model

    peft_model = with_last_token_pooling(get_peft_model(model, peft_config))
    if not train_head:
        for name, p in peft_model.named_parameters():
            if any(f"{h}." in name for h in HEAD_NAMES):
                p.requires_grad_(False)
    return peft_model


def with_last_token_pooling(peft_model: PeftModel) -> PeftModel:
    """``peft_model``, where it is a decoder classifier (its base has a ``score`` head), computing its logits with
    :func:`last_token_forward` (the model's ``forward``, as an instance attribute)."""
    if peft_model.active_peft_config.task_type == "SEQ_CLS" and hasattr(peft_model.get_base_model(), "score"):
        peft_model.forward = MethodType(last_token_forward, peft_model)
    return peft_model


def position_ids(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The position of each of the last ``width`` columns of ``mask`` (batch × length over [virtual, input]):
    the real tokens before it, ``cumsum(mask) − 1`` (0 before the first)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -width:]


class PromptedBody(nn.Module):
    """The transformer body of a prompt-learning peft model, with the virtual tokens in front of every sequence.

    Called as the body is (``input_ids``, ``attention_mask``, ``use_cache`` and a cache), it returns the body's
    output for the input positions only. Without a cache the virtual tokens run first (gradients reach them);
    with one (a prefix computed by this body) they are already in the cache, and the mask is extended over them.
    """

    def __init__(self, peft_model: PeftModel):
        super().__init__()
        base = peft_model.get_base_model()
        self.model = peft_model
        self.body = getattr(base, base.base_model_prefix)
        self.virtual = peft_model.active_peft_config.num_virtual_tokens
        self.training = self.body.training

    @property
    def cache_name(self) -> str:
        """What the body calls its key/value cache (:func:`fedtune.models.base.prefix_cache` reads it)."""
        from fedtune.models.base import _cache_name

        return _cache_name(type(self.body))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False,
                **cache: Any):
        peft_model = self.model
        rows, width = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cached = any(v is not None for v in cache.values())
        mask = torch.cat([attention_mask.new_ones(rows, self.virtual), attention_mask], dim=1)
        embeds = peft_model.word_embeddings(input_ids)
        if not cached:
            embeds = torch.cat([peft_model.get_prompt(batch_size=rows).to(embeds.dtype), embeds], dim=1)
        out = self.body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask, embeds.shape[1]),
                        use_cache=use_cache, **cache)
        if not cached:
            out.last_hidden_state = out.last_hidden_state[:, self.virtual:]
        return out


def prompted_generate(model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **kwargs: Any) -> torch.Tensor:
    """``model.generate`` for a prompt-learning decoder, batched with left padding: [input_ids, new tokens].

    peft's own ``generate`` drops the position ids transformers derives from the mask ("Position ids are not
    supported"), so a left-padded row counts its pads and continues differently from the same row alone. Here
    the base model generates from the embeddings [virtual tokens, input] with the mask over both, whose positions
    transformers derives as ``cumsum(mask) − 1``: the real tokens before each, whatever the padding."""
    rows, virtual = len(input_ids), model.active_peft_config.num_virtual_tokens
    embeds = model.word_embeddings(input_ids)
    embeds = torch.cat([model.get_prompt(batch_size=rows).to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(rows, virtual), attention_mask], dim=1)
    new = model.get_base_model().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return torch.cat([input_ids, new], dim=1)


def last_token_forward(self: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutputWithPast:
    """A decoder classifier under prompt learning: the head on the last real token of each row (left or right
    padding alike), after the virtual tokens; cross-entropy with ``labels`` when given."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    hidden = PromptedBody(self)(input_ids, attention_mask).last_hidden_state
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask.long() * (columns + 1)).argmax(-1)
    logits = self.get_base_model().score(hidden[torch.arange(len(hidden), device=hidden.device), last])
    loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
    return SequenceClassifierOutputWithPast(loss=loss, logits=logits)
