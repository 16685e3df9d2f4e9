import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedtune.errors import FedtuneError
from fedtune.evaluation import classification_metrics, evaluate_classifier, mean_metrics, unweighted_mean_metrics

LN3 = math.log(3)


def hand_case():
    """Four examples, two classes. Rows [ln3, 0] give p(class 0) = 3/4, rows [0, ln3] give p(class 1) = 3/4.

    labels      0     0     1     1
    predicted   0     1     1     1
    p(true)    3/4   1/4   3/4   3/4
    """
    logits = torch.tensor([[LN3, 0.0], [0.0, LN3], [0.0, LN3], [0.0, LN3]])
    labels = torch.tensor([0, 0, 1, 1])
    return logits, labels


def test_classification_metrics_by_hand():
    m = classification_metrics(*hand_case())
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(3 / 4)
    # class 0: P = 1/1, R = 1/2 → F1 = 2/3;  class 1: P = 2/3, R = 2/2 → F1 = 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # class 1 positive: TP = 2, TN = 1, FP = 1, FN = 0 → (2·1 − 1·0) / √(3·2·2·1)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))
    # −(3 log 3/4 + log 1/4) / 4
    assert m["loss"] == pytest.approx(-(3 * math.log(3 / 4) + math.log(1 / 4)) / 4)


def test_classification_metrics_numpy_and_bfloat16_agree():
    logits, labels = hand_case()
    ref = classification_metrics(logits, labels)
    assert classification_metrics(logits.numpy(), labels.numpy()) == ref
    low = classification_metrics(logits.to(torch.bfloat16), labels)
    assert low["accuracy"] == ref["accuracy"] and low["loss"] == pytest.approx(ref["loss"], abs=1e-2)


def test_classification_metrics_perfect_and_degenerate():
    labels = np.array([0, 1, 2, 2])
    perfect = classification_metrics(np.eye(3)[labels] * 10, labels)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["mcc"] == 1.0
    constant = classification_metrics(np.zeros((4, 3)), labels)  # always predicts class 0
    assert constant["mcc"] == 0.0 and constant["loss"] == pytest.approx(math.log(3))


def test_empty_evaluation_set_is_a_user_error():
    with pytest.raises(FedtuneError, match="evaluation set is empty"):
        classification_metrics(np.zeros((0, 2)), np.zeros(0))


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )
    return BertForSequenceClassification(config)


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for size, length in ((4, 7), (3, 5)):
        ids = torch.randint(1, 64, (size, length), generator=g)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length - 2:] = 0  # one padded row per batch
        out.append({
            "input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids), "labels": torch.randint(0, 3, (size,), generator=g),
        })
    return out


def test_evaluate_classifier_matches_manual_logits_and_restores_mode():
    model, data = tiny_bert(), batches()
    model.train()
    got = evaluate_classifier(model, data)
    assert model.training

    model.eval()
    with torch.no_grad():
        logits = torch.cat([
            model(**{k: v for k, v in b.items() if k != "labels"}).logits
            for b in data
        ])
    want = classification_metrics(logits, torch.cat([b["labels"] for b in data]))
    assert got["n"] == 7
    assert got == pytest.approx(want)

    assert evaluate_classifier(model, data) == pytest.approx(want)
    assert not model.training


def test_mean_metrics_weights_by_examples():
    per_client = {
        0: {"accuracy": 1.0, "loss": 0.2, "n": 1},
        1: {"accuracy": 0.0, "loss": 1.0, "n": 3},
        2: {"accuracy": 0.5, "loss": 9.9, "n": 0},  # no examples: left out
    }
    m = mean_metrics(per_client)
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["loss"] == pytest.approx((0.2 + 3 * 1.0) / 4)
    assert m["accuracy_std"] == pytest.approx(0.5)  # population std of [1, 0]
    assert "loss_std" not in m


def test_unweighted_mean_counts_every_client_once_beside_the_pooled_rows_mean():
    """FedAMoLE's headline (main.py:242 and :253: test_acc[r] += a client's accuracy; test_acc[r] /= client_num)
    is the plain mean over clients; fedtune's client_eval/ is the mean over their pooled test rows."""
    per_client = {0: {"accuracy": 1.0, "n": 1}, 1: {"accuracy": 0.0, "n": 3}, 2: {"accuracy": 0.5, "n": 4},
                  3: {"accuracy": 0.2, "n": 0}}  # no test rows: no score
    expected = sum(m["accuracy"] for m in list(per_client.values())[:3]) / 3
    assert unweighted_mean_metrics(per_client) == {"accuracy": pytest.approx(expected)}
    assert mean_metrics(per_client)["accuracy"] == pytest.approx(3 / 8)


def test_mean_metrics_are_the_same_bits_whatever_order_clients_answer_in():
    # Flower hands back evaluations in arrival order; these values round differently summed backwards
    vals, ns = [0.3101475693193326, 0.7298317482601286, 0.8988382879679935], [44, 22, 31]
    forward = {c: {"accuracy": v, "n": n} for c, (v, n) in enumerate(zip(vals, ns))}
    backward = {c: forward[c] for c in reversed(forward)}
    assert mean_metrics(forward) == mean_metrics(backward)


def _all_splits(n: int, max_rows: int):
    """Every split of range(n) into consecutive batches of at most max_rows (brute force)."""
    if n == 0:
        yield []
        return
    for first in range(1, min(max_rows, n) + 1):
        for rest in _all_splits(n - first, max_rows):
            yield [slice(0, first)] + [slice(s.start + first, s.stop + first) for s in rest]


@pytest.mark.parametrize("seed", range(5))
def test_padded_batches_minimise_padded_positions_plus_overhead(seed):
    from fedtune.evaluation import padded_batches

    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(5, 400, size=9).tolist())

    def cost(split):
        return sum((s.stop - s.start) * lengths[s.stop - 1] + 64 for s in split)

    split = padded_batches(lengths, max_rows=4, overhead=64)
    assert [i for s in split for i in range(s.start, s.stop)] == list(range(9))  # every row once, in order
    assert all(s.stop - s.start <= 4 for s in split)
    assert cost(split) == min(cost(s) for s in _all_splits(9, 4))


def test_padded_batches_cut_where_lengths_jump():
    from fedtune.evaluation import padded_batches

    assert padded_batches([10, 10, 11, 300, 300], max_rows=16, overhead=64) == [slice(0, 3), slice(3, 5)]
    assert len(padded_batches([10] * 5, max_rows=2, overhead=64)) == 3  # equal lengths: full batches
