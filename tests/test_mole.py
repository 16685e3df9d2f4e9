"""The AMoLE layer: routing over the client's own experts, top-k renormalisation, load balancing, by hand."""

import math

import pytest
import torch

from fedtune.models.mole import MoleLinear


def _layer(num_experts=4, r=2, top_k=2, d_in=3, d_out=2):
    torch.manual_seed(0)
    layer = MoleLinear(torch.nn.Linear(d_in, d_out), num_experts, r, alpha=4.0, dropout=0.0, top_k=top_k)
    for e in (*layer.experts, layer.shared):
        torch.nn.init.normal_(e.B)  # non-zero B, so every expert contributes
    return layer


def test_the_output_is_the_hand_computed_mixture_over_local_experts():
    layer = _layer()
    layer.set_local([0, 2, 3])
    x = torch.randn(5, 3)
    y = layer(x).detach()
    s = layer.scale
    with torch.no_grad():
        for i in range(5):
            xi = x[i]
            t = layer.token_proj.weight @ xi
            scores = {e: float((layer.experts[e].A @ xi) @ t) / math.sqrt(layer.r) for e in (0, 2, 3)}
            z = sum(math.exp(v) for v in scores.values())
            p = {e: math.exp(v) / z for e, v in scores.items()}  # softmax over the local experts only
            top = sorted(p, key=p.get, reverse=True)[:2]
            expected = layer.base(xi) + s * layer.shared.B @ (layer.shared.A @ xi)
            for e in top:
                expected = expected + p[e] / sum(p[j] for j in top) * s * layer.experts[e].B @ (layer.experts[e].A @ xi)
            assert torch.allclose(y[i], expected, atol=1e-5)


def test_an_expert_the_client_does_not_hold_gets_no_weight_and_no_gradient():
    layer = _layer()
    layer.set_local([1, 3])
    x = torch.randn(2, 4, 3)
    p, weights = layer.routing(x)
    assert p.shape[-1] == 2 and torch.allclose(weights.sum(-1), torch.ones(2, 4))
    layer(x).sum().backward()
    for e in (0, 2):
        assert layer.experts[e].A.grad is None and layer.experts[e].B.grad is None
    assert layer.experts[1].B.grad is not None and layer.token_proj.weight.grad is not None
    assert all(p.grad is None for p in layer.base.parameters())  # the base weight is frozen


def test_top_one_keeps_the_likeliest_local_expert_at_weight_one():
    layer = _layer(top_k=1)
    layer.set_local([0, 1, 2])
    p, weights = layer.routing(torch.randn(6, 3))
    assert torch.equal(weights.argmax(-1), p.argmax(-1)) and torch.equal(weights.max(-1).values, torch.ones(6))


def test_the_load_balancing_loss_on_a_constructed_case():
    """Two local experts, top-1, four tokens: p_0 = 0.9 on three tokens and 0.2 on one. Then f = (3/4, 1/4),
    P = (mean p_0, mean p_1) and the loss is N · f·P with N = 2."""
    layer = _layer(num_experts=2, r=1, top_k=1, d_in=2)
    with torch.no_grad():  # score_0 = x₀·x₀, score_1 = x₁·x₀
        layer.token_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.experts[0].A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.experts[1].A.copy_(torch.tensor([[0.0, 1.0]]))
    # (√ln 9, 0): scores (ln 9, 0), p_0 = 9/10;  (1, 1 + ln 4): scores (1, 1 + ln 4), p_0 = 1/5
    x = torch.tensor([[math.sqrt(math.log(9)), 0.0]] * 3 + [[1.0, 1.0 + math.log(4)]])
    layer.train()
    layer(x)
    p0 = torch.tensor([0.9, 0.9, 0.9, 0.2])
    f = torch.tensor([0.75, 0.25])
    assert float(layer.balance_loss.detach()) == pytest.approx(float(2 * (f * torch.stack([p0.mean(), 1 - p0.mean()])).sum()),
                                                      rel=1e-5)


def test_fresh_experts_leave_the_base_output_unchanged():
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)
    layer = MoleLinear(base, 4, 2, alpha=4.0, dropout=0.05, top_k=2).eval()
    x = torch.randn(3, 3)
    assert torch.allclose(layer(x), base(x))


def test_the_load_balancing_loss_at_top_two_is_the_reference_codes():
    """zyc140345/FedAMoLE model/mole/layer.py:33-41: routing_probs = softmax(scores); top-k; num_tokens =
    one_hot(selected).sum(0); P = routing_probs.mean(0); f = num_tokens / num_tokens.sum(); N · P·f."""
    torch.manual_seed(3)
    layer = _layer(num_experts=5, r=2, top_k=2, d_in=4)
    layer.set_local([0, 2, 3, 4])
    x = torch.randn(2, 7, 4)
    layer.train()
    layer(x)
    a = torch.cat([layer.experts[e].A for e in layer.local], dim=0)  # (num_experts * r, dim)
    flat = x.view(-1, 4)
    expert_embs = torch.nn.functional.linear(flat, a).view(flat.shape[0], -1, layer.r)
    scaled = torch.bmm(expert_embs, layer.token_proj(flat).unsqueeze(-1)).squeeze(-1) / math.sqrt(layer.r)
    routing_probs = torch.softmax(scaled, dim=-1)
    _, selected = routing_probs.topk(2, dim=-1)
    num_tokens = torch.nn.functional.one_hot(selected.view(-1), 4).sum(0)
    P = routing_probs.mean(dim=0)
    f = (num_tokens / num_tokens.sum()).to(dtype=P.dtype)
    assert float(layer.balance_loss) == pytest.approx(float(4 * torch.dot(P, f)), rel=1e-5)
