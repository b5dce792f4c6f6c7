"""Splicing reconstructions back into the model and the loss-recovered metric (SPEC §6).

One implementation serves `crossint eval` (CE recovered per hookpoint, SPEC §6.2) and the fidelity
analysis (Φ per keep/drop scheme, SPEC §6.1): both are the same ratio of next-token losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from crossint.models.adapter import BlockInput

# Logits entries (1 GiB in float32) of one stacked pass of :func:`variant_losses`: the logits,
# tokens × vocabulary, are the largest tensor of a pass, so they bound how many variants share it.
STACKED_LOGITS = 2**28


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


@torch.no_grad()
def variant_losses(adapter: Any, ids_BS: Tensor, replaced_BS: Tensor, start: BlockInput,
                   variants: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Next-token losses (B, S−1) of the model with each variant's replacements
    ``{hookpoint: (B, S, D)}`` written in where ``replaced_BS`` is True (elsewhere, at special
    tokens, the model keeps its own activations; see :func:`replace_where`).

    Every variant patches the same hookpoints, all in ``start.block`` or later, so each pass
    starts there from the unpatched residual stream, and the variants ride along the batch
    axis (several per pass, up to ``STACKED_LOGITS`` logits)."""
    names = list(variants)
    per_pass = max(1, STACKED_LOGITS // (ids_BS.numel() * adapter.vocab_size))
    losses: dict[str, Tensor] = {}
    for first in range(0, len(names), per_pass):
        chunk = names[first : first + per_pass]
        n = len(chunk)
        original_BS = ~replaced_BS.repeat(n, 1)
        patches = {
            hookpoint: replace_where(torch.cat([variants[v][hookpoint] for v in chunk]),
                                     original_BS)
            for hookpoint in variants[chunk[0]]
        }
        stacked = BlockInput(start.block, start.resid_pre_BSD.repeat(n, 1, 1))
        losses_BS = adapter.token_losses(ids_BS.repeat(n, 1), patches=patches, start=stacked)
        losses.update(zip(chunk, losses_BS.split(len(ids_BS)), strict=True))
    return losses


class TextLosses:
    """Next-token losses summed per held-out text under named variants ("model", a splice, an
    ablation, a scheme), so that every SPEC §6 ratio is a ratio of means and can be bootstrapped
    over texts. Call :meth:`new_batch` with the batch's loss mask, then :meth:`add` once per
    variant with that batch's (B, S−1) losses."""

    def __init__(self) -> None:
        self._counts: list[Tensor] = []
        self._sums: dict[str, list[Tensor]] = {}
        self._mask_BS: Tensor | None = None

    def new_batch(self, mask_BS: Tensor) -> None:
        self._mask_BS = mask_BS.bool()
        self._counts.append(self._mask_BS.sum(dim=1).double().cpu())

    def add(self, key: str, loss_BS: Tensor) -> None:
        if self._mask_BS is None:
            raise RuntimeError("TextLosses.add before new_batch")
        parts = self._sums.setdefault(key, [])
        if len(parts) != len(self._counts) - 1:
            raise RuntimeError(f"variant {key!r} missed a batch or was added twice")
        mask_BS = self._mask_BS.to(loss_BS.device)
        per_text_B = torch.where(mask_BS, loss_BS.double(), 0.0).sum(dim=1)
        parts.append(per_text_B.cpu())

    @property
    def n_texts(self) -> int:
        return sum(len(c) for c in self._counts)

    @property
    def n_tokens(self) -> int:
        return int(sum(float(c.sum()) for c in self._counts))

    def sums(self, key: str) -> Tensor:
        """Per-text loss sums (C,) of one variant."""
        parts = self._sums.get(key)
        if parts is None or len(parts) != len(self._counts):
            raise RuntimeError(f"variant {key!r} was not added for every batch")
        return torch.cat(parts)

    def mean(self, key: str) -> float:
        """Mean loss per token of one variant (ratio of means over texts)."""
        return float(self.sums(key).sum()) / max(self.n_tokens, 1)

    def recovered(self, patched: str, ablated: str, model: str = "model") -> float:
        """:func:`loss_recovered` of ``patched`` against ``ablated`` (SPEC §6.1/§6.2)."""
        return loss_recovered(self.mean(model), self.mean(patched), self.mean(ablated))

    def resample_weights(self, n_resamples: int, seed: int) -> Tensor:
        """(R, C) multiplicities of a text bootstrap: row r counts how often resample r drew
        each text. The same weights for every variant keep paired comparisons paired."""
        n_texts = self.n_texts
        g = torch.Generator().manual_seed(seed)
        draws_RC = torch.randint(n_texts, (n_resamples, n_texts), generator=g)
        weights_RC = torch.zeros(n_resamples, n_texts, dtype=torch.float64)
        return weights_RC.scatter_add_(1, draws_RC, torch.ones_like(weights_RC))

    def recovered_samples(
        self, patched: str, ablated: str, weights_RC: Tensor, model: str = "model"
    ) -> Tensor:
        """Loss recovered under each bootstrap resample (R,). The token counts cancel: with
        per-text sums, (ΣL_ablated − ΣL_patched) / (ΣL_ablated − ΣL_model)."""
        model_R = weights_RC @ self.sums(model)
        ablated_R = weights_RC @ self.sums(ablated)
        patched_R = weights_RC @ self.sums(patched)
        return (ablated_R - patched_R) / (ablated_R - model_R)


def percentile_interval(samples_R: Tensor, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap samples (NaNs ignored)."""
    finite_R = samples_R[torch.isfinite(samples_R)]
    if finite_R.numel() == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(finite_R, torch.tensor([tail, 1.0 - tail], dtype=finite_R.dtype))
    return [float(low), float(high)]
