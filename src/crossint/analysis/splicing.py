"""Splicing reconstructions back into the model and the loss-recovered metric (SPEC §6).

One implementation serves `crossint eval` (CE recovered per hookpoint, SPEC §6.2) and the fidelity
analysis (Φ per keep/drop scheme, SPEC §6.1): both are the same ratio of next-token losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def loss_recovered(loss_model: float, loss_patched: float, loss_ablated: float) -> float:
    """SPEC §6.1/§6.2: ``(L_ablated − L_patched) / (L_ablated − L_model)``.

    1 when the patch is as good as the model, 0 when it is as bad as the ablation. Equals
    ``Φ = 1 − (L_scheme − L_model) / (L_zero − L_model)``. NaN when the ablation costs nothing.
    """
    denominator = loss_ablated - loss_model
    if denominator == 0:
        return float("nan")
    return (loss_ablated - loss_patched) / denominator


def replace_where(replacement_BSD: Tensor, keep_BS: Tensor) -> Callable[[Tensor], Tensor]:
    """A hookpoint patch that writes ``replacement`` at positions where ``keep`` is False.

    Positions flagged ``keep`` (special tokens such as BOS, which the crosscoder never saw) keep
    the model's own activation, so splicing measures the crosscoder and not an out-of-distribution
    position.
    """

    def patch(original_BSD: Tensor) -> Tensor:
        new_BSD = replacement_BSD.to(dtype=original_BSD.dtype, device=original_BSD.device)
        return torch.where(keep_BS[..., None].to(original_BSD.device), original_BSD, new_BSD)

    return patch
