"""`crossint train --interaction-penalty` (SPEC §4.4) and `crossint interactions` (SPEC §4) on a
tiny GPT-2: the penalty is recorded and raises the dominant share, the analysis writes every
output and agrees with a naive float64 computation, and bad input fails with one line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from crossint.analysis.heldout import HeldoutRequest, heldout_batches, non_special_BS
from crossint.analysis.interactions import analyse_interactions
from crossint.cli import main
from crossint.crosscoder.model import Crosscoder
from crossint.data.harvest import harvest
from crossint.models.adapter import load_model

TRAIN = ["--features", "64", "--k", "4", "--steps", "60", "--batch-size", "128",
         "--checkpoint-every", "30", "--log-every", "10", "--quiet"]
PENALTY = ["--interaction-penalty", "100", "--penalty-normalise"]
SHARE_PENALTY = ["--interaction-penalty", "1000", "--penalty-normalise", "neuron"]
MEASURE = ["--tokens", "600", "--context-length", "32", "--top-pairs", "12",
           "--delta2-pairs", "12", "--quiet"]
TOP_KEYS = ("dominant_share", "nondominant", "bound", "measured_gap", "per_block", "top_pairs",
            "delta2_spearman")
PAIR_KEYS = ("i", "j", "block", "strength", "frequency", "ratio", "hadamard", "delta2")


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_text_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interaction_caches")
    settings = {"corpus": str(tiny_text_file), "context_length": 32, "batch_size": 8,
                "progress": False}
    return {
        layout: harvest(str(tiny_model_dir), root / layout, layout, n_tokens=tokens,
                        **settings).path
        for layout, tokens in (("paper", 3000), ("resid", 600))
    }


@pytest.fixture(scope="module")
def runs(caches, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interaction_runs")
    made = {}
    for name, extra in (("plain", ["--log-interactions", "--penalty-normalise"]),
                        ("penalised", PENALTY),
                        ("share", SHARE_PENALTY)):
        made[name] = root / name
        code = main(["train", "--activations", str(caches["paper"]), "--out", str(made[name]),
                     *TRAIN, *extra])
        assert code == 0
    return made


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_penalty_is_recorded_logged_and_raises_the_share(runs):
    config = json.loads((runs["penalised"] / "config.json").read_text())
    assert config["interaction_penalty"] == {"kind": "dominance", "lambda": 100.0,
                                             "sample": 1.0, "weighting": "uniform",
                                             "normalise": "total", "blocks": [0, 1]}
    assert config["status"] == "finished"
    plain = json.loads((runs["plain"] / "config.json").read_text())["interaction_penalty"]
    assert plain["lambda"] == 0.0
    penalised, unpenalised = metrics(runs["penalised"]), metrics(runs["plain"])
    # λ·L_int is part of the loss; the unweighted L_int and the share are logged by both runs.
    for record in penalised:
        assert record["interaction"] == pytest.approx(100 * record["interaction_penalty"],
                                                      rel=1e-3)
        assert record["loss"] > record["rec_loss"]
    assert all("interaction" not in r and 0 < r["dominant_share"] <= 1 for r in unpenalised)
    # normalised L_int = 1 − mass-weighted share, so it falls as the share rises
    assert penalised[-1]["dominant_share"] > unpenalised[-1]["dominant_share"] + 0.1
    assert penalised[-1]["interaction_penalty"] < unpenalised[-1]["interaction_penalty"]


def test_per_neuron_penalty_is_one_minus_the_share_and_raises_it(runs):
    config = json.loads((runs["share"] / "config.json").read_text())
    assert config["interaction_penalty"]["normalise"] == "neuron"
    share, plain = metrics(runs["share"]), metrics(runs["plain"])
    for record in share:
        assert record["interaction_penalty"] == pytest.approx(1 - record["dominant_share"],
                                                              rel=1e-4)
    assert share[-1]["dominant_share"] > plain[-1]["dominant_share"] + 0.1


@pytest.mark.slow
def test_interactions_cli_writes_every_output(runs, tmp_path, capsys):
    out = tmp_path / "inter"
    assert main(["interactions", str(runs["penalised"]), "--out", str(out), *MEASURE]) == 0
    printed = capsys.readouterr().out
    assert "share" in printed and "Spearman" in printed
    result = json.loads((out / "interactions.json").read_text())
    for key in TOP_KEYS:
        assert key in result, key
    assert 0 < result["dominant_share"] <= 1
    assert result["nondominant"] >= 0
    assert result["bound"] >= result["measured_gap"] > 0
    assert [row["block"] for row in result["per_block"]] == [0, 1]
    for row in result["per_block"]:
        assert 0 < row["dominant_share"] <= 1
        assert row["bound"] >= row["measured_gap"] and row["bound_violations"] == 0
    # Σ_{i≠j} I[i, j] is the mean per-token score Σ_n ‖W_out[n]‖(S − Mx): two code paths agree.
    assert result["pairwise_interaction"] == pytest.approx(result["interaction_score_mean"],
                                                           rel=1e-9)
    assert 0 < len(result["top_pairs"]) <= 12
    totals = [pair["total"] for pair in result["top_pairs"]]
    assert totals == sorted(totals, reverse=True)
    for pair in result["top_pairs"]:
        for key in PAIR_KEYS:
            assert key in pair, key
        assert pair["i"] != pair["j"] and pair["block"] in (0, 1)
        assert 0 < pair["frequency"] <= 1 and pair["strength"] > 0
        assert 0 <= pair["ratio"] <= 1 and pair["hadamard"] >= 0 and pair["delta2"] >= 0
    rho = result["delta2_spearman"]
    assert rho["n_pairs"] == len(result["top_pairs"])
    assert all(rho[k] is None or -1 <= rho[k] <= 1 for k in ("ratio", "hadamard", "strength"))
    with open(out / "top_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["top_pairs"]) and set(PAIR_KEYS) <= set(rows[0])
    assert int(rows[0]["i"]) == result["top_pairs"][0]["i"]
    for name in ("dominant_share_hist.png", "interaction_location.png", "top_pairs.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # The penalised crosscoder's dominant share on held-out text exceeds the plain one's.
    plain = analyse_interactions(runs["plain"], n_tokens=600, context_length=32, top_pairs=0,
                        delta2_pairs=0, progress=False)
    assert result["dominant_share"] > plain["dominant_share"] + 0.1
    assert plain["top_pairs"] == [] and plain["delta2_spearman"] == {"n_pairs": 0}


def test_analysis_matches_naive_float64(runs, tiny_text_file):
    """Shares, S − Mx, the §4.3 bound and L_rec against dense loops over every feature."""
    run = runs["plain"]
    result = analyse_interactions(run, n_tokens=300, corpus=str(tiny_text_file), context_length=32,
                         batch_size=4, top_pairs=3, delta2_pairs=0, progress=False)
    crosscoder = Crosscoder.from_pretrained(run)
    adapter = load_model(crosscoder.config.models[0])
    batches = heldout_batches(adapter, HeldoutRequest(n_tokens=300, corpus=str(tiny_text_file),
                                                      context_length=32, batch_size=4))
    hookpoints = crosscoder.config.hookpoints
    acts = []
    for ids_BS in batches:
        captured = adapter.capture(ids_BS, hookpoints)
        keep_BS = non_special_BS(ids_BS, adapter.special_token_ids())
        acts.append(torch.stack([captured[h][keep_BS] for h in hookpoints], dim=1))
    acts_TXD = torch.cat(acts)
    assert acts_TXD.shape[0] == result["n_tokens"]
    with torch.no_grad():  # encoded in float32 as the analysis does; everything after in float64
        f_TH = crosscoder.encode(acts_TXD)
        recon_TXD = crosscoder.decode(f_TH).double()
    f_TH, acts_TXD = f_TH.double(), acts_TXD.double()
    for row in result["per_block"]:
        block = row["block"]
        mlp = adapter.mlp_weights(block)
        d_HD = crosscoder.decoder(f"blocks.{block}.mlp_in").detach().double()
        V_HN = d_HD @ mlp.W_in_DN.double()
        p_THN = f_TH[:, :, None] * V_HN[None]  # every feature, dense
        S_TN, Mx_TN = p_THN.abs().sum(dim=1), p_THN.abs().amax(dim=1)
        share = ((Mx_TN + 1e-8) / (S_TN + 1e-8)).mean().item()
        w_out_N = mlp.W_out_ND.double().norm(dim=1)
        bound = (mlp.lipschitz * ((S_TN - Mx_TN) * w_out_N).sum(dim=1)).mean().item()
        assert row["dominant_share"] == pytest.approx(share, rel=1e-4)
        assert row["nondominant"] == pytest.approx((S_TN - Mx_TN).mean().item(), rel=1e-4)
        assert row["bound"] == pytest.approx(bound, rel=1e-4)
    scale_X = math.sqrt(crosscoder.config.d_model) / acts_TXD.norm(dim=-1).mean(dim=0)
    naive_rec = ((acts_TXD - recon_TXD) * scale_X[:, None]).pow(2).sum(dim=(1, 2)).mean().item()
    assert result["recon_loss"] == pytest.approx(naive_rec, rel=1e-3)


def test_resume_keeps_the_recorded_penalty(runs, caches, capsys):
    run = str(runs["penalised"])
    # no penalty flags: the run's own λ is used, and the finished run resumes as a no-op
    assert main(["train", "--activations", str(caches["paper"]), "--out", run, "--resume",
                 "--quiet"]) == 0
    capsys.readouterr()
    code = main(["train", "--activations", str(caches["paper"]), "--out", run, "--resume",
                 "--interaction-penalty", "5", "--quiet"])
    assert_one_line_error(capsys, code, "train", "cannot resume", "interaction_penalty")


@pytest.mark.parametrize("extra, fragments", [
    (["--interaction-penalty", "-1"], ("--interaction-penalty", ">= 0")),
    (["--interaction-penalty", "nan"], ("--interaction-penalty",)),
])
def test_train_rejects_a_negative_penalty(caches, tmp_path, capsys, extra, fragments):
    code = main(["train", "--activations", str(caches["paper"]), "--out", str(tmp_path / "r"),
                 *TRAIN, *extra])
    assert_one_line_error(capsys, code, "train", *fragments)
    assert not (tmp_path / "r").exists()


def test_train_penalty_needs_mlp_in(caches, tmp_path, capsys):
    code = main(["train", "--activations", str(caches["resid"]), "--out", str(tmp_path / "r"),
                 *TRAIN, "--interaction-penalty", "10"])
    assert_one_line_error(capsys, code, "train", "mlp_in", "paper layout")


def test_interactions_errors_are_one_line(runs, caches, tmp_path, capsys):
    # a crosscoder trained on the resid layout has no MLP inputs
    resid_run = tmp_path / "resid_run"
    assert main(["train", "--activations", str(caches["resid"]), "--out", str(resid_run),
                 "--features", "32", "--k", "2", "--steps", "4", "--batch-size", "64",
                 "--quiet"]) == 0
    capsys.readouterr()
    code = main(["interactions", str(resid_run), *MEASURE])
    assert_one_line_error(capsys, code, "interactions", "no blocks.{l}.mlp_in", "paper layout")
    code = main(["interactions", str(runs["plain"]), "--blocks", "5", *MEASURE])
    assert_one_line_error(capsys, code, "interactions", "block(s) 5", "blocks 0, 1")
    code = main(["interactions", str(tmp_path / "missing"), *MEASURE])
    assert_one_line_error(capsys, code, "interactions", "not found")


def test_interactions_rejects_a_model_of_another_width(runs, tmp_path, capsys):
    from conftest import build_tiny_gpt2

    wide = build_tiny_gpt2(tmp_path / "wide", d_model=48)
    capsys.readouterr()  # save_pretrained's own progress output
    code = main(["interactions", str(runs["plain"]), "--model", str(wide), *MEASURE])
    assert_one_line_error(capsys, code, "interactions", "d_model 48", "width 32")
    deep = build_tiny_gpt2(tmp_path / "deep", n_blocks=3)
    capsys.readouterr()
    code = main(["interactions", str(runs["plain"]), "--model", str(deep), *MEASURE])
    assert_one_line_error(capsys, code, "interactions", "does not match", "n_blocks 2")
