"""Sparse decoding (SPEC §3.1): gather the active decoder rows instead of a dense B×H·H×XD product.

The gather-sum is ``torch.nn.functional.embedding_bag`` (mode "sum" with per-sample weights): it
never materialises the B×K×XD gathered rows, it accepts a different number of active features
per token (BatchTopK, JumpReLU), and its backward gives gradients for both the decoder rows and
the feature values. Cost: O(B·K·XD) instead of O(B·H·XD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SparseCodes:
    """The non-zero features of a batch, grouped by token (the "bags" of ``embedding_bag``).

    Token b's features are ``indices_E[offsets_B[b]:offsets_B[b+1]]`` with values ``values_E``
    at the same places (the last token runs to the end).
    """

    indices_E: Tensor  # int64 feature index of every non-zero
    values_E: Tensor  # its activation (differentiable)
    offsets_B: Tensor  # int64 start of every token's run in indices_E

    @property
    def n_tokens(self) -> int:
        return self.offsets_B.shape[0]


def sparse_codes(f_BH: Tensor) -> SparseCodes:
    """Extract the non-zeros of ``f_BH``; ``values_E`` keeps the gradient path to ``f_BH``."""
    rows_E, cols_E = f_BH.detach().nonzero(as_tuple=True)  # row-major, so grouped by token
    offsets_B = torch.searchsorted(rows_E, torch.arange(f_BH.shape[0], device=f_BH.device))
    return SparseCodes(indices_E=cols_E, values_E=f_BH[rows_E, cols_E], offsets_B=offsets_B)


def sparse_decode(codes: SparseCodes, W_dec_HXD: Tensor) -> Tensor:
    """Σ_h f_bh W_dec[h] over the active features only; returns (B, X, D) without decoder bias."""
    n_features, n_positions, d_model = W_dec_HXD.shape
    out_BF = F.embedding_bag(
        codes.indices_E,
        W_dec_HXD.reshape(n_features, n_positions * d_model),
        codes.offsets_B,
        mode="sum",
        per_sample_weights=codes.values_E.to(W_dec_HXD.dtype),
    )
    return out_BF.view(codes.n_tokens, n_positions, d_model)


def dense_decode(f_BH: Tensor, W_dec_HXD: Tensor) -> Tensor:
    """The dense product einsum('bh,hxd->bxd'), for dense activations and as the reference."""
    n_features, n_positions, d_model = W_dec_HXD.shape
    out_BF = f_BH @ W_dec_HXD.reshape(n_features, n_positions * d_model)
    return out_BF.view(f_BH.shape[0], n_positions, d_model)


def decode_features(f_BH: Tensor, W_dec_HXD: Tensor, sparse: bool) -> Tensor:
    """Decode ``f_BH`` (no bias), gathering active rows when ``sparse``."""
    if sparse:
        return sparse_decode(sparse_codes(f_BH), W_dec_HXD)
    return dense_decode(f_BH, W_dec_HXD)
