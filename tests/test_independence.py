"""Probabilistic independence (SPEC §8): co-activation counts, PMI with intervals, magnitude
correlations, binned per-feature distributions and the Wasserstein distance, each against a
naive float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from crossint.interactions import independence as I
from crossint.interactions.contributions import active_features


def random_features(seed: int, T: int = 60, H: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(H, generator=g, dtype=torch.float64) * 0.6 + 0.1
    on = torch.rand(T, H, generator=g, dtype=torch.float64) < rate
    values = torch.rand(T, H, generator=g, dtype=torch.float64) * 3 + 0.1
    f = torch.where(on, values, torch.zeros_like(values))
    f[:, 1] = torch.where(f[:, 0] > 0, f[:, 0] * 0.5 + 0.2, 0.0)  # 1 fires with 0: PMI > 0
    return f


def naive_pairs(f: torch.Tensor) -> dict[tuple[int, int], list[float]]:
    out: dict[tuple[int, int], list[float]] = {}
    T, H = f.shape
    for t in range(T):
        active = [h for h in range(H) if f[t, h] != 0]
        for a in range(len(active)):
            for b in range(a + 1, len(active)):
                i, j = active[a], active[b]
                fi, fj = float(f[t, i]), float(f[t, j])
                sums = out.setdefault((i, j), [0.0] * 6)
                for k, v in enumerate((1.0, fi, fj, fi * fi, fj * fj, fi * fj)):
                    sums[k] += v
    return out


def test_coactivation_sums_pmi_and_correlation_match_naive_loops():
    f = random_features(0)
    T, H = f.shape
    acc = I.CoactivationAccumulator(H)
    for part in f.split(17):  # several updates merge
        acc.update(active_features(part))
    table = I.pair_table(acc)
    naive = naive_pairs(f)
    assert acc.n_tokens == T
    counts = [float((f[:, h] != 0).sum()) for h in range(H)]
    assert acc.count_H.tolist() == counts
    assert len(naive) == table.n_Q.numel()
    for q in range(table.n_Q.numel()):
        i, j = int(table.i_Q[q]), int(table.j_Q[q])
        n, fi, fj, fi2, fj2, fifj = naive[(i, j)]
        assert float(table.n_Q[q]) == n
        assert float(table.expected_Q[q]) == pytest.approx(counts[i] * counts[j] / T)
        assert float(table.pmi_Q[q]) == pytest.approx(math.log(n * T / (counts[i] * counts[j])))
        mean_i, mean_j = fi / n, fj / n
        cov = fifj / n - mean_i * mean_j
        var_i, var_j = fi2 / n - mean_i ** 2, fj2 / n - mean_j ** 2
        if n >= 2 and var_i > 1e-12 and var_j > 1e-12:
            r = cov / math.sqrt(var_i * var_j)
            assert float(table.corr_Q[q]) == pytest.approx(r, abs=1e-9)
        low, high = float(table.low_Q[q]), float(table.high_Q[q])
        assert low <= float(table.pmi_Q[q]) <= high
    q01 = [q for q in range(table.n_Q.numel()) if (int(table.i_Q[q]), int(table.j_Q[q])) == (0, 1)]
    assert float(table.corr_Q[q01[0]]) == pytest.approx(1.0)  # f_1 is affine in f_0


def test_wilson_interval_matches_the_formula():
    n, T, z = 7, 50, I.WILSON_Z
    p = n / T
    centre = (p + z * z / (2 * T)) / (1 + z * z / T)
    half = z * math.sqrt(p * (1 - p) / T + z * z / (4 * T * T)) / (1 + z * z / T)
    low, high = I.wilson_interval(torch.tensor([float(n)]), T)
    assert float(low) == pytest.approx(centre - half)
    assert float(high) == pytest.approx(centre + half)


def test_expected_coactivations_and_pair_population_match_loops():
    count = torch.tensor([0.0, 3.0, 10.0, 40.0, 7.0, 25.0])
    T = 50
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    expected = sum(float(count[i] * count[j]) / T for i, j in pairs)
    assert I.expected_coactivations(count, T) == pytest.approx(expected)
    for least in (0.5, 2, 5, 10):
        naive = sum(1 for i, j in pairs if float(count[i] * count[j]) / T >= least)
        assert I.pairs_expected_at_least(count, T, least) == naive


def test_feature_histograms_match_a_loop_and_samples_follow_them():
    f = random_features(1, T=200)
    T, H = f.shape
    bins = 4
    hist = I.feature_histograms([f[:120].to_sparse(), f[120:]], H, bins)
    for h in range(H):
        values = [float(v) for v in f[:, h] if v != 0]
        assert float(hist.rate_H[h]) == pytest.approx(len(values) / T)
        lo, hi = min(values), max(values)
        counts = [0] * bins
        for v in values:
            counts[min(int((v - lo) / ((hi - lo) / bins)), bins - 1)] += 1
        assert hist.counts_HB[h].tolist() == counts
    g = torch.Generator().manual_seed(0)
    sample = torch.cat(list(I.sample_independent(hist, 20_000, g, chunk_tokens=3000)))
    rates = (sample != 0).double().mean(dim=0)
    assert torch.allclose(rates, hist.rate_H, atol=0.02)
    on = sample != 0
    assert ((sample >= hist.lo_H - 1e-12) | ~on).all() and ((sample <= hist.hi_H + 1e-12)
                                                            | ~on).all()
    # independence: the sample's co-activation of features 0 and 1 is the product of rates
    both = float((on[:, 0] & on[:, 1]).double().mean())
    assert both == pytest.approx(float(hist.rate_H[0] * hist.rate_H[1]), abs=0.02)


def naive_wasserstein(a: list[float], b: list[float]) -> float:
    """∫ |F_a(x) − F_b(x)| dx over the merged sample points."""
    points = sorted(set(a) | set(b))
    total = 0.0
    for x0, x1 in zip(points[:-1], points[1:], strict=True):
        Fa = sum(v <= x0 for v in a) / len(a)
        Fb = sum(v <= x0 for v in b) / len(b)
        total += abs(Fa - Fb) * (x1 - x0)
    return total


@pytest.mark.parametrize("n,m", [(5, 7), (10, 10), (3, 11)])
def test_wasserstein_matches_the_cdf_integral(n, m):
    g = torch.Generator().manual_seed(n * m)
    a = torch.randn(n, 3, generator=g, dtype=torch.float64)
    b = torch.randn(m, 3, generator=g, dtype=torch.float64) * 2 + 0.5
    w = I.wasserstein_1d(a, b)
    for k in range(3):
        assert float(w[k]) == pytest.approx(naive_wasserstein(a[:, k].tolist(),
                                                              b[:, k].tolist()), abs=1e-12)
    assert float(I.wasserstein_1d(a, a).abs().max()) == 0.0
