"""Evaluation metrics, and how per-client results combine into one.

Every metric function returns a flat ``dict[str, float]`` that includes ``n``,
the number of examples it was computed on, so results from many clients can
be merged by :func:`mean_metrics`. The engine logs these under ``eval/`` (the
global held-out split) and ``client_eval/`` (each client's own test shard).

Sections: classification (accuracy, macro-F1, MCC, cross-entropy); decoder
LMs (choice scoring, response perplexity, greedy generation and ROUGE-L, and
:func:`evaluate_instructions` combining them); then the combination over
clients. Each section pairs pure metric functions with the functions that run
a model. MMLU is built on choice scoring in :mod:`fedtune.mmlu`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score, matthews_corrcoef

from fedtune.errors import FedtuneError
from fedtune.models.base import body_and_head, continue_prefix, prefix_cache
from fedtune.models.packed import packed_linears
from fedtune.models.prompt import is_prompt_learning, prompted_generate

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


def group_accuracy(logits: ArrayLike, labels: ArrayLike, groups: np.ndarray) -> dict[str, float]:
    """``accuracy@<g>`` = (1/N_g) Σ_{i: gᵢ = g} [ŷᵢ = yᵢ] for each group g of ``groups`` (one per example)."""
    correct = (_as_tensor(logits).argmax(dim=1) == _as_tensor(labels).long().reshape(-1)).numpy()
    groups = np.asarray(groups)
    return {f"accuracy@{g}": float(correct[groups == g].mean()) for g in sorted(set(groups.tolist()))}


def evaluate_classifier(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Run a sequence-classification model over ``batches`` and score it with :func:`classification_metrics`."""
    return classification_metrics(*classifier_outputs(model, batches))


@torch.no_grad()
def classifier_outputs(model: torch.nn.Module,
                       batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N × C, labels N) of a sequence-classification model over ``batches``, in batch order.

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
    return torch.cat(all_logits), torch.cat(all_labels)


# --------------------------------------------------------------------------- decoder LMs


def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def _shared_prefix(seqs: list[list[int]], limit: int) -> int:
    """Length of the longest common prefix of ``seqs``, at most ``limit``."""
    n = min(limit, *(len(s) for s in seqs))
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


BATCH_OVERHEAD_TOKENS = 64
"""What one more forward pass costs, in padded token positions (kernel launches, small-matrix inefficiency)."""


def padded_batches(lengths: list[int], max_rows: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[slice]:
    """Split ``lengths`` (ascending) into consecutive batches of at most ``max_rows`` that minimise
    Σ_b (rows_b × longest_b) + overhead × #batches: the padded positions computed, plus a cost per pass.

    Fixed-size batches of varied lengths pad short rows up to the longest; this split pays for
    padding only where it saves a pass. The dynamic programme, O(n · max_rows), starts a new batch
    where the lengths jump.
    """
    n = len(lengths)
    cost = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            c = cost[i] + (j - i) * lengths[j - 1] + overhead
            if c < cost[j]:
                cost[j], start[j] = c, i
    cuts, j = [], n
    while j > 0:
        cuts.append(slice(start[j], j))
        j = start[j]
    return cuts[::-1]


def _final_hidden(model, seqs: list[list[int]], pad_id: int, batch_size: int, limits: list[int],
                  groups: list | None = None):
    """The transformer body over ``seqs`` in length-sorted, right-padded batches (:func:`padded_batches`).

    The sequences of each group (``groups[i]``; default: one group) share their
    longest common prefix, capped at ``min(limits)`` of the group: it runs once,
    and its key/value cache is repeated for every batch, so only the suffixes are
    computed per sequence (a chat template's system turn, MMLU's header and shots).
    The body's linear layers run with packed weights (:mod:`fedtune.models.packed`).
    Yields (indices into ``seqs``, suffix ids, suffix mask, suffix hidden states,
    output head, prefix length).
    """
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    members: dict = {}
    for i, g in enumerate(groups if groups is not None else [0] * len(seqs)):
        members.setdefault(g, []).append(i)
    with packed_linears(body):
        for group in members.values():
            p = _shared_prefix([seqs[i] for i in group], min(limits[i] for i in group)) if len(group) > 1 else 0
            prefix = prefix_cache(body, torch.tensor([seqs[group[0]][:p]], device=device)) if p else None
            order = [group[j] for j in np.argsort([len(seqs[i]) for i in group], kind="stable")]
            for cut in padded_batches([len(seqs[i]) - p for i in order], batch_size):
                idx = order[cut]
                ids, mask = _right_padded([seqs[i][p:] for i in idx], pad_id, device)
                if prefix is None:
                    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                else:
                    full_mask = torch.cat([mask.new_ones(len(idx), p), mask], dim=1)
                    hidden = continue_prefix(body, copy.deepcopy(prefix), ids, full_mask)
                yield idx, ids, mask, hidden, head, p


def _target_logprobs(model, seqs: list[list[int]], spans: list[tuple[int, int]], pad_id: int, batch_size: int,
                     groups: list | None = None, progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """For each sequence s with span (a, b): log p(s_t | s_<t) for t in [a, b), as a float64 tensor.

    Only the positions a-1 .. b-2 go through the head.
    """
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    limits = [a - 1 for a, _ in spans]
    for idx, ids, _, hidden, head, p in _final_hidden(model, seqs, pad_id, batch_size, limits, groups):
        rows = [r for r, i in enumerate(idx) for _ in range(*spans[i])]
        cols = [t - 1 - p for i in idx for t in range(*spans[i])]
        targets = ids[rows, [c + 1 for c in cols]]
        logp = torch.log_softmax(head(hidden[rows, cols]).double(), dim=-1)
        picked = logp.gather(1, targets[:, None])[:, 0].cpu()
        for i, chunk in zip(idx, picked.split([spans[i][1] - spans[i][0] for i in idx])):
            out[i] = chunk
        if progress is not None:
            progress(len(idx))
    return out


@torch.no_grad()
def choice_losses(model: torch.nn.Module, prompts: list[list[int]], choices: list[list[list[int]]], pad_id: int,
                  batch_size: int = 32, groups: list | None = None,
                  progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """The mean token loss of each candidate answer given its prompt (lower is more likely)::

        L_ik = −(1 / |c_ik|) Σ_t log p(c_ik,t | prompt_i, c_ik,<t)

    When every candidate is one token, one forward pass of each prompt scores
    all its candidates; otherwise each prompt + candidate is run. Prompts of a
    group (``groups``; default: all prompts) compute their common prefix once.
    ``progress(k)`` is called after each forward pass with the k sequences it
    scored: prompts when every candidate is one token, else prompt + candidate
    pairs (Σ_i |choices_i| in all).
    """
    if not prompts:
        return []
    if all(len(c) == 1 for cs in choices for c in cs):
        out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
        limits = [len(x) - 1 for x in prompts]
        for idx, _, mask, hidden, head, _ in _final_hidden(model, prompts, pad_id, batch_size, limits, groups):
            last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]
            logp = torch.log_softmax(head(last).double(), dim=-1).cpu()
            for row, i in enumerate(idx):
                out[i] = -logp[row, [c[0] for c in choices[i]]].numpy()
            if progress is not None:
                progress(len(idx))
        return out
    seqs, spans, owner = [], [], []
    for i, (p, cs) in enumerate(zip(prompts, choices)):
        for c in cs:
            seqs.append(p + c)
            spans.append((len(p), len(p) + len(c)))
            owner.append(i)
    logps = _target_logprobs(model, seqs, spans, pad_id, batch_size,
                             None if groups is None else [groups[i] for i in owner], progress)
    out = [[] for _ in prompts]
    for i, lp in zip(owner, logps):
        out[i].append(-float(lp.mean()))
    return [np.asarray(x) for x in out]


def choice_metrics(losses: list[np.ndarray], answers: ArrayLike, tasks: list[str] | None = None) -> dict[str, float]:
    """Accuracy of argmin-loss predictions; with one shared candidate count K also macro-F1 and MCC.

    ``accuracy_<task>`` is added per task when the examples come from several.
    """
    answers = np.asarray(answers)
    if len(losses) == 0:
        raise FedtuneError(_EMPTY)
    pred = np.array([int(np.argmin(x)) for x in losses])
    out = {"accuracy": float((pred == answers).mean())}
    if len({len(x) for x in losses}) == 1:
        out["macro_f1"] = float(f1_score(answers, pred, average="macro", zero_division=0.0))
        out["mcc"] = float(matthews_corrcoef(answers, pred))
    if tasks is not None and len(set(tasks)) > 1:
        tasks_arr = np.asarray(tasks)
        for t in sorted(set(tasks)):
            out[f"accuracy_{t}"] = float((pred[tasks_arr == t] == answers[tasks_arr == t]).mean())
    out["n"] = len(pred)
    return out


@torch.no_grad()
def response_nll(model: torch.nn.Module, ids: list[list[int]], starts: list[int], pad_id: int,
                 batch_size: int = 32) -> tuple[float, int]:
    """Σ_t −log p(x_t | x_<t) over each sequence's response tokens (from ``starts[i]`` on), and their count."""
    spans = [(max(a, 1), len(x)) for x, a in zip(ids, starts)]
    keep = [i for i, (a, b) in enumerate(spans) if b > a]
    if not keep:
        raise FedtuneError("no response tokens to compute perplexity on")
    logps = _target_logprobs(model, [ids[i] for i in keep], [spans[i] for i in keep], pad_id, batch_size)
    return -sum(float(lp.sum()) for lp in logps), sum(len(lp) for lp in logps)


def perplexity_metrics(nll_sum: float, tokens: int, n: int) -> dict[str, float]:
    """``loss`` = mean NLL per response token, ``perplexity`` = exp(loss)."""
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "n": n}


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; decoded up to EOS.

    Decoding runs the linear layers (output head included) on packed weights (:mod:`fedtune.models.packed`); a
    prompt-learning model generates through :func:`~fedtune.models.prompt.prompted_generate`.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    texts: list[str] = [""] * len(prompts)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    was_training = model.training
    model.eval()
    try:
        with packed_linears(model):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                    device=device)
                greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                out = prompted_generate(model, **greedy) if is_prompt_learning(model) else model.generate(**greedy)
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    if tokenizer.eos_token_id in new:
                        new = new[: new.index(tokenizer.eos_token_id)]
                    texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return texts


class _RougeTokenizer:
    """Lower-cased words of letters and digits; each CJK character is a word of its own.

    rouge-score's default tokenizer keeps only ``[a-z0-9]``, which would score any
    Chinese response as empty.
    """

    _WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of words) of each prediction against its reference."""
    if not predictions:
        raise FedtuneError(_EMPTY)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def evaluate_instructions(model: torch.nn.Module, tokenizer, data, indices: np.ndarray | None,
                          metrics: list[str], batch_size: int = 32, max_new_tokens: int = 64) -> dict[str, float]:
    """Score a causal LM on instruction examples (:class:`~fedtune.training.EncodedInstructions`).

    ``metrics``: ``choice`` (examples with candidate answers), ``perplexity`` (of the
    reference responses), ``rouge`` (ROUGE-L F1 of greedy generations; reported as ``rougeL``).
    """
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    if len(idx) == 0:
        raise FedtuneError(_EMPTY)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        if "choice" in metrics:
            closed = [int(i) for i in idx if len(data.choices[i])]
            if closed:
                losses = choice_losses(model, [data.prompts[i] for i in closed], [data.choices[i] for i in closed],
                                       data.pad_id, batch_size)
                found = choice_metrics(losses, data.answers[closed], [data.tasks[i] for i in closed])
                found.pop("n")
                out.update(found)
        if "perplexity" in metrics:
            nll, tokens = response_nll(model, [data.features["input_ids"][i] for i in idx],
                                       [data.starts[i] for i in idx], data.pad_id, batch_size)
            out.update({k: v for k, v in perplexity_metrics(nll, tokens, len(idx)).items() if k != "n"})
        if "rouge" in metrics:
            preds = generate_greedy(model, tokenizer, [data.prompts[i] for i in idx], max_new_tokens, batch_size)
            out["rougeL"] = rouge_l(preds, [data.references[i] for i in idx])
    finally:
        model.train(was_training)
    out["n"] = len(idx)
    return out


# --------------------------------------------------------------------------- over clients


def mean_metrics(
    per_client: Mapping[int, Mapping[str, float]], std_of: tuple[str, ...] = ("accuracy",)
) -> dict[str, float]:
    """Combine per-client metrics into one dict.

    Each metric m becomes the example-weighted mean Σₖ nₖ mₖ / Σₖ nₖ over clients k
    (the metric over the pooled examples, for metrics that are means), ``n`` becomes
    Σₖ nₖ, and for each m in ``std_of`` ``m_std`` is the unweighted population
    standard deviation of mₖ across clients (how unevenly clients are served).
    Clients with nₖ = 0 are left out; only metrics every client reports are combined. Clients are summed in
    id order, so the result is the same bits whatever order they answered in (Flower's is arrival order).
    """
    results = [per_client[c] for c in sorted(per_client) if per_client[c]["n"] > 0]
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


def unweighted_mean_metrics(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Each metric m as the plain mean (1/K) Σₖ mₖ over the K clients with nₖ > 0, every client counting once
    whatever its number of test examples (FedAMoLE's and FedMLLM's reported figure); only metrics every such
    client reports; summed in client-id order."""
    results = [per_client[c] for c in sorted(per_client) if per_client[c]["n"] > 0]
    if not results:
        raise ValueError("unweighted_mean_metrics needs at least one client with n > 0")
    keys = [k for k in results[0] if k != "n" and all(k in r for r in results)]
    return {k: float(np.mean(np.array([r[k] for r in results], dtype=np.float64))) for k in keys}
