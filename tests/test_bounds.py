"""Compact-proof bounds (SPEC §7): every strategy's bound is at least the measured error on random
tiny models (plain and gated MLPs, several activations), the activation tables enclose φ and
its derivatives, the end-to-end chain's links hold, and FLOP counts match a hand count."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from crossint.errors import CrossintError
from crossint.interactions import bounds as B
from crossint.interactions import chain as C
from crossint.interactions.contributions import MLPFeatureBlock, active_features
from crossint.models.adapter import MLPWeights

ACTIVATIONS = {
    "gelu": (torch.nn.GELU(), 1.13),
    "gelu_new": (torch.nn.GELU(approximate="tanh"), 1.13),
    "relu": (torch.nn.ReLU(), 1.0),
    "silu": (torch.nn.SiLU(), 1.1),
}
SLACK = 1e-12  # float64 rounding of the measured error itself


def tiny_block(seed: int, gated: bool, act_name: str, D: int = 6, N: int = 10, H: int = 12,
               T: int = 40, K: int = 4, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    act, lipschitz = ACTIVATIONS[act_name]
    mlp = MLPWeights(r(D, N), r(N) * 0.5, r(N, D), r(D), act, act_name, lipschitz,
                     r(D, N) if gated else None, r(N) * 0.5 if gated else None)
    block = MLPFeatureBlock(0, r(H, D) * scale, r(D) * 0.3, mlp)
    f = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        k = 1 + (t % K)  # from one active feature up to K
        f[t, torch.randperm(H, generator=g)[:k]] = torch.rand(k, generator=g,
                                                                dtype=torch.float64) * 2
    f[0] = 0  # a token with nothing active
    return block, f, r(T, D) * scale


def all_chunks(block, f, x, chunk_tokens=16):
    verifier = B.block_verifier(block)
    return [B.chunk_bounds(chunk, verifier)
            for _, chunk in B.iter_chunks(active_features(f), block, x, chunk_tokens)], verifier


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
def test_every_bound_is_at_least_the_measured_error(gated, act_name):
    for seed in range(6):
        scale = (0.3, 1.0, 3.0)[seed % 3]  # small, moderate and wide pre-activation ranges
        block, f, x = tiny_block(seed, gated, act_name, scale=scale)
        chunks, _ = all_chunks(block, f, x)
        for cb in chunks:
            assert torch.equal(cb.gap["full"], torch.zeros_like(cb.gap["full"]))
            for e in ("keep", "independent"):
                for strategy, bound in cb.bounds[e].items():
                    assert (bound >= cb.gap[e] - SLACK).all(), (seed, e, strategy)
            for e in B.EXPLANATIONS:
                for strategy in B.strategies_for(e):
                    total = cb.total_bound(e, strategy)
                    assert (total >= cb.total[e] * (1 - SLACK) - SLACK).all(), (seed, e,
                                                                                  strategy)
            assert (cb.recon_bound >= cb.total["full"] * (1 - SLACK) - SLACK).all()


def test_brute_force_is_exact_and_the_tight_strategies_are_tight():
    block, f, x = tiny_block(3, False, "gelu_new")
    chunks, _ = all_chunks(block, f, x)
    gap = torch.cat([cb.gap["keep"] for cb in chunks])
    bounds = {s: torch.cat([cb.bounds["keep"][s] for cb in chunks]) for s in B.STRATEGIES}
    assert torch.equal(bounds["brute_force"], gap)
    # W_out is 10×6: rank 6, so the rank-16 bound is the exact norm (up to the margin).
    assert torch.allclose(bounds["lowrank_r16"], gap * (1 + B.ROUNDING), rtol=1e-9, atol=1e-12)
    ratio = {s: float(bounds[s].sum() / gap.sum()) for s in B.STRATEGIES}
    assert ratio["lowrank_r0"] <= ratio["lipschitz"]
    assert ratio["interval"] <= ratio["lipschitz"] <= ratio["feature_table"]


def test_independent_surrogate_of_a_linear_piece_costs_nothing():
    """ReLU with every partial sum on the positive side: the MLP is linear there, the additivity
    error is 0 and the interval strategy's second-order bound certifies exactly 0."""
    block, f, x = tiny_block(5, False, "relu")
    mlp = block.mlp
    mlp = MLPWeights(mlp.W_in_DN, mlp.b_in_N + 100.0, mlp.W_out_ND, mlp.b_out_D, mlp.act,
                     "relu", 1.0)
    block = MLPFeatureBlock(0, block.d_HD * 0.01, block.b_dec_D, mlp)
    chunks, _ = all_chunks(block, f, x)
    for cb in chunks:
        assert float(cb.gap["independent"].max()) < 1e-9
        assert float(cb.bounds["independent"]["interval"].max()) == 0.0


def test_activation_tables_enclose_phi_and_its_derivatives():
    g = torch.Generator().manual_seed(0)
    for name, (act, _) in ACTIVATIONS.items():
        table = B.build_table(act, name, -7.3, 9.1)
        a = torch.rand(400, generator=g, dtype=torch.float64) * 16 - 7
        b = (a + torch.rand(400, generator=g, dtype=torch.float64) * 3).clamp(max=9.0)
        t = a[:, None] + (b - a)[:, None] * torch.linspace(0, 1, 257, dtype=torch.float64)
        value, slope, curv = B.derivatives(act, t.reshape(-1), 2)
        value, slope, curv = (v.view_as(t) for v in (value, slope, curv))
        low, high = table.slope_range(a, b)
        assert (low[:, None] <= slope + 1e-12).all() and (slope <= high[:, None] + 1e-12).all()
        assert (slope.abs().amax(1) <= table.max_abs_slope(a, b) + 1e-12).all()
        assert (value.abs().amax(1) <= table.max_abs_value(a, b) + 1e-12).all()
        if name != "relu":  # ReLU's curvature is a point mass at 0: infinite cells there
            assert (curv.abs().amax(1) <= table.max_curvature(a, b) + 1e-12).all()
        assert table.lipschitz() <= ACTIVATIONS[name][1] + 0.02


def test_a_table_grows_to_cover_the_data_range_and_refuses_an_unbounded_slope():
    act, _ = ACTIVATIONS["silu"]
    table = B.cover(None, act, "silu", -1.0, 1.0)
    assert B.cover(table, act, "silu", -0.5, 0.5) is table
    wider = B.cover(table, act, "silu", -30.0, 2.0)
    assert wider.lo <= -30.0 and wider.hi >= 2.0
    with pytest.raises(CrossintError, match="no finite Lipschitz constant on the data range"):
        B.build_table(lambda t: t.abs().sqrt(), "sqrt_abs", -1.0, 1.0)


def test_flop_counts_by_hand():
    """K = 2 active features, N = 3 neurons, D = 4, GELU (φ costs 10): the documented
    operations counted one by one."""
    K, N, D = 2, 3, 4
    phi, Q, r8 = 10, B.TABLE_QUERY_FLOPS, B.INTERVAL_RANK
    lipschitz = (K * N) + (K * N) + (K * N) + (K * N) + N + N + N + 1  # p,|p|,Σ,max; S−Mx,·w,Σ;·L
    assert B.strategy_flops("keep", "lipschitz", K, N, D, False, "gelu") == lipschitz == 34
    table = K + K + K + K + 1 + 1  # |f_k|, ·a_k, Σ, max, difference, ·L
    assert B.strategy_flops("keep", "feature_table", K, N, D, False, "gelu") == table == 10
    lowrank4 = (4 * K * N  # p, Σ, |p|, max
                + N  # k = c + p_dom
                + 2 * phi * N  # φ(z), φ(k)
                + N  # Δ
                + N + 2 * N  # |Δ|, rows Σ‖W_out[n]‖·|Δ_n|
                + 2 * N  # ‖Δ‖²
                + 2 * 4 * N  # four projections Δ·u_i
                + 3 * 4  # Σ_{i<4} (σ_i² − σ_4²)(Δ·u_i)²
                + 2 + 1 + 1)  # + σ_4²‖Δ‖², sqrt, min (z's + c is one of Σ's K adds)
    assert B.strategy_flops("keep", "lowrank_r4", K, N, D, False, "gelu") == lowrank4 == 145
    interval = 4 * K * N + (24 + Q + 2 * r8) * N + 3 * r8 + 8
    assert B.strategy_flops("keep", "interval", K, N, D, False, "gelu") == interval == 191
    mlp = 2 * D * N + N + phi * N  # z = x·W_in + b_in, φ(z)
    brute_keep = (2 * K * D + mlp + N + 2 * N * D + 2 * D + 1  # x̂, MLP, Δ, ·W_out, norm
                  + 3 * K * N + N + phi * N)  # p, |p|, max; k; φ(k)
    assert B.strategy_flops("keep", "brute_force", K, N, D, False, "gelu") == brute_keep == 160
    brute_ind = 2 * K * D + mlp + N + 2 * N * D + 2 * D + 1 + (4 + phi) * K * N + N
    assert B.strategy_flops("independent", "brute_force", K, N, D, False,
                            "gelu") == brute_ind == 196
    recon = 2 * K * D + 3 * D + (2 * 4 * D + 3 * 4 + 4) + 2 * K * N + 6 * N + Q + 4
    assert B.reconstruction_flops(K, N, D, False) == recon == 115
    assert B.strategy_flops("keep", "interval", K, N, D, False, "gelu",
                            total=True) == interval + recon
    assert B.strategy_flops("keep", "brute_force", K, N, D, False, "gelu",
                            total=True) == brute_keep + mlp
    assert B.strategy_flops("keep", "lipschitz", K, N, D, False, "relu") == lipschitz


# --- the end-to-end chain's links ----------------------------------------------------------------
@pytest.mark.parametrize("centred", [True, False])
def test_norm_perturbation_bounds_the_normalised_change(centred):
    g = torch.Generator().manual_seed(1)
    D, eps_norm = 8, 1e-5
    norm = C.NormParams(torch.ones(D, dtype=torch.float64), eps_norm, centred)
    for scale in (0.05, 0.5, 3.0):
        r = torch.randn(500, D, generator=g, dtype=torch.float64)
        delta = torch.randn(500, D, generator=g, dtype=torch.float64) * scale

        def n(v: torch.Tensor) -> torch.Tensor:
            y = v - v.mean(-1, keepdim=True) if centred else v
            return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps_norm)

        change = (n(r + delta) - n(r)).norm(dim=-1)
        bound = C.norm_perturbation(delta.norm(dim=-1), C.pre_norm_size(r, norm), D, eps_norm)
        assert (change <= bound * (1 + 1e-12)).all()


def test_logit_radius_bounds_the_loss_change():
    g = torch.Generator().manual_seed(2)
    V, D = 30, 6
    W_U = torch.randn(V, D, generator=g, dtype=torch.float64)
    gain = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    for centred in (True, False):
        norm = C.NormParams(gain, 1e-5, centred)
        rho = C.logit_radius(W_U, norm)
        assert torch.allclose(C.logit_radius(W_U, norm, exact_vocab=1) >= rho,
                              torch.ones(V, dtype=torch.bool))
        for _ in range(50):
            dn = torch.randn(D, generator=g, dtype=torch.float64)
            if centred:
                dn -= dn.mean()
            n = torch.randn(D, generator=g, dtype=torch.float64)
            y = int(torch.randint(V, (1,), generator=g))
            ce = torch.nn.functional.cross_entropy
            before = ce((W_U @ (gain * n))[None], torch.tensor([y]))
            after = ce((W_U @ (gain * (n + dn)))[None], torch.tensor([y]))
            assert float((after - before).abs()) <= float(rho[y] * dn.norm()) + 1e-12


def random_attention(seed: int, D: int = 8, A: int = 2, d: int = 3, kv: int = 1,
                     window: int | None = None):
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return SimpleNamespace(
        W_Q_ADd=r(A, D, d), W_K_ADd=r(kv, D, d), W_V_ADd=r(kv, D, d), b_Q_Ad=r(A, d),
        b_K_Ad=r(kv, d), b_V_Ad=r(kv, d), W_O_AdD=r(A, d, D), b_O_D=r(D), n_heads=A,
        head_dim=d, n_kv_heads=kv, scale=0.7, window=window,
        kv_head=lambda h, A=A, kv=kv: h // (A // kv))


def attention_out(w, a_BSD: torch.Tensor) -> torch.Tensor:
    S = a_BSD.shape[1]
    mask = C.visible_SS(S, w.window)
    out = w.b_O_D.expand(*a_BSD.shape[:2], -1).clone()
    for h in range(w.n_heads):
        g = w.kv_head(h)
        q = a_BSD @ w.W_Q_ADd[h] + w.b_Q_Ad[h]
        k = a_BSD @ w.W_K_ADd[g] + w.b_K_Ad[g]
        v = a_BSD @ w.W_V_ADd[g] + w.b_V_Ad[g]
        scores = (w.scale * q @ k.transpose(1, 2)).masked_fill(~mask, -math.inf)
        out = out + torch.softmax(scores, dim=-1) @ v @ w.W_O_AdD[h]
    return out


@pytest.mark.parametrize("kv,window", [(1, None), (2, 3)])
def test_attention_perturbation_bounds_the_output_change(kv, window):
    w = random_attention(3, kv=kv, window=window)
    norms = C.attention_norms(w)
    g = torch.Generator().manual_seed(4)
    for scale in (0.01, 0.3, 2.0):
        a = torch.randn(3, 7, 8, generator=g, dtype=torch.float64)
        delta = torch.randn(3, 7, 8, generator=g, dtype=torch.float64) * scale
        alpha = delta.norm(dim=-1)
        value, pattern, _ = C.attention_perturbation(alpha, C.attention_clean(a, w, norms),
                                                     norms)
        change = (attention_out(w, a + delta) - attention_out(w, a)).norm(dim=-1)
        assert (change <= (value + pattern) * (1 + 1e-12) + 1e-12).all()


def test_mlp_perturbation_bounds_a_kept_mlp():
    for gated in (False, True):
        block, _, x = tiny_block(7, gated, "silu")
        mlp = block.mlp
        constants = C.mlp_constants(mlp)
        g = torch.Generator().manual_seed(5)
        delta = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.3
        clean = None
        if gated:
            clean = ((x @ mlp.W_up_DN + mlp.b_up_N).abs().amax(-1),
                     mlp.act(x @ mlp.W_in_DN + mlp.b_in_N).abs().amax(-1))
        bound = C.mlp_perturbation(delta.norm(dim=-1), constants, clean)
        change = (mlp.forward(x + delta) - mlp.forward(x)).norm(dim=-1)
        assert (change <= bound * (1 + 1e-12)).all()


def test_chain_adds_block_errors_and_attention_terms():
    """With no attention (zero value/output weights, zero key norms) the chain is the sum of
    the block errors, pushed through the final norm's link."""
    D, S = 4, 5
    w = random_attention(0, D=D)
    w.W_V_ADd = torch.zeros_like(w.W_V_ADd)
    w.b_V_Ad = torch.zeros_like(w.b_V_Ad)
    w.W_K_ADd = torch.zeros_like(w.W_K_ADd)
    w.b_K_Ad = torch.zeros_like(w.b_K_Ad)
    norms = C.attention_norms(w)
    norm = C.NormParams(torch.ones(D, dtype=torch.float64), 1e-5, True)
    consts = C.BlockConstants(norm, norms, norm, C.MLPConstants(1.0, 1.0, 1.0))
    a = torch.randn(1, S, D, dtype=torch.float64)
    clean = C.attention_clean(a, w, norms)
    size = torch.full((1, S), 10.0, dtype=torch.float64)
    inputs = [C.BlockChainInput(l, size, clean, size) for l in range(2)]
    errors = {0: torch.full((1, S), 0.1, dtype=torch.float64),
              1: torch.full((1, S), 0.2, dtype=torch.float64)}
    terms = C.chain_batch(inputs, {0: consts, 1: consts}, errors, size, norm,
                          torch.ones(1, S, dtype=torch.float64))
    assert torch.allclose(terms["eps.final"], torch.full((1, S), 0.3, dtype=torch.float64))
    expected = C.norm_perturbation(terms["eps.final"], size, D, 1e-5)
    assert torch.allclose(terms["bound_BS"], expected)


@pytest.mark.parametrize("gated", [False, True])
def test_the_spliced_outputs_are_fidelitys_surrogates(gated):
    """The chain splices in exactly the SPEC §6.1/§4.7 surrogates `crossint fidelity` uses."""
    from crossint.analysis.fidelity import surrogate_outputs

    block, f, x = tiny_block(11, gated, "gelu_new")
    schemes = {"full": "none", "keep": "keep_largest", "independent": "independent",
               "zero": "zero"}
    expected = surrogate_outputs(f, block, list(schemes.values()))
    verifier = B.block_verifier(block)
    got = {name: torch.zeros(f.shape[0], x.shape[1], dtype=torch.float64) for name in schemes}
    for tokens, chunk in B.iter_chunks(active_features(f), block, x, chunk_tokens=7):
        for name, out in B.chunk_bounds(chunk, verifier).outputs.items():
            got[name][tokens] = out
    for name, scheme in schemes.items():
        assert torch.allclose(got[name], expected[scheme], atol=1e-10), name
