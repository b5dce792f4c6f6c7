"""Independent effects (SPEC §4.7): the surrogate, the additivity error and the keep_error and
additivity penalties, checked against naive float64 loops that call the MLP one input vector at
a time, with gradcheck for the backward, on plain and gated MLPs."""

from __future__ import annotations

import pytest
import torch

from crossint.interactions import active_features
from crossint.interactions.additivity import (
    MLPTerms,
    additivity_error,
    additivity_penalty,
    full_post,
    independent_post,
    iter_terms,
    keep_error_penalty,
)
from crossint.interactions.contributions import MLPFeatureBlock
from test_interactions_mlp import H, random_block, random_f

KINDS = [("gelu", False), ("gelu_new", False), ("relu", False), ("silu", True), ("gelu", True)]


def naive_additivity(f_BH, block: MLPFeatureBlock) -> torch.Tensor:
    """‖MLP(x̂) − MLP(c) − Σ_h [MLP(c + q_h) − MLP(c)]‖ per token, one MLP call per vector."""
    mlp, c_D = block.mlp, block.b_dec_D
    out = []
    for b in range(f_BH.shape[0]):
        active = [h for h in range(f_BH.shape[1]) if f_BH[b, h] != 0]
        x_D = c_D + sum((f_BH[b, h] * block.d_HD[h] for h in active), torch.zeros_like(c_D))
        base = mlp.forward(c_D[None])[0]
        ind = base + sum((mlp.forward((c_D + f_BH[b, h] * block.d_HD[h])[None])[0] - base
                          for h in active), torch.zeros_like(base))
        out.append((mlp.forward(x_D[None])[0] - ind).norm())
    return torch.stack(out)


def naive_keep_error(f_BH, block: MLPFeatureBlock) -> torch.Tensor:
    """‖(post(x̂) − post_keep)·W_out‖² per token, neuron by neuron: the gate keeps c plus the
    first largest |p|; the up projection (gated) keeps its full value."""
    mlp, c_D = block.mlp, block.b_dec_D
    out = []
    for b in range(f_BH.shape[0]):
        active = [h for h in range(f_BH.shape[1]) if f_BH[b, h] != 0]
        x_D = c_D + sum((f_BH[b, h] * block.d_HD[h] for h in active), torch.zeros_like(c_D))
        post_N = mlp.post(x_D[None])[0]
        kept = []
        for n in range(mlp.W_in_DN.shape[1]):
            p = [float(f_BH[b, h]) * float(block.d_HD[h] @ mlp.W_in_DN[:, n]) for h in active]
            best = max(range(len(p)), key=lambda i: (abs(p[i]), -i)) if p else None
            z = float(c_D @ mlp.W_in_DN[:, n] + mlp.b_in_N[n]) + (p[best] if p else 0.0)
            value = mlp.act(torch.tensor(z, dtype=torch.float64))
            if mlp.gated:
                value = value * (x_D @ mlp.W_up_DN[:, n] + mlp.b_up_N[n])
            kept.append(value)
        out.append(((post_N - torch.stack(kept)) @ mlp.W_out_ND).pow(2).sum())
    return torch.stack(out)


def terms_of(f_BH, block) -> MLPTerms:
    (_, terms), = list(iter_terms(active_features(f_BH), block, chunk_tokens=10_000))
    return terms


@pytest.mark.parametrize("act_name, gated", KINDS)
def test_additivity_error_matches_naive(act_name, gated):
    block = random_block(3, act_name=act_name, gated=gated)
    f_BH = random_f(9, H, seed=3)
    torch.testing.assert_close(additivity_error(terms_of(f_BH, block), block),
                               naive_additivity(f_BH, block))


@pytest.mark.parametrize("act_name, gated", KINDS)
def test_penalties_match_naive_in_value_and_chunking(act_name, gated, kernel_path):
    block = random_block(4, act_name=act_name, gated=gated)
    other = random_block(5, block=1, act_name=act_name, gated=gated)
    f_BH = random_f(13, H, seed=4)
    active = active_features(f_BH)
    expect_add = (naive_additivity(f_BH, block).pow(2).mean()
                  + naive_additivity(f_BH, other).pow(2).mean()) / 2
    expect_keep = (naive_keep_error(f_BH, block).mean()
                   + naive_keep_error(f_BH, other).mean()) / 2
    for chunk in (1, 4, None):
        torch.testing.assert_close(additivity_penalty(active, [block, other], chunk),
                                   expect_add)
        torch.testing.assert_close(keep_error_penalty(active, [block, other], chunk),
                                   expect_keep)


def test_what_additivity_can_and_cannot_see():
    """Zero for one active feature, and for a plain MLP with a linear φ; not zero for a gated
    MLP with a linear φ (its gate and up values multiply); ReLU at c = 0 gives min(P⁺, P⁻) per
    neuron (SPEC §4.3)."""
    f_BH = random_f(12, H, seed=6)
    single_BH = torch.zeros_like(f_BH)
    single_BH[:, 2] = 0.7
    linear = {"act": lambda x: 3 * x - 1, "act_name": "gelu"}
    plain = random_block(6, act_name="gelu")
    assert additivity_error(terms_of(single_BH, plain), plain).abs().max() < 1e-12
    plain_linear = random_block(6)
    plain_linear = MLPFeatureBlock(0, plain_linear.d_HD, plain_linear.b_dec_D,
                                   _replace(plain_linear.mlp, **linear))
    assert additivity_error(terms_of(f_BH, plain_linear), plain_linear).abs().max() < 1e-10
    gated = random_block(6, gated=True)
    gated_linear = MLPFeatureBlock(0, gated.d_HD, gated.b_dec_D, _replace(gated.mlp, **linear))
    assert additivity_error(terms_of(f_BH, gated_linear), gated_linear).max() > 1e-3
    relu = random_block(7, act_name="relu", bias=False)
    relu = MLPFeatureBlock(0, relu.d_HD, torch.zeros_like(relu.b_dec_D), relu.mlp)
    terms = terms_of(f_BH, relu)
    gap_BN = independent_post(terms, relu.mlp.act) - full_post(terms, relu.mlp.act)
    positive_BN = terms.p_BKN.clamp(min=0).sum(dim=1)
    negative_BN = (-terms.p_BKN).clamp(min=0).sum(dim=1)
    torch.testing.assert_close(gap_BN, torch.minimum(positive_BN, negative_BN))


def _replace(mlp, **changes):
    import dataclasses

    return dataclasses.replace(mlp, **changes)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("penalty", [additivity_penalty, keep_error_penalty])
@pytest.mark.parametrize("normalise", ["none", "effect"])
def test_penalty_gradients_pass_gradcheck(penalty, gated, normalise, kernel_path):
    """Through the active features' f (the encoder's side; an inactive feature gets none, as in
    the crosscoder) and through the decoder rows (V = d·W_in)."""
    block = random_block(8, act_name="silu" if gated else "gelu", gated=gated)
    f_BH = random_f(6, H, seed=8)
    mask_BH = f_BH != 0
    values_E = f_BH[mask_BH].clone().requires_grad_(True)
    d_HD = block.d_HD.clone().requires_grad_(True)

    def value(values_E, d_HD):
        f_BH = torch.zeros(mask_BH.shape, dtype=values_E.dtype).masked_scatter(mask_BH, values_E)
        moved = MLPFeatureBlock(0, d_HD, block.b_dec_D, block.mlp)
        return penalty(active_features(f_BH), [moved], 2, normalise)

    assert torch.autograd.gradcheck(value, (values_E, d_HD), eps=1e-6, atol=1e-6)


def test_the_meter_averages_the_naive_error_per_block():
    from crossint.interactions.additivity import AdditivityMeter

    blocks = [random_block(9, act_name="gelu"), random_block(10, block=1, gated=True,
                                                             act_name="silu")]
    f_BH = random_f(11, H, seed=9)
    meter = AdditivityMeter(blocks, chunk_tokens=3)
    meter.update(f_BH[:5])
    meter.update(f_BH[5:])
    result = meter.result()
    for block in blocks:
        naive_B = naive_additivity(f_BH, block)
        assert result[block.block]["additivity_error"] == pytest.approx(naive_B.mean().item())
        assert result[block.block]["additivity_error_sq"] == pytest.approx(
            naive_B.pow(2).mean().item())
        assert 0 < result[block.block]["additivity_fraction"]


@pytest.mark.parametrize("gated", [False, True])
def test_fused_and_torch_paths_agree_in_float32(gated, monkeypatch):
    """The fused kernel's φ, sums and scatters against the chunked torch path, float32."""
    from crossint.interactions import kernels

    block = random_block(12, act_name="gelu_new" if not gated else "silu", gated=gated)
    block = MLPFeatureBlock(0, block.d_HD.float(), block.b_dec_D.float(),
                            _replace(block.mlp, **{k: getattr(block.mlp, k).float()
                                                   for k in ("W_in_DN", "b_in_N", "W_out_ND",
                                                             "b_out_D")},
                                     **({k: getattr(block.mlp, k).float()
                                         for k in ("W_up_DN", "b_up_N")} if gated else {})))
    f_BH = random_f(40, H, seed=12, dtype=torch.float32).requires_grad_(True)
    d_HD = block.d_HD.clone().requires_grad_(True)
    results = []
    for disable in ("0", "1"):
        monkeypatch.setenv(kernels.DISABLE_ENV, disable)
        moved = MLPFeatureBlock(0, d_HD, block.b_dec_D, block.mlp)
        value = additivity_penalty(active_features(f_BH), [moved], 8)
        grads = torch.autograd.grad(value, (f_BH, d_HD))
        results.append((value.detach(), *grads))
    for fused, torch_path in zip(*results, strict=True):
        torch.testing.assert_close(fused, torch_path, rtol=2e-4, atol=2e-5)


def naive_effect_sq(f_BH, block: MLPFeatureBlock) -> torch.Tensor:
    mlp, c_D = block.mlp, block.b_dec_D
    out = []
    for b in range(f_BH.shape[0]):
        x_D = c_D + sum((f_BH[b, h] * block.d_HD[h] for h in range(f_BH.shape[1])
                         if f_BH[b, h] != 0), torch.zeros_like(c_D))
        out.append((mlp.forward(x_D[None])[0] - mlp.forward(c_D[None])[0]).pow(2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("gated", [False, True])
def test_effect_normalised_penalties_are_per_block_ratios(gated, kernel_path):
    blocks = [random_block(13, act_name="gelu", gated=gated),
              random_block(14, block=1, act_name="gelu", gated=gated)]
    f_BH = random_f(10, H, seed=13)
    active = active_features(f_BH)
    effects = [naive_effect_sq(f_BH, b).sum() for b in blocks]
    expect_add = sum(naive_additivity(f_BH, b).pow(2).sum() / e
                     for b, e in zip(blocks, effects, strict=True)) / 2
    expect_keep = sum(naive_keep_error(f_BH, b).sum() / e
                      for b, e in zip(blocks, effects, strict=True)) / 2
    torch.testing.assert_close(additivity_penalty(active, blocks, 3, "effect"), expect_add)
    torch.testing.assert_close(keep_error_penalty(active, blocks, 3, "effect"), expect_keep)
    with pytest.raises(Exception, match="normalisation"):
        additivity_penalty(active, blocks, 3, "total")
