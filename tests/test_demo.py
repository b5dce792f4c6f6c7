"""`crossint demo`: the whole pipeline on the embedded model, end to end (small sizes)."""

from __future__ import annotations

import json

import pytest

from crossint.cli import main

SMALL = [
    "--tokens",
    "3000",
    "--features",
    "128",
    "--k",
    "8",
    "--steps",
    "12",
    "--batch-size",
    "128",
    "--eval-tokens",
    "300",
    "--quiet",
]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reruns(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["hookpoints"]) == 17  # paper layout of the 4-block story model
    assert summary["model"] == {
        "name": "storylm",
        "family": "gpt_neo",
        "blocks": 4,
        "d_model": 128,
        "d_mlp": 512,
    }
    assert 0 < summary["fvu_mean"] < 1.5
    assert 0 < summary["l0"] < 128
    assert set(summary["ce_recovered"]) == {
        f"blocks.{l}.{site}" for l in range(4) for site in ("resid_pre", "resid_mid")
    } | {"blocks.3.resid_post"}
    assert (out / "crosscoder" / "model.safetensors").is_file()
    assert (out / "crosscoder" / "eval" / "eval.json").is_file()
    assert 0 < summary["dominant_share"] <= 1
    assert summary["keep_dominant_gap"] <= summary["keep_dominant_bound"]  # SPEC §4.3
    assert (out / "crosscoder" / "interactions" / "interaction_location.png").is_file()
    assert "CE recovered" in capsys.readouterr().out
    assert set(summary["clusters"]) == {"interaction", "decoder", "activation"}
    assert (out / "crosscoder" / "clusters" / "clusters.json").is_file()
    report = (out / "crosscoder" / "report.html").read_text(encoding="utf-8")
    assert '<section id="clusters">' in report and '<section id="interactions">' in report

    # Re-running the finished demo reuses the cache and the trained crosscoder.
    weights = (out / "crosscoder" / "model.safetensors").read_bytes()
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    assert (out / "crosscoder" / "model.safetensors").read_bytes() == weights
