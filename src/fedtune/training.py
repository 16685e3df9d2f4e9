"""The local training loop (plain PyTorch), tokenised examples and length-grouped batches.

Examples are tokenised once per run into Python lists of token ids; a batch
is padded only to its longest member (dynamic padding). Batches are
*length-grouped*: the shard is shuffled, cut into groups of ``GROUP`` batches,
each group is sorted by length and cut into batches, and the batch order is
shuffled again, so a batch holds examples of similar length (little padding)
while the order stays random.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.config import TrainConfig
from fedtune.data.templates import Template
from fedtune.device import autocast, grad_scaler, model_device, to_device
from fedtune.errors import FedtuneError
from fedtune.models.base import body_and_head, continue_prefix, prefix_cache, quiet_loading

if TYPE_CHECKING:
    from fedtune.dp_sgd import PrivateGradient

GROUP = 50
"""Batches per length-sorting group."""


IGNORE = -100
"""Target of a token that is not scored (prompt tokens, padding): the convention of torch's cross-entropy."""


@dataclass
class Encoded:
    """Tokenised examples: one list of ids per example, plus targets.

    ``labels`` is one class index per example (classification), or one list of
    per-token targets per example, :data:`IGNORE` where a token is not scored
    (instruction tuning).
    """

    features: dict[str, list[list[int]]]  # input_ids, and token_type_ids for pair inputs
    labels: np.ndarray | list[list[int]]
    pad_id: int
    full_lengths: np.ndarray | None = None
    """Token count of every example before truncation to ``model.max_length`` (None: not recorded)."""
    groups: np.ndarray | None = None
    """Each example's group (a value of ``partition.by``), where metrics are also reported per group."""

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Token count of every example (computed once: batching reads it every client round)."""
        return np.fromiter((len(x) for x in self.features["input_ids"]), dtype=np.int64, count=len(self))

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the examples ``idx`` (on the right) to their longest member; attention mask marks real tokens.
        No examples: a batch of zero rows (a Poisson sample can draw none)."""
        ids = self.features["input_ids"]
        if not len(idx):
            labels = (0,) if isinstance(self.labels, np.ndarray) else (0, 0)
            return {**{k: torch.zeros((0, 0), dtype=torch.long) for k in [*self.features, "attention_mask"]},
                    "labels": torch.zeros(labels, dtype=torch.long)}
        width = max(len(ids[i]) for i in idx)
        batch: dict[str, torch.Tensor] = {}
        for name, rows in self.features.items():
            pad = self.pad_id if name == "input_ids" else 0
            batch[name] = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx], dtype=torch.long)
        batch["attention_mask"] = torch.tensor(
            [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx], dtype=torch.long
        )
        if isinstance(self.labels, np.ndarray):
            batch["labels"] = torch.as_tensor(self.labels[np.asarray(idx)], dtype=torch.long)
        else:
            rows = self.labels
            batch["labels"] = torch.tensor([rows[i] + [IGNORE] * (width - len(rows[i])) for i in idx], dtype=torch.long)
        return batch


@dataclass
class EncodedInstructions(Encoded):
    """Instruction examples (prompt + response) and what decoder evaluation needs besides the training view.

    ``prompts[i]`` is the prompt's token ids as scored and generated from,
    ``choices[i]`` the token ids of each candidate answer, without EOS, as choice
    scoring compares them (empty: open-ended),
    ``answers[i]`` the index of the correct candidate (-1: open-ended),
    ``references[i]`` the response text, ``tasks[i]`` the source dataset,
    ``starts[i]`` where the response begins in ``features["input_ids"][i]``.
    """

    prompts: list[list[int]] = field(default_factory=list)
    choices: list[list[list[int]]] = field(default_factory=list)
    answers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    references: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)


def encode_classification(tokenizer, texts: Sequence[Sequence[str]], labels: Sequence[int], max_length: int) -> Encoded:
    """Tokenise one or two text columns (``texts`` holds one sequence per column), truncated to ``max_length``
    (the tokenizer's ``longest_first``), recording every input's length before truncation."""
    with quiet_loading():  # transformers warns of inputs longer than the model takes: they are truncated below
        enc = tokenizer(*texts, truncation=False, padding=False)
    keep = ["input_ids"] + (["token_type_ids"] if len(texts) > 1 and "token_type_ids" in enc else [])
    features = {k: list(enc[k]) for k in keep}
    full = np.fromiter((len(x) for x in features["input_ids"]), dtype=np.int64, count=len(features["input_ids"]))
    long = np.flatnonzero(full > max_length)
    if len(long):
        cut = tokenizer(*[[column[i] for i in long] for column in texts], truncation=True, max_length=max_length,
                        padding=False)
        for k in keep:
            for j, i in enumerate(long):
                features[k][i] = cut[k][j]
    return Encoded(features, np.asarray(labels, dtype=np.int64), tokenizer.pad_token_id, full)


def truncation_note(max_length: int, lengths: dict[str, np.ndarray]) -> str:
    """The line saying which share of each split's inputs (``lengths``: tokens before truncation, by split name)
    ``max_length`` cuts, and the smallest length that keeps 95% of them all whole."""
    every = np.concatenate([v for v in lengths.values()]) if lengths else np.zeros(0, dtype=np.int64)
    if not len(every):
        return ""
    keep95 = int(np.quantile(every, 0.95, method="inverted_cdf"))
    splits = {name: v for name, v in lengths.items() if len(v)}
    if not (every > max_length).any():
        counts = " and ".join(f"{len(v):,} {name}" for name, v in splits.items())
        return (f"inputs: none of the {counts} inputs is longer than model.max_length={max_length} tokens; "
                f"95% fit in {keep95}")
    shares = " and ".join(f"{np.mean(v > max_length):.1%} of the {len(v):,} {name} inputs" for name, v in splits.items())
    return f"inputs: model.max_length={max_length} tokens cuts {shares}; model.max_length={keep95} would keep 95% whole"


def encode_instructions(tokenizer, template: Template, rows: dict[str, list], max_length: int,
                        train_on_inputs: bool = False) -> EncodedInstructions:
    """Tokenise instruction rows (:data:`fedtune.data.instructions.COLUMNS`) as prompt + response + EOS.

    Targets are the response tokens (and EOS); prompt tokens are :data:`IGNORE`
    unless ``train_on_inputs``. Prompt and response are tokenised separately
    and concatenated, so the boundary is the same in training, scoring and
    generation. Too long an example keeps its response (up to half of
    ``max_length`` when the prompt needs the rest) and loses the start of its prompt.
    """
    if tokenizer.eos_token_id is None:
        raise FedtuneError("the tokenizer has no EOS token; instruction tuning needs one to end responses")
    texts = [template.prompt(i, x) for i, x in zip(rows["instruction"], rows["input"])]
    prompts = tokenizer(texts, add_special_tokens=not template.prompt_has_special_tokens).input_ids
    prefix, eos = template.response_prefix, [tokenizer.eos_token_id]
    responses = [r + eos for r in tokenizer([prefix + o for o in rows["output"]], add_special_tokens=False).input_ids]
    vocab: dict[str, list[int]] = {}

    def candidate(text: str) -> list[int]:
        if text not in vocab:
            vocab[text] = tokenizer(prefix + text, add_special_tokens=False).input_ids
        return vocab[text]

    choices = [[candidate(c) for c in cs] for cs in rows["choices"]]
    ids, targets, kept_prompts, starts = [], [], [], []
    full = np.asarray([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=np.int64)
    for p, r, cs in zip(prompts, responses, choices):
        r = r[: max(max_length - len(p), max_length // 2)]
        p = p[max(0, len(p) - (max_length - len(r))):]
        ids.append(p + r)
        starts.append(len(p))
        targets.append((p if train_on_inputs else [IGNORE] * len(p)) + r)
        longest = max((len(c) for c in cs), default=0)
        kept_prompts.append(p[max(0, len(p) - (max_length - longest)):])
    return EncodedInstructions(
        features={"input_ids": ids}, labels=targets, pad_id=tokenizer.pad_token_id, full_lengths=full,
        prompts=kept_prompts, choices=choices, answers=np.asarray(rows["answer"], dtype=np.int64),
        references=list(rows["output"]), tasks=list(rows["task"]), starts=starts,
    )


def length_grouped_batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch over ``indices`` as batches of similar length, in random order."""
    order = rng.permutation(indices)
    batches: list[np.ndarray] = []
    span = batch_size * GROUP
    for start in range(0, len(order), span):
        group = order[start : start + span]
        group = group[np.argsort(lengths[group], kind="stable")]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_stream(data: Encoded, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless length-grouped batches over ``indices``, epoch after epoch."""
    if len(indices) == 0:
        raise ValueError("a client with no training examples cannot train")
    lengths = data.lengths
    while True:
        for b in length_grouped_batches(lengths, indices, batch_size, rng):
            yield data.collate(b)


def eval_order(data: Encoded, indices: np.ndarray | None) -> np.ndarray:
    """The examples ``indices`` (all: None) in the order :func:`eval_batches` yields them: by length, stable."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    return idx[np.argsort(data.lengths[idx], kind="stable")]


def eval_batches(data: Encoded, indices: np.ndarray | None, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches sorted by length (deterministic; the order does not change any metric)."""
    idx = eval_order(data, indices)
    for i in range(0, len(idx), batch_size):
        yield data.collate(idx[i : i + batch_size])


def local_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimiser steps for one client round: ``local_steps``, or ⌈epochs · n / (batch · accum)⌉."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """Learning rate of round ``rnd`` (1-based): constant, cosine from lr to min_lr_ratio · lr, or lr · lr_decay^(rnd−1)."""
    if cfg.lr_schedule == "exponential":
        return cfg.lr * cfg.lr_decay ** (rnd - 1)
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    progress = (rnd - 1) / (rounds - 1)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


LossFn = Callable[[dict[str, torch.Tensor], object], torch.Tensor]
Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], object]


def model_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The model's own forward pass and task loss (``outputs.loss``)."""
    return model(**batch)


@dataclass
class LMOutputs:
    loss: torch.Tensor
    logits: torch.Tensor
    """Logits of the scored positions only (those predicting a target ≠ IGNORE), in batch order."""


def causal_lm_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> LMOutputs:
    """Next-token cross-entropy, mean over the scored tokens: −(1/|S|) Σ_{(b,t)∈S} log p(y_bt | x_b,<t).

    The same loss and gradients as the model's own ``labels=`` path, computed
    with less work: only the positions in S go through the output head, and the
    prompt prefix every row of the batch shares (a template's preamble), up to
    the first scored position, runs once; its key/value cache is repeated over
    the batch, and gradients flow back through it (with ``lora.dropout`` > 0 the
    batch shares the prefix's dropout mask). ``share_prefix=False``: one forward pass over the whole batch.
    """
    body, head = body_and_head(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    # gradient checkpointing recomputes each layer without its cache: every row runs its prefix itself
    checkpointing = body.training and any(getattr(m, "gradient_checkpointing", False) for m in body.modules())
    p = 0 if checkpointing or not share_prefix else _shared_prefix_length(ids, mask, scored)
    if p > 0 and len(ids) > 1:
        hidden = continue_prefix(body, prefix_cache(body, ids[:1, :p]), ids[:, p:], mask)
        scored_hidden = hidden[:, :-1][scored[:, p:]]
    else:
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        scored_hidden = hidden[:, :-1][scored]
    logits = head(scored_hidden)
    return LMOutputs(torch.nn.functional.cross_entropy(logits.float(), targets[scored]), logits)


def _shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> int:
    """Leading positions identical (and unpadded) in every row, none of them scored and one left for the suffix."""
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)
    same[scored.any(dim=0).nonzero()[:1, 0]] = False  # hidden position t scores token t+1: in the suffix
    differ = (~same).nonzero()
    return min(int(differ[0, 0]) if len(differ) else ids.shape[1], ids.shape[1] - 1)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """A fresh ``cfg.optimizer`` over the model's trainable parameters at ``lr`` (LoRA B at λ · lr with
    ``cfg.lora_plus_ratio`` λ)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = cfg.lora_plus_ratio or 1.0
    groups = [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
              {"params": [p for n, p in named if "lora_B" in n], "lr": lr * ratio}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def train_local(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    lr: float,
    loss_fn: LossFn,
    after_step: Callable[[], None] = lambda: None,
    on_step: Callable[[], None] = lambda: None,
    forward: Forward = model_forward,
    private: PrivateGradient | None = None,
) -> tuple[float, int]:
    """Run ``steps`` optimiser steps (``cfg.optimizer``) of ``grad_accum`` micro-batches; return (mean loss, examples seen).

    A fresh optimiser per call: client optimiser state does not travel between rounds.
    With ``cfg.lora_plus_ratio`` λ the LoRA B factors train at λ · lr (LoRA+).
    Batches move to the model's device; the forward pass and ``loss_fn`` run under ``cfg.precision``'s
    autocast, and fp16 scales the loss (its steps with overflowing gradients are skipped; :mod:`fedtune.device`).
    ``private``: each step's gradient is DP-SGD's (:mod:`fedtune.dp_sgd`), one batch per step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg, lr)
    device = model_device(model)
    scaler = grad_scaler(cfg.precision, device)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        if private is not None:  # one Poisson batch, its gradient privatised
            batch = to_device(next(batches), device)
            loss_sum, n = private.backward(model, batch, forward, loss_fn, lambda: autocast(cfg.precision, device))
            total += loss_sum
            seen += n
        else:
            for _ in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                with autocast(cfg.precision, device):
                    loss = loss_fn(batch, forward(model, batch))
                scaled = loss / cfg.grad_accum
                (scaled if scaler is None else scaler.scale(scaled)).backward()
                n = len(batch["input_ids"])
                total += loss.item() * n
                seen += n
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        after_step()
        on_step()
    return total / max(seen, 1), seen
