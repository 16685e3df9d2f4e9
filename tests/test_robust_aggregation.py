"""Robust aggregation math and the streaming mean (``fedtune.aggregation``), on hand cases with outliers.

Every expected value is worked out by hand in the comments, or computed independently with numpy/scipy.
"""

import math
import random

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import trim_mean

from fedtune.aggregation import (
    StreamingMean,
    clip_change,
    coordinate_median,
    krum_scores,
    krum_select,
    trimmed_mean,
    weighted_mean,
)


def sets_of(rows):
    """Client i's update from row i of a (n × 5) list: ``w`` (2,) holds its first two values, ``b`` (3,) the rest."""
    return [{"w": torch.tensor(r[:2], dtype=torch.float32), "b": torch.tensor(r[2:], dtype=torch.float32)}
            for r in rows]


ODD = [[1.0, -2.0, 0.0, 5.0, 1e6],
       [2.0, -1.0, 0.5, 4.0, 2.0],
       [9e9, -3.0, 0.25, -1e9, 3.0]]  # an outlier per column somewhere
EVEN = ODD + [[4.0, 7e7, 1.0, 6.0, 1.0]]


def test_coordinate_median_odd_and_even_counts():
    med = coordinate_median(sets_of(ODD))
    # columns sorted: [1, 2, 9e9] → 2; [-3, -2, -1] → -2; [0, .25, .5] → .25; [-1e9, 4, 5] → 4; [2, 3, 1e6] → 3
    assert med["w"].tolist() == [2.0, -2.0] and med["b"].tolist() == [0.25, 4.0, 3.0]
    med = coordinate_median(sets_of(EVEN))
    # even: the mean of the two middle values: [1, 2, 4, 9e9] → 3; [-3, -2, -1, 7e7] → -1.5; [0, .25, .5, 1] → .375;
    # [-1e9, 4, 5, 6] → 4.5; [1, 2, 3, 1e6] → 2.5
    assert med["w"].tolist() == [3.0, -1.5] and med["b"].tolist() == [0.375, 4.5, 2.5]
    assert med["w"].dtype == torch.float32
    rng = np.random.default_rng(0)
    for n in (5, 6):
        x = rng.normal(size=(n, 5)).astype(np.float32)
        med = coordinate_median(sets_of(x.tolist()))
        want = np.median(x.astype(np.float64), axis=0).astype(np.float32)
        assert np.array_equal(np.concatenate([med["w"].numpy(), med["b"].numpy()]), want)


def test_trimmed_mean_drops_beta_n_from_each_end():
    rows = ODD + [[4.0, 7e7, 1.0, 6.0, 1.0], [0.0, 0.0, -5.0, 5.0, 2.0]]  # n = 5
    tm = trimmed_mean(sets_of(rows), beta=0.2)  # ⌊0.2·5⌋ = 1 from each end, the mean of the middle 3
    # [0, 1, 2, 4, 9e9] → 7/3; [-3, -2, -1, 0, 7e7] → -1; [-5, 0, .25, .5, 1] → .25; [-1e9, 4, 5, 5, 6] → 14/3;
    # [1, 2, 2, 3, 1e6] → 7/3
    assert tm["w"].tolist() == pytest.approx([7 / 3, -1.0]) and tm["b"].tolist() == pytest.approx([0.25, 14 / 3, 7 / 3])
    tm = trimmed_mean(sets_of(EVEN), beta=0.25)  # ⌊0.25·4⌋ = 1: the mean of the middle two, the even median
    assert tm["w"].tolist() == [3.0, -1.5] and tm["b"].tolist() == [0.375, 4.5, 2.5]
    tm = trimmed_mean(sets_of(EVEN), beta=0.2)  # ⌊0.8⌋ = 0: the plain mean
    assert tm["w"].tolist() == pytest.approx(np.mean(np.array(EVEN)[:, :2], axis=0).tolist())
    x = np.random.default_rng(1).normal(size=(9, 5))
    for beta in (0.0, 0.1, 0.3, 0.45):
        tm = trimmed_mean(sets_of(x.tolist()), beta)
        want = trim_mean(x.astype(np.float32).astype(np.float64), beta, axis=0)
        assert np.concatenate([tm["w"].numpy(), tm["b"].numpy()]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"^trimmed mean: β must be in \[0, 0.5\) .* got 0.5$"):
        trimmed_mean(sets_of(EVEN), beta=0.5)  # ⌊0.5·4⌋ = 2 from each end would leave nothing


# Krum's planted case, points in the plane split over two tensors (x in "w", y in "b"):
#   0: (0, 0)   1: (50, 50), far   2: (0, 1)   3: (3, 0)
# squared distances: d01 = 5000, d02 = 1, d03 = 9, d12 = 2500 + 2401 = 4901, d13 = 2209 + 2500 = 4709, d23 = 10
PLANTED = [[0.0, 0.0], [50.0, 50.0], [0.0, 1.0], [3.0, 0.0]]


def planted():
    return [{"w": torch.tensor([x]), "b": torch.tensor([[y]])} for x, y in PLANTED]


def test_krum_selects_an_honest_client_of_a_planted_construction():
    # f = 1: each scored by its n − f − 2 = 1 nearest other: 0 → 1, 1 → 4709, 2 → 1, 3 → 9
    assert krum_scores(planted(), f=1) == [1.0, 4709.0, 1.0, 9.0]
    assert krum_select(planted(), f=1) == [0]  # tied with client 2: the lower index
    # f = 0: the 2 nearest: 0 → 1 + 9, 1 → 4709 + 4901, 2 → 1 + 10, 3 → 9 + 10
    assert krum_scores(planted(), f=0) == [10.0, 9610.0, 11.0, 19.0]
    assert krum_select(planted(), f=0) == [0]


def test_multi_krum_selects_the_m_lowest_scores():
    assert krum_select(planted(), f=1, m=2) == [0, 2]
    assert krum_select(planted(), f=1, m=3) == [0, 2, 3]
    assert krum_select(planted(), f=0, m=4) == [0, 2, 3, 1]
    x = np.random.default_rng(2).normal(size=(7, 5))
    x[4] += 30  # one far client
    d = cdist(x, x, "sqeuclidean")
    want = [np.sort(np.delete(d[i], i))[:7 - 2 - 2].sum() for i in range(7)]  # f = 2
    assert krum_scores(sets_of(x.tolist()), f=2) == pytest.approx(want, rel=1e-6)
    assert krum_select(sets_of(x.tolist()), f=2, m=3) == [int(i) for i in np.argsort(want, kind="stable")[:3]]
    assert 4 not in krum_select(sets_of(x.tolist()), f=2, m=6)


def test_krum_errors_name_what_is_missing():
    with pytest.raises(ValueError, match=r"^Krum scores .* needs n ≥ f \+ 3: got n = 4, f = 2$"):
        krum_scores(planted(), f=2)
    with pytest.raises(ValueError, match=r"m must be in 1..4, got 5$"):
        krum_select(planted(), f=1, m=5)
    with pytest.raises(ValueError, match=r"^Krum: tensor 'w' has different shapes"):
        krum_scores([*planted(), {"w": torch.zeros(2), "b": torch.zeros(1, 1)}], f=0)
    with pytest.raises(ValueError, match="updates hold different tensor names"):
        coordinate_median([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])


def test_clip_change_scales_only_above_the_bound():
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([[0.0, 4.0]])}  # ‖Δ‖ = 5 over both tensors
    same, factor = clip_change(delta, 10.0)
    assert factor == 1.0 and same["a"] is delta["a"] and same["b"] is delta["b"]
    clipped, factor = clip_change(delta, 1.0)
    assert factor == pytest.approx(0.2)
    assert clipped["a"].tolist() == pytest.approx([0.6]) and clipped["b"].flatten().tolist() == pytest.approx([0.0, 0.8])
    assert clipped["a"].dtype == torch.float32
    with pytest.raises(ValueError, match="^norm bound must be positive, got 0"):
        clip_change(delta, 0.0)


def random_updates(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 9, n, dtype=torch.float64)  # magnitudes spread over twelve decades
    ups = [{"lora_A": (torch.randn(4, 16, generator=g, dtype=torch.float64) * s).to(dtype),
            "head": (torch.randn(3, generator=g, dtype=torch.float64) * s).to(dtype)} for s in scale]
    weights = torch.randint(1, 500, (n,), generator=g).tolist()
    return ups, weights


def test_streaming_mean_equals_the_batch_mean_to_float64_precision():
    ups, weights = random_updates(30, 0, torch.float64)
    mean = StreamingMean()
    for u, w in zip(ups, weights):
        mean.add(u, w)
    got, want = mean.result(), weighted_mean(ups, weights)
    for name in want:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], want[name], rtol=1e-13, atol=1e-13)
    assert (mean.count, mean.total_weight) == (30, float(sum(weights)))
    # the double-double keeps what a float64 sum loses: (1e16 + 1 − 1e16) / 3 is 1/3, not 0
    mean = StreamingMean()
    for x in (1e16, 1.0, -1e16):
        mean.add({"x": torch.tensor([x], dtype=torch.float64)}, 1)
    assert mean.result()["x"].item() == 1 / 3


def test_streaming_mean_of_float32_updates_is_bit_identical_in_any_order():
    ups, weights = random_updates(30, 1)
    # the 20 largest again, negated: they cancel, leaving a mean a float64 running sum gets wrong in the last
    # float32 bits in an order-dependent way (a plain float64 accumulator fails this test)
    ups += [{k: -v for k, v in u.items()} for u in ups[10:]]
    weights += weights[10:]
    order = list(range(50))
    results = []
    for shuffle in range(20):
        random.Random(shuffle).shuffle(order)
        mean = StreamingMean()
        for i in order:
            mean.add(ups[i], weights[i])
        results.append(mean.result())
    for r in results[1:]:
        assert all(torch.equal(r[k], results[0][k]) for k in r)
    assert results[0]["lora_A"].dtype == torch.float32
    for k, got in results[0].items():  # and it is the correctly rounded sum: math.fsum of the exact products
        terms = np.stack([u[k].double().numpy().ravel() * w for u, w in zip(ups, weights)])
        exact = torch.tensor([math.fsum(col) for col in terms.T], dtype=torch.float64) / sum(weights)
        assert torch.equal(got.ravel(), exact.float())


def test_streaming_mean_errors():
    mean = StreamingMean()
    with pytest.raises(ValueError, match="^streaming mean: no update was added$"):
        mean.result()
    with pytest.raises(ValueError, match="^streaming mean: weights must be positive, got 0$"):
        mean.add({"a": torch.zeros(2)}, 0)
    mean.add({"a": torch.zeros(2), "b": torch.ones(1)}, 1)
    with pytest.raises(ValueError, match="other tensor names than the first one"):
        mean.add({"a": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match=r"^streaming mean: tensor 'b' has shape \(2,\), the first update's \(1,\)$"):
        mean.add({"a": torch.ones(2), "b": torch.ones(2)}, 1)
    assert mean.count == 1 and torch.equal(mean.result()["a"], torch.zeros(2))  # a refused update folds nothing
