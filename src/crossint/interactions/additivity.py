"""Independent effects (SPEC §4.7): each active feature's effect on an MLP alone, their sum, and
how far the MLP of the whole reconstruction is from it.

Block l's MLP reads a reconstruction ``x̂ = c + Σ_h q_h`` (``q_h = f_h·d_h``; c = the decoder
bias, the part no feature carries). The **independent-effects surrogate** is

    MLP_ind(x̂) = MLP(c) + Σ_h [MLP(c + q_h) − MLP(c)]

and the **additivity error** ``A = ‖MLP(x̂) − MLP_ind(x̂)‖`` per token. At the neurons this is

    post(x̂) − post_ind(x̂) = h(c + Σ_k p_k) − h(c) − Σ_k [h(c + p_k) − h(c)]

with ``h`` the neuron's nonlinearity: ``φ(z)`` for a plain MLP, ``φ(g)·u`` for a gated one, whose
gate and up projections both split by feature (so a gated MLP is not additive even where φ is
linear). ``A = ‖(post − post_ind)·W_out‖`` (b_out cancels). It is zero exactly when the active
features pass through the MLP independently, and it leaves a neuron that stays in a linear or off
regime free to be shared by several features.

The **keep-dominant surrogate** (SPEC §6.1 ``keep_largest``, :func:`kept_post`) keeps at every
neuron only its dominant feature's gate contribution (the up projection keeps its full value, as
in §4.3).

Everything here is a pure function of one chunk of tokens (:class:`MLPTerms`), differentiable in
the feature activations and the decoder rows; the penalties and the fidelity surrogates call the
same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from crossint.interactions.contributions import (
    ActiveFeatures,
    MLPFeatureBlock,
    active_features,
    compute_dtype,
    resolve_chunk,
)


@dataclass(frozen=True)
class MLPTerms:
    """One chunk of tokens at one block, split by feature: the gate (or plain) contributions
    ``p_BKN``, the up projection's ``pu_BKN`` (gated MLPs; None otherwise), and the constant
    parts ``c_N`` / ``cu_N`` that no feature carries."""

    p_BKN: Tensor
    c_N: Tensor
    pu_BKN: Tensor | None = None
    cu_N: Tensor | None = None
    mask_BK: Tensor | None = None  # the active slots (padding slots hold p = 0)

    @property
    def gated(self) -> bool:
        return self.pu_BKN is not None


def neuron_output(act: Callable[[Tensor], Tensor], z: Tensor, u: Tensor | None) -> Tensor:
    """h(z, u): φ(z), or φ(z)·u for a gated MLP (z the gate pre-activation, u the up value)."""
    post = act(z)
    return post if u is None else post * u


def full_post(terms: MLPTerms, act: Callable[[Tensor], Tensor]) -> Tensor:
    """What the output linear reads for the whole reconstruction (B×N)."""
    z_BN = terms.c_N + terms.p_BKN.sum(dim=1)
    u_BN = None if terms.pu_BKN is None else terms.cu_N + terms.pu_BKN.sum(dim=1)
    return neuron_output(act, z_BN, u_BN)


def independent_post(terms: MLPTerms, act: Callable[[Tensor], Tensor]) -> Tensor:
    """SPEC §4.7 at the neurons: h(c) + Σ_k [h(c + p_k) − h(c)] (B×N). Padding slots (p = 0)
    add exactly nothing."""
    base_N = neuron_output(act, terms.c_N, terms.cu_N)
    u_BKN = None if terms.pu_BKN is None else terms.cu_N + terms.pu_BKN
    single_BKN = neuron_output(act, terms.c_N + terms.p_BKN, u_BKN)
    return base_N + (single_BKN - base_N).sum(dim=1)


def full_up(terms: MLPTerms) -> Tensor | None:
    """A gated MLP's up value of the whole reconstruction, cu + Σ_k pu (None if not gated):
    the surrogates that select gate contributions keep it whole, as the SPEC §4.3 gap does."""
    return None if terms.pu_BKN is None else terms.cu_N + terms.pu_BKN.sum(dim=1)


def kept_post(terms: MLPTerms, act: Callable[[Tensor], Tensor], kept_BN: Tensor) -> Tensor:
    """The neurons when the gate reads c + ``kept_BN`` (the contributions a SPEC §6.1 scheme
    keeps) and the up projection its full value."""
    return neuron_output(act, terms.c_N + kept_BN, full_up(terms))


def output_norm_sq(post_BN: Tensor, W_out_ND: Tensor) -> Tensor:
    """‖post·W_out‖² per token (B,)."""
    return (post_BN @ W_out_ND).pow(2).sum(dim=-1)


def additivity_error(terms: MLPTerms, block: MLPFeatureBlock) -> Tensor:
    """SPEC §4.7 A = ‖MLP(x̂) − MLP_ind(x̂)‖ per token (B,)."""
    act = block.mlp.act
    gap_BN = full_post(terms, act) - independent_post(terms, act)
    return output_norm_sq(gap_BN, block.mlp.W_out_ND).sqrt()


# --- the terms of a batch, chunk by chunk --------------------------------------------------------
def constant_terms(block: MLPFeatureBlock) -> tuple[Tensor, Tensor | None]:
    """(c_N, cu_N): the pre-activations of the decoder bias alone (cu_N: gated MLPs' up)."""
    mlp = block.mlp
    if not mlp.gated:
        return block.c_N, None
    assert mlp.W_up_DN is not None and mlp.b_up_N is not None
    return block.c_N, mlp.b_up_N + block.b_dec_D.to(mlp.W_up_DN.dtype) @ mlp.W_up_DN


def virtual_rows(active: ActiveFeatures, block: MLPFeatureBlock) -> tuple[Tensor, Tensor | None]:
    """V = d·W_in (and d·W_up for gated MLPs) of the batch's distinct active features (U×N)."""
    mlp = block.mlp
    dtype = compute_dtype(block.d_HD, mlp.W_in_DN)
    d_UD = block.d_HD[active.distinct_U].to(dtype)
    V_UN = d_UD @ mlp.W_in_DN.to(dtype)
    Vu_UN = None if mlp.W_up_DN is None else d_UD @ mlp.W_up_DN.to(dtype)
    return V_UN, Vu_UN


def iter_terms(active: ActiveFeatures, block: MLPFeatureBlock,
               chunk_tokens: int | None = None) -> Iterator[tuple[int, MLPTerms]]:
    """``(start, MLPTerms)`` per chunk of at most ``chunk_tokens`` tokens; V is computed once for
    the batch's distinct active features."""
    V_UN, Vu_UN = virtual_rows(active, block)
    c_N, cu_N = constant_terms(block)
    per_token = active.features_BK.shape[1] * V_UN.shape[1] * (1 if Vu_UN is None else 2)
    chunk_tokens = resolve_chunk(chunk_tokens, active.f_BK.device, per_token)
    for start in range(0, active.n_tokens, chunk_tokens):
        chunk = active.slice(start, min(start + chunk_tokens, active.n_tokens))
        k = chunk.features_BK.shape[1]
        f_BK1 = chunk.f_BK.to(V_UN.dtype)[:, :, None]
        rows_BK = chunk.row_BK[:, :k]
        pu_BKN = None if Vu_UN is None else f_BK1 * Vu_UN[rows_BK]
        yield start, MLPTerms(f_BK1 * V_UN[rows_BK], c_N, pu_BKN, cu_N, chunk.mask_BK)


# --- the penalties (SPEC §4.7): λ·mean over tokens and blocks -------------------------------------
def active_inputs(active: ActiveFeatures, block: MLPFeatureBlock) -> Tensor:
    """The part of the reconstructed ``mlp_in`` the features carry, Σ_k f_k·d_k (B×D), as one
    dense (B×U)·(U×D) product over the batch's distinct active features."""
    dtype = compute_dtype(block.d_HD, block.mlp.W_in_DN)
    rows_E = torch.arange(active.n_tokens, device=active.f_BK.device)[:, None].expand_as(
        active.row_BK)
    f_BU = active.f_BK.new_zeros((active.n_tokens, active.distinct_U.numel()), dtype=dtype)
    # Padding slots add f = 0 to an arbitrary row: accumulate so they never overwrite a value.
    f_BU = f_BU.index_put((rows_E.reshape(-1), active.row_BK.reshape(-1)),
                          active.f_BK.to(dtype).reshape(-1), accumulate=True)
    return f_BU @ block.d_HD[active.distinct_U].to(dtype)


def keep_error_penalty(active: ActiveFeatures, blocks: list[MLPFeatureBlock],
                       chunk_tokens: int | None = None) -> Tensor:
    """SPEC §4.7 ``keep_error``: the mean over blocks and tokens of
    ‖(h(z) − h(z_keep))·W_out‖², z_keep = c + the dominant feature's contribution at each neuron.

    The dominant slot is chosen without gradient (held fixed in the backward, SPEC §4.7). The
    full pre-activation comes from the carried input (B×D)·W_in and the kept one from a B×N
    gather, so nothing B×K×N is kept for the backward; the slot search is one fused pass."""
    from crossint.interactions.kernels import dominant_magnitudes

    active = active.by_count()
    total: Tensor | None = None
    for block in blocks:
        mlp = block.mlp
        V_UN, _ = virtual_rows(active, block)
        f_BK = active.f_BK.to(V_UN.dtype)
        chunk = resolve_chunk(chunk_tokens, f_BK.device, f_BK.shape[1] * V_UN.shape[1])
        with torch.no_grad():
            slot_BN, _, _ = dominant_magnitudes(f_BK.detach().abs(), V_UN.detach().abs(),
                                                active.row_BK, active.counts_B, chunk)
        slot_BN = slot_BN.to(torch.int64)
        p_keep_BN = f_BK.gather(1, slot_BN) * V_UN.gather(0, active.row_BK.gather(1, slot_BN))
        carried_BD = active_inputs(active, block)
        c_N, cu_N = constant_terms(block)
        u_BN = None if cu_N is None else carried_BD @ mlp.W_up_DN.to(V_UN.dtype) + cu_N
        full_BN = neuron_output(mlp.act, carried_BD @ mlp.W_in_DN.to(V_UN.dtype) + c_N, u_BN)
        kept_BN = neuron_output(mlp.act, p_keep_BN + c_N, u_BN)
        part = output_norm_sq(full_BN - kept_BN, mlp.W_out_ND.to(V_UN.dtype)).sum()
        total = part if total is None else total + part
    assert total is not None
    return total / max(active.n_tokens * len(blocks), 1)


def _chunk_additivity_sq(f_BK: Tensor, rows_BK: Tensor, V_UN: Tensor, Vu_UN: Tensor | None,
                         c_N: Tensor, cu_N: Tensor | None, act: Callable[[Tensor], Tensor],
                         W_out_ND: Tensor) -> Tensor:
    f_BK1 = f_BK[:, :, None]
    pu_BKN = None if Vu_UN is None else f_BK1 * Vu_UN[rows_BK]
    terms = MLPTerms(f_BK1 * V_UN[rows_BK], c_N, pu_BKN, cu_N)
    gap_BN = full_post(terms, act) - independent_post(terms, act)
    return output_norm_sq(gap_BN, W_out_ND).sum()


def additivity_penalty(active: ActiveFeatures, blocks: list[MLPFeatureBlock],
                       chunk_tokens: int | None = None) -> Tensor:
    """SPEC §4.7 ``additivity``: the mean over blocks and tokens of A² = ‖MLP(x̂) −
    MLP_ind(x̂)‖². Chunked over tokens with each chunk recomputed in the backward
    (activation checkpointing), so memory stays O(chunk·K·N) whatever the batch."""
    from torch.utils.checkpoint import checkpoint

    active = active.by_count()
    total: Tensor | None = None
    for block in blocks:
        mlp = block.mlp
        V_UN, Vu_UN = virtual_rows(active, block)
        c_N, cu_N = constant_terms(block)
        W_out_ND = mlp.W_out_ND.to(V_UN.dtype)
        f_BK = active.f_BK.to(V_UN.dtype)
        per_token = f_BK.shape[1] * V_UN.shape[1] * (1 if Vu_UN is None else 2)
        chunk = resolve_chunk(chunk_tokens, f_BK.device, per_token)
        for start in range(0, active.n_tokens, chunk):
            stop = min(start + chunk, active.n_tokens)
            k = max(int(active.counts_B[start]), 1)  # tokens are sorted by descending count
            part = checkpoint(_chunk_additivity_sq, f_BK[start:stop, :k],
                              active.row_BK[start:stop, :k], V_UN, Vu_UN, c_N, cu_N, mlp.act,
                              W_out_ND, use_reentrant=False)
            total = part if total is None else total + part
    assert total is not None
    return total / max(active.n_tokens * len(blocks), 1)


# --- measuring it over data ---------------------------------------------------------------------
class AdditivityMeter:
    """Per block, over batches of feature activations: the mean SPEC §4.7 additivity error A,
    the mean A² (what the ``additivity`` penalty trains) and, for scale, the mean size of the
    features' whole effect on the MLP ‖MLP(x̂) − MLP(c)‖."""

    def __init__(self, blocks: list[MLPFeatureBlock], chunk_tokens: int | None = None) -> None:
        self.blocks = blocks
        self.chunk_tokens = chunk_tokens
        self._sums = {b.block: [0.0, 0.0, 0.0] for b in blocks}
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, f_BH: Tensor) -> None:
        active = active_features(f_BH)
        for block in self.blocks:
            act, W_out_ND = block.mlp.act, block.mlp.W_out_ND
            sums = self._sums[block.block]
            for _, terms in iter_terms(active, block, self.chunk_tokens):
                full_BN = full_post(terms, act)
                error_B = output_norm_sq(full_BN - independent_post(terms, act), W_out_ND)
                base_N = neuron_output(act, terms.c_N, terms.cu_N)
                sums[0] += float(error_B.sqrt().double().sum())
                sums[1] += float(error_B.double().sum())
                sums[2] += float(output_norm_sq(full_BN - base_N, W_out_ND).sqrt().double().sum())
        self.n_tokens += active.n_tokens

    def result(self) -> dict[int, dict[str, float]]:
        n = max(self.n_tokens, 1)
        out = {}
        for block, (error, error_sq, effect) in self._sums.items():
            out[block] = {"additivity_error": error / n, "additivity_error_sq": error_sq / n,
                          "feature_effect": effect / n,
                          "additivity_fraction": error / effect if effect else float("nan")}
        return out


__all__ = [
    "AdditivityMeter", "MLPTerms", "active_inputs", "additivity_error", "additivity_penalty",
    "constant_terms", "full_post", "full_up", "independent_post", "iter_terms",
    "keep_error_penalty", "kept_post", "neuron_output", "output_norm_sq", "virtual_rows",
]
