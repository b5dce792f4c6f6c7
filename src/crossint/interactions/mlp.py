"""MLP feature interactions (SPEC §4.2–§4.4, §9.2): dominant share, the keep-dominant bound and its
measured gap, the interaction penalty (its training plug-in is :mod:`crossint.interactions.penalty`)
and the per-token score.

Every statistic comes from :func:`crossint.interactions.contributions.magnitude_stats`; the
penalty finds the same maxima with :func:`crossint.interactions.kernels.dominant_magnitudes`
(one fused pass on the CPU), so the penalty that trains a crosscoder and the metric that
evaluates it are the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossint.crosscoder.distributed import divide
from crossint.errors import CrossintError
from crossint.interactions.contributions import (
    SHARE_EPS,
    ActiveFeatures,
    Contributions,
    MLPFeatureBlock,
    NeuronStats,
    Ratio,
    active_features,
    distinct_virtual_weights,
    feature_blocks,
    iter_contributions,
    neuron_stats,
    reconstructed_mlp_in,
    resolve_chunk,
)
from crossint.interactions.kernels import chunks, dominant_gradients, dominant_magnitudes

if TYPE_CHECKING:
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions.pairwise import PairwiseAccumulator, PairwiseResult
    from crossint.models.adapter import MLPWeights

WEIGHTINGS: tuple[str, ...] = ("uniform", "w_out")
NORMALISATIONS: tuple[str, ...] = ("none", "total", "neuron")


# --- SPEC §4.2 averages ------------------------------------------------------------------------
class ShareSummary:
    """Running SPEC §4.2 averages over tokens × neurons × blocks, overall and per block.

    ``dominant_share`` is the plain mean (the paper's mean_max_ratio_mlp); ``dominant_share_active``
    averages only (token, neuron) pairs with at least one non-zero contribution;
    ``mean_nondominant`` (mean S − Mx) is exactly the uniform, un-normalised penalty."""

    _KEYS = ("n", "share", "n_active", "share_active", "S", "nondominant")

    def __init__(self) -> None:
        self._sums: dict[int, dict[str, float]] = {}

    def update(self, block: int, stats: NeuronStats) -> None:
        share_BN = stats.share_BN.double()
        active_BN = stats.active_BN
        sums = self._sums.setdefault(block, dict.fromkeys(self._KEYS, 0.0))
        sums["n"] += share_BN.numel()
        sums["share"] += share_BN.sum().item()
        sums["n_active"] += active_BN.sum().item()
        sums["share_active"] += share_BN[active_BN].sum().item()
        sums["S"] += stats.S_BN.double().sum().item()
        sums["nondominant"] += stats.nondominant_BN.double().sum().item()

    @staticmethod
    def _means(sums: dict[str, float]) -> dict[str, float]:
        n, n_active = sums["n"], sums["n_active"]
        nan = float("nan")
        return {
            "dominant_share": sums["share"] / n if n else nan,
            "dominant_share_active": sums["share_active"] / n_active if n_active else nan,
            "active_fraction": n_active / n if n else nan,
            "mean_S": sums["S"] / n if n else nan,
            "mean_nondominant": sums["nondominant"] / n if n else nan,
            "nondominant_fraction": sums["nondominant"] / sums["S"] if sums["S"] else nan,
        }

    def result(self) -> dict[str, Any]:
        total = dict.fromkeys(self._KEYS, 0.0)
        for sums in self._sums.values():
            for key in self._KEYS:
                total[key] += sums[key]
        return {
            **self._means(total),
            "blocks": {block: self._means(self._sums[block]) for block in sorted(self._sums)},
        }


# --- SPEC §4.3 the keep-dominant gap and its bound ---------------------------------------------
@dataclass(frozen=True)
class KeepDominantGap:
    """Per token: the measured ‖MLP_full − MLP_keep‖ and the SPEC §4.3 bound on it."""

    gap_B: Tensor
    bound_B: Tensor


def keep_dominant_gap(
    contrib: Contributions, stats: NeuronStats, block: MLPFeatureBlock
) -> KeepDominantGap:
    """SPEC §4.3 on the crosscoder's reconstruction of ``mlp_in``.

    MLP_full uses z = Σ_h p_h + c, MLP_keep uses z_keep = p_dom + c at every neuron (the bias
    term c is kept). gap = ‖(φ(z) − φ(z_keep))·W_out‖ (b_out cancels); bound =
    Lip(φ)·Σ_n ‖W_out[n]‖·(S_n − Mx_n), valid because |z − z_keep| ≤ S − Mx.

    Gated MLPs: only the gate pre-activation is decomposed; the up projection keeps its full value
    up = u·W_up + b_up (u = reconstructed mlp_in) in both terms. The neuron's change is then
    (φ(z) − φ(z_keep))·up, so the bound carries the extra factor |up_n|:
    Lip(φ)·Σ_n ‖W_out[n]‖·|up_n|·(S_n − Mx_n) (the plain SPEC form is not a bound there).
    """
    mlp = block.mlp
    c_N = block.c_N
    z_BN = contrib.z_BN + c_N
    p_dom_BN = contrib.p_BKN.gather(1, stats.slot_BN[:, None, :]).squeeze(1)
    z_keep_BN = p_dom_BN + c_N
    delta_BN = mlp.act(z_BN) - mlp.act(z_keep_BN)
    weight_BN = block.w_out_N.expand_as(delta_BN)
    if mlp.gated:
        u_BD = reconstructed_mlp_in(contrib, block)
        up_BN = u_BD @ mlp.W_up_DN + mlp.b_up_N
        delta_BN = delta_BN * up_BN
        weight_BN = weight_BN * up_BN.abs()
    gap_B = (delta_BN @ mlp.W_out_ND).norm(dim=-1)
    bound_B = mlp.lipschitz * (weight_BN * stats.nondominant_BN).sum(dim=-1)
    return KeepDominantGap(gap_B, bound_B)


# --- SPEC §9.2 per-token score -----------------------------------------------------------------
def interaction_score(stats: NeuronStats, w_out_N: Tensor) -> Tensor:
    """One block's share of score(t) = Σ_n ‖W_out[n]‖·(S − Mx) (SPEC §9.2)."""
    return (stats.nondominant_BN * w_out_N).sum(dim=-1)


def token_interaction_scores(
    f_BH: Tensor,
    blocks: Sequence[MLPFeatureBlock],
    chunk_tokens: int | None = None,
) -> Tensor:
    """SPEC §9.2 score(t) = Σ_blocks Σ_n ‖W_out[n]‖·(S[t,n] − Mx[t,n]), per token (B,)."""
    active = active_features(f_BH)
    score_B = None
    for block in blocks:
        w_out_N = block.w_out_N
        for start, contrib in iter_contributions(active, block.d_HD, block.mlp.W_in_DN,
                                                 chunk_tokens):
            part_B = interaction_score(neuron_stats(contrib), w_out_N)
            if score_B is None:
                score_B = part_B.new_zeros(active.n_tokens)
            score_B[start:start + part_B.shape[0]] += part_B
    if score_B is None:
        return f_BH.new_zeros(f_BH.shape[0])
    return score_B


# --- SPEC §4.4 the interaction penalty ---------------------------------------------------------
class _NondominantSum(torch.autograd.Function):
    """Σ_{b,n} w_n·(S − Mx) and Σ_{b,n} w_n·S for one block, chunked over tokens, with an
    analytic backward that never touches a B×K×N tensor.

    |p_k| = |f_k|·|V_kn|, so the forward reduces |f|·|V[row]| chunk by chunk (O(chunk·K·N)
    memory) and keeps only Mx and the dominant slot of every (token, neuron) (B×N). With
    a_n = ∂L/∂(S−Mx)·w_n and t_n = ∂L/∂S·w_n, and |V_dom,n| = Mx_bn/|f_dom|:

        ∂L/∂f_bk = sign(f_bk)·Σ_n |V_kn|·(a_n + t_n) − (1/f_bk)·Σ_{n: dom(b,n)=k} Mx_bn·a_n
        ∂L/∂V_un = sign(V_un)·( (a_n + t_n)·Σ_{(b,k): row=u} |f_bk|
                                − Σ_{b: dom row(b,n)=u} |f_dom(b,n)|·a_n )

    The first terms are per feature (one U×N product), the dominant terms are B×N scatters
    (:func:`crossint.interactions.kernels.dominant_gradients`): the backward costs
    O(U·N + B·N), not O(B·K·N). Subgradient convention as
    autograd's: sign(0) = 0 and the maximum's gradient goes to its first argmax slot.
    """

    @staticmethod
    def forward(ctx, f_BK, V_UN, row_BK, counts_B, w_N, chunk_tokens):  # noqa: ANN001
        n_rows = V_UN.shape[0]
        abs_f_BK, abs_V_UN = f_BK.abs(), V_UN.abs()
        slot_BN, Mx_BN, _ = dominant_magnitudes(abs_f_BK, abs_V_UN, row_BK, counts_B,
                                                chunk_tokens)
        # Σ_b S = (Σ_b |f| per row)·|V|: no B·K·N pass for S.
        mass_U = abs_f_BK.new_zeros(n_rows).index_add_(0, row_BK.reshape(-1), abs_f_BK.reshape(-1))
        S_sum_N = mass_U @ abs_V_UN
        Mx_sum_N = Mx_BN.sum(dim=0)
        if w_N is None:
            nondominant, total = (S_sum_N - Mx_sum_N).sum(), S_sum_N.sum()
        else:
            nondominant, total = (S_sum_N - Mx_sum_N) @ w_N, S_sum_N @ w_N
        ctx.save_for_backward(f_BK, V_UN, abs_V_UN, row_BK, w_N, Mx_BN, slot_BN, mass_U)
        return nondominant, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nondominant, grad_total):  # noqa: ANN001
        f_BK, V_UN, abs_V_UN, row_BK, w_N, Mx_BN, slot_BN, mass_U = ctx.saved_tensors
        if w_N is None:
            w_N = torch.ones(V_UN.shape[1], dtype=V_UN.dtype, device=V_UN.device)
        a_N = grad_nondominant * w_N  # on every non-dominant |p|
        both_N = a_N + grad_total * w_N  # on every |p|
        grad_f_BK, grad_V_UN = dominant_gradients(
            f_BK.to(V_UN.dtype), V_UN, row_BK, slot_BN, Mx_BN, a_N.expand_as(Mx_BN),
            (abs_V_UN @ both_N)[row_BK], mass_U[:, None] * both_N)
        return grad_f_BK.to(f_BK.dtype), grad_V_UN, None, None, None, None


class _NondominantShare(torch.autograd.Function):
    """Σ_{b,n} w_n·(S − Mx)/(S + ε) for one block (one minus the SPEC §4.2 share, per token
    and neuron), chunked over tokens; the analytic backward costs two chunked B·K·N passes.

    With G_bn = g·w_n/(S + ε) and A_bn = G_bn·(Mx + ε)/(S + ε) (g the incoming gradient),
    ∂L/∂|p_bkn| = A_bn − 1[k = dom(b,n)]·G_bn, so

        ∂L/∂f_bk = sign(f_bk)·Σ_n |V_kn|·A_bn − (1/f_bk)·Σ_{n: dom(b,n)=k} Mx_bn·G_bn
        ∂L/∂V_un = sign(V_un)·( Σ_{(b,k): row=u} |f_bk|·A_bn − Σ_{b: dom row(b,n)=u} |f_dom|·G_bn )

    The ratio is invariant to scaling a neuron's contributions, so this penalty cannot be
    lowered by shrinking features: it only moves each neuron's mass towards its dominant feature.
    """

    @staticmethod
    def forward(ctx, f_BK, V_UN, row_BK, counts_B, w_N, chunk_tokens):  # noqa: ANN001
        abs_f_BK, abs_V_UN = f_BK.abs(), V_UN.abs()
        slot_BN, Mx_BN, S_BN = dominant_magnitudes(abs_f_BK, abs_V_UN, row_BK, counts_B,
                                                   chunk_tokens, with_sum=True)
        ratio_BN = (S_BN - Mx_BN) / (S_BN + SHARE_EPS)
        value = ratio_BN.sum() if w_N is None else (ratio_BN @ w_N).sum()
        ctx.save_for_backward(f_BK, V_UN, abs_V_UN, row_BK, counts_B, w_N, Mx_BN, S_BN, slot_BN)
        ctx.chunk_tokens = chunk_tokens
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001
        (f_BK, V_UN, abs_V_UN, row_BK, counts_B, w_N, Mx_BN, S_BN,
         slot_BN) = ctx.saved_tensors
        n_neurons = V_UN.shape[1]
        f_V_BK = f_BK.to(V_UN.dtype)
        abs_f_BK = f_V_BK.abs()
        G_BN = grad / (S_BN + SHARE_EPS)
        if w_N is not None:
            G_BN = G_BN * w_N
        A_BN = G_BN * (Mx_BN + SHARE_EPS) / (S_BN + SHARE_EPS)
        spread_BK, unsigned_UN = torch.zeros_like(f_V_BK), torch.zeros_like(V_UN)
        for start, stop, width in chunks(counts_B, ctx.chunk_tokens):
            rows = row_BK[start:stop, :width]
            # Σ_n |V_kn|·A_bn
            abs_BKN = abs_V_UN.index_select(0, rows.reshape(-1)).view(-1, width, n_neurons)
            spread_BK[start:stop, :width] = torch.bmm(abs_BKN, A_BN[start:stop, :, None])[..., 0]
            # Σ_{(b,k): row=u} |f_bk|·A_bn
            outer_BKN = abs_f_BK[start:stop, :width, None] * A_BN[start:stop, None, :]
            unsigned_UN.index_add_(0, rows.reshape(-1), outer_BKN.view(-1, n_neurons))
        grad_f_BK, grad_V_UN = dominant_gradients(f_V_BK, V_UN, row_BK, slot_BN, Mx_BN, G_BN,
                                                  spread_BK, unsigned_UN)
        return grad_f_BK.to(f_BK.dtype), grad_V_UN, None, None, None, None


def normalisation_mode(normalise: str | bool) -> str:
    """``normalise`` as one of NORMALISATIONS (``False``/``True`` mean "none"/"total")."""
    if isinstance(normalise, bool):
        return "total" if normalise else "none"
    if normalise not in NORMALISATIONS:
        raise CrossintError(
            f"unknown penalty normalisation {normalise!r}: valid choices are "
            f"{', '.join(NORMALISATIONS)}"
        )
    return normalise


def check_penalty_options(weighting: str, normalise: str | bool) -> str:
    """Validate the dominance penalty's options; returns the normalisation as one of
    NORMALISATIONS."""
    if weighting not in WEIGHTINGS:
        raise CrossintError(
            f"unknown interaction weighting {weighting!r}: valid choices are "
            f"{', '.join(WEIGHTINGS)}"
        )
    return normalisation_mode(normalise)


def interaction_penalty(
    f_BH: Tensor | ActiveFeatures,
    blocks: Sequence[MLPFeatureBlock],
    weighting: str = "uniform",
    normalise: str | bool = "none",
    chunk_tokens: int | None = None,
    ratio: Ratio = divide,
) -> Tensor:
    """SPEC §4.4 L_int = mean over blocks, tokens, neurons of w_n·(S − Mx).

    Gradients reach the encoder through ``f_BH`` and the decoder through each block's ``d_HD``
    (via V = d·W_in); any number of blocks. ``weighting``: ``"uniform"`` (w = 1; then the value
    is ShareSummary's mean_nondominant) or ``"w_out"`` (w_n = ‖W_out[n]‖, so the value is the
    SPEC §4.3 bound averaged over neurons, divided by Lip(φ)). ``normalise`` (``True`` =
    ``"total"``, ``False`` = ``"none"``):

    - ``"total"``: Σ w(S − Mx) / Σ w·S ∈ [0, 1) (one minus the mass-weighted dominant share),
      comparable across models. The denominator is NOT detached: the ratio is invariant to
      scaling all contributions, so its gradient only moves mass towards the dominant features.
      A detached denominator keeps the un-normalised gradient's "shrink every contribution"
      direction, which fights reconstruction and, with a large weight, kills the features.
      ``ratio`` divides the two sums (``Ranks.ratio`` makes it the global batch's ratio).
    - ``"neuron"``: the weighted mean over tokens and neurons of (S − Mx)/(S + ε), i.e. one minus
      the SPEC §4.2 dominant share itself (uniform weighting). Invariant to scaling each
      neuron's contributions, so no neuron's input is worth shrinking.

    Memory: O(chunk_tokens·K·N) transient, O(B·N) kept for the backward, which costs
    O(U·N + B·N) for "none"/"total" and two chunked O(B·K·N) passes for "neuron" (see
    ``_NondominantSum`` and ``_NondominantShare``).
    """
    mode = check_penalty_options(weighting, normalise)
    if not blocks:
        raise CrossintError("the interaction penalty needs at least one MLP block")
    active = f_BH if isinstance(f_BH, ActiveFeatures) else active_features(f_BH)
    active = active.by_count()  # the sum is order-free; sorted chunks carry little padding
    per_token = active.features_BK.shape[1] * max(block.n_neurons for block in blocks)
    chunk_tokens = resolve_chunk(chunk_tokens, active.f_BK.device, per_token)
    nondominant: Tensor | None = None
    total: Tensor | None = None
    weight_sum = 0.0
    for block in blocks:
        V_UN, row_BK = distinct_virtual_weights(active, block.d_HD, block.mlp.W_in_DN)
        w_N = block.w_out_N.to(V_UN.dtype) if weighting == "w_out" else None
        f_BK = active.f_BK.to(V_UN.dtype)
        if mode == "neuron":
            part = _NondominantShare.apply(f_BK, V_UN, row_BK, active.counts_B, w_N,
                                           chunk_tokens)
            weight_sum += active.n_tokens * (block.n_neurons if w_N is None
                                             else float(w_N.sum()))
        else:
            part, part_total = _NondominantSum.apply(f_BK, V_UN, row_BK, active.counts_B, w_N,
                                                     chunk_tokens)
            total = part_total if total is None else total + part_total
            weight_sum += active.n_tokens * block.n_neurons
        nondominant = part if nondominant is None else nondominant + part
    assert nondominant is not None
    if mode == "total":
        assert total is not None
        return ratio(nondominant, total)
    return nondominant / max(weight_sum, 1.0)


# --- one pass over data: all of the above at once ----------------------------------------------
BlockRecord = tuple[MLPFeatureBlock, Contributions, NeuronStats]


def block_records(blocks: Sequence[MLPFeatureBlock], active: ActiveFeatures,
                  chunk_tokens: int | None = None) -> Iterator[tuple[int, list[BlockRecord]]]:
    """Per chunk of tokens: its first token and, at every block, the chunk's contributions and
    neuron statistics (one chunk size for every block, so the records cover the same tokens)."""
    per_token = active.features_BK.shape[1] * max(b.n_neurons for b in blocks)
    chunk_tokens = resolve_chunk(chunk_tokens, active.f_BK.device, per_token)
    per_block = [iter_contributions(active, b.d_HD, b.mlp.W_in_DN, chunk_tokens)
                 for b in blocks]
    for chunk in zip(*per_block, strict=True):
        records = [(block, contrib, neuron_stats(contrib))
                   for block, (_, contrib) in zip(blocks, chunk, strict=True)]
        yield chunk[0][0], records


class MLPInteractionMeter:
    """Accumulates SPEC §4.2 shares, the §4.3 gap and bound, and (optionally) the §4.5 pairwise
    matrix over batches of feature activations; ``update`` returns the §9.2 per-token scores.

    ``blocks`` from :func:`feature_blocks` (use ``dtype=torch.float64`` for exact analysis).
    """

    def __init__(
        self,
        blocks: Sequence[MLPFeatureBlock],
        chunk_tokens: int | None = None,
        pairwise: PairwiseAccumulator | None = None,
    ) -> None:
        if not blocks:
            raise CrossintError("MLP interaction analysis needs at least one MLP block")
        resolve_chunk(chunk_tokens, blocks[0].d_HD.device)
        self.blocks = list(blocks)
        self.chunk_tokens = chunk_tokens
        self.pairwise = pairwise
        self.shares = ShareSummary()
        self._gap: dict[int, list[float]] = {b.block: [0.0, 0.0, 0.0, 0.0] for b in self.blocks}
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, f_BH: Tensor) -> Tensor:
        """Add a batch; returns score_B (SPEC §9.2) for its tokens."""
        active = active_features(f_BH)
        dtype = self.blocks[0].d_HD.dtype
        score_B = torch.zeros(active.n_tokens, dtype=dtype, device=f_BH.device)
        for start, records in block_records(self.blocks, active, self.chunk_tokens):
            for block, contrib, stats in records:
                self.shares.update(block.block, stats)
                gap = keep_dominant_gap(contrib, stats, block)
                sums = self._gap[block.block]
                sums[0] += gap.gap_B.double().sum().item()
                sums[1] += gap.bound_B.double().sum().item()
                sums[2] += gap.gap_B.shape[0]
                sums[3] += (gap.bound_B < gap.gap_B).sum().item()
                stop = start + contrib.p_BKN.shape[0]
                score_B[start:stop] += interaction_score(stats, block.w_out_N).to(dtype)
            if self.pairwise is not None:
                self.pairwise.update(records)
        self.n_tokens += active.n_tokens
        return score_B

    def result(self) -> dict[str, Any]:
        """Shares (overall and per block) and mean gap / bound per block and over blocks."""
        summary = self.shares.result()
        gaps = {}
        for block, (gap, bound, n, violations) in self._gap.items():
            gaps[block] = {
                "mean_gap": gap / n if n else float("nan"),
                "mean_bound": bound / n if n else float("nan"),
                "bound_violations": int(violations),
            }
            summary["blocks"].setdefault(block, {}).update(gaps[block])
        n_blocks = len(gaps)
        summary["mean_gap"] = sum(g["mean_gap"] for g in gaps.values()) / n_blocks
        summary["mean_bound"] = sum(g["mean_bound"] for g in gaps.values()) / n_blocks
        summary["n_tokens"] = self.n_tokens
        return summary


@dataclass
class MLPInteractionReport:
    """What :func:`analyse_mlp_interactions` found: ``summary`` (SPEC §4.2 shares overall and
    per block, §4.3 mean gap and bound) and the §4.5 ``pairwise`` result (or None)."""

    summary: dict[str, Any]
    pairwise: PairwiseResult | None


def analyse_mlp_interactions(
    crosscoder: Crosscoder,
    mlp_weights_by_block: dict[int, MLPWeights],
    batches: Iterable[Tensor],
    *,
    model: str | None = None,
    dtype: torch.dtype = torch.float64,
    pairwise: bool = True,
    storage: str = "auto",
    chunk_tokens: int | None = None,
    progress: bool = True,
    total: int | None = None,
) -> MLPInteractionReport:
    """Encode every batch of activations (B, X, D) with the crosscoder and accumulate the MLP
    interaction statistics of the given blocks, in ``dtype`` (float64 by default)."""
    from tqdm.auto import tqdm

    from crossint.interactions.pairwise import PairwiseAccumulator

    blocks = feature_blocks(crosscoder, mlp_weights_by_block, model=model, dtype=dtype)
    accumulator = None
    if pairwise:
        accumulator = PairwiseAccumulator(crosscoder.config.n_features,
                                          [b.block for b in blocks], storage)
    meter = MLPInteractionMeter(blocks, chunk_tokens, accumulator)
    device = blocks[0].d_HD.device
    with torch.no_grad():
        for acts_BXD in tqdm(batches, total=total, disable=not progress, desc="interactions",
                             unit="batch", dynamic_ncols=True):
            meter.update(crosscoder.encode(acts_BXD.to(device)))
    return MLPInteractionReport(meter.result(),
                                accumulator.result() if accumulator is not None else None)
