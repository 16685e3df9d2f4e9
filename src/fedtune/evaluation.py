"""Evaluation metrics, and how per-client results combine into one.

Every metric function returns a flat ``dict[str, float]`` that includes ``n``,
the number of examples it was computed on, so results from many clients can
be merged by :func:`mean_metrics`. The engine logs these under ``eval/`` (the
global held-out split) and ``client_eval/`` (each client's own test shard).

Sections: classification (accuracy, macro-F1, MCC, cross-entropy), then the
combination over clients. Further task families (perplexity, ROUGE-L, choice
scoring, MMLU) belong here as further sections of the same shape: a pure
metric function on arrays, and an ``evaluate_*`` function that runs a model
over batches and calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, matthews_corrcoef

from fedtune.errors import FedtuneError

ArrayLike = torch.Tensor | np.ndarray

_EMPTY = "evaluation set is empty; give it examples (check data.max_eval_examples and partition.client_test_fraction)"


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


# --------------------------------------------------------------------------- classification


def classification_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Metrics of class scores ``logits`` (N × C) against integer ``labels`` (N).

    With predictions ŷᵢ = argmaxⱼ logitsᵢⱼ:

    - ``accuracy`` = (1/N) Σᵢ [ŷᵢ = yᵢ]
    - ``macro_f1`` = unweighted mean over classes of F1 = 2PR / (P + R), over the
      classes that occur in the labels or the predictions (an undefined F1 counts 0)
    - ``mcc``: Matthews correlation (multi-class form; 0 when undefined)
    - ``loss`` = (1/N) Σᵢ −log softmax(logitsᵢ)[yᵢ], the mean cross-entropy
    - ``n`` = N
    """
    logits_t = _as_tensor(logits).to(torch.float64)
    labels_t = _as_tensor(labels).long().reshape(-1)
    if logits_t.ndim != 2 or logits_t.shape[0] != labels_t.shape[0]:
        raise ValueError(f"logits must be N × C and labels N; got {tuple(logits_t.shape)} and {tuple(labels_t.shape)}")
    if labels_t.numel() == 0:
        raise FedtuneError(_EMPTY)
    y, y_hat = labels_t.numpy(), logits_t.argmax(dim=1).numpy()
    return {
        "accuracy": float((y_hat == y).mean()),
        "macro_f1": float(f1_score(y, y_hat, average="macro", zero_division=0.0)),
        "mcc": float(matthews_corrcoef(y, y_hat)),
        "loss": float(F.cross_entropy(logits_t, labels_t)),
        "n": len(y),
    }


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Run a sequence-classification model over ``batches`` and score it with :func:`classification_metrics`.

    Each batch holds ``input_ids``, ``attention_mask``, optionally ``token_type_ids``,
    and ``labels``; tensors are moved to the model's device. The model runs in eval
    mode and is returned to its previous train/eval mode afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        all_logits, all_labels = [], []
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            all_logits.append(model(**inputs).logits.float().cpu())
            all_labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise FedtuneError(_EMPTY)
    return classification_metrics(torch.cat(all_logits), torch.cat(all_labels))


# --------------------------------------------------------------------------- over clients


def mean_metrics(
    per_client: Mapping[int, Mapping[str, float]], std_of: tuple[str, ...] = ("accuracy",)
) -> dict[str, float]:
    """Combine per-client metrics into one dict.

    Each metric m becomes the example-weighted mean Σₖ nₖ mₖ / Σₖ nₖ over clients k
    (the metric over the pooled examples, for metrics that are means), ``n`` becomes
    Σₖ nₖ, and for each m in ``std_of`` ``m_std`` is the unweighted population
    standard deviation of mₖ across clients (how unevenly clients are served).
    Clients with nₖ = 0 are left out; only metrics every client reports are combined.
    """
    results = [r for r in per_client.values() if r["n"] > 0]
    if not results:
        raise ValueError("mean_metrics needs at least one client with n > 0")
    n = np.array([r["n"] for r in results], dtype=np.float64)
    keys = [k for k in results[0] if k != "n" and all(k in r for r in results)]
    out: dict[str, float] = {}
    for k in keys:
        values = np.array([r[k] for r in results], dtype=np.float64)
        out[k] = float(np.average(values, weights=n))
        if k in std_of:
            out[f"{k}_std"] = float(values.std())
    out["n"] = int(n.sum())
    return out
