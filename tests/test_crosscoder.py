"""The Crosscoder module (SPEC §3.1, §3.4, §3.5): config, forward, sparse decode, folding, files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.crosscoder.sparse import dense_decode, sparse_codes, sparse_decode
from crossint.errors import CrossintError

HOOKS = ["blocks.0.resid_pre", "blocks.0.mlp_in", "blocks.1.resid_post"]


def make(activation="topk", models=("m",), H=24, D=8, k=3, seed=0, dtype=torch.float64, **kw):
    cfg = CrosscoderConfig(
        hookpoints=list(HOOKS), models=list(models), d_model=D, n_features=H,
        activation=activation, k=k, **kw,
    )
    return Crosscoder(cfg, seed=seed).to(dtype)


def randomise(cc: Crosscoder, seed: int = 1) -> Crosscoder:
    """Give every parameter and buffer generic values (so the tests do not rely on the init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (cc.W_enc_XDH, cc.W_dec_HXD, cc.b_enc_H, cc.b_dec_XD):
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=g, dtype=tensor.dtype))
        cc.scale_X.copy_(0.5 + torch.rand(cc.scale_X.shape, generator=g, dtype=cc.scale_X.dtype))
        cc.threshold_H.copy_(0.1 * torch.rand(cc.threshold_H.shape, generator=g,
                                              dtype=cc.threshold_H.dtype))
    return cc


def acts(cc: Crosscoder, n: int = 10, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X, D = cc.config.n_positions, cc.config.d_model
    return 3.0 * torch.randn(n, X, D, generator=g, dtype=torch.float64)


# --- config ---------------------------------------------------------------------------------
def test_k_not_smaller_than_features_is_an_error():
    with pytest.raises(CrossintError, match=r"k=16.*smaller than n_features=16"):
        CrosscoderConfig(hookpoints=HOOKS, d_model=8, n_features=16, k=16)
    with pytest.raises(CrossintError, match=r"k=40"):
        CrosscoderConfig(hookpoints=HOOKS, d_model=8, n_features=16, k=40)


def test_unknown_activation_is_an_error_listing_valid_names():
    with pytest.raises(CrossintError, match=r"activation='gelu'.*topk, batchtopk, jumprelu, relu"):
        CrosscoderConfig(hookpoints=HOOKS, d_model=8, n_features=16, k=2, activation="gelu")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hookpoints": []}, "hookpoints"),
        ({"hookpoints": ["a", "a"]}, "hookpoints"),
        ({"models": "gpt2"}, "models"),
        ({"d_model": 0}, "d_model"),
        ({"n_features": 2.5}, "n_features"),
        ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"aux_k": 0}, "aux_k"),
        ({"threshold_momentum": 1.0}, "threshold_momentum"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    base = {"hookpoints": HOOKS, "d_model": 8, "n_features": 16, "k": 2}
    with pytest.raises(CrossintError, match=field):
        CrosscoderConfig(**{**base, **changes})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = CrosscoderConfig(hookpoints=HOOKS, models=["a", "b"], d_model=8, n_features=16, k=2,
                           activation="jumprelu", aux_k=5)
    assert CrosscoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CrossintError, match="unknown settings.*'colour'"):
        CrosscoderConfig.from_dict({**cfg.to_dict(), "colour": 1})


# --- init (SPEC §3.5) -------------------------------------------------------------------------
def test_init_decoder_norms_tied_encoder_zero_biases():
    cc = make(activation="batchtopk", H=40, D=16, seed=3, dtype=torch.float32)
    norms_HX = cc.W_dec_HXD.norm(dim=-1)
    torch.testing.assert_close(norms_HX, torch.full_like(norms_HX, 0.1))
    assert torch.equal(cc.W_enc_XDH, cc.W_dec_HXD.permute(1, 2, 0))
    assert torch.equal(cc.b_enc_H, torch.zeros_like(cc.b_enc_H))
    assert not cc.b_dec_XD.requires_grad  # frozen at zero by default (paper)
    assert torch.equal(make(seed=3, H=40, D=16).W_dec_HXD.float(), cc.W_dec_HXD)  # seeded
    assert not torch.equal(make(seed=4, H=40, D=16).W_dec_HXD.float(), cc.W_dec_HXD)


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_calibrated_encoder_bias_fires_each_feature_on_k_over_h_of_tokens(activation):
    cc = make(activation=activation, H=20, k=4, jumprelu_init_threshold=0.05)
    a = acts(cc, n=1000)
    cc.estimate_normalisation(a)
    cc.calibrate_encoder_bias(a)
    level = 0.05 if activation == "jumprelu" else 0.0
    rate_H = (cc.pre_activations(a) > level).double().mean(0)
    torch.testing.assert_close(rate_H, torch.full((20,), 4 / 20, dtype=torch.float64),
                               atol=2e-3, rtol=0)


# --- forward vs naive float64 (SPEC §3.1) ----------------------------------------------------
def naive_forward(cc: Crosscoder, a_BXD: torch.Tensor):
    """SPEC §3.1 by loops over positions with the activation written out per token."""
    cfg = cc.config
    s = cc.scale_X.detach()
    pre = cc.b_enc_H.detach().clone().expand(a_BXD.shape[0], -1).clone()
    for x in range(cfg.n_positions):
        centre = cc.b_dec_XD[x].detach() if cfg.center_inputs else 0.0
        pre += (a_BXD[:, x] * s[x] - centre) @ cc.W_enc_XDH[x].detach()
    f = torch.zeros_like(pre)
    for b in range(pre.shape[0]):
        for h in range(pre.shape[1]):
            z = pre[b, h].item()
            if cfg.activation == "relu":
                f[b, h] = max(z, 0.0)
            elif cfg.activation == "topk":
                kth = sorted(pre[b].tolist(), reverse=True)[cfg.k - 1]
                f[b, h] = max(z, 0.0) if z >= kth else 0.0
            else:  # jumprelu, or batchtopk at inference: the threshold rule
                f[b, h] = z if z > cc.threshold_H[h].item() else 0.0
    recon = torch.zeros_like(a_BXD)
    for x in range(cfg.n_positions):
        recon[:, x] = (f @ cc.W_dec_HXD[:, x].detach() + cc.b_dec_XD[x].detach()) / s[x]
    return pre, f, recon


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_forward_matches_naive(activation, center):
    cc = randomise(make(activation=activation, center_inputs=center)).eval()
    a = acts(cc)
    with torch.no_grad():
        out = cc(a)
    pre, f, recon = naive_forward(cc, a)
    torch.testing.assert_close(out.pre_BH, pre)
    torch.testing.assert_close(out.f_BH, f)
    torch.testing.assert_close(out.recon_BXD, recon)
    torch.testing.assert_close(cc.encode(a), f)
    torch.testing.assert_close(cc.decode(f), recon)
    torch.testing.assert_close(out.acts_norm_BXD, a * cc.scale_X[:, None])
    torch.testing.assert_close(out.recon_norm_BXD, recon * cc.scale_X[:, None])


def test_batchtopk_training_mode_selects_over_the_batch():
    cc = randomise(make(activation="batchtopk", k=2)).train()
    a = acts(cc, n=12)
    out = cc(a)
    assert (out.f_BH != 0).sum() <= 2 * 12
    assert out.batch_threshold is not None and out.batch_threshold.item() > 0
    active = out.pre_BH[out.f_BH != 0]
    assert active.min().item() == pytest.approx(out.batch_threshold.item())


def test_batchtopk_inference_features_do_not_depend_on_the_batch():
    cc = randomise(make(activation="batchtopk", k=2, dtype=torch.float32)).eval()
    a = acts(cc, n=16).float()
    with torch.no_grad():
        together = cc.encode(a)
        alone = torch.cat([cc.encode(a[i : i + 1]) for i in range(16)])
        in_other_batch = cc.encode(torch.cat([a[:4], 10 * a[4:]]))[:4]
    # Same active features, same values up to the GEMM's rounding for another batch shape.
    assert torch.equal(together != 0, alone != 0)
    assert torch.equal(together[:4] != 0, in_other_batch != 0)
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(in_other_batch, together[:4])
    # ...whereas batch top-k in training mode does depend on the other tokens.
    cc.train()
    with torch.no_grad():
        mixed = cc.encode(torch.cat([a[:4], 10 * a[4:]]))[:4]
        assert not torch.equal(mixed != 0, cc.encode(a)[:4] != 0)


# --- sparse decode (SPEC §3.1) -------------------------------------------------------------
def test_sparse_decode_equals_dense_values_and_gradients_float64():
    g = torch.Generator().manual_seed(5)
    B, H, X, D = 9, 30, 3, 5
    mask = torch.rand(B, H, generator=g) < 0.15
    mask[2] = False  # a token with no active feature
    mask[4, :7] = True  # tokens with different numbers of features
    f = (torch.rand(B, H, generator=g, dtype=torch.float64) * mask).requires_grad_(True)
    W = torch.randn(H, X, D, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, X, D, generator=g, dtype=torch.float64)

    sparse = sparse_decode(sparse_codes(f), W)
    naive = torch.einsum("bh,hxd->bxd", f, W)
    torch.testing.assert_close(sparse, naive)
    torch.testing.assert_close(dense_decode(f, W), naive)
    grad_f_sparse, grad_W_sparse = torch.autograd.grad((sparse * upstream).sum(), (f, W))
    grad_f_dense, grad_W_dense = torch.autograd.grad((naive * upstream).sum(), (f, W))
    torch.testing.assert_close(grad_W_sparse, grad_W_dense)
    # Sparse decoding gives gradient at the active features only (the others are exact zeros
    # after a TopK-like activation, whose backward discards them anyway).
    torch.testing.assert_close(grad_f_sparse, grad_f_dense * mask)
    assert torch.autograd.gradcheck(
        lambda w: sparse_decode(sparse_codes(f.detach()), w), (W,)
    )


def test_sparse_decode_of_an_all_zero_batch():
    W = torch.randn(7, 2, 3, dtype=torch.float64)
    out = sparse_decode(sparse_codes(torch.zeros(4, 7, dtype=torch.float64)), W)
    assert torch.equal(out, torch.zeros(4, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_model_gradients_equal_with_sparse_and_dense_decoding(activation, monkeypatch):
    a = acts(make(activation=activation))
    grads = []
    for sparse in (True, False):
        cc = randomise(make(activation=activation)).train()
        monkeypatch.setattr(Crosscoder, "decodes_sparsely", property(lambda self, s=sparse: s))
        out = cc(a)
        out.recon_norm_BXD.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in (cc.W_enc_XDH, cc.W_dec_HXD, cc.b_enc_H)])
    for g_sparse, g_dense in zip(*grads, strict=True):
        torch.testing.assert_close(g_sparse, g_dense)


# --- positions ---------------------------------------------------------------------------------
def test_two_models_positions_are_model_major():
    cc = randomise(make(activation="relu", models=("base", "ft")))
    assert cc.config.n_positions == 6
    assert cc.positions == [("base", h) for h in HOOKS] + [("ft", h) for h in HOOKS]
    assert cc.W_enc_XDH.shape == (6, 8, 24) and cc.W_dec_HXD.shape == (24, 6, 8)
    for x, (model, hook) in enumerate(cc.positions):
        assert cc.position_index(hook, model) == x
        torch.testing.assert_close(cc.decoder(hook, model), cc.W_dec_HXD[:, x] / cc.scale_X[x])
        torch.testing.assert_close(cc.decoder_bias(hook, model), cc.b_dec_XD[x] / cc.scale_X[x])
    a = acts(cc)
    out = cc(a)
    assert out.recon_BXD.shape == a.shape and out.f_BH.shape == (10, 24)
    # Feature h reads position (ft, mlp_in) through W_enc[4] and writes it through W_dec[:, 4].
    a2 = a.clone()
    a2[:, 4] += 1.0
    with torch.no_grad():
        delta = cc.pre_activations(a2) - cc.pre_activations(a)
    torch.testing.assert_close(delta, (cc.scale_X[4] * cc.W_enc_XDH[4].sum(0)).expand(10, -1))
    with pytest.raises(CrossintError, match="say which model"):
        cc.decoder("blocks.0.mlp_in")
    with pytest.raises(CrossintError, match="unknown model"):
        cc.decoder("blocks.0.mlp_in", "other")
    with pytest.raises(CrossintError, match="not in this crosscoder"):
        cc.decoder("blocks.0.attn_in", "base")


def test_wrong_activation_shape_is_an_error():
    cc = make()
    with pytest.raises(CrossintError, match=r"\(tokens, 3 positions, 8\)"):
        cc(torch.zeros(4, 2, 8, dtype=torch.float64))


# --- normalisation and folding (SPEC §3.4) ----------------------------------------------------
def test_estimate_normalisation_matches_definition():
    cc = make()
    a = acts(cc, n=50)
    a[:, 1] *= 7.0
    scale = cc.estimate_normalisation(a)
    for x in range(3):
        mean_norm = sum(a[n, x].norm().item() for n in range(50)) / 50
        assert scale[x].item() == pytest.approx(math.sqrt(8) / mean_norm, rel=1e-12)
    normalised = cc.normalise(a)
    torch.testing.assert_close(normalised.norm(dim=-1).mean(0), torch.full((3,), math.sqrt(8),
                                                                           dtype=torch.float64))
    a[:, 2] = 0
    with pytest.raises(CrossintError, match="all zero"):
        cc.estimate_normalisation(a)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_folded_model_on_raw_activations_equals_unfolded_with_normalisation(activation, center):
    cc = make(activation=activation, train_decoder_bias=True, center_inputs=center)
    cc = randomise(cc).eval()
    a = acts(cc)
    with torch.no_grad():
        before = cc(a)
        folded = cc.fold_normalisation()
        after = folded(a)
    assert folded.config.folded and torch.equal(folded.scale_X, torch.ones(3, dtype=torch.float64))
    assert not folded.config.center_inputs  # the saved form is SPEC §3.1 exactly
    torch.testing.assert_close(after.pre_BH, before.pre_BH)
    torch.testing.assert_close(after.f_BH, before.f_BH)
    torch.testing.assert_close(after.recon_BXD, before.recon_BXD)
    with torch.no_grad():
        again = folded.fold_normalisation()(a)  # folding twice changes nothing
    torch.testing.assert_close(again.recon_BXD, before.recon_BXD)
    with pytest.raises(CrossintError, match="already folded"):
        folded.estimate_normalisation(a)


def test_decoder_is_in_raw_units_before_and_after_folding():
    cc = randomise(make())
    before = cc.decoder("blocks.0.mlp_in").detach().clone()
    cc.fold_normalisation()
    torch.testing.assert_close(cc.decoder("blocks.0.mlp_in"), before)
    torch.testing.assert_close(cc.decoder("blocks.0.mlp_in"), cc.W_dec_HXD[:, 1])



def test_decoders_gather_several_positions_with_the_same_values_and_gradients():
    cc = randomise(make())
    names = list(cc.config.hookpoints)[::-1]
    weights = [torch.randn_like(cc.decoder(name)) for name in names]
    together = cc.decoders(names)
    sum((w * d).sum() for w, d in zip(weights, together, strict=True)).backward()
    grad_together = cc.W_dec_HXD.grad.clone()
    cc.W_dec_HXD.grad = None
    one_by_one = [cc.decoder(name) for name in names]
    sum((w * d).sum() for w, d in zip(weights, one_by_one, strict=True)).backward()
    for a, b in zip(together, one_by_one, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_together, cc.W_dec_HXD.grad)

# --- save / load -------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_save_load_round_trip(activation, tmp_path):
    cc = randomise(make(activation=activation, dtype=torch.float32)).eval()
    a = acts(cc).float()
    cc.save_pretrained(tmp_path / "cc")
    loaded = Crosscoder.from_pretrained(tmp_path / "cc")
    assert not loaded.training
    assert loaded.config == cc.config
    for name, tensor in cc.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(a).recon_BXD, cc(a).recon_BXD)
    document = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert document["format"] == "crossint.crosscoder" and "crosscoder" in document


def test_saved_batchtopk_loads_as_jumprelu_with_its_threshold(tmp_path):
    cc = randomise(make(activation="batchtopk", dtype=torch.float32))
    with torch.no_grad():
        cc.threshold_H.fill_(0.07)
    cc.save_pretrained(tmp_path / "cc", extra={"note": "kept"})
    loaded = Crosscoder.from_pretrained(tmp_path / "cc")
    assert loaded.config.activation == "jumprelu"
    assert loaded.config.trained_activation == "batchtopk"
    assert torch.equal(loaded.threshold_H, torch.full((24,), 0.07))
    a = acts(cc).float()
    with torch.no_grad():
        assert torch.equal(loaded.encode(a), cc.eval().encode(a))
    assert json.loads((tmp_path / "cc" / "config.json").read_text())["note"] == "kept"


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(CrossintError, match="not found"):
        Crosscoder.from_pretrained(tmp_path / "nothing")
    d = tmp_path / "cc"
    make(dtype=torch.float32).save_pretrained(d)
    weights = (d / "model.safetensors").read_bytes()
    config = (d / "config.json").read_text()

    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CrossintError, match="corrupt or truncated"):
        Crosscoder.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CrossintError, match="weights not found"):
        Crosscoder.from_pretrained(d)
    (d / "model.safetensors").write_bytes(weights)

    (d / "config.json").write_text(config[:40])
    with pytest.raises(CrossintError, match="not valid JSON"):
        Crosscoder.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(CrossintError, match="not a crosscoder config"):
        Crosscoder.from_pretrained(d)
    document = json.loads(config)
    document["crosscoder"]["n_features"] = 32
    (d / "config.json").write_text(json.dumps(document))
    with pytest.raises(CrossintError, match=r"W_dec_HXD.*shape \(24, 3, 8\).*\(32, 3, 8\)"):
        Crosscoder.from_pretrained(d)
    document["crosscoder"]["n_features"] = 24
    document["crosscoder"]["activation"] = "swish"
    (d / "config.json").write_text(json.dumps(document))
    with pytest.raises(CrossintError, match="activation='swish'"):
        Crosscoder.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CrossintError, match="config not found"):
        Crosscoder.from_pretrained(d)
