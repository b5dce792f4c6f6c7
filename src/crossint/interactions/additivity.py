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
from torch.autograd.function import once_differentiable

from crossint.crosscoder.distributed import divide
from crossint.errors import CrossintError
from crossint.interactions.contributions import (
    ActiveFeatures,
    MLPFeatureBlock,
    Ratio,
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
    d_UD = block.d_HD.index_select(0, active.distinct_U).to(dtype)
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
class _KeepErrorSq(torch.autograd.Function):
    """Σ_b ‖(h(z) − h(z_keep))·W_out‖² for one block, with the dominant slot fixed and an
    analytic backward: the full pre-activations come from the carried input
    x_b = Σ_k f_bk·d_k (B×D, so the gradient on every slot is one B×D·D×N product and a B×K×D
    pass), the kept ones from one B×N gather, whose gradient is a B×N scatter."""

    @staticmethod
    def forward(ctx, f_BK, d_UD, row_BK, counts_B, c_N, cu_N, W_in_DN, W_up_DN, W_out_ND, act,  # noqa: ANN001
                chunk_tokens):
        from crossint.interactions.kernels import dominant_magnitudes

        V_UN = d_UD @ W_in_DN
        slot_BN, _, _ = dominant_magnitudes(f_BK.abs(), V_UN.abs(), row_BK, counts_B,
                                            chunk_tokens)
        slot_BN = slot_BN.to(torch.int64)
        dom_row_BN = row_BK.gather(1, slot_BN)
        f_dom_BN = f_BK.gather(1, slot_BN)
        V_dom_BN = V_UN.gather(0, dom_row_BN)
        x_BD = _carried(f_BK, d_UD, row_BK)
        z_BN, zk_BN = x_BD @ W_in_DN + c_N, c_N + f_dom_BN * V_dom_BN
        u_BN = None if W_up_DN is None else x_BD @ W_up_DN + cu_N
        e_BD = (neuron_output(act, z_BN, u_BN) - neuron_output(act, zk_BN, u_BN)) @ W_out_ND
        ctx.save_for_backward(f_BK, d_UD, row_BK, slot_BN, dom_row_BN, f_dom_BN, V_dom_BN,
                              z_BN, zk_BN, u_BN, e_BD, W_in_DN, W_up_DN, W_out_ND)
        ctx.act = act
        return e_BD.pow(2).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001
        from crossint.interactions.additivity_kernels import derivative

        (f_BK, d_UD, row_BK, slot_BN, dom_row_BN, f_dom_BN, V_dom_BN, z_BN, zk_BN, u_BN, e_BD,
         W_in_DN, W_up_DN, W_out_ND) = ctx.saved_tensors
        act = ctx.act
        G_BN = (2 * grad) * (e_BD @ W_out_ND.T)
        up_BN = 1 if u_BN is None else u_BN
        full_BN = G_BN * derivative(act, z_BN) * up_BN  # ∂L/∂z
        kept_BN = -G_BN * derivative(act, zk_BN) * up_BN  # ∂L/∂z_keep
        grad_x_BD = full_BN @ W_in_DN.T
        if W_up_DN is not None:  # ∂L/∂u = G·(φ(z) − φ(z_keep))
            grad_x_BD = grad_x_BD + (G_BN * (act(z_BN) - act(zk_BN))) @ W_up_DN.T
        rows_E = row_BK.reshape(-1)
        rows_BKD = d_UD.index_select(0, rows_E).view(*row_BK.shape, -1)
        grad_f_BK = (rows_BKD * grad_x_BD[:, None, :]).sum(dim=-1)
        grad_f_BK.scatter_add_(1, slot_BN, kept_BN * V_dom_BN)
        grad_d_UD = torch.zeros_like(d_UD).index_add_(
            0, rows_E, (f_BK[:, :, None] * grad_x_BD[:, None, :]).reshape(-1, d_UD.shape[1]))
        grad_V_UN = torch.zeros(d_UD.shape[0], W_in_DN.shape[1], dtype=d_UD.dtype,
                                device=d_UD.device).scatter_add_(0, dom_row_BN,
                                                                 f_dom_BN * kept_BN)
        grad_d_UD += grad_V_UN @ W_in_DN.T
        return grad_f_BK, grad_d_UD, None, None, None, None, None, None, None, None, None


def _carried(f_BK: Tensor, d_UD: Tensor, row_BK: Tensor) -> Tensor:
    """Σ_k f_bk·d_{row(b,k)} (B×D) as one weighted embedding bag (padding slots have f = 0)."""
    return torch.nn.functional.embedding_bag(row_BK, d_UD, per_sample_weights=f_BK,
                                             mode="sum")


def keep_error_penalty(active: ActiveFeatures, blocks: list[MLPFeatureBlock],
                       chunk_tokens: int | None = None, normalise: str = "none",
                       ratio: Ratio = divide) -> Tensor:
    """SPEC §4.7 ``keep_error``: the mean over blocks and tokens of
    ‖(h(z) − h(z_keep))·W_out‖², z_keep = c + the dominant feature's contribution at each neuron
    (the up projection of a gated MLP keeps its full value). ``normalise="effect"``: each
    block's sum is divided by its features' whole effect Σ_b ‖MLP(x̂) − MLP(c)‖² (not
    detached; by ``ratio``, see ``interaction_penalty``) and the blocks are averaged, so
    shrinking the features' effect does not pay and every block counts alike.

    The dominant slot is chosen without gradient (held fixed in the backward, SPEC §4.7) by one
    fused pass; nothing B×K×N is kept. The constant parts c are treated as fixed."""
    active = active.by_count()
    total: Tensor | None = None
    for block in blocks:
        mlp = block.mlp
        dtype = compute_dtype(block.d_HD, mlp.W_in_DN)
        d_UD = block.d_HD.index_select(0, active.distinct_U).to(dtype)
        chunk = resolve_chunk(chunk_tokens, d_UD.device,
                              active.f_BK.shape[1] * mlp.W_in_DN.shape[1])
        c_N, cu_N = (None if t is None else t.detach().to(dtype) for t in constant_terms(block))
        weights = [None if w is None else w.detach().to(dtype)
                   for w in (mlp.W_in_DN, mlp.W_up_DN, mlp.W_out_ND)]
        part = _KeepErrorSq.apply(active.f_BK.to(dtype), d_UD, active.row_BK, active.counts_B,
                                  c_N, cu_N, *weights, mlp.act, chunk)
        if normalise == "effect":
            part = ratio(part, effect_sq(active, block))
        total = part if total is None else total + part
    assert total is not None
    return _mean_over(total, active, blocks, normalise)


class _AdditivitySq(torch.autograd.Function):
    """Σ_b ‖g_b·W_out‖² for one block with an analytic backward (see
    :mod:`crossint.interactions.additivity_kernels`): only the B×D output error is kept between
    the passes."""

    @staticmethod
    def forward(ctx, f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, W_out_ND, act, act_name,  # noqa: ANN001
                chunk_tokens):
        from crossint.interactions.additivity_kernels import additivity_gaps

        g_BN = additivity_gaps(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, act, act_name,
                               chunk_tokens)
        e_BD = g_BN @ W_out_ND
        ctx.save_for_backward(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, W_out_ND, e_BD)
        ctx.act, ctx.act_name, ctx.chunk_tokens = act, act_name, chunk_tokens
        return e_BD.pow(2).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001
        from crossint.interactions.additivity_kernels import additivity_grads

        f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, W_out_ND, e_BD = ctx.saved_tensors
        G_BN = (2 * grad) * (e_BD @ W_out_ND.T)
        grad_f, grad_V, grad_Vu = additivity_grads(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N,
                                                   cu_N, G_BN, ctx.act, ctx.act_name,
                                                   ctx.chunk_tokens)
        return grad_f, grad_V, grad_Vu, None, None, None, None, None, None, None, None


def additivity_penalty(active: ActiveFeatures, blocks: list[MLPFeatureBlock],
                       chunk_tokens: int | None = None, normalise: str = "none",
                       ratio: Ratio = divide) -> Tensor:
    """SPEC §4.7 ``additivity``: the mean over blocks and tokens of A² = ‖MLP(x̂) −
    MLP_ind(x̂)‖², with an analytic backward that keeps nothing B×K×N (fused on the CPU with
    numba). ``normalise="effect"``: per block Σ A² / Σ ‖MLP(x̂) − MLP(c)‖², averaged over
    blocks (as for :func:`keep_error_penalty`). The constant parts c are treated as fixed: a
    trained decoder bias gets no gradient from this term."""
    active = active.by_count()
    total: Tensor | None = None
    for block in blocks:
        mlp = block.mlp
        V_UN, Vu_UN = virtual_rows(active, block)
        c_N, cu_N = (None if t is None else t.detach() for t in constant_terms(block))
        per_token = active.f_BK.shape[1] * V_UN.shape[1] * (1 if Vu_UN is None else 2)
        chunk = resolve_chunk(chunk_tokens, active.f_BK.device, per_token)
        part = _AdditivitySq.apply(active.f_BK.to(V_UN.dtype), V_UN, Vu_UN, active.row_BK,
                                   active.counts_B, c_N, cu_N,
                                   mlp.W_out_ND.to(V_UN.dtype).detach(), mlp.act, mlp.act_name,
                                   chunk)
        if normalise == "effect":
            part = ratio(part, effect_sq(active, block))
        total = part if total is None else total + part
    assert total is not None
    return _mean_over(total, active, blocks, normalise)


def effect_sq(active: ActiveFeatures, block: MLPFeatureBlock) -> Tensor:
    """Σ_b ‖MLP(x̂_b) − MLP(c)‖²: the size of the features' whole effect on the MLP (autograd;
    the reconstruction from one embedding bag, so it costs two B×D×N products)."""
    mlp = block.mlp
    dtype = compute_dtype(block.d_HD, mlp.W_in_DN)
    d_UD = block.d_HD.index_select(0, active.distinct_U).to(dtype)
    x_BD = _carried(active.f_BK.to(dtype), d_UD, active.row_BK)
    c_N, cu_N = (None if t is None else t.detach().to(dtype) for t in constant_terms(block))
    z_BN = x_BD @ mlp.W_in_DN.to(dtype) + c_N
    u_BN = None if cu_N is None else x_BD @ mlp.W_up_DN.to(dtype) + cu_N
    base_N = neuron_output(mlp.act, c_N, cu_N)
    return output_norm_sq(neuron_output(mlp.act, z_BN, u_BN) - base_N,
                          mlp.W_out_ND.to(dtype)).sum()


PENALTY_NORMALISATIONS = ("none", "effect")


def _mean_over(total: Tensor, active: ActiveFeatures, blocks: list[MLPFeatureBlock],
               normalise: str) -> Tensor:
    """The sum over blocks as a mean: over blocks (each already a ratio) or tokens and blocks."""
    if normalise not in PENALTY_NORMALISATIONS:
        raise CrossintError(f"unknown normalisation {normalise!r} for this penalty: valid "
                            f"choices are {', '.join(PENALTY_NORMALISATIONS)}")
    if normalise == "effect":
        return total / len(blocks)
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
    "AdditivityMeter", "MLPTerms", "additivity_error", "additivity_penalty",
    "constant_terms", "full_post", "full_up", "independent_post", "iter_terms",
    "keep_error_penalty", "kept_post", "neuron_output", "output_norm_sq", "virtual_rows",
]
