"""MLP feature interactions (SPEC §4.1–§4.4, §9.2): contributions, dominance statistics, the
keep-dominant bound, the interaction penalty and its use in training, checked against naive
float64 loops over tokens × neurons × features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.errors import CrossintError
from crossint.interactions import (
    SHARE_EPS,
    MLPFeatureBlock,
    MLPInteractionMeter,
    ShareSummary,
    active_features,
    analyse_mlp_interactions,
    contributions,
    distinct_virtual_weights,
    dominant_slot,
    feature_blocks,
    interaction_penalty,
    iter_contributions,
    keep_dominant_gap,
    neuron_stats,
    reconstructed_mlp_in,
    token_interaction_scores,
)
from crossint.interactions.penalty import DominancePenalty, penalty_loss
from crossint.models.adapter import MLPWeights, activation_lipschitz
from crossint.models.hookpoints import hookpoint, resolve_layout

D, N, H = 5, 7, 11
ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def random_f(n_tokens: int, n_features: int, seed: int, max_active: int = 5,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Feature activations with a different number of active features per token (0 included)."""
    g = torch.Generator().manual_seed(seed)
    f_BH = torch.zeros(n_tokens, n_features, dtype=dtype)
    for b in range(n_tokens):
        count = b % (max_active + 1)
        chosen = torch.randperm(n_features, generator=g)[:count]
        f_BH[b, chosen] = (0.2 + torch.rand(count, generator=g, dtype=dtype)).to(dtype)
    return f_BH


def random_mlp(seed: int, act_name: str = "gelu", gated: bool = False, bias: bool = True,
               d: int = D, n: int = N, dtype: torch.dtype = torch.float64) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    act = ACTS[act_name]
    return MLPWeights(
        W_in_DN=rand(d, n), b_in_N=rand(n) if bias else torch.zeros(n, dtype=dtype),
        W_out_ND=rand(n, d), b_out_D=rand(d), act=act, act_name=act_name,
        lipschitz=activation_lipschitz(act_name, act),
        W_up_DN=rand(d, n) if gated else None, b_up_N=rand(n) if gated else None,
    )


def random_block(seed: int, block: int = 0, n_features: int = H, **mlp_kwargs) -> MLPFeatureBlock:
    g = torch.Generator().manual_seed(1000 + seed)
    mlp = random_mlp(seed, **mlp_kwargs)
    d = mlp.W_in_DN.shape[0]
    return MLPFeatureBlock(block, torch.randn(n_features, d, generator=g, dtype=torch.float64),
                           torch.randn(d, generator=g, dtype=torch.float64), mlp)


# --- naive references: explicit loops over tokens, neurons, features ---------------------------
def naive_p_BNH(f_BH: torch.Tensor, d_HD: torch.Tensor, W_in_DN: torch.Tensor) -> torch.Tensor:
    B, H_ = f_BH.shape
    D_, N_ = W_in_DN.shape
    p = torch.zeros(B, N_, H_, dtype=torch.float64)
    for b in range(B):
        for n in range(N_):
            for h in range(H_):
                if f_BH[b, h] != 0:
                    p[b, n, h] = float(f_BH[b, h]) * sum(
                        float(d_HD[h, i]) * float(W_in_DN[i, n]) for i in range(D_)
                    )
    return p


def naive_stats(p_BNH: torch.Tensor):
    B, N_, H_ = p_BNH.shape
    S = torch.zeros(B, N_, dtype=torch.float64)
    Mx = torch.zeros(B, N_, dtype=torch.float64)
    dom = torch.full((B, N_), -1, dtype=torch.int64)
    for b in range(B):
        for n in range(N_):
            for h in range(H_):
                a = abs(float(p_BNH[b, n, h]))
                S[b, n] += a
                if a > Mx[b, n]:
                    Mx[b, n], dom[b, n] = a, h
    return S, Mx, dom


def dense_from_slots(contrib, n_features: int) -> torch.Tensor:
    B, K, N_ = contrib.p_BKN.shape
    p = torch.zeros(B, N_, n_features, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            h = int(contrib.features_BK[b, k])
            if h >= 0:
                p[b, :, h] = contrib.p_BNK[b, :, k]
    return p


# --- SPEC §4.1 contributions -------------------------------------------------------------------
def test_active_features_pads_variable_counts():
    f_BH = random_f(9, H, seed=0)
    active = active_features(f_BH)
    assert active.features_BK.shape == (9, 5)
    for b in range(9):
        nz = f_BH[b].nonzero().squeeze(1)
        count = nz.numel()
        assert int(active.counts_B[b]) == count
        assert active.features_BK[b, :count].tolist() == nz.tolist()
        assert (active.features_BK[b, count:] == -1).all()
        assert torch.equal(active.f_BK[b, :count], f_BH[b, nz])
        assert (active.f_BK[b, count:] == 0).all()


def test_active_features_rejects_wrong_rank():
    with pytest.raises(CrossintError, match="2-d"):
        active_features(torch.zeros(2, 3, 4))


def test_contributions_match_naive_loops():
    block = random_block(1)
    f_BH = random_f(8, H, seed=1)
    contrib = contributions(f_BH, block.d_HD, block.mlp.W_in_DN)
    torch.testing.assert_close(dense_from_slots(contrib, H),
                               naive_p_BNH(f_BH, block.d_HD, block.mlp.W_in_DN))
    assert contrib.p_BNK.shape == (8, N, 5)


def test_virtual_weights_only_for_distinct_active_features():
    block = random_block(2)
    f_BH = torch.zeros(4, H, dtype=torch.float64)
    f_BH[0, [1, 3]] = 1.0
    f_BH[1, [3]] = 2.0
    f_BH[3, [1, 7, 9]] = 0.5
    V_UN, row_BK = distinct_virtual_weights(active_features(f_BH), block.d_HD, block.mlp.W_in_DN)
    assert V_UN.shape == (4, N)  # features 1, 3, 7, 9 only
    torch.testing.assert_close(V_UN, block.d_HD[[1, 3, 7, 9]] @ block.mlp.W_in_DN)


@pytest.mark.parametrize("chunk", [1, 3, 4, 1000])
def test_contributions_do_not_depend_on_chunk_size(chunk):
    block = random_block(3)
    f_BH = random_f(10, H, seed=3)
    reference = contributions(f_BH, block.d_HD, block.mlp.W_in_DN, chunk_tokens=1000)
    chunked = contributions(f_BH, block.d_HD, block.mlp.W_in_DN, chunk_tokens=chunk)
    assert torch.equal(chunked.p_BKN, reference.p_BKN)
    assert torch.equal(chunked.features_BK, reference.features_BK)


def test_chunk_size_is_validated():
    block = random_block(3)
    with pytest.raises(CrossintError, match="chunk_tokens"):
        contributions(random_f(3, H, seed=0), block.d_HD, block.mlp.W_in_DN, chunk_tokens=0)


def test_pre_activation_is_sum_of_contributions_plus_c():
    """z = Σ_h p + c equals the MLP's own pre-activation of the reconstructed mlp_in."""
    block = random_block(4)
    f_BH = random_f(7, H, seed=4)
    contrib = contributions(f_BH, block.d_HD, block.mlp.W_in_DN)
    u_BD = f_BH @ block.d_HD + block.b_dec_D
    torch.testing.assert_close(contrib.z_BN + block.c_N, block.mlp.pre(u_BD))
    torch.testing.assert_close(reconstructed_mlp_in(contrib, block), u_BD)


# --- SPEC §4.2 statistics ----------------------------------------------------------------------
def test_neuron_stats_match_naive_loops():
    block = random_block(5)
    f_BH = random_f(8, H, seed=5)
    stats = neuron_stats(contributions(f_BH, block.d_HD, block.mlp.W_in_DN))
    S, Mx, dom = naive_stats(naive_p_BNH(f_BH, block.d_HD, block.mlp.W_in_DN))
    torch.testing.assert_close(stats.S_BN, S)
    torch.testing.assert_close(stats.Mx_BN, Mx)
    assert torch.equal(stats.dominant_BN, dom)
    torch.testing.assert_close(stats.share_BN, (Mx + SHARE_EPS) / (S + SHARE_EPS))
    torch.testing.assert_close(stats.nondominant_BN, S - Mx)
    assert (stats.dominant_BN[0] == -1).all()  # token 0 has no active feature
    assert torch.allclose(stats.share_BN[0], torch.ones(N, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_slots", [1, 2, 7, 64, 300])
def test_dominant_slot_is_the_first_argmax(dtype, n_slots):
    g = torch.Generator().manual_seed(n_slots)
    abs_BKN = torch.rand(6, n_slots, 33, generator=g, dtype=torch.float64)
    abs_BKN[0] = 0.0  # all zero: slot 0
    abs_BKN[1, :, :] = 0.5  # exact ties everywhere: the first slot
    abs_BKN[2, -1] = 10.0  # the last slot dominates
    abs_BKN = abs_BKN.to(dtype)
    before = abs_BKN.clone()
    slot_BN = dominant_slot(abs_BKN)
    assert torch.equal(abs_BKN, before)  # not in place by default
    expected = torch.stack([abs_BKN.double()[b].max(dim=0).indices for b in range(6)])
    if dtype != torch.float64:  # near-ties within the slot-code bits may pick either slot
        picked = abs_BKN.double().gather(1, slot_BN[:, None]).squeeze(1)
        best = abs_BKN.double().amax(dim=1)
        bits = max((n_slots - 1).bit_length(), 1)
        mantissa = {torch.float32: 23, torch.bfloat16: 23}[dtype]  # bf16 is widened to float32
        assert (picked >= best * (1 - 2.0 ** (bits - mantissa))).all()
        expected = torch.where(picked == best, expected, slot_BN)
    assert torch.equal(slot_BN, expected)
    assert (slot_BN[0] == 0).all() and (slot_BN[1] == 0).all()
    assert (slot_BN[2] == n_slots - 1).all()
    if dtype in (torch.float32, torch.float64):
        in_place = dominant_slot(abs_BKN, in_place=True)
        assert torch.equal(in_place, slot_BN)


def test_share_summary_plain_and_active_means():
    blocks = [random_block(6, block=0), random_block(7, block=3)]
    f_BH = random_f(9, H, seed=6)
    summary = ShareSummary()
    shares, actives, nondominant = [], [], []
    for block in blocks:
        for _, contrib in iter_contributions(f_BH, block.d_HD, block.mlp.W_in_DN, 4):
            summary.update(block.block, neuron_stats(contrib))
        S, Mx, _ = naive_stats(naive_p_BNH(f_BH, block.d_HD, block.mlp.W_in_DN))
        share = (Mx + SHARE_EPS) / (S + SHARE_EPS)
        shares.append(share.flatten())
        actives.append(share[S > 0])
        nondominant.append((S - Mx).flatten())
    result = summary.result()
    assert result["dominant_share"] == pytest.approx(torch.cat(shares).mean().item())
    assert result["dominant_share_active"] == pytest.approx(torch.cat(actives).mean().item())
    assert result["mean_nondominant"] == pytest.approx(torch.cat(nondominant).mean().item())
    assert result["dominant_share_active"] < result["dominant_share"]  # token 0 counts as 1
    assert set(result["blocks"]) == {0, 3}
    assert result["blocks"][3]["dominant_share"] == pytest.approx(shares[1].mean().item())


# --- SPEC §4.3 the bound and the measured gap --------------------------------------------------
def naive_keep_dominant(f_BH, block: MLPFeatureBlock):
    """MLP_full(u) from the rebuilt MLP; MLP_keep from z_keep = p_dom + c by explicit loops."""
    mlp = block.mlp
    u_BD = f_BH @ block.d_HD + block.b_dec_D
    full_BD = mlp.forward(u_BD)
    p = naive_p_BNH(f_BH, block.d_HD, mlp.W_in_DN)
    S, Mx, dom = naive_stats(p)
    c_N = block.c_N
    B = f_BH.shape[0]
    z_keep = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            z_keep[b, n] = c_N[n] + (p[b, n, dom[b, n]] if dom[b, n] >= 0 else 0.0)
    post = mlp.act(z_keep)
    if mlp.gated:
        post = post * (u_BD @ mlp.W_up_DN + mlp.b_up_N)
    keep_BD = post @ mlp.W_out_ND + mlp.b_out_D
    return (full_BD - keep_BD).norm(dim=-1), S, Mx


@pytest.mark.parametrize("act_name", sorted(ACTS))
@pytest.mark.parametrize("gated", [False, True])
def test_bound_is_never_below_the_measured_gap(act_name, gated):
    worst = 0.0
    for seed in range(4):
        block = random_block(10 + seed, act_name=act_name, gated=gated)
        f_BH = random_f(12, H, seed=seed, max_active=6) * 3.0  # large p: far from linear
        contrib = contributions(f_BH, block.d_HD, block.mlp.W_in_DN)
        result = keep_dominant_gap(contrib, neuron_stats(contrib), block)
        gap, S, Mx = naive_keep_dominant(f_BH, block)
        torch.testing.assert_close(result.gap_B, gap)
        assert (result.bound_B >= result.gap_B - 1e-9).all()
        if not gated:
            bound = block.mlp.lipschitz * ((S - Mx) * block.w_out_N).sum(-1)
            torch.testing.assert_close(result.bound_B, bound)
        worst = max(worst, float((result.gap_B / result.bound_B.clamp_min(1e-12)).max()))
    assert worst > 0.05  # the gap is not trivially zero: the test can fail


def test_bound_holds_on_a_real_model(tiny_model_dir):
    from crossint.models.adapter import load_model

    adapter = load_model(str(tiny_model_dir), dtype="float64")
    mlp = adapter.mlp_weights(1)
    g = torch.Generator().manual_seed(0)
    block = MLPFeatureBlock(1, torch.randn(H, adapter.d_model, generator=g, dtype=torch.float64),
                            torch.zeros(adapter.d_model, dtype=torch.float64), mlp)
    f_BH = random_f(10, H, seed=0) * 5
    contrib = contributions(f_BH, block.d_HD, mlp.W_in_DN)
    result = keep_dominant_gap(contrib, neuron_stats(contrib), block)
    assert (result.bound_B >= result.gap_B).all()
    assert result.gap_B[1:].min() >= 0 and result.gap_B.max() > 0


# --- SPEC §4.4 the penalty ---------------------------------------------------------------------
def naive_penalty(f_BH, blocks, weighting="uniform", normalise=False):
    numerator = denominator = 0.0
    count = 0
    for block in blocks:
        S, Mx, _ = naive_stats(naive_p_BNH(f_BH, block.d_HD, block.mlp.W_in_DN))
        w = block.w_out_N if weighting == "w_out" else torch.ones(N, dtype=torch.float64)
        if normalise == "neuron":  # weighted mean of 1 − share over tokens and neurons
            numerator += float((((S - Mx) / (S + 1e-8)) * w).sum())
            count += S.shape[0] * float(w.sum())
            continue
        numerator += float(((S - Mx) * w).sum())
        denominator += float((S * w).sum())
        count += S.numel()
    return numerator / denominator if normalise is True else numerator / count


def torch_penalty(f_BH, d_by_block, blocks, weighting, normalise):
    """The penalty by plain autograd over a dense B×N×H tensor (gradient reference)."""
    numerator, denominator, count = 0, 0, 0
    for block, d_HD in zip(blocks, d_by_block, strict=True):
        abs_BNH = (f_BH[:, None, :] * (d_HD @ block.mlp.W_in_DN).T[None]).abs()
        w = block.w_out_N if weighting == "w_out" else torch.ones(N, dtype=torch.float64)
        S_BN, Mx_BN = abs_BNH.sum(-1), abs_BNH.amax(-1)
        if normalise == "neuron":
            numerator = numerator + ((S_BN - Mx_BN) / (S_BN + 1e-8) * w).sum()
            count += abs_BNH.shape[0] * float(w.sum())
            continue
        numerator = numerator + ((S_BN - Mx_BN) * w).sum()
        denominator = denominator + (S_BN * w).sum()
        count += abs_BNH.shape[0] * abs_BNH.shape[1]
    return numerator / denominator if normalise is True else numerator / count


@pytest.mark.parametrize("weighting", ["uniform", "w_out"])
@pytest.mark.parametrize("normalise", [False, True, "neuron"])
def test_penalty_value_and_gradients_match_references(weighting, normalise, kernel_path):
    blocks = [random_block(20, block=0), random_block(21, block=1)]
    f_BH = random_f(9, H, seed=20)
    value = interaction_penalty(f_BH, blocks, weighting, normalise, chunk_tokens=4)
    assert value.item() == pytest.approx(naive_penalty(f_BH, blocks, weighting, normalise),
                                         rel=1e-12)

    def gradients(fn):
        f = f_BH.clone().requires_grad_()
        ds = [b.d_HD.clone().requires_grad_() for b in blocks]
        fn(f, ds).backward()
        return [f.grad, *(d.grad for d in ds)]

    ours = gradients(lambda f, ds: interaction_penalty(
        f, [MLPFeatureBlock(b.block, d, b.b_dec_D, b.mlp) for b, d in zip(blocks, ds,
                                                                           strict=True)],
        weighting, normalise, chunk_tokens=2))
    reference = gradients(lambda f, ds: torch_penalty(f, ds, blocks, weighting, normalise))
    mask = (f_BH != 0).double()  # inactive features get no gradient from the sparse penalty
    torch.testing.assert_close(ours[0], reference[0] * mask)
    for a, b in zip(ours[1:], reference[1:], strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("normalise", [False, True, "neuron"])
def test_penalty_gradcheck(normalise, kernel_path):
    blocks = [random_block(30, block=0, n_features=6)]
    f_BH = random_f(5, 6, seed=30, max_active=3)
    mask_BH = (f_BH != 0).double()  # fixed sparsity pattern: the penalty's domain
    mlp = blocks[0].mlp

    def penalty(f, d):
        block = MLPFeatureBlock(0, d, blocks[0].b_dec_D, mlp)
        return interaction_penalty(f * mask_BH, [block], "w_out", normalise, chunk_tokens=2)

    inputs = (f_BH.clone().requires_grad_(), blocks[0].d_HD.clone().requires_grad_())
    assert torch.autograd.gradcheck(penalty, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalise", ["none", "neuron"])
def test_penalty_does_not_depend_on_chunk_size(normalise, kernel_path):
    blocks = [random_block(40, block=0), random_block(41, block=2)]
    f_BH = random_f(13, H, seed=40)
    grads = []
    values = []
    for chunk in (1, 5, 100):
        f = f_BH.clone().requires_grad_()
        value = interaction_penalty(f, blocks, "w_out", normalise, chunk_tokens=chunk)
        value.backward()
        values.append(value.item())
        grads.append(f.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-13) == pytest.approx(values[2])
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[2])


def test_penalty_options_are_validated():
    blocks = [random_block(0)]
    f_BH = random_f(3, H, seed=0)
    with pytest.raises(CrossintError, match="weighting"):
        interaction_penalty(f_BH, blocks, weighting="l2")
    with pytest.raises(CrossintError, match="normalisation 'token'"):
        interaction_penalty(f_BH, blocks, normalise="token")
    with pytest.raises(CrossintError, match="at least one"):
        interaction_penalty(f_BH, [])
    with pytest.raises(CrossintError, match="weight"):
        DominancePenalty(weight=-1.0)


def crosscoder_for(n_blocks: int, d: int = D, n_features: int = 16, **kwargs) -> Crosscoder:
    config = CrosscoderConfig(hookpoints=resolve_layout("paper", n_blocks), d_model=d,
                              n_features=n_features, k=3, **kwargs)
    return Crosscoder(config, seed=0)


def test_penalty_trains_every_block_of_a_six_block_model():
    crosscoder = crosscoder_for(6).train()
    mlps = {block: random_mlp(50 + block, dtype=torch.float32) for block in range(6)}
    loss_fn = penalty_loss(DominancePenalty(2.0, weighting="w_out", normalise=True), mlps)
    g = torch.Generator().manual_seed(0)
    acts_BXD = torch.randn(32, crosscoder.config.n_positions, D, generator=g)
    output = crosscoder(acts_BXD)
    terms = loss_fn(crosscoder, acts_BXD, output)
    assert list(terms) == ["interaction"] and terms["interaction"].item() > 0
    terms["interaction"].backward()
    for block in range(6):
        x = crosscoder.position_index(hookpoint(block, "mlp_in"))
        assert crosscoder.W_dec_HXD.grad[:, x].abs().sum() > 0, f"block {block} got no gradient"
        other = crosscoder.position_index(hookpoint(block, "resid_pre"))
        assert crosscoder.W_dec_HXD.grad[:, other].abs().sum() == 0
    assert crosscoder.W_enc_XDH.grad.abs().sum() > 0  # through f


def test_loss_is_the_weighted_analysis_metric():
    """The trained term is weight × interaction_penalty, and the uniform penalty is exactly the
    mean S − Mx that the analysis summary reports."""
    crosscoder = crosscoder_for(2).eval()
    mlps = {block: random_mlp(60 + block, dtype=torch.float32) for block in range(2)}
    acts_BXD = torch.randn(20, crosscoder.config.n_positions, D,
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = crosscoder(acts_BXD)
        term = penalty_loss(DominancePenalty(3.0), mlps)(crosscoder, acts_BXD, output)
        blocks = feature_blocks(crosscoder, mlps)
        penalty = interaction_penalty(output.f_BH, blocks)
        meter = MLPInteractionMeter(blocks, chunk_tokens=7)
        meter.update(output.f_BH)
    assert term["interaction"].item() == pytest.approx(3.0 * penalty.item(), rel=1e-6)
    assert meter.result()["mean_nondominant"] == pytest.approx(penalty.item(), rel=1e-5)
    # The per-neuron normalisation is one minus the reported dominant share itself.
    share_penalty = interaction_penalty(output.f_BH, blocks, normalise="neuron")
    assert 1 - meter.result()["dominant_share"] == pytest.approx(share_penalty.item(), rel=1e-5)


def test_feature_blocks_needs_mlp_in_hookpoints():
    config = CrosscoderConfig(hookpoints=resolve_layout("resid", 2), d_model=D, n_features=16,
                              k=3)
    crosscoder = Crosscoder(config)
    with pytest.raises(CrossintError, match="blocks.0.mlp_in"):
        feature_blocks(crosscoder, {0: random_mlp(0)})


# --- SPEC §9.2 per-token score, and the meter --------------------------------------------------
def test_token_scores_match_naive():
    blocks = [random_block(70, block=0), random_block(71, block=1)]
    f_BH = random_f(8, H, seed=70)
    expected = torch.zeros(8, dtype=torch.float64)
    for block in blocks:
        S, Mx, _ = naive_stats(naive_p_BNH(f_BH, block.d_HD, block.mlp.W_in_DN))
        expected += ((S - Mx) * block.w_out_N).sum(-1)
    torch.testing.assert_close(token_interaction_scores(f_BH, blocks, chunk_tokens=3), expected)
    meter = MLPInteractionMeter(blocks, chunk_tokens=5)
    torch.testing.assert_close(meter.update(f_BH), expected)
    result = meter.result()
    assert result["n_tokens"] == 8
    assert result["blocks"][0]["bound_violations"] == 0
    assert 0 < result["mean_gap"] <= result["mean_bound"]


def test_analyse_mlp_interactions_over_batches():
    crosscoder = crosscoder_for(2).eval()
    mlps = {block: random_mlp(80 + block, dtype=torch.float32) for block in range(2)}
    acts_BXD = torch.randn(40, crosscoder.config.n_positions, D,
                           generator=torch.Generator().manual_seed(2))
    report = analyse_mlp_interactions(crosscoder, mlps, [acts_BXD[:25], acts_BXD[25:]],
                                      chunk_tokens=8, progress=False)
    meter = MLPInteractionMeter(feature_blocks(crosscoder, mlps, dtype=torch.float64))
    with torch.no_grad():
        meter.update(crosscoder.encode(acts_BXD))
    expected = meter.result()
    assert report.summary["n_tokens"] == 40
    for key in ("dominant_share", "dominant_share_active", "mean_gap", "mean_bound"):
        assert report.summary[key] == pytest.approx(expected[key], rel=1e-12)
    assert report.pairwise is not None and report.pairwise.n_tokens == 40
    assert report.pairwise.interaction_matrix().sum() > 0


# --- training with the penalty -----------------------------------------------------------------
@pytest.mark.slow
def test_training_with_the_penalty_raises_the_dominant_share(tiny_model_dir, tmp_path):
    from crossint.crosscoder.train import TrainConfig, train
    from crossint.data.cache import TensorActivations
    from crossint.models.adapter import load_model

    adapter = load_model(str(tiny_model_dir))
    hookpoints = adapter.resolve_layout("paper")
    g = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(0, adapter.vocab_size, (24, 32), generator=g)
    captured = adapter.capture(ids_BS, hookpoints)
    acts_TXD = torch.stack([captured[h].reshape(-1, adapter.d_model) for h in hookpoints], dim=1)
    source = TensorActivations(acts_TXD, hookpoints)
    mlps = {block: adapter.mlp_weights(block) for block in range(adapter.n_blocks)}
    config = CrosscoderConfig(hookpoints=hookpoints, models=["tiny"], d_model=adapter.d_model,
                              n_features=64, k=4)
    train_config = TrainConfig(steps=60, batch_size=128, lr=3e-3, checkpoint_every=1000,
                               log_every=10, normalisation_tokens=768)
    shares = {}
    for weight in (0.0, 100.0):
        loss_fn = penalty_loss(DominancePenalty(weight, normalise=True), mlps)
        crosscoder = train(config, train_config, source, tmp_path / f"w{weight}",
                           extra_losses=[loss_fn], progress=False)
        meter = MLPInteractionMeter(feature_blocks(crosscoder, mlps, dtype=torch.float64))
        with torch.no_grad():
            meter.update(crosscoder(acts_TXD).f_BH)
        shares[weight] = meter.result()["dominant_share_active"]
        assert math.isfinite(shares[weight])
    assert shares[100.0] > shares[0.0] + 0.1, shares
