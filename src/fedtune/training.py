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
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.config import TrainConfig

GROUP = 50
"""Batches per length-sorting group."""


@dataclass
class Encoded:
    """Tokenised examples: one list of ids per example, plus labels."""

    features: dict[str, list[list[int]]]  # input_ids, and token_type_ids for pair inputs
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Token count of every example (computed once: batching reads it every client round)."""
        return np.fromiter((len(x) for x in self.features["input_ids"]), dtype=np.int64, count=len(self))

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the examples ``idx`` to their longest member; attention mask marks real tokens."""
        ids = self.features["input_ids"]
        width = max(len(ids[i]) for i in idx)
        batch: dict[str, torch.Tensor] = {}
        for name, rows in self.features.items():
            pad = self.pad_id if name == "input_ids" else 0
            batch[name] = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx], dtype=torch.long)
        batch["attention_mask"] = torch.tensor(
            [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx], dtype=torch.long
        )
        batch["labels"] = torch.as_tensor(self.labels[np.asarray(idx)], dtype=torch.long)
        return batch


def encode_classification(tokenizer, texts: Sequence[Sequence[str]], labels: Sequence[int], max_length: int) -> Encoded:
    """Tokenise one or two text columns (``texts`` holds one sequence per column), truncated to ``max_length``."""
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
    keep = ["input_ids"] + (["token_type_ids"] if len(texts) > 1 and "token_type_ids" in enc else [])
    return Encoded({k: enc[k] for k in keep}, np.asarray(labels, dtype=np.int64), tokenizer.pad_token_id)


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


def eval_batches(data: Encoded, indices: np.ndarray | None, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches sorted by length (deterministic; the order does not change any metric)."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    idx = idx[np.argsort(data.lengths[idx], kind="stable")]
    for i in range(0, len(idx), batch_size):
        yield data.collate(idx[i : i + batch_size])


def local_steps(cfg: TrainConfig, num_examples: int) -> int:
    """Optimiser steps for one client round: ``local_steps``, or ⌈epochs · n / (batch · accum)⌉."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


def round_lr(cfg: TrainConfig, rnd: int, rounds: int) -> float:
    """Learning rate of round ``rnd`` (1-based): constant, or cosine from lr to min_lr_ratio · lr."""
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    progress = (rnd - 1) / (rounds - 1)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


LossFn = Callable[[dict[str, torch.Tensor], object], torch.Tensor]


def train_local(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    lr: float,
    loss_fn: LossFn,
    after_step: Callable[[], None] = lambda: None,
    on_step: Callable[[], None] = lambda: None,
) -> tuple[float, int]:
    """Run ``steps`` AdamW steps of ``grad_accum`` micro-batches; return (mean loss, examples seen).

    A fresh optimiser per call: client optimiser state does not travel between rounds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            loss = loss_fn(batch, model(**batch))
            (loss / cfg.grad_accum).backward()
            n = len(batch["input_ids"])
            total += loss.item() * n
            seen += n
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        on_step()
    return total / max(seen, 1), seen
