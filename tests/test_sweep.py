"""`crossint sweep` (the paper's Figure 1): one run per λ on one cache, measured on held-out text;
re-runs skip finished work, resume interrupted runs and refuse changed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossint.analysis.frontier import (
    PAPER_FIGURE1,
    best_within,
    frontier,
    measure_value,
    paper_points,
)
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

    # The frontier of the real sweep: each L_rec over the sweep's own λ = 0 L_rec.
    assert main(["frontier", str(out), "--out", str(tmp_path / "frontier.png")]) == 0
    document = json.loads((tmp_path / "frontier.json").read_text())
    points = document["curves"]["sweep"]["points"]
    assert [p["lambda"] for p in points] == [0.0, 100.0]
    assert points[1]["cost"] == pytest.approx(rows[1]["recon_loss"] / rows[0]["recon_loss"])
    assert points[0]["cost"] == 1.0
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
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


def write_sweep_rows(directory: Path, rows) -> Path:
    directory.mkdir(parents=True)
    entries = [{"lambda": lam, "dominant_share": share, "recon_loss": loss}
               for lam, share, loss in rows]
    (directory / "sweep.json").write_text(json.dumps(entries))
    return directory


def test_frontier_ratios_and_the_best_value_within_a_cost():
    rows = [{"lambda": lam, "dominant_share": share, "recon_loss": loss}
            for lam, share, loss in [(300, 0.84, 150.0), (0, 0.25, 100.0), (100, 0.6, 120.0)]]
    points = frontier(rows)
    assert [p["lambda"] for p in points] == [0, 100, 300]  # ascending λ
    assert [p["cost"] for p in points] == [1.0, 1.2, 1.5]
    assert best_within(points, 1.3)["lambda"] == 100
    assert best_within(points, 1.5)["value"] == 0.84
    assert best_within(points, 0.99) is None
    assert best_within(points, 1.5, higher_is_better=False)["lambda"] == 0
    paper = frontier([{"lambda": lam, "dominant_share": share, "recon_loss": loss}
                      for lam, share, loss in PAPER_FIGURE1])
    best = best_within(paper, 1.3)  # SPEC §12: 0.923 at +25%
    assert best["lambda"] == 2000 and best["cost"] == pytest.approx(2451 / 1962)
    keep = paper_points("phi_keep_largest@1", "recon_ratio")  # Figure 2, block 1
    assert [(p["lambda"], p["value"]) for p in keep] == [(0.0, 0.290), (1000.0, 0.351)]
    assert paper_points("phi_independent@all", "recon_ratio") == []


def test_measures_are_read_from_rows_and_fidelity():
    row = {"lambda": 0, "recon_loss": 10.0, "dominant_share": 0.3, "mlp_in_fvu": 0.1,
           "fidelity": {"per_block": {"1": {"phi": {"keep_largest": 0.4}, "keep_ratio": 0.5}},
                        "all_blocks": {"phi": {"independent": 0.9}}}}
    assert measure_value(row, "dominant_share") == 0.3
    assert measure_value(row, "phi_keep_largest@1") == 0.4
    assert measure_value(row, "keep_ratio@1") == 0.5
    assert measure_value(row, "phi_independent@all") == 0.9
    assert measure_value(row, "phi_independent@2") is None
    assert measure_value(row, "nothing") is None
    points = frontier([row, {**row, "lambda": 5, "mlp_in_fvu": 0.3}], "phi_keep_largest@1",
                      "mlp_in_fvu")
    assert [p["cost"] for p in points] == [0.1, 0.3]
    with pytest.raises(CrossintError, match="fidelity-texts"):
        frontier([row], "phi_none@3")
    with pytest.raises(CrossintError, match="unknown cost"):
        frontier([row], "dominant_share", "time")


def test_frontier_command_compares_sweeps_and_marks_the_target(tmp_path, capsys):
    a = write_sweep_rows(tmp_path / "a", [(0, 0.25, 100.0), (300, 0.84, 150.0)])
    b = write_sweep_rows(tmp_path / "b", [(0, 0.3, 200.0), (1000, 0.82, 240.0)])
    out = tmp_path / "cmp.png"
    assert main(["frontier", str(a), str(b), "--labels", "wide,narrow", "--paper",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wide" in printed and "narrow" in printed and "paper" in printed
    document = json.loads(out.with_suffix(".json").read_text())
    curves = document["curves"]
    assert curves["wide"]["target_met"] is False  # 0.84 costs 1.5x
    assert curves["wide"]["best_within_cost"]["lambda"] == 0
    assert curves["narrow"]["target_met"] is True  # 0.82 at 1.2x
    assert curves["paper (SPEC §12)"]["target_met"] is True
    assert out.read_bytes()[:4] == b"\x89PNG"
    # a stricter target
    assert main(["frontier", str(b), "--target-ratio", "1.1", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["b"]["target_met"] is False


def test_frontier_bad_input_is_one_line(tmp_path, capsys):
    no_baseline = write_sweep_rows(tmp_path / "nob", [(100, 0.5, 120.0)])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "sweep.json").write_text('[{"lambda": 0, "dominant')
    not_a_sweep = tmp_path / "other"
    not_a_sweep.mkdir()
    (not_a_sweep / "sweep.json").write_text('{"lambda": 0}')
    good = write_sweep_rows(tmp_path / "good", [(0, 0.25, 100.0)])
    out = str(tmp_path / "f.png")
    cases = [
        ([str(no_baseline)], "λ = 0"),
        ([str(corrupt)], "corrupt"),
        ([str(not_a_sweep)], "not a sweep"),
        ([str(tmp_path / "missing")], "not found"),
        ([str(good), "--labels", "x,y"], "--labels"),
        ([str(good), "--target-cost", "0"], "--target-cost"),
        ([str(good), "--measure", "phi_none@1"], "fidelity-texts"),
        ([str(good), "--measure", "additivity_error", "--paper"], "paper reports no"),
        ([str(good), str(good)], "--labels"),  # the same directory name twice
    ]
    for argv, message in cases:
        assert main(["frontier", *argv, "--out", out]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)
    assert not (tmp_path / "f.png").exists()


@pytest.mark.slow
def test_a_sweep_of_another_kind_with_fidelity_feeds_the_frontier(cache, tmp_path, capsys):
    out = tmp_path / "additivity"
    args = [a for a in SWEEP if a != "--penalty-normalise"]
    assert main(["sweep", "--activations", str(cache), "--lambdas", "0,30", "--out", str(out),
                 *args, "--penalty-kind", "additivity", "--fidelity-texts", "3"]) == 0
    assert "Φ_ind@all" in capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())
    for row in rows:
        assert row["additivity_error"] > 0 and 0 < row["mlp_in_fvu"]
        assert set(row["fidelity"]["per_block"]) == {"0", "1"}
        assert set(row["fidelity"]["all_blocks"]["phi"]) == {"none", "keep_largest",
                                                             "independent", "zero"}
    config = json.loads((out / "lambda_30" / "config.json").read_text())
    assert config["interaction_penalty"]["kind"] == "additivity"
    assert rows[1]["additivity_error"] < rows[0]["additivity_error"]
    assert (out / "lambda_30" / "fidelity" / "fidelity.json").is_file()
    # the fidelity of the same weights is re-used
    before = (out / "lambda_30" / "fidelity" / "fidelity.json").stat().st_mtime_ns
    assert main(["sweep", "--activations", str(cache), "--lambdas", "0,30", "--out", str(out),
                 *args, "--penalty-kind", "additivity", "--fidelity-texts", "3"]) == 0
    assert (out / "lambda_30" / "fidelity" / "fidelity.json").stat().st_mtime_ns == before
    frontier_png = tmp_path / "ind.png"
    assert main(["frontier", str(out), "--measure", "phi_independent@all", "--cost",
                 "mlp_in_fvu", "--target", "0.5", "--target-cost", "1", "--out",
                 str(frontier_png)]) == 0
    document = json.loads(frontier_png.with_suffix(".json").read_text())
    assert [p["lambda"] for p in document["curves"]["additivity"]["points"]] == [0.0, 30.0]


def test_one_lambda_0_run_serves_the_sweeps_of_every_kind(cache, tmp_path, capsys):
    out = tmp_path / "shared"
    args = [a for a in SWEEP if a != "--penalty-normalise"]
    assert main(["sweep", "--activations", str(cache), "--lambdas", "0", "--out", str(out),
                 *args]) == 0
    capsys.readouterr()
    assert main(["sweep", "--activations", str(cache), "--lambdas", "0", "--out", str(out),
                 *args, "--penalty-kind", "keep_error"]) == 0
    assert "skipped" in capsys.readouterr().out
    # a penalised run of another kind is still refused
    assert main(["sweep", "--activations", str(cache), "--lambdas", "5", "--out", str(out),
                 *args]) == 0
    capsys.readouterr()
    assert main(["sweep", "--activations", str(cache), "--lambdas", "5", "--out", str(out),
                 *args, "--penalty-kind", "keep_error"]) == 1
    assert "other settings" in capsys.readouterr().err
