"""Probabilistic independence of crosscoder features (SPEC §8; decisions in docs/spec.md §8).

- **Co-activation PMI** of a feature pair: ``PMI(i, j) = log(n_ij·T / (n_i·n_j))`` over T tokens
  (n_i tokens where i is active, n_ij where both are), with a 95% interval from the Wilson score
  interval of n_ij/T (the marginals, estimated from far more tokens, held fixed).
- **Correlation of magnitudes when co-active**: Pearson's r of (f_i, f_j) over the n_ij tokens.
- **Independence push-forward**: per-feature binned distributions (activation rate, and a
  histogram of the active values) sampled independently, pushed through a block's MLP (the
  crosscoder's reconstruction of its input, SPEC §4.7 notation) and compared, neuron by neuron,
  with the measured output distribution by the Wasserstein-1 distance (:func:`wasserstein_1d`).

Pure functions and one accumulator over chunks of tokens; no model or file access here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from crossint.errors import CrossintError
from crossint.interactions.contributions import ActiveFeatures

WILSON_Z = 1.959963984540054  # the 97.5% normal quantile


# --- co-activation counts ------------------------------------------------------------------------
def coactive_pairs(active: ActiveFeatures) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i_E, j_E, f_i_E, f_j_E): every unordered pair i < j of features active on the same
    token, once per token, with their activations."""
    valid_BK = active.mask_BK
    K = valid_BK.shape[1]
    upper_KK = torch.ones(K, K, dtype=torch.bool).triu(diagonal=1)
    both_BKK = valid_BK[:, :, None] & valid_BK[:, None, :] & upper_KK
    b_E, k1_E, k2_E = both_BKK.nonzero(as_tuple=True)
    i_E, j_E = active.features_BK[b_E, k1_E], active.features_BK[b_E, k2_E]
    f_i, f_j = active.f_BK[b_E, k1_E].double(), active.f_BK[b_E, k2_E].double()
    swap = i_E > j_E  # slots are in ascending feature order, but do not rely on it
    return (torch.where(swap, j_E, i_E), torch.where(swap, i_E, j_E),
            torch.where(swap, f_j, f_i), torch.where(swap, f_i, f_j))


PAIR_SUMS = ("n", "fi", "fj", "fi2", "fj2", "fifj")


class CoactivationAccumulator:
    """Counts n_i per feature and, per co-active pair (sparse keys i·H + j), the sums n_ij,
    Σf_i, Σf_j, Σf_i², Σf_j², Σf_i·f_j over the tokens where both are active."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.n_tokens = 0
        self.count_H = torch.zeros(n_features, dtype=torch.float64)
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.sums = torch.zeros(0, len(PAIR_SUMS), dtype=torch.float64)

    def update(self, active: ActiveFeatures) -> None:
        self.n_tokens += active.n_tokens
        features = active.features_BK[active.mask_BK].cpu()
        self.count_H += torch.bincount(features, minlength=self.n_features).double()
        i_E, j_E, f_i, f_j = (t.cpu() for t in coactive_pairs(active))
        if i_E.numel() == 0:
            return
        values = torch.stack([torch.ones_like(f_i), f_i, f_j, f_i * f_i, f_j * f_j, f_i * f_j],
                             dim=1)
        keys = torch.cat([self.keys, i_E * self.n_features + j_E])
        values = torch.cat([self.sums, values])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.sums = torch.zeros(self.keys.numel(), len(PAIR_SUMS),
                                dtype=torch.float64).index_add_(0, inverse, values)

    def pairs(self) -> tuple[Tensor, Tensor]:
        """(i_Q, j_Q) of every co-active pair."""
        return self.keys // self.n_features, self.keys % self.n_features


# --- PMI and correlation -------------------------------------------------------------------------
def pmi(n_ij: Tensor, n_i: Tensor, n_j: Tensor, n_tokens: int) -> Tensor:
    """log P(i, j) / (P(i)·P(j)) = log(n_ij·T / (n_i·n_j)) (−inf where n_ij = 0)."""
    return torch.log(n_ij.double() * n_tokens) - torch.log(n_i.double() * n_j.double())


def wilson_interval(n: Tensor, total: int, z: float = WILSON_Z) -> tuple[Tensor, Tensor]:
    """The Wilson score interval of a binomial proportion n/total."""
    p = n.double() / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * torch.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (centre - half).clamp(min=0), (centre + half).clamp(max=1)


def pmi_interval(n_ij: Tensor, n_i: Tensor, n_j: Tensor, n_tokens: int
                 ) -> tuple[Tensor, Tensor]:
    """95% interval of the PMI: the Wilson interval of n_ij/T over P(i)·P(j)."""
    low, high = wilson_interval(n_ij, n_tokens)
    expected = n_i.double() * n_j.double() / (n_tokens * n_tokens)
    return torch.log(low / expected), torch.log(high / expected)


def correlation(sums_Q6: Tensor) -> Tensor:
    """Pearson's r of (f_i, f_j) over the co-active tokens from PAIR_SUMS (NaN where fewer
    than two tokens or a constant magnitude)."""
    n, fi, fj, fi2, fj2, fifj = sums_Q6.unbind(dim=1)
    cov = fifj - fi * fj / n
    var_i = (fi2 - fi * fi / n).clamp(min=0)
    var_j = (fj2 - fj * fj / n).clamp(min=0)
    denominator = torch.sqrt(var_i * var_j)
    r = cov / denominator
    ok = (n >= 2) & (denominator > 1e-12 * (fi2 * fj2).sqrt().clamp(min=1e-300))
    return torch.where(ok, r.clamp(-1, 1), torch.full_like(r, math.nan))


@dataclass(frozen=True)
class PairTable:
    """Every co-active pair: features, counts, expected count under independence, PMI with
    its interval, and the magnitude correlation."""

    i_Q: Tensor
    j_Q: Tensor
    n_Q: Tensor
    expected_Q: Tensor
    pmi_Q: Tensor
    low_Q: Tensor
    high_Q: Tensor
    corr_Q: Tensor


def pair_table(acc: CoactivationAccumulator) -> PairTable:
    i_Q, j_Q = acc.pairs()
    n_Q = acc.sums[:, 0]
    n_i, n_j = acc.count_H[i_Q], acc.count_H[j_Q]
    T = acc.n_tokens
    low, high = pmi_interval(n_Q, n_i, n_j, T)
    return PairTable(i_Q, j_Q, n_Q, n_i * n_j / T, pmi(n_Q, n_i, n_j, T), low, high,
                     correlation(acc.sums))


def expected_coactivations(count_H: Tensor, n_tokens: int) -> float:
    """Σ_{i<j} n_i·n_j / T: co-activations (token, pair) expected if features were
    independent with their measured rates."""
    total = float(count_H.sum())
    return (total * total - float(count_H.pow(2).sum())) / (2 * n_tokens)


def pairs_expected_at_least(count_H: Tensor, n_tokens: int, least: float) -> int:
    """How many pairs i < j have an expected co-activation count n_i·n_j/T ≥ ``least``
    (co-active or not), by one sort: O(H log H)."""
    counts, _ = count_H.double().sort()
    positive = counts > 0
    needed = torch.where(positive, least * n_tokens / counts.clamp(min=1e-300),
                         torch.full_like(counts, math.inf))
    partners = counts.numel() - torch.searchsorted(counts, needed * (1 - 1e-12))
    ordered = int(partners.sum()) - int((counts * counts >= least * n_tokens * (1 - 1e-12))
                                        .sum())
    return ordered // 2


# --- binned per-feature distributions and independent samples -----------------------------------
@dataclass(frozen=True)
class FeatureHistograms:
    """Per feature: the activation rate, and a histogram of its active values over ``bins``
    equal bins between its smallest and largest value (a point mass if they are equal)."""

    rate_H: Tensor
    lo_H: Tensor
    hi_H: Tensor
    counts_HB: Tensor


def feature_histograms(f_TH_parts: list[Tensor], n_features: int, bins: int
                       ) -> FeatureHistograms:
    """The histograms of sparse or dense (T, H) activation chunks."""
    if bins < 1:
        raise CrossintError(f"bins must be a positive integer, got {bins!r}")
    features, values, n_tokens = [], [], 0
    for f_TH in f_TH_parts:
        dense = f_TH.to_dense() if f_TH.is_sparse else f_TH
        t_E, h_E = dense.nonzero(as_tuple=True)
        features.append(h_E)
        values.append(dense[t_E, h_E].double())
        n_tokens += dense.shape[0]
    if n_tokens == 0:
        raise CrossintError("no tokens to estimate feature distributions from")
    h_E, v_E = torch.cat(features), torch.cat(values)
    count_H = torch.bincount(h_E, minlength=n_features).double()
    lo_H = torch.full((n_features,), math.inf, dtype=torch.float64).scatter_reduce(
        0, h_E, v_E, "amin")
    hi_H = torch.full((n_features,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, h_E, v_E, "amax")
    lo_H = torch.where(count_H > 0, lo_H, torch.zeros_like(lo_H))
    hi_H = torch.where(count_H > 0, hi_H, torch.zeros_like(hi_H))
    width_H = (hi_H - lo_H) / bins
    bin_E = torch.where(width_H[h_E] > 0, ((v_E - lo_H[h_E]) / width_H[h_E]).floor(),
                        torch.zeros_like(v_E)).long().clamp(0, bins - 1)
    counts_HB = torch.zeros(n_features * bins, dtype=torch.float64).index_add_(
        0, h_E * bins + bin_E, torch.ones_like(v_E)).view(n_features, bins)
    return FeatureHistograms(count_H / n_tokens, lo_H, hi_H, counts_HB)


def sample_independent(hist: FeatureHistograms, n_tokens: int, generator: torch.Generator,
                       chunk_tokens: int = 1024) -> Iterator[Tensor]:
    """Synthetic (chunk, H) activations: every feature active independently with its rate,
    its value drawn from its histogram (a bin by its count, then uniformly within the bin)."""
    H, bins = hist.counts_HB.shape
    cdf_HB = hist.counts_HB.cumsum(dim=1)
    cdf_HB = cdf_HB / cdf_HB[:, -1:].clamp(min=1)
    width_H = (hist.hi_H - hist.lo_H) / bins
    for start in range(0, n_tokens, chunk_tokens):
        m = min(chunk_tokens, n_tokens - start)
        on_MH = torch.rand(m, H, generator=generator, dtype=torch.float64) < hist.rate_H
        t_E, h_E = on_MH.nonzero(as_tuple=True)
        u_E = torch.rand(h_E.numel(), 1, generator=generator, dtype=torch.float64)
        bin_E = torch.searchsorted(cdf_HB[h_E], u_E, right=True).squeeze(1).clamp(max=bins - 1)
        v_E = torch.rand(h_E.numel(), generator=generator, dtype=torch.float64)
        f_MH = torch.zeros(m, H, dtype=torch.float64)
        f_MH[t_E, h_E] = hist.lo_H[h_E] + (bin_E + v_E) * width_H[h_E]
        yield f_MH


# --- distances between distributions -------------------------------------------------------------
def wasserstein_1d(a_TN: Tensor, b_MN: Tensor) -> Tensor:
    """Per column, the Wasserstein-1 distance between the empirical distributions of a's and
    b's values: ∫₀¹ |F_a⁻¹(q) − F_b⁻¹(q)| dq, exact for any sample sizes."""
    n, m = a_TN.shape[0], b_MN.shape[0]
    if n == 0 or m == 0:
        raise CrossintError("the Wasserstein distance needs two non-empty samples")
    a, b = a_TN.double().sort(dim=0).values, b_MN.double().sort(dim=0).values
    q = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                torch.arange(1, m + 1, dtype=torch.float64) / m]))
    q = q[q > 0]
    widths = torch.diff(q, prepend=q.new_zeros(1))
    middle = q - widths / 2  # inside the q-interval where both quantile functions are constant
    ia = torch.ceil(middle * n).long().clamp(1, n) - 1
    ib = torch.ceil(middle * m).long().clamp(1, m) - 1
    return (widths[:, None] * (a[ia] - b[ib]).abs()).sum(dim=0)


__all__ = [
    "PAIR_SUMS", "CoactivationAccumulator", "FeatureHistograms", "PairTable", "coactive_pairs",
    "correlation", "expected_coactivations", "feature_histograms", "pair_table",
    "pairs_expected_at_least", "pmi",
    "pmi_interval", "sample_independent", "wasserstein_1d", "wilson_interval",
]
