"""Activation functions (SPEC §3.2) against naive float64 loop implementations."""

from __future__ import annotations

import pytest
import torch

from crossint.crosscoder.activations import (
    batchtopk,
    decoder_weighted_l1,
    jumprelu,
    jumprelu_l0,
    relu,
    threshold_activation,
    topk,
)

B, H = 6, 17


def _pre(seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, generator=g, dtype=torch.float64) + shift


def naive_topk(pre, k):
    out = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        row = pre[b].tolist()
        for h in sorted(range(len(row)), key=lambda i: -row[i])[:k]:
            out[b, h] = max(row[h], 0.0)
    return out


@pytest.mark.parametrize("k", [1, 3, H - 1])
@pytest.mark.parametrize("shift", [0.0, -1.5])
def test_topk_matches_naive(k, shift):
    pre = _pre(1, shift)
    torch.testing.assert_close(topk(pre, k), naive_topk(pre, k), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("shift", [0.0, -1.0, -3.0])
def test_batchtopk_matches_naive(k, shift):
    pre = _pre(2, shift)
    flat = pre.flatten().tolist()
    chosen = sorted(range(len(flat)), key=lambda i: -flat[i])[: k * B]
    want = torch.zeros(B * H, dtype=torch.float64)
    for i in chosen:
        want[i] = max(flat[i], 0.0)
    positives = [flat[i] for i in chosen if flat[i] > 0]
    f, smallest = batchtopk(pre, k)
    torch.testing.assert_close(f, want.view(B, H), rtol=0, atol=0)
    # The smallest selected value that actually fires (ReLU applied, SPEC §3.2).
    assert smallest.item() == (min(positives) if positives else 0.0)
    assert (f >= 0).all()
    assert (f != 0).sum() <= k * B


def test_batchtopk_never_keeps_negative_values():
    pre = _pre(3, shift=-5.0)  # almost everything negative: the paper's code would keep them
    f, smallest = batchtopk(pre, 4)
    assert (f >= 0).all()
    assert smallest.item() >= 0


def test_threshold_activation_matches_naive():
    pre = _pre(4)
    theta = torch.linspace(-0.5, 0.8, H, dtype=torch.float64)
    want = torch.tensor(
        [[pre[b, h].item() if pre[b, h] > theta[h] else 0.0 for h in range(H)] for b in range(B)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(threshold_activation(pre, theta), want, rtol=0, atol=0)


def test_relu_matches_naive():
    pre = _pre(5)
    want = torch.tensor([[max(v, 0.0) for v in row] for row in pre.tolist()], dtype=torch.float64)
    torch.testing.assert_close(relu(pre), want, rtol=0, atol=0)


def _naive_jumprelu_grads(pre, theta, eps, upstream):
    """Rajamanoharan et al. (2024): df/dpre = 1[pre > θ], df/dθ = −(θ/ε)·K((pre − θ)/ε)."""
    g_pre = torch.zeros_like(pre)
    g_theta = torch.zeros_like(theta)
    for b in range(pre.shape[0]):
        for h in range(pre.shape[1]):
            z, t = pre[b, h].item(), theta[h].item()
            g_pre[b, h] = upstream[b, h] * (1.0 if z > t else 0.0)
            kernel = 1.0 if abs((z - t) / eps) < 0.5 else 0.0
            g_theta[h] += upstream[b, h].item() * (-(t / eps) * kernel)
    return g_pre, g_theta


def test_jumprelu_forward_and_straight_through_gradients():
    g = torch.Generator().manual_seed(6)
    eps = 0.3  # wide enough that many entries fall inside the kernel
    pre = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    theta = (0.2 + 0.3 * torch.rand(H, generator=g, dtype=torch.float64)).requires_grad_(True)
    upstream = torch.randn(B, H, generator=g, dtype=torch.float64)
    f = jumprelu(pre, theta, eps)
    torch.testing.assert_close(f, threshold_activation(pre, theta), rtol=0, atol=0)
    (f * upstream).sum().backward()
    want_pre, want_theta = _naive_jumprelu_grads(pre.detach(), theta.detach(), eps, upstream)
    torch.testing.assert_close(pre.grad, want_pre)
    torch.testing.assert_close(theta.grad, want_theta)
    assert theta.grad.abs().sum() > 0  # the kernel actually caught some entries


def test_jumprelu_l0_value_and_threshold_gradient():
    g = torch.Generator().manual_seed(7)
    eps = 0.4
    pre = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(H, generator=g, dtype=torch.float64).requires_grad_(True)
    l0 = jumprelu_l0(pre, theta, eps)
    count = sum(
        1 for b in range(B) for h in range(H) if pre[b, h].item() > theta[h].item()
    )
    assert l0.item() == pytest.approx(count / B)
    l0.backward()
    want = torch.zeros(H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            if abs((pre[b, h].item() - theta[h].item()) / eps) < 0.5:
                want[h] += -(1.0 / eps) / B
    torch.testing.assert_close(theta.grad, want)
    assert torch.equal(pre.grad, torch.zeros_like(pre))  # STE: no gradient to pre from L0
    assert want.abs().sum() > 0


def test_decoder_weighted_l1_matches_naive():
    g = torch.Generator().manual_seed(8)
    X, D = 3, 4
    f = torch.rand(B, H, generator=g, dtype=torch.float64)
    W = torch.randn(H, X, D, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(B):
        for h in range(H):
            norms = sum(sum(W[h, x, d].item() ** 2 for d in range(D)) ** 0.5 for x in range(X))
            total += f[b, h].item() * norms
    assert decoder_weighted_l1(f, W).item() == pytest.approx(total / B, rel=1e-12)
