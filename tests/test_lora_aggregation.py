"""Heterogeneous-rank LoRA aggregation: zero padding, FLoRA stacking, FLoRIST, dense SVD."""

import pytest
import torch

from fedtune.aggregation import (
    dense_svd_factors,
    energy_rank,
    fit_rank,
    florist,
    lora_product,
    stack_factors,
    weighted_mean,
    weighted_product_sum,
    zero_pad_mean,
)

D_OUT, D_IN, RANKS, WEIGHTS = 48, 40, [8, 4, 4, 2], [3.0, 1.0, 2.0, 4.0]


def clients(ranks=RANKS, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, D_IN, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(D_OUT, r, generator=g, dtype=dtype) for r in ranks]
    return As, Bs


def rel_err(x, y):
    x, y = x.double(), y.double()
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def test_fit_rank_cuts_and_pads():
    (A,), (B,) = clients([4])
    A2, B2 = fit_rank(A, B, 2)
    assert torch.equal(A2, A[:2]) and torch.equal(B2, B[:, :2])
    A6, B6 = fit_rank(A, B, 6)
    assert A6.shape == (6, D_IN) and B6.shape == (D_OUT, 6)
    assert torch.equal(A6[:4], A) and torch.equal(B6[:, :4], B)
    assert not A6[4:].any() and not B6[:, 4:].any()
    assert torch.equal(lora_product(A6, B6), lora_product(A, B))


def test_zero_pad_mean_equal_ranks_is_weighted_mean():
    As, Bs = clients([4, 4, 4])
    A, B = zero_pad_mean(As, Bs, WEIGHTS[:3])
    ref = weighted_mean([{"A": a, "B": b} for a, b in zip(As, Bs)], WEIGHTS[:3])
    assert torch.equal(A, ref["A"]) and torch.equal(B, ref["B"])


def test_zero_pad_mean_unequal_ranks_pads_with_zeros():
    As, Bs = clients()
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    A, B = zero_pad_mean(As, Bs, WEIGHTS)
    assert A.shape == (8, D_IN) and B.shape == (D_OUT, 8) and A.dtype == torch.float32
    # rows 4..7 exist only in client 0; rows 2..3 in clients 0, 1, 2; rows 0..1 in all
    assert torch.allclose(A[4:], p[0] * As[0][4:])
    assert torch.allclose(B[:, 4:], p[0] * Bs[0][:, 4:])
    assert torch.allclose(A[2:4], p[0] * As[0][2:4] + p[1] * As[1][2:4] + p[2] * As[2][2:4])
    assert torch.allclose(A[:2], sum(pi * a[:2] for pi, a in zip(p, As)))


def test_stack_factors_product_identity():
    As, Bs = clients(dtype=torch.float64)
    A_st, B_st = stack_factors(As, Bs, WEIGHTS)
    assert A_st.shape == (sum(RANKS), D_IN) and B_st.shape == (D_OUT, sum(RANKS))
    assert rel_err(lora_product(A_st, B_st), weighted_product_sum(As, Bs, WEIGHTS)) < 1e-14


def test_energy_rank_constructed_spectrum():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0]).sqrt()  # energies 4, 3, 2, 1 of 10
    for tau, k in [(0.4, 1), (0.7, 2), (0.71, 3), (0.9, 3), (1.0, 4)]:
        assert energy_rank(sigma, tau) == k, tau
    assert energy_rank(torch.tensor([2.0, 1.0, 0.0, 0.0]), 1.0) == 2
    assert energy_rank(torch.zeros(5), 0.5) == 1


def test_energy_rank_is_smallest_on_random_spectra():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        sigma = torch.rand(20, generator=g, dtype=torch.float64).sort(descending=True).values
        tau = float(torch.rand(1, generator=g)) * 0.99 + 0.01
        k = energy_rank(sigma, tau)
        frac = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
        assert frac[k - 1] >= tau
        assert k == 1 or frac[k - 2] < tau


def test_florist_tau_one_reproduces_flora():
    As, Bs = clients()
    A_st, B_st = stack_factors(As, Bs, WEIGHTS)
    A_g, B_g, sigma = florist(A_st, B_st, 1.0)
    assert A_g.dtype == B_g.dtype == torch.float32
    assert A_g.shape == (sum(RANKS), D_IN) and sigma.shape == (sum(RANKS),)
    assert rel_err(lora_product(A_g, B_g), lora_product(A_st, B_st)) <= 1e-5


def test_florist_matches_dense_svd_truncation():
    As, Bs = clients()
    A_g, B_g, sigma = florist(*stack_factors(As, Bs, WEIGHTS), 0.9)
    k = A_g.shape[0]
    assert 1 <= k < sum(RANKS)
    A_d, B_d = dense_svd_factors(weighted_product_sum(As, Bs, WEIGHTS), k)
    assert rel_err(lora_product(A_g, B_g), lora_product(A_d, B_d)) <= 1e-4


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_florist_kept_spectrum_sorted_and_holds_tau(tau):
    As, Bs = clients(dtype=torch.float64, seed=2)
    A_g, B_g, sigma = florist(*stack_factors(As, Bs, WEIGHTS), tau)
    k = A_g.shape[0]
    assert torch.all(sigma[:-1] >= sigma[1:])
    energy = sigma**2 / (sigma**2).sum()
    assert energy[:k].sum() >= tau > energy[: k - 1].sum()
    # B_g's columns carry the kept singular values, A_g's rows are orthonormal
    assert torch.allclose(torch.linalg.norm(B_g, dim=0), sigma[:k])
    assert torch.allclose(A_g @ A_g.T, torch.eye(k, dtype=torch.float64), atol=1e-10)


def test_errors():
    As, Bs = clients()
    with pytest.raises(ValueError, match="empty"):
        stack_factors([], [], [])
    with pytest.raises(ValueError, match="LoRA factors need"):
        fit_rank(As[0], Bs[1], 2)
    with pytest.raises(ValueError, match="rank must be"):
        fit_rank(As[0], Bs[0], 0)
    with pytest.raises(ValueError, match="differ"):
        zero_pad_mean([As[0], As[1][:, :10]], [Bs[0], Bs[1]], [1, 1])
    with pytest.raises(ValueError, match="differ"):
        weighted_product_sum([As[0], As[1]], [Bs[0], Bs[1][:10]], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        stack_factors(As, Bs, [1.0])
    with pytest.raises(ValueError, match="τ"):
        energy_rank(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="rank"):
        dense_svd_factors(torch.ones(4, 3), 4)


def test_a_model_carries_named_lora_adapters_each_found_and_fitted_by_name(tiny_llama_dir):
    """Two LoRA adapters on one model (e.g. a shared and a private one): each under its own name, both in the
    forward pass once active, and the factor helpers find and cut each adapter's factors by name."""
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.models.base import load_causal_lm
    from fedtune.models.lora import (
        adapted_base_weights, apply_lora, fit_lora_rank, lora_adapters, lora_factor_names, lora_modules,
        trainable_state,
    )

    torch.manual_seed(0)
    base, _ = load_causal_lm(ModelConfig(name=str(tiny_llama_dir)))
    model = apply_lora(base, LoraConfig(r=4, alpha=8), "sft", adapter_name="shared")
    model = apply_lora(model, LoraConfig(r=2, alpha=4), "sft", adapter_name="private")
    model.base_model.set_adapter(["shared", "private"])
    state = trainable_state(model)
    assert lora_adapters(state) == ["shared", "private"]
    shared, private = lora_modules(state, "shared"), lora_modules(state, "private")
    assert shared.keys() == private.keys() and len(shared) == 4  # q_proj and v_proj of 2 layers
    module = next(iter(shared))
    assert shared[module] == lora_factor_names(module, "shared") and state[private[module][0]].shape[0] == 2
    assert not lora_modules(state)  # no adapter named "default"
    cut = fit_lora_rank(state, 1)
    assert all(cut[a].shape[0] == 1 and cut[b].shape[1] == 1 for ab in (*shared.values(), *private.values())
               for a, b in [ab])
    assert len(adapted_base_weights(model)) == 4
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        for name, t in state.items():
            if "lora_B" in name:
                dict(model.named_parameters())[name].normal_()
        both = model(input_ids=ids).logits
        model.base_model.set_adapter("shared")
        alone = model(input_ids=ids).logits
    assert not torch.allclose(both, alone)  # the private adapter takes part once active
