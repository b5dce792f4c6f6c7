"""SPEC §6.1 fidelity: the keep/drop schemes against naive per-token, per-neuron loops, the laws
(an exact decomposition recovers everything, `zero` recovers nothing, one feature = no choice),
the bootstrap, the `crossint fidelity` command and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crossint.analysis.evaluate import evaluate
from crossint.analysis.fidelity import (
    ALL_BLOCK_SCHEMES,
    KEEP_DROP_SCHEMES,
    SCHEMES,
    fidelity,
    random_active_slot,
    scheme_pre_activations,
)
from crossint.analysis.heldout import HeldoutRequest, capture_tokens, heldout_batches
from crossint.analysis.splicing import TextLosses, loss_recovered, percentile_interval
from crossint.cli import main
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.models.adapter import load_model
from crossint.models.hookpoints import hookpoint, resolve_layout

TEXT = ["--corpus", "stories", "--context-length", "32", "--quiet"]


# --- the schemes against naive loops ------------------------------------------------------------
def random_slots(n_tokens: int, n_slots: int, n_neurons: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts_B = torch.randint(0, n_slots + 1, (n_tokens,), generator=g)
    mask_BK = torch.arange(n_slots)[None, :] < counts_B[:, None]
    p_BKN = torch.randn(n_tokens, n_slots, n_neurons, generator=g, dtype=torch.float64)
    return p_BKN * mask_BK[:, :, None], mask_BK


def naive_scheme(p_BKN, mask_BK, scheme: str, random_slot_BN=None):
    n_tokens, _, n_neurons = p_BKN.shape
    z_BN = torch.zeros(n_tokens, n_neurons, dtype=torch.float64)
    for b in range(n_tokens):
        active = [k for k in range(p_BKN.shape[1]) if mask_BK[b, k]]
        for n in range(n_neurons):
            values = {k: float(p_BKN[b, k, n]) for k in active}
            ranked = sorted(active, key=lambda k: (-abs(values[k]), k))
            if scheme == "none":
                kept = active
            elif scheme == "zero":
                kept = []
            elif scheme == "keep_largest":
                kept = ranked[:1]
            elif scheme == "drop_largest":
                kept = ranked[1:]
            elif scheme == "drop_second":
                kept = ranked[:1] + ranked[2:]
            else:  # drop_random: the drawn slot
                kept = [k for k in active if k != int(random_slot_BN[b, n])]
            z_BN[b, n] = sum(values[k] for k in kept)
    return z_BN


@pytest.mark.parametrize("scheme", KEEP_DROP_SCHEMES)
def test_schemes_match_a_naive_loop(scheme):
    p_BKN, mask_BK = random_slots(9, 5, 7, seed=1)
    g = torch.Generator().manual_seed(3)
    z_BN = scheme_pre_activations(p_BKN, mask_BK, scheme, g)
    drawn = None
    if scheme == "drop_random":
        drawn = random_active_slot(mask_BK, 7, torch.Generator().manual_seed(3))
        for b in range(9):  # the drawn slot is always an active one (or 0 for no features)
            assert mask_BK[b, drawn[b]].all() or not mask_BK[b].any()
    torch.testing.assert_close(z_BN, naive_scheme(p_BKN, mask_BK, scheme, drawn))


def test_one_active_feature_leaves_no_choice():
    p_BKN, mask_BK = random_slots(6, 4, 5, seed=2)
    mask_BK[:] = False
    mask_BK[:, 0] = True
    p_BKN = p_BKN * mask_BK[:, :, None]
    p_BKN[:, 0] = torch.randn(6, 5, dtype=torch.float64)
    none = scheme_pre_activations(p_BKN, mask_BK, "none")
    torch.testing.assert_close(scheme_pre_activations(p_BKN, mask_BK, "keep_largest"), none)
    torch.testing.assert_close(scheme_pre_activations(p_BKN, mask_BK, "drop_second"), none)
    assert scheme_pre_activations(p_BKN, mask_BK, "drop_largest").abs().max() == 0
    g = torch.Generator().manual_seed(0)
    assert scheme_pre_activations(p_BKN, mask_BK, "drop_random", g).abs().max() == 0


def test_drop_random_is_seeded_and_roughly_uniform():
    mask_BK = torch.ones(2000, 4, dtype=torch.bool)
    a = random_active_slot(mask_BK, 3, torch.Generator().manual_seed(5))
    b = random_active_slot(mask_BK, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    frequencies = torch.bincount(a.flatten(), minlength=4).double() / a.numel()
    assert (frequencies - 0.25).abs().max() < 0.02


def test_unknown_scheme_and_missing_generator_are_errors():
    from crossint.errors import CrossintError

    p_BKN, mask_BK = random_slots(2, 2, 2, seed=0)
    with pytest.raises(CrossintError, match="unknown scheme 'keep_all'"):
        scheme_pre_activations(p_BKN, mask_BK, "keep_all")
    with pytest.raises(CrossintError, match="seeded"):
        scheme_pre_activations(p_BKN, mask_BK, "drop_random")


# --- the bootstrap -------------------------------------------------------------------------------
def test_text_losses_are_ratios_of_means_with_a_bootstrap():
    losses = TextLosses()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        mask_BS = torch.rand(4, 6, generator=g) > 0.2
        losses.new_batch(mask_BS)
        base = torch.rand(4, 6, generator=g)
        losses.add("model", base)
        losses.add("zero", base + 2.0)
        losses.add("patch", base + 0.5 + 0.1 * torch.rand(4, 6, generator=g))
    assert losses.n_texts == 12
    assert losses.recovered("patch", "zero") == pytest.approx(
        loss_recovered(losses.mean("model"), losses.mean("patch"), losses.mean("zero")))
    assert 0.7 < losses.recovered("patch", "zero") < 0.8
    weights_RC = losses.resample_weights(500, seed=1)
    assert torch.all(weights_RC.sum(dim=1) == 12)
    low, high = percentile_interval(losses.recovered_samples("patch", "zero", weights_RC))
    assert low < losses.recovered("patch", "zero") < high
    assert high - low < 0.05
    with pytest.raises(RuntimeError, match="missed a batch"):
        losses.new_batch(torch.ones(1, 6, dtype=torch.bool))
        losses.add("model", torch.zeros(1, 6))
        losses.add("model", torch.zeros(1, 6))


# --- end to end on a tiny GPT-2 -----------------------------------------------------------------
def save_run(crosscoder: Crosscoder, directory: Path) -> Path:
    return crosscoder.save_pretrained(directory)


def exact_crosscoder(model_dir: Path, block: int, d_model: int) -> Crosscoder:
    """ReLU features ±e_d at each of resid_mid and mlp_in: reconstructs both exactly."""
    hookpoints = [hookpoint(block, "resid_mid"), hookpoint(block, "mlp_in")]
    n_positions = len(hookpoints)
    config = CrosscoderConfig(hookpoints=hookpoints, models=[str(model_dir)], d_model=d_model,
                              n_features=2 * n_positions * d_model, activation="relu",
                              center_inputs=False, folded=True)
    crosscoder = Crosscoder(config)
    with torch.no_grad():
        crosscoder.W_enc_XDH.zero_()
        crosscoder.W_dec_HXD.zero_()
        crosscoder.b_enc_H.zero_()
        crosscoder.b_dec_XD.zero_()
        h = 0
        for x in range(n_positions):
            for d in range(d_model):
                for sign in (1.0, -1.0):
                    crosscoder.W_enc_XDH[x, d, h] = sign
                    crosscoder.W_dec_HXD[h, x, d] = sign
                    h += 1
    return crosscoder.eval()


def random_crosscoder(model_dir: Path, n_blocks: int, d_model: int, seed: int) -> Crosscoder:
    config = CrosscoderConfig(hookpoints=resolve_layout("paper", n_blocks),
                              models=[str(model_dir)], d_model=d_model, n_features=48,
                              activation="topk", k=5, center_inputs=False, folded=True)
    crosscoder = Crosscoder(config, seed=seed)
    with torch.no_grad():
        crosscoder.W_dec_HXD.mul_(20.0)  # contributions large enough to matter
    return crosscoder.eval()


def test_an_exact_decomposition_recovers_everything(tiny_model_dir, tmp_path):
    run = save_run(exact_crosscoder(tiny_model_dir, block=1, d_model=32), tmp_path / "exact")
    result = fidelity([run], blocks=[1], n_texts=6, corpus="stories", context_length=32,
                      progress=False)["exact"]
    assert result["block"] == 1 and result["n_texts"] == 6
    assert result["phi"]["none"] == pytest.approx(1.0, abs=1e-4)
    assert result["phi"]["zero"] == 0.0
    assert result["keep_ratio"] == pytest.approx(result["phi"]["keep_largest"], abs=1e-4)
    assert result["ce_scheme"]["none"] == pytest.approx(result["ce_model"], abs=1e-5)
    assert result["ce_zero"] != pytest.approx(result["ce_model"], abs=1e-4)  # Φ is defined
    evaluated = evaluate(run, n_tokens=150, corpus="stories", context_length=32, progress=False)
    assert evaluated["ce_recovered"]["blocks.1.resid_mid"] == pytest.approx(1.0, abs=1e-4)
    low, high = evaluated["ce_recovered_ci"]["blocks.1.resid_mid"]
    assert low == pytest.approx(1.0, abs=1e-3) and high == pytest.approx(1.0, abs=1e-3)


def naive_mlp_outputs(mlp, crosscoder: Crosscoder, out, block: int, scheme: str) -> torch.Tensor:
    """One block's MLP output (T×D) rebuilt under ``scheme`` from float64 per-token loops: the
    keep/drop schemes neuron by neuron, ``independent`` as MLP(c) + Σ_h [MLP(c + q_h) − MLP(c)]
    with one MLP call per vector."""
    mlp_in = list(crosscoder.config.hookpoints).index(hookpoint(block, "mlp_in"))
    W_in, b_in = mlp.W_in_DN.double(), mlp.b_in_N.double()
    W_out, b_out = mlp.W_out_ND.double(), mlp.b_out_D.double()
    d_HD = crosscoder.W_dec_HXD[:, mlp_in].double()
    c_D = crosscoder.b_dec_XD[mlp_in].double()

    def forward(x_D):
        return mlp.act(x_D @ W_in + b_in) @ W_out + b_out

    rows = []
    for t in range(out.f_BH.shape[0]):
        active = out.f_BH[t].nonzero().flatten().tolist()
        f = {h: float(out.f_BH[t, h]) for h in active}
        if scheme == "independent":
            base = forward(c_D)
            rows.append(base + sum((forward(c_D + f[h] * d_HD[h]) - base for h in active),
                                   torch.zeros_like(base)))
            continue
        z_N = c_D @ W_in + b_in
        for n in range(W_in.shape[1]):
            p = {h: f[h] * float(d_HD[h] @ W_in[:, n]) for h in active}
            ranked = sorted(active, key=lambda h: -abs(p[h]))
            kept = {"none": ranked, "zero": [], "keep_largest": ranked[:1],
                    "drop_largest": ranked[1:], "drop_second": ranked[:1] + ranked[2:]}[scheme]
            z_N[n] += sum(p[h] for h in kept)
        rows.append(mlp.act(z_N) @ W_out + b_out)
    return torch.stack(rows)


def naive_fidelity(model_dir: Path, crosscoder: Crosscoder, block: int, n_texts: int):
    """Φ per scheme (except drop_random) at one block, and every block's MLP output replaced at
    once, from the loops of :func:`naive_mlp_outputs`."""
    adapter = load_model(str(model_dir))
    blocks = list(range(adapter.n_blocks))
    mlps = {l: adapter.mlp_weights(l) for l in blocks}
    hookpoints = list(crosscoder.config.hookpoints)
    mid = hookpoints.index(hookpoint(block, "resid_mid"))
    batches = heldout_batches(adapter, HeldoutRequest(n_texts=n_texts, corpus="stories",
                                                      context_length=32))
    schemes = [s for s in SCHEMES if s != "drop_random"]
    sums = dict.fromkeys(("model", *schemes, *(f"all/{s}" for s in ALL_BLOCK_SCHEMES)), 0.0)

    def add(key, ids_BS, patches, mask_BS):
        sums[key] += float(adapter.token_losses(ids_BS, patches=patches)[mask_BS].double().sum())

    def patch(keep_BS, like_BSD, rows_TD):
        new_BSD = torch.zeros_like(like_BSD)
        new_BSD[keep_BS] = rows_TD.float()
        return lambda orig, new=new_BSD, keep=keep_BS: torch.where(keep[..., None], new, orig)

    for ids_BS in batches:
        acts, keep_BS, acts_TXD = capture_tokens(adapter, ids_BS, hookpoints,
                                                 adapter.special_token_ids())
        like_BSD, mask_BS = acts[hookpoint(block, "resid_mid")], keep_BS[:, :-1]
        with torch.no_grad():
            out = crosscoder(acts_TXD)
            add("model", ids_BS, None, mask_BS)
            for scheme in schemes:
                rows_TD = (out.recon_BXD[:, mid].double()
                           + naive_mlp_outputs(mlps[block], crosscoder, out, block, scheme))
                add(scheme, ids_BS, {hookpoint(block, "resid_post"):
                                     patch(keep_BS, like_BSD, rows_TD)}, mask_BS)
            for scheme in ALL_BLOCK_SCHEMES:
                patches = {hookpoint(l, "mlp_out"): patch(
                    keep_BS, like_BSD, naive_mlp_outputs(mlps[l], crosscoder, out, l, scheme))
                    for l in blocks}
                add(f"all/{scheme}", ids_BS, patches, mask_BS)

    def phi(key, zero):
        return 1 - (sums[key] - sums["model"]) / (sums[zero] - sums["model"])

    return ({s: phi(s, "zero") for s in schemes},
            {s: phi(f"all/{s}", "all/zero") for s in ALL_BLOCK_SCHEMES})


def test_fidelity_matches_a_naive_loop_on_a_tiny_model(tiny_model_dir, tmp_path):
    crosscoder = random_crosscoder(tiny_model_dir, n_blocks=2, d_model=32, seed=3)
    run = save_run(crosscoder, tmp_path / "random")
    result = fidelity([run], blocks=[0, 1], n_texts=3, corpus="stories", context_length=32,
                      progress=False)["random"]
    expected, expected_all = naive_fidelity(tiny_model_dir, Crosscoder.from_pretrained(run), 0,
                                            n_texts=3)
    for scheme, value in expected.items():
        assert result["per_block"][0]["phi"][scheme] == pytest.approx(value, abs=2e-4), scheme
    assert result["all_blocks"]["blocks"] == [0, 1]
    for scheme, value in expected_all.items():
        assert result["all_blocks"]["phi"][scheme] == pytest.approx(value, abs=2e-4), scheme


def test_cli_writes_json_plot_and_table(tiny_model_dir, tmp_path, capsys):
    runs = [save_run(random_crosscoder(tiny_model_dir, 2, 32, seed), tmp_path / name)
            for name, seed in (("base", 0), ("pen", 1))]
    out = tmp_path / "fid"
    code = main(["fidelity", *map(str, runs), "--all-blocks", "--texts", "4", "--out", str(out),
                 *TEXT])
    assert code == 0
    printed = capsys.readouterr().out
    assert "keep ratio" in printed and "base@0" in printed and "pen@1" in printed
    result = json.loads((out / "fidelity.json").read_text())
    assert set(result) == {"base", "pen"}
    for entry in result.values():
        assert [b["block"] for b in entry["per_block"]] == [0, 1]
        assert entry["n_texts"] == 4
        for summary in entry["per_block"]:
            assert set(summary["phi"]) == set(SCHEMES) == set(summary["phi_ci"])
            assert summary["phi"]["zero"] == 0.0
            assert math.isfinite(summary["keep_ratio"])
            assert {"ce_model", "ce_zero", "keep_ratio_ci"} <= set(summary)
    assert (out / "fidelity.png").stat().st_size > 5000
    code = main(["fidelity", str(runs[0]), "--block", "1", "--texts", "2", "--out",
                 str(tmp_path / "one"), *TEXT])
    assert code == 0
    single = json.loads((tmp_path / "one" / "fidelity.json").read_text())["base"]
    assert single["block"] == 1 and "keep_ratio" in single and len(single["per_block"]) == 1


def one_line_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert err.startswith("crossint fidelity: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    good = save_run(random_crosscoder(tiny_model_dir, 2, 32, 0), tmp_path / "good")
    resid = CrosscoderConfig(hookpoints=resolve_layout("resid", 2), models=[str(tiny_model_dir)],
                             d_model=32, n_features=16, activation="topk", k=2, folded=True)
    no_mlp = save_run(Crosscoder(resid), tmp_path / "resid_only")
    out = str(tmp_path / "out")
    one_line_error(capsys, main(["fidelity", str(good), "--block", "7", "--out", out, *TEXT]),
                   "block 7 is out of range")
    one_line_error(capsys, main(["fidelity", str(no_mlp), "--block", "1", "--out", out, *TEXT]),
                   "cannot rebuild block 1", "blocks.1.mlp_in")
    one_line_error(capsys, main(["fidelity", str(good), "--block", "0", "--texts", "0",
                                 "--out", out, *TEXT]), "positive integer")
    one_line_error(capsys, main(["fidelity", str(good), str(good), "--block", "0",
                                 "--out", out, *TEXT]), "given twice")
    one_line_error(capsys, main(["fidelity", str(tmp_path / "missing"), "--block", "0",
                                 "--out", out, *TEXT]), "not found")
    assert not (tmp_path / "out").exists()
