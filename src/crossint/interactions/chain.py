"""End-to-end compact-proof bound (SPEC §7; the decisions are in docs/spec.md §7): from each
block's explanation error to a bound on |ΔCE| per token.

The *spliced model* replaces the MLP output of every explained block l by its explanation
E_l(x̂_l), x̂_l the crosscoder's reconstruction of the model's own ``mlp_in`` (the features are
those of the model's pass, as in SPEC §4.7's all-blocks fidelity). Per token t, with ε_l(t) a
bound on ‖r'_l(t) − r_l(t)‖ (spliced vs model residual entering block l; ε = 0 before the first
explained block):

    ε_mid  = ε_l + ‖ΔAttn_l‖                 (attention reads LN1 of the perturbed residual)
    ε_l+1  = ε_mid + err_l                   (explained block: err_l ≥ ‖MLP(x_l) − E_l(x̂_l)‖)
    ε_l+1  = ε_mid + ‖ΔMLP_l‖                (other blocks: a Lipschitz bound through LN2)
    |ΔCE_t| ≤ ρ_y·‖Δ n_f‖                    (final norm n_f, ρ_y = max_v ‖P(γ⊙(W_U[v] − W_U[y]))‖)

A norm ``n(r) = y/s(y)`` (y = P·r centred for LayerNorm, y = r for RMSNorm, s = √(‖y‖²/D + eps))
has Jacobian norm 1/s, so on the segment between r and r' (‖y'‖ ≥ ‖y‖ − ε)
``‖Δn‖ ≤ ε / √((‖y‖ − ε)₊²/D + eps)``, and always ``‖Δn‖ ≤ ‖n(r)‖ + √D``
(:func:`norm_perturbation`). ``‖y‖`` is the model's own (the certified lower bound on the
pre-norm standard deviation σ = ‖y‖/√D comes from the data), per token or, in ``global`` mode,
the minimum over the data set.

Attention (per head h, query t, visible keys s; clean q, k, v from the model's pass):
the value part ``Σ_s A'_ts (v'_s − v_s)W_O`` is at most ‖W_V^h W_O^h‖₂·max_s α_s (α_s the
perturbation of LN1's output at s); the pattern part ``Σ_s (A'_ts − A_ts)(v_s W_O − m_t)`` (any
m_t, since Σ_s ΔA_ts = 0; here the mean over visible keys) is at most
``‖ΔA_t‖₁·max_s ‖v_s W_O − m_t‖`` with ``‖ΔA_t‖₁ ≤ min(2, osc_s Δscore_ts)`` and
``|Δscore_ts| ≤ scale·(‖W_Q‖α_t‖k_s‖ + ‖q_t‖‖W_K‖α_s + ‖W_Q‖‖W_K‖α_tα_s)``. Rotary positions
and ALiBi biases do not change these norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from crossint.errors import CrossintError

SIGMA_MODES: tuple[str, ...] = ("token", "global")
EXACT_RADIUS_VOCAB = 8192  # exact ρ_y (a V×V table) up to this vocabulary, else a triangle bound


# --- norms -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormParams:
    """A LayerNorm (``centred``) or RMSNorm: output = gain ⊙ y/s(y) (+ bias)."""

    gain_D: Tensor
    eps: float
    centred: bool

    @property
    def gain_max(self) -> float:
        return float(self.gain_D.abs().max())


def pre_norm_size(r_BSD: Tensor, norm: NormParams) -> Tensor:
    """‖y‖ of the norm's input: the centred vector for a LayerNorm, r itself for an RMSNorm."""
    r = r_BSD.double()
    if norm.centred:
        r = r - r.mean(dim=-1, keepdim=True)
    return r.norm(dim=-1)


def norm_perturbation(eps: Tensor, size: Tensor, D: int, norm_eps: float,
                      exact: bool = True) -> Tensor:
    """A bound on ‖n(r') − n(r)‖ (before the gain) for ‖r' − r‖ ≤ eps, where ‖y(r)‖ ≥ size.
    ``exact``: size is the model's own ‖y(r)‖, so the cap is ‖n(r)‖ + √D; otherwise (a lower
    bound, the ``global`` σ mode) the cap is 2√D (‖n‖ ≤ √D always)."""
    floor = (size - eps).clamp(min=0)
    s_min = torch.sqrt(floor.pow(2) / D + norm_eps)
    own = size / torch.sqrt(size.pow(2) / D + norm_eps) if exact else math.sqrt(D)
    cap = own + math.sqrt(D)
    return torch.minimum(eps / s_min, torch.as_tensor(cap, dtype=eps.dtype))


def logit_radius(W_U_VD: Tensor, norm: NormParams, exact_vocab: int = EXACT_RADIUS_VOCAB
                 ) -> Tensor:
    """ρ_y per target y: |ΔCE| ≤ ρ_y·‖Δn‖ for the final norm's normalised output n.

    ΔCE = Δlse − Δz_y lies between min_v and max_v of Δz_v − Δz_y, and
    Δz_v − Δz_y = (γ⊙(W_U[v] − W_U[y]))·Δn with Δn centred for a LayerNorm, so
    ρ_y = max_v ‖P(γ⊙(W_U[v] − W_U[y]))‖ (exact up to ``exact_vocab`` rows, else the triangle
    bound ‖A_y‖ + max_v ‖A_v‖)."""
    A_VD = W_U_VD.double() * norm.gain_D.double()
    if norm.centred:
        A_VD = A_VD - A_VD.mean(dim=-1, keepdim=True)
    sq_V = A_VD.pow(2).sum(dim=-1)
    if A_VD.shape[0] > exact_vocab:
        return sq_V.sqrt() + sq_V.sqrt().max()
    rho_V = torch.empty(A_VD.shape[0], dtype=torch.float64)
    for start in range(0, A_VD.shape[0], 1024):
        block = A_VD[start:start + 1024]
        dist_CV = sq_V[start:start + 1024, None] + sq_V[None, :] - 2 * block @ A_VD.T
        rho_V[start:start + 1024] = dist_CV.clamp(min=0).amax(dim=1).sqrt()
    return rho_V


# --- attention ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionNorms:
    """Per-head operator norms of one block's attention and its masking."""

    wq_A: Tensor  # ‖W_Q^h‖₂ per query head
    wk_K: Tensor  # ‖W_K^g‖₂ per key/value head
    wvo_A: Tensor  # ‖W_V^{g(h)} W_O^h‖₂ per query head
    kv_A: Tensor  # the key/value head each query head reads
    scale: float
    window: int | None


def attention_norms(weights) -> AttentionNorms:  # noqa: ANN001 (an adapter AttentionWeights)
    n_heads = weights.n_heads
    kv_A = torch.tensor([weights.kv_head(h) for h in range(n_heads)])
    W_Q = weights.W_Q_ADd.double()
    W_K = weights.W_K_ADd.double()
    W_VO = torch.stack([weights.W_V_ADd[int(kv_A[h])].double() @ weights.W_O_AdD[h].double()
                        for h in range(n_heads)])
    return AttentionNorms(
        wq_A=torch.linalg.matrix_norm(W_Q, ord=2), wk_K=torch.linalg.matrix_norm(W_K, ord=2),
        wvo_A=torch.linalg.matrix_norm(W_VO, ord=2), kv_A=kv_A, scale=float(weights.scale),
        window=weights.window,
    )


def visible_SS(n_positions: int, window: int | None) -> Tensor:
    """Causal (and local-window) mask: key s visible from query t."""
    t = torch.arange(n_positions)
    delta = t[:, None] - t[None, :]
    mask = delta >= 0
    if window is not None:
        mask &= delta < window
    return mask


@dataclass(frozen=True)
class AttentionClean:
    """The model's own attention quantities of one block for a batch: ‖q_t^h‖, ‖k_s^g‖ and
    R_t^h = max over visible s of ‖v_s W_O^h − m_t^h‖ (m_t^h: their mean)."""

    qn_BSA: Tensor
    kn_BSK: Tensor
    R_BSA: Tensor


def attention_clean(a_BSD: Tensor, weights, norms: AttentionNorms) -> AttentionClean:  # noqa: ANN001
    a = a_BSD.double()
    q = torch.einsum("bsd,hde->bshe", a, weights.W_Q_ADd.double()) + weights.b_Q_Ad.double()
    k = torch.einsum("bsd,gde->bsge", a, weights.W_K_ADd.double()) + weights.b_K_Ad.double()
    v = torch.einsum("bsd,gde->bsge", a, weights.W_V_ADd.double()) + weights.b_V_Ad.double()
    vo_BASD = torch.einsum("bshe,hed->bhsd", v[:, :, norms.kv_A], weights.W_O_AdD.double())
    mask = visible_SS(a.shape[1], norms.window).double()
    count_S = mask.sum(dim=1)
    gram_BASS = vo_BASD @ vo_BASD.transpose(-1, -2)
    mg_BASS = mask @ gram_BASS / count_S[:, None]  # (m_t · vo_s)
    mean_sq_BAS = (mg_BASS * mask).sum(dim=-1) / count_S  # ‖m_t‖²
    own_BAS = torch.diagonal(gram_BASS, dim1=-2, dim2=-1)  # ‖vo_s‖²
    dist_BASS = (own_BAS[:, :, None, :] - 2 * mg_BASS + mean_sq_BAS[..., None]).clamp(min=0)
    R_BAS = dist_BASS.masked_fill(mask == 0, 0).amax(dim=-1).sqrt()
    return AttentionClean(q.norm(dim=-1), k.norm(dim=-1), R_BAS.transpose(1, 2))


def attention_perturbation(alpha_BS: Tensor, clean: AttentionClean, norms: AttentionNorms
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(value part, pattern part, fraction of heads whose ‖ΔA‖₁ bound saturated at 2) per
    token, for LN1-output perturbations α_s (module docstring)."""
    mask = visible_SS(alpha_BS.shape[1], norms.window)
    alpha_max_BS = alpha_BS[:, None, :].expand(-1, mask.shape[0], -1).masked_fill(
        ~mask, 0).amax(dim=-1)
    value_BS = norms.wvo_A.sum() * alpha_max_BS
    kn_BSA = clean.kn_BSK[:, :, norms.kv_A]
    wk_A = norms.wk_K[norms.kv_A]
    a_t = alpha_BS[:, None, :, None]  # B, 1, S(t), 1
    a_s = alpha_BS[:, None, None, :]  # B, 1, 1, S(s)
    wq = norms.wq_A[None, :, None, None]
    wk = wk_A[None, :, None, None]
    beta_BASS = norms.scale * (wq * a_t * kn_BSA.permute(0, 2, 1)[:, :, None, :]
                               + clean.qn_BSA.permute(0, 2, 1)[..., None] * wk * a_s
                               + wq * wk * a_t * a_s)
    osc_BAS = 2 * beta_BASS.masked_fill(~mask, 0).amax(dim=-1)
    dA_BAS = osc_BAS.clamp(max=2.0)
    pattern_BS = (dA_BAS * clean.R_BSA.permute(0, 2, 1)).sum(dim=1)
    saturated_BS = (osc_BAS >= 2.0).double().mean(dim=1)
    return value_BS, pattern_BS, saturated_BS


# --- MLPs the spliced model keeps --------------------------------------------------------------
@dataclass(frozen=True)
class MLPConstants:
    """What a Lipschitz bound of an unexplained block's MLP needs: Lip(φ), ‖W_in‖₂, ‖W_out‖₂
    (gated: ‖W_up‖₂ and the largest column norms of W_in and W_up)."""

    lipschitz: float
    sigma_in: float
    sigma_out: float
    sigma_up: float = 0.0
    col_in: float = 0.0
    col_up: float = 0.0


def mlp_constants(mlp) -> MLPConstants:  # noqa: ANN001 (an adapter MLPWeights)
    norm = torch.linalg.matrix_norm
    if mlp.W_up_DN is None:
        return MLPConstants(float(mlp.lipschitz), float(norm(mlp.W_in_DN.double(), ord=2)),
                            float(norm(mlp.W_out_ND.double(), ord=2)))
    return MLPConstants(
        float(mlp.lipschitz), float(norm(mlp.W_in_DN.double(), ord=2)),
        float(norm(mlp.W_out_ND.double(), ord=2)), float(norm(mlp.W_up_DN.double(), ord=2)),
        float(mlp.W_in_DN.double().norm(dim=0).max()),
        float(mlp.W_up_DN.double().norm(dim=0).max()))


def mlp_perturbation(delta_BS: Tensor, constants: MLPConstants,
                     gated_clean: tuple[Tensor, Tensor] | None) -> Tensor:
    """‖MLP(u') − MLP(u)‖ for ‖u' − u‖ ≤ δ: plain L·‖W_in‖·‖W_out‖·δ; gated
    ‖W_out‖·(L·(‖u‖_∞ + c_up δ)·‖W_in‖ + (‖φ(z)‖_∞ + L·c_in δ)·‖W_up‖)·δ with the model's own
    ``gated_clean`` = (‖u‖_∞, ‖φ(z)‖_∞) per token."""
    c = constants
    if gated_clean is None:
        return c.lipschitz * c.sigma_in * c.sigma_out * delta_BS
    up_max, phi_max = gated_clean
    return c.sigma_out * delta_BS * (
        c.lipschitz * (up_max + c.col_up * delta_BS) * c.sigma_in
        + (phi_max + c.lipschitz * c.col_in * delta_BS) * c.sigma_up)


# --- the chain ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockChainInput:
    """One block of one batch, as the chain reads it: the model's own pre-norm sizes of LN1
    and LN2, its attention quantities and (gated MLPs the spliced model keeps) ‖u‖_∞, ‖φ(z)‖_∞."""

    block: int
    size1_BS: Tensor
    attention: AttentionClean
    size2_BS: Tensor
    gated_clean: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class BlockConstants:
    """A block's constants: its norms, attention norms, MLP constants and whether attention
    and MLP read the same residual (parallel residual)."""

    norm1: NormParams
    attention: AttentionNorms
    norm2: NormParams
    mlp: MLPConstants
    parallel: bool = False


def chain_batch(inputs: list[BlockChainInput], constants: dict[int, BlockConstants],
                errors: dict[int, Tensor], final_size_BS: Tensor, final_norm: NormParams,
                rho_BS: Tensor, floors: dict[str, float] | None = None,
                ) -> dict[str, Tensor]:
    """The chain over one batch (B contexts × S positions). ``errors[l]`` bounds
    ‖MLP(x_l) − E_l(x̂_l)‖ per position (0 where the spliced model keeps the model's own MLP
    output); blocks before the first explained one are skipped (ε = 0). ``floors``
    (``global`` mode): the data set's smallest pre-norm size per norm (keys ``"{l}.1"``,
    ``"{l}.2"``, ``"final"``) replaces each token's own. Returns the per-position bound
    ``bound_BS`` and the terms per block (``eps.{l}`` entering it, ``alpha.{l}`` the bound on
    LN1's output change, ``value.{l}``, ``pattern.{l}``, ``saturated.{l}``, ``mlp.{l}``), and
    at the end ``eps.final``, ``rho``, ``final_capped`` (1 where ‖Δn_f‖ is at its cap
    ‖n_f‖ + √D) and ``final_factor`` (ρ_y·‖Δn_f‖/ε_L)."""
    first = min(errors)
    eps = final_size_BS.new_zeros(final_size_BS.shape)
    terms: dict[str, Tensor] = {}
    for item in inputs:
        if item.block < first:
            continue
        l, c = item.block, constants[item.block]
        D = c.norm1.gain_D.numel()
        exact = floors is None
        size1 = _size(item.size1_BS, floors, f"{l}.1")
        alpha = c.norm1.gain_max * norm_perturbation(eps, size1, D, c.norm1.eps, exact)
        value, pattern, saturated = attention_perturbation(alpha, item.attention, c.attention)
        eps_mid = eps + value + pattern
        if l in errors:
            mlp_term = errors[l]
        else:
            reads = eps if c.parallel else eps_mid
            size2 = _size(item.size2_BS, floors, f"{l}.2")
            delta = c.norm2.gain_max * norm_perturbation(reads, size2, D, c.norm2.eps, exact)
            mlp_term = mlp_perturbation(delta, c.mlp, item.gated_clean)
        terms.update({f"eps.{l}": eps, f"alpha.{l}": alpha, f"value.{l}": value,
                      f"pattern.{l}": pattern, f"saturated.{l}": saturated,
                      f"mlp.{l}": mlp_term})
        eps = eps_mid + mlp_term
    D = final_norm.gain_D.numel()
    size_f = _size(final_size_BS, floors, "final")
    change = norm_perturbation(eps, size_f, D, final_norm.eps, floors is None)
    cap = norm_perturbation(torch.full_like(eps, math.inf), size_f, D, final_norm.eps,
                            floors is None)
    bound = rho_BS * change
    terms.update({"eps.final": eps, "bound_BS": bound, "rho": rho_BS,
                  "final_capped": (change >= cap).double(),
                  "final_factor": bound / eps.clamp(min=1e-300)})
    return terms


def _size(size_BS: Tensor, floors: dict[str, float] | None, key: str) -> Tensor:
    if floors is None:
        return size_BS
    return torch.full_like(size_BS, floors[key])


# --- what verifying costs ------------------------------------------------------------------------
def attention_verify_flops(D: int, n_heads: int, head_dim: int, n_kv: int, keys: float) -> float:
    """Per token and block: LN1's size, q/k/v, their norms, v·W_O per head, then per visible
    key the Gram entries of R (2D) and the score bound (≈ 12)."""
    projections = 2 * D * head_dim * (n_heads + 2 * n_kv)
    return (4 * D + projections + 2 * head_dim * (n_heads + n_kv) + 2 * n_heads * head_dim * D
            + n_heads * keys * (2 * D + 12) + 6)


def model_flops_per_token(D: int, N: int, n_heads: int, head_dim: int, n_kv: int, keys: float,
                          vocab: int, n_blocks: int, gated: bool, act_flops: int) -> float:
    """One forward pass per token (the brute-force verifier of the end-to-end bound): per block
    two norms, q/k/v/o, scores and values over ``keys`` keys, the MLP; then the final norm and
    the unembedding."""
    attention = 2 * D * head_dim * (2 * n_heads + 2 * n_kv) + 4 * n_heads * head_dim * keys
    mlp = (6 if gated else 4) * D * N + act_flops * N + 2 * N
    return n_blocks * (10 * D + attention + mlp) + 5 * D + 2 * D * vocab


def check_chain_model(post_ln: bool, encoder: bool, model: str) -> None:
    if encoder or post_ln:
        raise CrossintError(
            f"model {model!r} is a post-LN encoder: the end-to-end bound chains through a "
            "pre-LN causal language model (use --no-chain for the per-block bounds alone)"
        )


__all__ = [
    "SIGMA_MODES", "AttentionClean", "AttentionNorms", "BlockChainInput", "BlockConstants",
    "MLPConstants", "NormParams", "attention_clean", "attention_norms", "attention_perturbation",
    "attention_verify_flops", "chain_batch", "check_chain_model", "logit_radius",
    "mlp_constants", "mlp_perturbation", "model_flops_per_token", "norm_perturbation",
    "pre_norm_size", "visible_SS",
]
