"""`crossint sweep` (the paper's Figure 1): one run per λ on one cache, measured on held-out text;
re-runs skip finished work, resume interrupted runs and refuse changed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossint.analysis.sweep import lambda_name, parse_lambdas
from crossint.cli import main
from crossint.data.harvest import harvest
from crossint.errors import CrossintError

SWEEP = ["--features", "64", "--k", "4", "--steps", "40", "--batch-size", "128",
         "--checkpoint-every", "20", "--log-every", "10", "--penalty-normalise",
         "--tokens", "400", "--context-length", "32", "--top-pairs", "5", "--delta2-pairs", "5",
         "--quiet"]
ROW_KEYS = ("lambda", "dominant_share", "recon_loss", "fvu", "pairwise_interaction")


def test_parse_lambdas():
    assert parse_lambdas("0,100, 300,1e3") == [0.0, 100.0, 300.0, 1000.0]
    for bad, match in (("", "at least one"), ("0,x", "'x'"), ("0,-1", ">= 0"),
                       ("1,inf", ">= 0"), ("1,1.0", "twice")):
        with pytest.raises(CrossintError, match=match):
            parse_lambdas(bad)


def test_lambda_names_are_distinct_and_readable():
    assert [lambda_name(v) for v in (0.0, 100.0, 0.5, 1e-5, 1e20)] == [
        "lambda_0", "lambda_100", "lambda_0.5", "lambda_1e-05", "lambda_1e20"]


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    return harvest(str(tiny_model_dir), tmp_path_factory.mktemp("sweep_cache") / "cache",
                   "paper", n_tokens=2000, corpus=str(tiny_text_file), context_length=32,
                   batch_size=8, progress=False).path


def sweep(cache: Path, out: Path, lambdas: str, *extra: str) -> int:
    return main(["sweep", "--activations", str(cache), "--lambdas", lambdas, "--out", str(out),
                 *SWEEP, *extra])


def snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.parent.name != out.name}


@pytest.mark.slow
def test_sweep_writes_rows_and_plot_and_reruns(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep(cache, out, "0,100") == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [row["lambda"] for row in rows] == [0.0, 100.0]
    for row in rows:
        for key in ROW_KEYS:
            assert isinstance(row[key], float), key
        assert 0 < row["dominant_share"] <= 1 and row["recon_loss"] > 0 and row["fvu"] > 0
        assert row["pairwise_interaction"] > 0
        run = Path(row["run"])
        config = json.loads((run / "config.json").read_text())
        assert config["interaction_penalty"]["lambda"] == row["lambda"]
        assert config["train"]["seed"] == 0 and config["train"]["steps"] == 40
        result = json.loads((run / "interactions" / "interactions.json").read_text())
        assert result["dominant_share"] == row["dominant_share"]
        # every run logs the same interaction metric, λ = 0 included
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert 0 < last["dominant_share"] <= 1
    assert rows[1]["dominant_share"] > rows[0]["dominant_share"]
    assert rows[1]["pairwise_interaction"] < rows[0]["pairwise_interaction"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "lambda_0").is_dir() and (out / "lambda_100").is_dir()
    capsys.readouterr()

    # Re-run: nothing is retrained or re-measured.
    before = snapshot(out)
    assert sweep(cache, out, "0,100") == 0
    assert "skipped" in capsys.readouterr().out
    assert snapshot(out) == before
    assert json.loads((out / "sweep.json").read_text()) == rows

    # An interrupted run (no saved crosscoder yet) resumes from its checkpoint to the same weights.
    run = out / "lambda_100"
    weights = (run / "model.safetensors").read_bytes()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "status": "training"}))
    (run / "model.safetensors").unlink()
    assert sweep(cache, out, "0,100") == 0
    assert (run / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "sweep.json").read_text()) == rows

    # A finished run trained with other settings is not silently reused.
    capsys.readouterr()
    assert sweep(cache, out, "0", "--k", "3") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings" in err and "k=4 (now 3)" in err


def test_sweep_bad_input_is_one_line(cache, tmp_path, tiny_model_dir, tiny_text_file, capsys):
    assert sweep(cache, tmp_path / "s", "0,-5") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lambdas" in err and ">= 0" in err
    resid = harvest(str(tiny_model_dir), tmp_path / "resid", "resid", n_tokens=200,
                    corpus=str(tiny_text_file), context_length=32, progress=False).path
    capsys.readouterr()
    assert sweep(resid, tmp_path / "s", "0") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mlp_in" in err
    assert not (tmp_path / "s").exists()
