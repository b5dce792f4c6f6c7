"""Pairwise MLP feature interactions (SPEC §4.5–§4.6): the corrected Figure-3 matrix against a
naive triple loop, dense vs sparse storage, co-occurrence, ranking, and the proposal's ratio,
Hadamard and second-difference measures with their rank correlation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossint.errors import CrossintError
from crossint.interactions import (
    MLPFeatureBlock,
    MLPInteractionMeter,
    PairMeasureAccumulator,
    PairwiseAccumulator,
    average_ranks,
    hadamard_measure,
    iter_contributions,
    measure_correlations,
    neuron_stats,
    spearman,
)
from crossint.interactions import pairwise as pairwise_module
from crossint.models.adapter import MLPWeights

D, N, H = 5, 9, 12


def random_f(n_tokens: int, n_features: int, seed: int, max_active: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f_BH = torch.zeros(n_tokens, n_features, dtype=torch.float64)
    for b in range(n_tokens):
        count = b % (max_active + 1)
        chosen = torch.randperm(n_features, generator=g)[:count]
        f_BH[b, chosen] = 0.2 + torch.rand(count, generator=g, dtype=torch.float64)
    return f_BH


def random_block(seed: int, block: int, act=F.gelu, act_name: str = "gelu") -> MLPFeatureBlock:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mlp = MLPWeights(W_in_DN=rand(D, N), b_in_N=rand(N), W_out_ND=rand(N, D), b_out_D=rand(D),
                     act=act, act_name=act_name, lipschitz=1.13)
    return MLPFeatureBlock(block, rand(H, D), rand(D), mlp)


def accumulate(f_BH, blocks, storage, chunk_tokens=4) -> PairwiseAccumulator:
    accumulator = PairwiseAccumulator(H, [b.block for b in blocks], storage=storage)
    iterators = [iter_contributions(f_BH, b.d_HD, b.mlp.W_in_DN, chunk_tokens) for b in blocks]
    for chunk in zip(*iterators, strict=True):
        accumulator.update([(block, contrib, neuron_stats(contrib))
                            for block, (_, contrib) in zip(blocks, chunk, strict=True)])
    return accumulator


def naive_interactions(f_BH, blocks):
    """Explicit loops over tokens, blocks, neurons and features (SPEC §4.5)."""
    B = f_BH.shape[0]
    I_LHH = torch.zeros(len(blocks), H, H, dtype=torch.float64)
    C_HH = torch.zeros(H, H, dtype=torch.float64)
    for b in range(B):
        active = [h for h in range(H) if f_BH[b, h] != 0]
        for i in active:
            for j in active:
                if i != j:
                    C_HH[i, j] += 1
        for x, block in enumerate(blocks):
            V_HN = block.d_HD @ block.mlp.W_in_DN
            w_N = block.mlp.W_out_ND.norm(dim=1)
            for n in range(N):
                p = {h: float(f_BH[b, h] * V_HN[h, n]) for h in active}
                if not p or max(abs(v) for v in p.values()) == 0:
                    continue
                dom = max(p, key=lambda h: abs(p[h]))
                for j in active:
                    if j != dom:
                        I_LHH[x, dom, j] += float(w_N[n]) * abs(p[j])
    return I_LHH / B, C_HH


@pytest.fixture(scope="module")
def case():
    blocks = [random_block(1, block=0), random_block(2, block=2)]
    f_BH = random_f(14, H, seed=3)
    f_BH[5] = 0.0
    f_BH[5, [2, 7]] = torch.tensor([5.0, 0.3], dtype=torch.float64)  # 2 dominates everywhere
    return f_BH, blocks, naive_interactions(f_BH, blocks)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_interaction_matrix_matches_naive_loops(case, storage):
    f_BH, blocks, (I_LHH, C_HH) = case
    result = accumulate(f_BH, blocks, storage).result()
    assert result.storage == storage and result.n_tokens == 14

    def dense(t):
        return t.to_dense() if t.is_sparse else t

    torch.testing.assert_close(dense(result.interaction_matrix()), I_LHH.sum(0))
    torch.testing.assert_close(dense(result.interaction_matrix(block=2)), I_LHH[1])
    torch.testing.assert_close(dense(result.cooccurrence()), C_HH)
    # token 5 alone: feature 2 dominates all N neurons, so every neuron's share must be summed
    # (duplicate (2, 7) indices), not just one of them
    only5 = accumulate(f_BH[5:6], blocks, storage).result()
    w_N = blocks[0].mlp.W_out_ND.norm(dim=1)
    p7_N = (0.3 * blocks[0].d_HD[7] @ blocks[0].mlp.W_in_DN).abs()
    assert dense(only5.interaction_matrix(block=0))[2, 7].item() == pytest.approx(
        float((w_N * p7_N).sum()))


def test_dense_and_sparse_storage_agree_and_merge_correctly(case, monkeypatch):
    f_BH, blocks, _ = case
    monkeypatch.setattr(pairwise_module, "_MIN_PENDING", 1)  # merge after every chunk
    dense = accumulate(f_BH, blocks, "dense", chunk_tokens=3).result()
    sparse = accumulate(f_BH, blocks, "sparse", chunk_tokens=5).result()
    assert torch.equal(dense.mass_keys_E, sparse.mass_keys_E)
    torch.testing.assert_close(dense.mass_E, sparse.mass_E)
    assert torch.equal(dense.count_keys_E, sparse.count_keys_E)
    assert torch.equal(dense.count_E, sparse.count_E)
    for key in ("i", "j", "block", "total", "count", "strength"):
        torch.testing.assert_close(dense.triplets()[key], sparse.triplets()[key])


def test_accumulation_does_not_depend_on_chunk_size(case):
    f_BH, blocks, _ = case
    one = accumulate(f_BH, blocks, "dense", chunk_tokens=1).result()
    all_ = accumulate(f_BH, blocks, "dense", chunk_tokens=100).result()
    torch.testing.assert_close(one.dense_mass_LHH, all_.dense_mass_LHH)
    assert torch.equal(one.dense_count_HH, all_.dense_count_HH)


def test_triplets_and_rankings(case):
    f_BH, blocks, (I_LHH, C_HH) = case
    result = accumulate(f_BH, blocks, "auto").result()
    rows = result.triplets()
    for i, j, block, total, count, strength in zip(*(rows[k].tolist() for k in (
            "i", "j", "block", "total", "count", "strength")), strict=True):
        x = [b.block for b in blocks].index(block)
        assert total == pytest.approx(float(I_LHH[x, i, j]))
        assert count == C_HH[i, j] > 0
        assert strength == pytest.approx(total * 14 / count)
    assert int((I_LHH > 0).sum()) == rows["i"].numel()
    top = result.top_triplets(3, by="total")
    assert top["total"].tolist() == sorted(rows["total"].tolist(), reverse=True)[:3]
    top = result.top_triplets(4, by="frequency")
    assert top["count"].tolist() == sorted(rows["count"].tolist(), reverse=True)[:4]
    top = result.top_triplets(2, by="strength")
    assert top["strength"].tolist() == sorted(rows["strength"].tolist(), reverse=True)[:2]
    with pytest.raises(CrossintError, match="ranking"):
        result.top_triplets(2, by="size")


def test_accumulator_validation():
    with pytest.raises(CrossintError, match="storage"):
        PairwiseAccumulator(H, [0], storage="hash")
    assert PairwiseAccumulator(5000, [0, 1, 2, 3], storage="auto").storage == "sparse"
    assert PairwiseAccumulator(1000, [0, 1], storage="auto").storage == "dense"


def test_meter_feeds_the_pairwise_accumulator(case):
    f_BH, blocks, (I_LHH, _) = case
    accumulator = PairwiseAccumulator(H, [0, 2])
    meter = MLPInteractionMeter(blocks, chunk_tokens=6, pairwise=accumulator)
    meter.update(f_BH[:7])
    meter.update(f_BH[7:])
    torch.testing.assert_close(accumulator.result().interaction_matrix(), I_LHH.sum(0))


# --- SPEC §4.6 measures ------------------------------------------------------------------------
def naive_pair_measures(f_BH, block, i, j):
    mlp = block.mlp
    V_HN = block.d_HD @ mlp.W_in_DN
    w_N = mlp.W_out_ND.norm(dim=1)
    ratios, deltas = [], []
    for b in range(f_BH.shape[0]):
        if f_BH[b, i] == 0 or f_BH[b, j] == 0:
            continue
        r = 0.0
        for n in range(N):
            a, c = abs(float(f_BH[b, i] * V_HN[i, n])), abs(float(f_BH[b, j] * V_HN[j, n]))
            r += float(w_N[n]) * (min(a, c) / max(a, c) if max(a, c) > 0 else 0.0)
        ratios.append(r / float(w_N.sum()))
        u = f_BH[b] @ block.d_HD + block.b_dec_D
        q_i, q_j = f_BH[b, i] * block.d_HD[i], f_BH[b, j] * block.d_HD[j]
        delta = (mlp.forward(u) - mlp.forward(u - q_i) - mlp.forward(u - q_j)
                 + mlp.forward(u - q_i - q_j))
        deltas.append(float(delta.norm()))
    hadamard = float(sum(abs(float(V_HN[i, n] * V_HN[j, n])) for n in range(N)))
    mean = (lambda xs: sum(xs) / len(xs)) if ratios else (lambda xs: float("nan"))
    return mean(ratios), mean(deltas), len(ratios), hadamard


def test_pair_measures_match_naive(case):
    f_BH, blocks, _ = case
    i_Q = torch.tensor([2, 0, 3, 7, 1])
    j_Q = torch.tensor([7, 4, 5, 2, 1])
    block_Q = torch.tensor([0, 2, 0, 2, 0])
    measures = PairMeasureAccumulator(blocks, i_Q, j_Q, block_Q, chunk_pairs=2)
    measures.update(f_BH[:9])
    measures.update(f_BH[9:])
    result = measures.result()
    by_id = {b.block: b for b in blocks}
    for p in range(5):
        ratio, delta, count, hadamard = naive_pair_measures(
            f_BH, by_id[int(block_Q[p])], int(i_Q[p]), int(j_Q[p]))
        assert result["coactive"][p].item() == count
        assert result["hadamard"][p].item() == pytest.approx(hadamard)
        if count:
            assert result["ratio"][p].item() == pytest.approx(ratio)
            assert result["delta2"][p].item() == pytest.approx(delta)
        else:
            assert torch.isnan(result["ratio"][p]) and torch.isnan(result["delta2"][p])
    assert result["coactive"].sum() > 0


def test_second_difference_is_zero_for_a_linear_mlp(case):
    f_BH, _, _ = case
    linear = random_block(5, block=0, act=lambda x: 0.5 * x + 1.0, act_name="linear")
    measures = PairMeasureAccumulator([linear], torch.tensor([2, 0]), torch.tensor([7, 3]),
                                      torch.tensor([0, 0]))
    measures.update(f_BH)
    delta_Q = measures.result()["delta2"]
    assert torch.isfinite(delta_Q[0])
    assert delta_Q[torch.isfinite(delta_Q)].abs().max() < 1e-12


def test_hadamard_measure():
    a = torch.tensor([[1.0, -2.0, 0.0]])
    b = torch.tensor([[3.0, 1.0, 5.0]])
    assert hadamard_measure(a, b).tolist() == [5.0]


def test_pairs_must_name_given_blocks(case):
    _, blocks, _ = case
    with pytest.raises(CrossintError, match="blocks"):
        PairMeasureAccumulator(blocks, torch.tensor([1]), torch.tensor([2]), torch.tensor([1]))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=g).double()
    y = x + torch.randn(40, generator=g, dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic)
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(x, -x) == pytest.approx(-1.0)
    with_nan = y.clone()
    with_nan[0] = float("nan")
    assert spearman(x, with_nan) == pytest.approx(
        stats.spearmanr(x[1:].numpy(), y[1:].numpy()).statistic)


def test_measure_correlations():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    result = measure_correlations(reference, {"same": reference * 10, "reversed": -reference,
                                              "constant": torch.ones(4)})
    assert result["same"] == pytest.approx(1.0)
    assert result["reversed"] == pytest.approx(-1.0)
    assert result["constant"] != result["constant"]  # NaN: undefined for a constant measure
