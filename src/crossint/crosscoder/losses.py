"""Training losses and metrics of the crosscoder (SPEC §3.3, §3.6) as pure tensor functions.

All inputs are in normalised units (SPEC §3.4), where every position has E‖a_x‖ = sqrt(D).
"""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(acts_norm_BXD: Tensor, recon_norm_BXD: Tensor) -> Tensor:
    """SPEC §3.3 L_rec = mean_b Σ_x ‖a_bx·s_x − â_bx·s_x‖²."""
    return (acts_norm_BXD - recon_norm_BXD).pow(2).sum(dim=(1, 2)).mean()


def fvu_X(acts_BXD: Tensor, recon_BXD: Tensor) -> Tensor:
    """SPEC §3.6 FVU per position ‖a − â‖² / ‖a − ā‖² (sums over the batch; ā = batch mean)."""
    error_X = (acts_BXD - recon_BXD).pow(2).sum(dim=(0, 2))
    variance_X = (acts_BXD - acts_BXD.mean(dim=0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return error_X / variance_X


def token_variance(acts_norm_BXD: Tensor) -> Tensor:
    """mean_b Σ_x ‖a_bx − ā_x‖² (detached): L_rec's value for a constant (mean) reconstruction.

    The trainer weights L_aux by it so that L_rec and α_aux·L_aux share a unit.
    """
    centred_BXD = acts_norm_BXD.detach() - acts_norm_BXD.detach().mean(dim=0, keepdim=True)
    return centred_BXD.pow(2).sum(dim=(1, 2)).mean()


def auxk_loss(
    pre_BH: Tensor,
    W_dec_HXD: Tensor,
    dead_U: Tensor,
    residual_BXD: Tensor,
    acts_norm_BXD: Tensor,
    k_aux: int,
    variance: Tensor | None = None,
) -> Tensor:
    """SPEC §3.3 L_aux = ‖e − ê‖² / ‖a − mean_b a‖².

    ê decodes, per token, the top-``k_aux`` of the DEAD features' PRE-activations (ReLU'd, as in
    the TopK activation); the live features' selection plays no part, so dead features get
    gradient through both their encoder (via pre) and decoder rows. ``residual_BXD`` = a − â is
    the target and must be detached by the caller. ``dead_U`` holds the dead features' indices.
    ``variance``: the denominator when the batch is larger than ``acts_norm_BXD`` (a
    data-parallel rank's share of it); by default this batch's ‖a − mean_b a‖².
    """
    n_dead = dead_U.shape[0]
    if n_dead == 0:
        return pre_BH.new_zeros(())
    H, X, D = W_dec_HXD.shape
    pre_dead_BU = pre_BH[:, dead_U]
    if k_aux < n_dead:
        values_BK, indices_BK = pre_dead_BU.topk(k_aux, dim=-1, sorted=False)
        f_aux_BU = torch.zeros_like(pre_dead_BU).scatter(-1, indices_BK, values_BK.relu())
    else:
        f_aux_BU = pre_dead_BU.relu()
    # Dense over the dead subset only: cost B·U·XD, small once most features are alive.
    e_hat_BF = f_aux_BU @ W_dec_HXD[dead_U].reshape(n_dead, X * D)
    residual_BF = residual_BXD.reshape(residual_BXD.shape[0], X * D)
    if variance is None:
        variance = (acts_norm_BXD - acts_norm_BXD.mean(dim=0, keepdim=True)).pow(2).sum()
    return (residual_BF - e_hat_BF).pow(2).sum() / variance


def update_dead_counter(tokens_since_fired_H: Tensor, f_BH: Tensor) -> Tensor:
    """Tokens since each feature last fired, after one more batch (0 if it fired in it)."""
    return advance_dead_counter(tokens_since_fired_H, (f_BH != 0).any(dim=0), f_BH.shape[0])


def advance_dead_counter(tokens_since_fired_H: Tensor, fired_H: Tensor, n_tokens: int) -> Tensor:
    """Tokens since each feature last fired, after a batch of ``n_tokens`` in which the features
    ``fired_H`` fired."""
    return torch.where(fired_H, torch.zeros_like(tokens_since_fired_H),
                       tokens_since_fired_H + n_tokens)


def learning_rate(
    step: int, steps: int, lr: float, warmup_fraction: float, decay_fraction: float
) -> float:
    """SPEC §3.3 schedule for 0-based ``step``: linear warm-up over the first ``warmup_fraction``
    of the steps, constant, then linear decay to 0 over the last ``decay_fraction``."""
    warmup = round(warmup_fraction * steps)
    decay = round(decay_fraction * steps)
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if decay > 0 and step >= steps - decay:
        return lr * (steps - step) / decay
    return lr
