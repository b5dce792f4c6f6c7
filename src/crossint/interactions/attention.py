"""Attention feature interactions (SPEC §5) as pure functions over tensors (float64 for analysis).

One block's attention reads ``attn_in``. Decoded from crosscoder features (folded, raw units)
it is x̂(s) = c + Σ_b f_b(s)·d_b with c = b_dec[attn_in], so every head's query and key split
into a fixed part and one part per active feature::

    q(t) = R_t(q_fix(t) + Σ_a f_a(t)·q_a)      q_a = d_a·W_Q[h]    q_fix = c·W_Q[h] + b_Q[h]
    k(s) = R_s(k_fix(s) + Σ_b f_b(s)·k_b)      k_b = d_b·W_K[g]    k_fix = c·W_K[g] + b_K[g]
    score(t, s) = scale·q(t)·k(s),   Q_ab(t − s) = scale·(R_t q_a)·(R_s k_b)

R_t is the rotary rotation at position t (the identity for absolute positions, where Q_ab is
one number per pair) and g the key/value head that query head h reads (grouped-query
attention). Special-token positions (BOS/EOS/PAD, which the crosscoder never saw) are not
decomposed: their fixed part is the model's own attn_in and they carry no feature.

Layouts: A query heads (K/V weights repeated per query head), d head_dim, S positions of one
context (a ``_ASS`` tensor is indexed [head, query position, key position]), K feature slots per
position (padding: feature −1 with f = 0), U the distinct features of a context, E entries of a
sparse table, Q a list of feature pairs. The decisions SPEC §5 leaves open are in spec.md §5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.models.hookpoints import blocks_with_site, hookpoint

if TYPE_CHECKING:
    from crossint.models.adapter import AttentionWeights

SUPPORTED_POSITIONAL = ("absolute", "rotary")
DENSE_CELLS = 1 << 24  # a PairTable up to this many cells (columns × H²) is kept dense
MERGE_ENTRIES = 1 << 20  # a sparse PairTable merges its pending entries beyond this many
BOUND_TOLERANCE = 1e-9  # float64 rounding allowed when checking a bound


def attn_in_blocks(crosscoder: Any) -> list[int]:
    """Blocks whose ``attn_in`` the crosscoder reads (sorted)."""
    return blocks_with_site(crosscoder.config.hookpoints, "attn_in")


def check_supported(weights: AttentionWeights, block: int) -> None:
    """Refuse attention this analysis cannot decompose, naming what it supports."""
    if weights.positional not in SUPPORTED_POSITIONAL:
        raise CrossintError(
            f"block {block} uses {weights.positional} position biases, which the attention "
            f"analysis cannot decompose into feature pairs (supported: "
            f"{', '.join(SUPPORTED_POSITIONAL)} positions)"
        )
    if weights.positional == "rotary" and (weights.rotary_inv_freq is None
                                           or weights.rotary_dim <= 0):
        raise CrossintError(f"block {block} is rotary but its rotary frequencies are unknown")
    # The feature-pair decomposition needs scores bilinear in attn_in: a norm of q and k, or a
    # soft cap on the scores, breaks it. (A post-norm or residual multiplier acts after the
    # pattern: only the output error is then measured before it.)
    if weights.q_norm is not None or weights.softcap is not None:
        what = "normalises queries and keys" if weights.q_norm is not None else "soft-caps scores"
        raise CrossintError(
            f"block {block} of this {weights.family or 'model'} model {what}, so its attention "
            f"scores do not split into feature pairs: the attention analysis supports models "
            f"whose scores are bilinear in attn_in (no q/k norm, no logit soft-capping)"
        )
    if weights.n_heads % weights.n_kv_heads:
        raise CrossintError(
            f"block {block} has {weights.n_heads} query heads and {weights.n_kv_heads} key/value "
            f"heads: grouped-query attention needs the first to be a multiple of the second"
        )


@dataclass(frozen=True, eq=False)
class AttentionFeatureBlock:
    """One block's attention with the crosscoder's decoder at its attn_in (raw units), every
    tensor in one dtype on one device; key/value weights are repeated per query head."""

    block: int
    d_HD: Tensor  # decoder rows at blocks.{l}.attn_in
    c_D: Tensor  # the part no feature carries: b_dec at attn_in
    W_Q_ADd: Tensor
    b_Q_Ad: Tensor
    W_K_ADd: Tensor
    b_K_Ad: Tensor
    W_V_ADd: Tensor
    b_V_Ad: Tensor
    W_O_AdD: Tensor
    kv_head_A: Tensor  # the key/value head each query head reads
    scale: float
    causal: bool
    window: int | None
    rotary_dim: int  # 0: absolute positions
    inv_freq: Tensor | None  # rotary_dim / 2 frequencies

    @property
    def n_heads(self) -> int:
        return self.W_Q_ADd.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W_Q_ADd.shape[2]

    @property
    def rotary(self) -> bool:
        return self.inv_freq is not None


def attention_block(block: int, d_HD: Tensor, c_D: Tensor, weights: AttentionWeights,
                    dtype: torch.dtype = torch.float64) -> AttentionFeatureBlock:
    """An :class:`AttentionFeatureBlock` from decoder rows, decoder bias and the model's
    ``AttentionWeights`` (moved to the decoder's device, cast to ``dtype``)."""
    check_supported(weights, block)
    device = d_HD.device

    def cast(tensor: Tensor) -> Tensor:
        return tensor.detach().to(device=device, dtype=dtype)

    kv_A = torch.tensor([weights.kv_head(h) for h in range(weights.n_heads)], device=device)
    rotary = weights.positional == "rotary"
    return AttentionFeatureBlock(
        block=block, d_HD=cast(d_HD), c_D=cast(c_D),
        W_Q_ADd=cast(weights.W_Q_ADd), b_Q_Ad=cast(weights.b_Q_Ad),
        W_K_ADd=cast(weights.W_K_ADd)[kv_A], b_K_Ad=cast(weights.b_K_Ad)[kv_A],
        W_V_ADd=cast(weights.W_V_ADd)[kv_A], b_V_Ad=cast(weights.b_V_Ad)[kv_A],
        W_O_AdD=cast(weights.W_O_AdD), kv_head_A=kv_A, scale=float(weights.scale),
        causal=bool(weights.causal), window=weights.window,
        rotary_dim=weights.rotary_dim if rotary else 0,
        inv_freq=cast(weights.rotary_inv_freq) if rotary else None,
    )


def attention_feature_blocks(crosscoder: Any, weights_by_block: Mapping[int, AttentionWeights],
                             model: str | None = None, dtype: torch.dtype = torch.float64,
                             ) -> list[AttentionFeatureBlock]:
    """Pair each block's attention with the crosscoder's decoder at its ``attn_in``."""
    available = attn_in_blocks(crosscoder)
    chosen = sorted(weights_by_block)
    missing = [block for block in chosen if block not in available]
    if missing or not chosen:
        raise CrossintError(
            f"the crosscoder does not read attn_in of block(s) {missing or chosen}; attention "
            f"interactions need blocks.{{l}}.attn_in (it reads attn_in of blocks {available})"
        )
    names = [hookpoint(block, "attn_in") for block in chosen]
    with torch.no_grad():
        rows = crosscoder.decoders(names, model)
        return [attention_block(block, d_HD, crosscoder.decoder_bias(name, model),
                                weights_by_block[block], dtype)
                for block, name, d_HD in zip(chosen, names, rows, strict=True)]


# --- positions ---------------------------------------------------------------------------------
def rotary_tables(positions_S: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of position·frequency, each (S, rotary_dim), in the rotate-half layout."""
    angle = positions_S.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding of the first ``cos.shape[-1]`` dims of x's last axis:
    dims i and i + r/2 turn together (cos, sin broadcast against them)."""
    r = cos.shape[-1]
    turning, rest = x[..., :r], x[..., r:]
    half = r // 2
    swapped = torch.cat([-turning[..., half:], turning[..., :half]], dim=-1)
    return torch.cat([turning * cos + swapped * sin, rest], dim=-1)


def visibility(n_positions: int, causal: bool, window: int | None,
               device: torch.device | str | None = None) -> Tensor:
    """visible_SS[t, s]: query position t sees key position s (causal: s ≤ t; a window w:
    t − s < w)."""
    t = torch.arange(n_positions, device=device)[:, None]
    s = torch.arange(n_positions, device=device)[None, :]
    visible_SS = torch.ones(n_positions, n_positions, dtype=torch.bool, device=device)
    if causal:
        visible_SS &= s <= t
    if window is not None:
        visible_SS &= (t - s) < window
    return visible_SS


def distinct_rows(features_SK: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct active features of a context (at least one row, so shapes stay valid) and
    each slot's row among them (0 for padding)."""
    active_SK = features_SK >= 0
    distinct_U, inverse = torch.unique(features_SK[active_SK], return_inverse=True)
    row_SK = torch.zeros_like(features_SK)
    row_SK[active_SK] = inverse
    if distinct_U.numel() == 0:
        distinct_U = torch.zeros(1, dtype=features_SK.dtype, device=features_SK.device)
    return distinct_U, row_SK


# --- one context: the feature decomposition of every head's q, k, v ----------------------------
@dataclass
class HeadTerms:
    """Every head's query, key and value on one context, split by feature: the fixed parts,
    the per-slot feature parts (rotated at their positions) and the reconstruction's values."""

    q_fixed_ASd: Tensor
    q_ASKd: Tensor
    k_fixed_ASd: Tensor
    k_ASKd: Tensor
    v_ASd: Tensor
    active_SK: Tensor  # slot holds a feature (never at a fixed position)
    visible_SS: Tensor
    query_S: Tensor  # measured query positions: not special
    scale: float

    @property
    def q_ASd(self) -> Tensor:
        return self.q_fixed_ASd + self.q_ASKd.sum(2)

    @property
    def k_ASd(self) -> Tensor:
        return self.k_fixed_ASd + self.k_ASKd.sum(2)


def head_terms(fblock: AttentionFeatureBlock, attn_in_SD: Tensor, features_SK: Tensor,
               f_SK: Tensor, fixed_S: Tensor) -> HeadTerms:
    """Decompose one context (S positions) at one block. ``attn_in_SD``: the model's own
    attn_in (used at ``fixed_S`` positions only); ``features_SK``/``f_SK``: the active
    features per position (−1 / 0 padding)."""
    dtype, device = fblock.d_HD.dtype, fblock.d_HD.device
    fixed_S = fixed_S.to(device)
    active_SK = (features_SK.to(device) >= 0) & ~fixed_S[:, None]
    f_SK = torch.where(active_SK, f_SK.to(device=device, dtype=dtype), 0.0)
    distinct_U, row_SK = distinct_rows(torch.where(active_SK, features_SK.to(device), -1))
    d_UD = fblock.d_HD[distinct_U]
    x_fixed_SD = torch.where(fixed_S[:, None], attn_in_SD.to(device=device, dtype=dtype),
                             fblock.c_D)

    def split(W_ADd: Tensor, b_Ad: Tensor) -> tuple[Tensor, Tensor]:
        fixed_ASd = x_fixed_SD @ W_ADd + b_Ad[:, None]
        per_feature_AUd = d_UD @ W_ADd
        return fixed_ASd, per_feature_AUd[:, row_SK] * f_SK[None, :, :, None]

    q_fixed_ASd, q_ASKd = split(fblock.W_Q_ADd, fblock.b_Q_Ad)
    k_fixed_ASd, k_ASKd = split(fblock.W_K_ADd, fblock.b_K_Ad)
    x_SD = x_fixed_SD + torch.einsum("sk,skd->sd", f_SK, d_UD[row_SK])
    v_ASd = x_SD @ fblock.W_V_ADd + fblock.b_V_Ad[:, None]
    S = attn_in_SD.shape[0]
    if fblock.inv_freq is not None:
        cos, sin = rotary_tables(torch.arange(S, device=device), fblock.inv_freq)
        q_fixed_ASd, k_fixed_ASd = (apply_rotary(x, cos, sin) for x in (q_fixed_ASd, k_fixed_ASd))
        q_ASKd, k_ASKd = (apply_rotary(x, cos[:, None], sin[:, None]) for x in (q_ASKd, k_ASKd))
    return HeadTerms(q_fixed_ASd, q_ASKd, k_fixed_ASd, k_ASKd, v_ASd, active_SK,
                     visibility(S, fblock.causal, fblock.window, device), ~fixed_S,
                     fblock.scale)


def model_scores(fblock: AttentionFeatureBlock, attn_in_SD: Tensor) -> Tensor:
    """The model's own scores on its own attn_in (no features): score_ASS, unmasked."""
    n = attn_in_SD.shape[0]
    none_SK = torch.full((n, 1), -1, dtype=torch.int64, device=attn_in_SD.device)
    terms = head_terms(fblock, attn_in_SD, none_SK, torch.zeros(n, 1),
                       torch.ones(n, dtype=torch.bool))
    return attention_scores(terms.q_fixed_ASd, terms.k_fixed_ASd, fblock.scale)


def attention_scores(q_ASd: Tensor, k_ASd: Tensor, scale: float) -> Tensor:
    """score_ASS[h, t, s] = scale·q(t)·k(s) (no mask)."""
    return scale * (q_ASd @ k_ASd.transpose(-1, -2))


def masked_softmax(score_ASS: Tensor, visible_SS: Tensor) -> Tensor:
    """The attention pattern: softmax over the visible keys, 0 elsewhere."""
    return score_ASS.masked_fill(~visible_SS, float("-inf")).softmax(dim=-1)


def query_contributions(terms: HeadTerms) -> Tensor:
    """cq_ASKS[h, t, k, s]: query slot k's part of score(t, s) with the full key,
    scale·f_a(t)·(R_t q_a)·k(s)."""
    A, S, K, d = terms.q_ASKd.shape
    cq_AFS = terms.q_ASKd.reshape(A, S * K, d) @ terms.k_ASd.transpose(-1, -2)
    return cq_AFS.mul_(terms.scale).view(A, S, K, S)


def key_contributions(terms: HeadTerms) -> Tensor:
    """ck_ASSK[h, t, s, k]: key slot k (at position s)'s part of score(t, s) with the full
    query, scale·f_b(s)·q(t)·(R_s k_b)."""
    A, S, K, d = terms.k_ASKd.shape
    ck_ASF = terms.q_ASd @ terms.k_ASKd.reshape(A, S * K, d).transpose(-1, -2)
    return ck_ASF.mul_(terms.scale).view(A, S, S, K)


# --- the strict dominance test -------------------------------------------------------------------
def strongest_slot(strength_ASK: Tensor, active_SK: Tensor) -> Tensor:
    """The active slot of largest strength (the first on ties); 0 where none is active."""
    return strength_ASK.masked_fill(~active_SK, -1.0).argmax(dim=-1)


def slot_share(strength_ASK: Tensor, active_SK: Tensor) -> Tensor:
    """max / Σ of the active slots' strengths (NaN where none is active or all are 0)."""
    strength_ASK = strength_ASK.masked_fill(~active_SK, 0.0)
    total_AS = strength_ASK.sum(-1)
    share_AS = strength_ASK.amax(-1) / total_AS
    return share_AS.masked_fill(total_AS <= 0, float("nan"))


def keep_slot(fixed_ASd: Tensor, slots_ASKd: Tensor, slot_AS: Tensor, has_S: Tensor) -> Tensor:
    """The fixed part plus the chosen slot's part (the fixed part alone where ``has_S`` is
    False)."""
    index = slot_AS[:, :, None, None].expand(-1, -1, 1, slots_ASKd.shape[-1])
    return fixed_ASd + slots_ASKd.gather(2, index).squeeze(2) * has_S[None, :, None]


@dataclass
class DominanceTest:
    """SPEC §5's strict dominance test on one context: each query keeps only its strongest
    feature, each key position only its strongest. Per (head, query position)."""

    query_slot_AS: Tensor
    key_slot_AS: Tensor  # per key position
    pattern_ASS: Tensor  # softmax of the full reconstruction's scores
    pattern_dom_ASS: Tensor  # softmax of the dominant scores
    pattern_error_AS: Tensor  # ‖Δp‖₁
    delta_max_AS: Tensor  # ‖Δscore‖_∞ over the visible keys
    delta_range_AS: Tensor  # max − min of Δscore over the visible keys
    output_error_AS: Tensor  # ‖Σ_s Δp(t, s)·v(s)·W_O[h]‖₂
    output_norm_AS: Tensor  # ‖Σ_s p(t, s)·v(s)·W_O[h]‖₂
    value_norm_max_AS: Tensor  # max over the visible keys of ‖v(s)·W_O[h]‖₂
    query_share_AS: Tensor  # strongest query feature's strength / Σ strengths
    key_share_AS: Tensor  # the same per key position

    @property
    def bound_AS(self) -> Tensor:
        """SPEC §5: ‖Δp‖₁ ≤ 2‖Δscore‖_∞."""
        return 2.0 * self.delta_max_AS

    @property
    def tight_bound_AS(self) -> Tensor:
        """‖Δp‖₁ ≤ min(2, ½(max Δscore − min Δscore)): softmax ignores a shift of the scores."""
        return (0.5 * self.delta_range_AS).clamp(max=2.0)

    @property
    def output_bound_AS(self) -> Tensor:
        """‖Δo‖ ≤ ‖Δp‖₁·max_s ‖v(s)·W_O‖ ≤ tight bound × that maximum."""
        return self.tight_bound_AS * self.value_norm_max_AS


def slot_strengths(terms: HeadTerms, cq_ASKS: Tensor) -> tuple[Tensor, Tensor]:
    """Strength of each query slot (max over its visible keys of |its score part|) and of each
    key slot (max over the measured queries that see it)."""
    visible_SS = terms.visible_SS
    mask_SS = visible_SS.to(cq_ASKS.dtype)
    query_ASK = cq_ASKS.abs().mul_(mask_SS[:, None, :]).amax(-1)
    seen_SS = (visible_SS & terms.query_S[:, None]).to(cq_ASKS.dtype)
    key_ASK = key_contributions(terms).abs_().mul_(seen_SS[:, :, None]).amax(1)
    return query_ASK, key_ASK


def dominance_test(terms: HeadTerms, cq_ASKS: Tensor, W_O_AdD: Tensor) -> DominanceTest:
    """Recompute every head's pattern keeping only the strongest query feature per query and
    the strongest key feature per key position (fixed parts kept whole); compare patterns and
    head outputs (values: the full reconstruction's in both)."""
    query_ASK, key_ASK = slot_strengths(terms, cq_ASKS)
    has_S = terms.active_SK.any(-1)
    query_slot_AS = strongest_slot(query_ASK, terms.active_SK)
    key_slot_AS = strongest_slot(key_ASK, terms.active_SK)
    q_dom_ASd = keep_slot(terms.q_fixed_ASd, terms.q_ASKd, query_slot_AS, has_S)
    k_dom_ASd = keep_slot(terms.k_fixed_ASd, terms.k_ASKd, key_slot_AS, has_S)
    score_ASS = attention_scores(terms.q_ASd, terms.k_ASd, terms.scale)
    delta_ASS = score_ASS - attention_scores(q_dom_ASd, k_dom_ASd, terms.scale)
    visible_SS = terms.visible_SS
    pattern_ASS = masked_softmax(score_ASS, visible_SS)
    pattern_dom_ASS = masked_softmax(score_ASS - delta_ASS, visible_SS)
    inf = float("inf")
    top_AS = delta_ASS.masked_fill(~visible_SS, -inf).amax(-1)
    bottom_AS = delta_ASS.masked_fill(~visible_SS, inf).amin(-1)
    u_ASD = torch.einsum("asd,adD->asD", terms.v_ASd, W_O_AdD)
    diff_ASS = pattern_ASS - pattern_dom_ASS
    value_norm_AS = u_ASD.norm(dim=-1)
    return DominanceTest(
        query_slot_AS=query_slot_AS, key_slot_AS=key_slot_AS, pattern_ASS=pattern_ASS,
        pattern_dom_ASS=pattern_dom_ASS, pattern_error_AS=diff_ASS.abs().sum(-1),
        delta_max_AS=torch.maximum(top_AS.abs(), bottom_AS.abs()),
        delta_range_AS=top_AS - bottom_AS,
        output_error_AS=(diff_ASS @ u_ASD).norm(dim=-1),
        output_norm_AS=(pattern_ASS @ u_ASD).norm(dim=-1),
        value_norm_max_AS=(value_norm_AS[:, None, :] * visible_SS).amax(-1),
        query_share_AS=slot_share(query_ASK, terms.active_SK),
        key_share_AS=slot_share(key_ASK, terms.active_SK),
    )


# --- cross-feature interaction of query features -------------------------------------------------
def visible_key_covariance(terms: HeadTerms) -> Tensor:
    """C_ASdd[h, t] = Σ_s (k(s) − k̄_t)(k(s) − k̄_t)ᵀ over the keys s visible from t (k̄_t their
    mean): the scatter of the keys a query position sees."""
    mask_SS = terms.visible_SS.to(terms.k_ASd.dtype)
    k_ASd = terms.k_ASd
    A, S, d = k_ASd.shape
    n_S = mask_SS.sum(-1).clamp(min=1.0)
    second_ASdd = (mask_SS @ (k_ASd[..., :, None] * k_ASd[..., None, :]).view(A, S, d * d))
    sum_ASd = mask_SS @ k_ASd
    outer_ASdd = sum_ASd[..., :, None] * sum_ASd[..., None, :] / n_S[:, None, None]
    return second_ASdd.view(A, S, d, d) - outer_ASdd


def query_overlap(terms: HeadTerms) -> tuple[Tensor, Tensor]:
    """Cosine over the visible keys of two query features' score parts at the same query
    position, each centred over those keys (softmax ignores a constant): cos_ASKK[h, t, k, l]
    for slots k < l, and where it is defined (both active, a measured query with ≥ 2 visible
    keys, neither part constant).

    Slot k's centred part is scale·q_k·(k(s) − k̄_t), so the Gram matrix of the parts is
    scale²·q_k·C_t·q_l with C_t the visible keys' scatter: O(S·K·d²) per head instead of
    O(S²·K²)."""
    visible_SS = terms.visible_SS
    n_visible_S = visible_SS.sum(-1)
    q_ASKd = terms.q_ASKd
    gram_ASKK = (q_ASKd @ visible_key_covariance(terms)) @ q_ASKd.transpose(-1, -2)
    norm_ASK = gram_ASKK.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    K = terms.active_SK.shape[1]
    upper_KK = torch.ones(K, K, dtype=torch.bool, device=visible_SS.device).triu(1)
    coactive_SKK = (upper_KK & terms.active_SK[:, :, None] & terms.active_SK[:, None, :]
                    & (terms.query_S & (n_visible_S >= 2))[:, None, None])
    valid_ASKK = (coactive_SKK & (norm_ASK[..., :, None] > 0) & (norm_ASK[..., None, :] > 0))
    cos_ASKK = (gram_ASKK / (norm_ASK[..., :, None] * norm_ASK[..., None, :])).clamp(-1.0, 1.0)
    return cos_ASKK.masked_fill(~valid_ASKK, 0.0), valid_ASKK


# --- the feature-pair score table ----------------------------------------------------------------
@dataclass
class PairSums:
    """One context's sums per observed (query feature a, key feature b): over the visible
    (query t, key s) position pairs where a is active at t and b at s."""

    a_E: Tensor
    b_E: Tensor
    count_E: Tensor  # position pairs
    weight_E: Tensor  # Σ f_a(t)·f_b(s)
    score_AE: Tensor | None  # Σ f_a(t)·f_b(s)·Q_ab(t − s), per head (None: not asked for)


def feature_projections(fblock: AttentionFeatureBlock, d_UD: Tensor) -> tuple[Tensor, Tensor]:
    """q_a = d_a·W_Q[h] and k_b = d_b·W_K[g] per head (unrotated): (A, U, d) each."""
    return d_UD @ fblock.W_Q_ADd, d_UD @ fblock.W_K_ADd


def pair_score_sums(fblock: AttentionFeatureBlock, q_AUd: Tensor, k_AUd: Tensor,
                    f_SU: Tensor, visible_SS: Tensor) -> Tensor:
    """Σ over visible (t, s) of f_a(t)·f_b(s)·Q_ab(t − s) for every (a, b) of the context.

    Rotate-half rotary: (R_t q)·(R_s k) = Σ_i (q_i k_i + q_j k_j)·cos((t − s)θ_i)
    + (q_i k_j − q_j k_i)·sin((t − s)θ_i) over frequency pairs (i, j = i + r/2), plus q·k
    over the dims that do not turn; so each frequency needs f·(mask ∘ cos)·f and f·(mask ∘
    sin)·f over positions, shared by every head."""
    mask_SS = visible_SS.to(f_SU.dtype)
    r = fblock.rotary_dim
    plain_AUU = k_AUd.new_zeros(())
    if r < fblock.head_dim:
        weight_UU = f_SU.T @ mask_SS @ f_SU
        plain_AUU = (q_AUd[..., r:] @ k_AUd[..., r:].transpose(-1, -2)) * weight_UU
    total_AUU = fblock.scale * plain_AUU
    if fblock.inv_freq is None:
        return total_AUU
    S = f_SU.shape[0]
    offset_SS = (torch.arange(S, device=f_SU.device)[:, None]
                 - torch.arange(S, device=f_SU.device)[None, :]).to(f_SU.dtype)
    half = r // 2
    for i in range(half):
        angle_SS = offset_SS * fblock.inv_freq[i]
        cos_UU = f_SU.T @ (mask_SS * angle_SS.cos()) @ f_SU
        sin_UU = f_SU.T @ (mask_SS * angle_SS.sin()) @ f_SU
        qi_AU, qj_AU = q_AUd[..., i], q_AUd[..., i + half]
        ki_AU, kj_AU = k_AUd[..., i], k_AUd[..., i + half]
        even_AUU = qi_AU[:, :, None] * ki_AU[:, None, :] + qj_AU[:, :, None] * kj_AU[:, None, :]
        odd_AUU = qi_AU[:, :, None] * kj_AU[:, None, :] - qj_AU[:, :, None] * ki_AU[:, None, :]
        total_AUU = total_AUU + fblock.scale * (even_AUU * cos_UU + odd_AUU * sin_UU)
    return total_AUU


def pair_sums(fblock: AttentionFeatureBlock, features_SK: Tensor, f_SK: Tensor,
              fixed_S: Tensor, with_scores: bool = True) -> PairSums:
    """The sums of one context (features at ``fixed_S`` positions are ignored). Exact
    products over the distinct features: O(S²·U + S·U²) per context, no per-pair loop.
    ``with_scores=False`` leaves the score sums out (for absolute positions they are
    Q_ab·Σ f_a f_b: :func:`absolute_score_sums` makes them from the table at the end)."""
    dtype, device = fblock.d_HD.dtype, fblock.d_HD.device
    features_SK, fixed_S = features_SK.to(device), fixed_S.to(device)
    active_SK = (features_SK >= 0) & ~fixed_S[:, None]
    distinct_U, row_SK = distinct_rows(torch.where(active_SK, features_SK, -1))
    S, U = features_SK.shape[0], distinct_U.numel()
    where = (torch.arange(S, device=device)[:, None].expand_as(row_SK)[active_SK],
             row_SK[active_SK])
    f_SU = torch.zeros(S, U, dtype=dtype, device=device).index_put_(
        where, f_SK.to(device=device, dtype=dtype)[active_SK], accumulate=True)
    present_SU = torch.zeros(S, U, dtype=dtype, device=device).index_put_(
        where, torch.ones_like(where[0], dtype=dtype))
    visible_SS = visibility(S, fblock.causal, fblock.window, device)
    seen_SF = visible_SS.to(dtype) @ torch.cat([present_SU, f_SU], dim=1)
    count_UU, weight_UU = present_SU.T @ seen_SF[:, :U], f_SU.T @ seen_SF[:, U:]
    where_E = (count_UU > 0.5).flatten().nonzero().flatten()
    score_AE = None
    if with_scores:
        q_AUd, k_AUd = feature_projections(fblock, fblock.d_HD[distinct_U])
        score_AUU = pair_score_sums(fblock, q_AUd, k_AUd, f_SU, visible_SS)
        score_AE = score_AUU.expand(fblock.n_heads, U, U).reshape(fblock.n_heads, U * U)[
            :, where_E]
    return PairSums(distinct_U[where_E // U], distinct_U[where_E % U],
                    count_UU.flatten()[where_E].round(), weight_UU.flatten()[where_E], score_AE)


def absolute_score_sums(fblock: AttentionFeatureBlock, a_E: Tensor, b_E: Tensor,
                        weight_E: Tensor, chunk: int = 1 << 18) -> Tensor:
    """score_AE = Q_ab·Σ f_a f_b for absolute positions (Q_ab one number per pair), in chunks
    of pairs."""
    if fblock.rotary:
        raise CrossintError("rotary score sums depend on the offsets: accumulate them per "
                            "context (pair_sums with_scores=True)")
    a_E, b_E = a_E.to(fblock.d_HD.device), b_E.to(fblock.d_HD.device)
    H = fblock.d_HD.shape[0]
    score_AE = weight_E.new_empty((fblock.n_heads, weight_E.numel()))
    for h in range(fblock.n_heads):
        q_Hd, k_Hd = fblock.d_HD @ fblock.W_Q_ADd[h], fblock.d_HD @ fblock.W_K_ADd[h]
        if H * H <= DENSE_CELLS:  # one H×H product, then a gather
            score_AE[h] = (q_Hd @ k_Hd.T).flatten()[a_E * H + b_E]
        else:
            for start in range(0, weight_E.numel(), chunk):
                part = slice(start, start + chunk)
                score_AE[h, part] = torch.einsum("ed,ed->e", q_Hd[a_E[part]], k_Hd[b_E[part]])
    return score_AE.mul_(weight_E).mul_(fblock.scale)


def pair_scores(fblock: AttentionFeatureBlock, head: int, a_Q: Tensor, b_Q: Tensor,
                offset_Q: Tensor | None = None) -> Tensor:
    """Q_ab for listed pairs at head ``head``: scale·(R_t q_a)·(R_s k_b) with t − s =
    ``offset_Q`` (rotary; ignored, and may be None, for absolute positions)."""
    device = fblock.d_HD.device
    q_Qd = fblock.d_HD[a_Q.to(device)] @ fblock.W_Q_ADd[head]
    k_Qd = fblock.d_HD[b_Q.to(device)] @ fblock.W_K_ADd[head]
    if fblock.inv_freq is not None:
        if offset_Q is None:
            raise CrossintError("rotary pair scores depend on the offset t − s: pass offset_Q")
        cos, sin = rotary_tables(offset_Q.to(device), fblock.inv_freq)
        q_Qd = apply_rotary(q_Qd, cos, sin)
    return fblock.scale * (q_Qd * k_Qd).sum(-1)


def cross_position(a_E: Tensor, weight_E: Tensor, score_E: Tensor, n_features: int,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(Q_E, others_E, cross_E) of one head: Q_ab = Σ f_a f_b Q / Σ f_a f_b (exact Q_ab for
    absolute positions), the same mean over the other key features b' ≠ b that a meets, and
    their difference (NaN where a meets no other key feature)."""
    Q_E = score_E / weight_E
    row_score_H = score_E.new_zeros(n_features).index_add_(0, a_E, score_E)
    row_weight_H = weight_E.new_zeros(n_features).index_add_(0, a_E, weight_E)
    other_weight_E = row_weight_H[a_E] - weight_E
    others_E = (row_score_H[a_E] - score_E) / other_weight_E
    none_E = other_weight_E <= 1e-12 * row_weight_H[a_E]
    others_E = others_E.masked_fill(none_E, float("nan"))
    return Q_E, others_E, Q_E - others_E


def query_spread(a_E: Tensor, weight_E: Tensor, Q_E: Tensor, n_features: int) -> Tensor:
    """σ_a per entry: the Σ f_a f_b-weighted standard deviation of Q_ab over every key
    feature b that query feature a meets (the scale of a's cross-position departures)."""
    row_weight_H = weight_E.new_zeros(n_features).index_add_(0, a_E, weight_E)
    row_mean_H = weight_E.new_zeros(n_features).index_add_(0, a_E, weight_E * Q_E)
    row_square_H = weight_E.new_zeros(n_features).index_add_(0, a_E, weight_E * Q_E * Q_E)
    row_mean_H = row_mean_H / row_weight_H.clamp(min=1e-300)
    variance_H = row_square_H / row_weight_H.clamp(min=1e-300) - row_mean_H**2
    return variance_H.clamp(min=0.0).sqrt()[a_E]


class PairTable:
    """Sums of value columns per ordered feature pair (a, b), a and b < ``n_features``; memory
    bounded by the pairs observed. Dense arrays when columns × H² ≤ ``dense_cells``, else a
    sorted key list merged whenever ``merge_entries`` entries are pending. The first column
    must be positive for every entry added (a count): the result keeps the pairs where it is."""

    def __init__(self, n_features: int, n_columns: int, dense_cells: int = DENSE_CELLS,
                 merge_entries: int = MERGE_ENTRIES, device: torch.device | str | None = None,
                 ) -> None:
        self.n_features, self.n_columns = n_features, n_columns
        self.dense = n_columns * n_features * n_features <= dense_cells
        self.merge_entries = merge_entries
        size = n_features * n_features if self.dense else 0
        self.keys_E = torch.arange(size, dtype=torch.int64, device=device)
        self.columns = [torch.zeros(size, dtype=torch.float64, device=device)
                        for _ in range(n_columns)]
        self.pending: list[tuple[Tensor, list[Tensor]]] = []
        self.n_pending = 0

    def add(self, a_E: Tensor, b_E: Tensor, columns: Sequence[Tensor]) -> None:
        if len(columns) != self.n_columns:
            raise ValueError(f"expected {self.n_columns} columns, got {len(columns)}")
        device = self.keys_E.device
        keys_E = a_E.to(device) * self.n_features + b_E.to(device)
        values = [column.to(device=device, dtype=torch.float64) for column in columns]
        if self.dense:
            for total, value in zip(self.columns, values, strict=True):
                total.index_add_(0, keys_E, value)
            return
        self.pending.append((keys_E, values))
        self.n_pending += keys_E.numel()
        if self.n_pending >= self.merge_entries:
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        keys_E = torch.cat([self.keys_E, *(keys for keys, _ in self.pending)])
        unique_E, inverse_E = torch.unique(keys_E, sorted=True, return_inverse=True)
        self.columns = [
            unique_E.new_zeros(unique_E.numel(), dtype=torch.float64).index_add_(
                0, inverse_E, torch.cat([self.columns[c], *(v[c] for _, v in self.pending)]))
            for c in range(self.n_columns)
        ]
        self.keys_E, self.pending, self.n_pending = unique_E, [], 0

    def result(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(a_E, b_E, columns) of every observed pair, ascending (a, b)."""
        self._merge()
        keep_E = self.columns[0] > 0
        keys_E = self.keys_E[keep_E]
        return (keys_E // self.n_features, keys_E % self.n_features,
                [column[keep_E] for column in self.columns])

    @property
    def n_pairs(self) -> int:
        self._merge()
        return int((self.columns[0] > 0).sum())


# --- accumulation over contexts ------------------------------------------------------------------
SUMMED = ("pattern_error", "bound", "tight_bound", "output_error", "output_norm",
          "output_bound", "recon_pattern_error")


class DominanceSummary:
    """Per-head sums of the dominance test over the measured query positions, the bound
    checks, and the mean query / key shares."""

    def __init__(self, n_heads: int) -> None:
        self.n_heads = n_heads
        self.n_queries = 0
        self.sums = {key: torch.zeros(n_heads, dtype=torch.float64) for key in SUMMED}
        self.pattern_error_max = torch.zeros(n_heads, dtype=torch.float64)
        self.violations = {key: torch.zeros(n_heads, dtype=torch.int64)
                           for key in ("bound", "tight_bound", "output_bound")}
        self.shares = {key: torch.zeros(n_heads, dtype=torch.float64) for key in ("query", "key")}
        self.share_counts = {key: torch.zeros(n_heads, dtype=torch.int64)
                             for key in ("query", "key")}

    def update(self, test: DominanceTest, query_S: Tensor, recon_error_AS: Tensor) -> None:
        query_S = query_S.to(test.pattern_error_AS.device)
        values = {"pattern_error": test.pattern_error_AS, "bound": test.bound_AS,
                  "tight_bound": test.tight_bound_AS, "output_error": test.output_error_AS,
                  "output_norm": test.output_norm_AS, "output_bound": test.output_bound_AS,
                  "recon_pattern_error": recon_error_AS}
        self.n_queries += int(query_S.sum())
        for key, value_AS in values.items():
            self.sums[key] += value_AS[:, query_S].sum(-1).double().cpu()
        error_AS = test.pattern_error_AS[:, query_S]
        if error_AS.numel():
            self.pattern_error_max = torch.maximum(self.pattern_error_max,
                                                   error_AS.amax(-1).double().cpu())
        for key, (measured, bound) in {
            "bound": (test.pattern_error_AS, test.bound_AS),
            "tight_bound": (test.pattern_error_AS, test.tight_bound_AS),
            "output_bound": (test.output_error_AS, test.output_bound_AS),
        }.items():
            broken_AS = measured > bound * (1 + BOUND_TOLERANCE) + BOUND_TOLERANCE
            self.violations[key] += broken_AS[:, query_S].sum(-1).cpu()
        for key, share_AS in (("query", test.query_share_AS), ("key", test.key_share_AS)):
            defined_AS = torch.isfinite(share_AS) & query_S
            self.shares[key] += share_AS.nan_to_num(0.0).mul(defined_AS).sum(-1).double().cpu()
            self.share_counts[key] += defined_AS.sum(-1).cpu()

    def result(self) -> list[dict[str, Any]]:
        """One dict per head: means over the measured queries, maxima, violations."""
        n = max(self.n_queries, 1)
        rows = []
        for h in range(self.n_heads):
            row: dict[str, Any] = {"head": h, "n_queries": self.n_queries}
            row.update({key: float(self.sums[key][h]) / n for key in SUMMED})
            row["pattern_error_max"] = float(self.pattern_error_max[h])
            norm = float(self.sums["output_norm"][h])
            row["relative_output_error"] = (float(self.sums["output_error"][h]) / norm
                                            if norm > 0 else float("nan"))
            row.update({f"{key}_violations": int(self.violations[key][h])
                        for key in self.violations})
            for key in ("query", "key"):
                count = int(self.share_counts[key][h])
                row[f"{key}_share"] = (float(self.shares[key][h]) / count if count
                                       else float("nan"))
            rows.append(row)
        return rows


def shares_pair_table(first: AttentionFeatureBlock, second: AttentionFeatureBlock,
                      n_positions: int) -> bool:
    """Whether two blocks' pair tables are equal on contexts of up to ``n_positions``: every
    block reads the same features, so for absolute positions (no per-head score columns) the
    counts and Σ f_a f_b differ only through the visible position pairs."""
    if first.rotary or second.rotary:
        return False
    return bool(torch.equal(visibility(n_positions, first.causal, first.window),
                            visibility(n_positions, second.causal, second.window)))


class AttentionMeter:
    """SPEC §5 on one block, one context at a time: the dominance test (with the
    reconstruction's own pattern error against the model's), the feature-pair sums and the
    query-feature key overlaps. ``first_patterns`` keeps the first context's full and
    dominant patterns (float32, CPU) for a plot."""

    def __init__(self, fblock: AttentionFeatureBlock, n_features: int,
                 dense_cells: int = DENSE_CELLS, merge_entries: int = MERGE_ENTRIES,
                 shared_pairs: PairTable | None = None) -> None:
        A, device = fblock.n_heads, fblock.d_HD.device
        self.fblock, self.n_features = fblock, n_features
        self.summary = DominanceSummary(A)
        # columns: position pairs, Σ f_a f_b, then (rotary only) Σ f_a f_b·Q_ab per head.
        # A shared table is filled by the meter that made it (see shares_pair_table).
        self.owns_pairs = shared_pairs is None
        self.pairs = shared_pairs if shared_pairs is not None else PairTable(
            n_features, 2 + (A if fblock.rotary else 0), dense_cells, merge_entries, device)
        # columns: co-active query positions, then per head the defined cosines and their sum
        self.overlaps = PairTable(n_features, 1 + 2 * A, dense_cells, merge_entries, device)
        self.overlap_sums = torch.zeros(2, A, dtype=torch.float64)
        self.first_patterns: tuple[Tensor, Tensor] | None = None
        self._table: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None

    def update(self, attn_in_SD: Tensor, features_SK: Tensor, f_SK: Tensor, fixed_S: Tensor,
               ) -> DominanceTest:
        fblock, self._table = self.fblock, None
        terms = head_terms(fblock, attn_in_SD, features_SK, f_SK, fixed_S)
        cq_ASKS = query_contributions(terms)
        test = dominance_test(terms, cq_ASKS, fblock.W_O_AdD)
        model_ASS = masked_softmax(model_scores(fblock, attn_in_SD), terms.visible_SS)
        self.summary.update(test, terms.query_S,
                            (model_ASS - test.pattern_ASS).abs().sum(-1))
        self._add_overlaps(features_SK.to(fblock.d_HD.device), *query_overlap(terms))
        if self.owns_pairs:
            sums = pair_sums(fblock, features_SK, f_SK, fixed_S, with_scores=fblock.rotary)
            self.pairs.add(sums.a_E, sums.b_E, [sums.count_E, sums.weight_E,
                                                *(() if sums.score_AE is None
                                                  else sums.score_AE)])
        if self.first_patterns is None:
            self.first_patterns = (test.pattern_ASS.float().cpu(),
                                   test.pattern_dom_ASS.float().cpu())
        return test

    def _add_overlaps(self, features_SK: Tensor, cos_ASKK: Tensor, valid_ASKK: Tensor) -> None:
        coactive_SKK = valid_ASKK.any(0)
        s_E, k_E, l_E = coactive_SKK.nonzero(as_tuple=True)
        first_E, second_E = features_SK[s_E, k_E], features_SK[s_E, l_E]
        valid_AE = valid_ASKK[:, s_E, k_E, l_E].double()
        cos_AE = cos_ASKK[:, s_E, k_E, l_E]
        self.overlaps.add(torch.minimum(first_E, second_E), torch.maximum(first_E, second_E),
                          [torch.ones_like(cos_AE[0]), *valid_AE, *cos_AE])
        self.overlap_sums += torch.stack([valid_AE.sum(-1), cos_AE.sum(-1)]).cpu()

    def pair_table(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(a_E, b_E, count_E, weight_E, score_AE) of every observed pair, ascending (a, b);
        score_AE = Σ f_a f_b·Q_ab per head (kept until the next update)."""
        if self._table is None:
            a_E, b_E, columns = self.pairs.result()
            if self.fblock.rotary:
                score_AE = torch.stack(columns[2:])
            else:
                score_AE = absolute_score_sums(self.fblock, a_E, b_E, columns[1])
            self._table = (a_E, b_E, columns[0], columns[1], score_AE)
        return self._table

    def head_rows(self) -> list[dict[str, Any]]:
        """The dominance summary per head plus the mean key overlap and pair counts."""
        rows = self.summary.result()
        n_pairs = self.pairs.n_pairs
        for h, row in enumerate(rows):
            n_cos = float(self.overlap_sums[0, h])
            row["query_overlap"] = float(self.overlap_sums[1, h]) / n_cos if n_cos else None
            row["query_overlap_pairs"] = int(n_cos)
            row["n_pairs"] = n_pairs
        return rows
