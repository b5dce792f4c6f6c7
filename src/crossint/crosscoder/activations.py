"""Crosscoder activation functions (SPEC §3.2) and their sparsity penalties (SPEC §3.3).

Pure functions of the pre-activations ``pre_BH``; every one returns a dense ``f_BH`` that is
exactly zero outside the active features (the model decodes the non-zeros sparsely).
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk(pre_BH: Tensor, k: int) -> Tensor:
    """SPEC §3.2 TopK: keep the k largest pre-activations per token, ReLU them, zero the rest."""
    values_BK, indices_BK = pre_BH.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BH).scatter(-1, indices_BK, values_BK.relu())


def batchtopk(pre_BH: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """SPEC §3.2 BatchTopK: keep the k·B largest pre-activations of the whole batch, then ReLU.

    Returns ``(f_BH, smallest_selected)`` where ``smallest_selected`` (a detached 0-d tensor) is the
    smallest *positive* selected value, the quantity whose running mean is the inference threshold
    θ. A selected value <= 0 is zeroed by the ReLU and never fires, so it must not lower θ below 0
    (a negative θ would let negative pre-activations through ``pre·1[pre > θ]``).
    """
    n_tokens, n_features = pre_BH.shape
    flat_N = pre_BH.reshape(-1)
    values_S, indices_S = flat_N.topk(min(k * n_tokens, flat_N.numel()), sorted=False)
    values_S = values_S.relu()
    f_BH = torch.zeros_like(flat_N).scatter(0, indices_S, values_S).view(n_tokens, n_features)
    detached_S = values_S.detach()
    positive_min = torch.where(detached_S > 0, detached_S, torch.inf).min()
    smallest = torch.where(torch.isinf(positive_min), torch.zeros_like(positive_min), positive_min)
    return f_BH, smallest


def threshold_activation(pre_BH: Tensor, threshold_H: Tensor) -> Tensor:
    """Inference form of BatchTopK and JumpReLU: ``f = pre · 1[pre > θ]`` (per token, no batch)."""
    return torch.where(pre_BH > threshold_H, pre_BH, torch.zeros_like(pre_BH))


def relu(pre_BH: Tensor) -> Tensor:
    """SPEC §3.2 ReLU (trained with the decoder-norm-weighted L1 penalty)."""
    return pre_BH.relu()


def _rectangle_BH(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((pre − θ)/ε) with K(u) = 1[|u| < 1/2]."""
    return ((pre_BH - threshold_H).abs() < bandwidth / 2).to(pre_BH.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """JumpReLU with the straight-through estimator of Rajamanoharan et al. (2024).

    d f/d pre = 1[pre > θ];  d f/d θ = −(θ/ε)·K((pre − θ)/ε)  (rectangle kernel K).
    """

    @staticmethod
    def forward(ctx, pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BH, threshold_H)
        ctx.bandwidth = bandwidth
        return torch.where(pre_BH > threshold_H, pre_BH, torch.zeros_like(pre_BH))

    @staticmethod
    def backward(ctx, grad_BH: Tensor):
        pre_BH, threshold_H = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_pre = grad_BH * (pre_BH > threshold_H).to(grad_BH.dtype)
        if ctx.needs_input_grad[1]:
            kernel_BH = _rectangle_BH(pre_BH, threshold_H, ctx.bandwidth)
            grad_threshold = (-(threshold_H / ctx.bandwidth) * kernel_BH * grad_BH).sum_to_size(
                threshold_H.shape
            )
        return grad_pre, grad_threshold, None


class _StepFunction(torch.autograd.Function):
    """Heaviside step 1[pre > θ] with d/dθ = −(1/ε)·K((pre − θ)/ε) and no gradient to pre."""

    @staticmethod
    def forward(ctx, pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BH, threshold_H)
        ctx.bandwidth = bandwidth
        return (pre_BH > threshold_H).to(pre_BH.dtype)

    @staticmethod
    def backward(ctx, grad_BH: Tensor):
        pre_BH, threshold_H = ctx.saved_tensors
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            kernel_BH = _rectangle_BH(pre_BH, threshold_H, ctx.bandwidth)
            grad_threshold = (-(1.0 / ctx.bandwidth) * kernel_BH * grad_BH).sum_to_size(
                threshold_H.shape
            )
        grad_pre = torch.zeros_like(pre_BH) if ctx.needs_input_grad[0] else None
        return grad_pre, grad_threshold, None


def jumprelu(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """SPEC §3.2 JumpReLU ``pre · 1[pre > θ_H]`` with the rectangle-kernel STE for θ."""
    return _JumpReLUFunction.apply(pre_BH, threshold_H, bandwidth)


def jumprelu_l0(pre_BH: Tensor, threshold_H: Tensor, bandwidth: float) -> Tensor:
    """Mean number of active features per token, differentiable in θ through the STE."""
    return _StepFunction.apply(pre_BH, threshold_H, bandwidth).sum(dim=-1).mean()


def decoder_weighted_l1(f_BH: Tensor, W_dec_HXD: Tensor) -> Tensor:
    """SPEC §3.2 ReLU penalty: mean over tokens of Σ_h f_h Σ_x ‖W_dec[h, x]‖."""
    norm_H = W_dec_HXD.norm(dim=-1).sum(dim=-1)
    return (f_BH * norm_H).sum(dim=-1).mean()
