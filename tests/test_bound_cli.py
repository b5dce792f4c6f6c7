"""`crossint bound` (SPEC §7) and `crossint independence` (SPEC §8) on a tiny GPT-2: the outputs
are written, no bound falls below its measured error on the real run, and bad input fails with
one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from crossint.cli import main

TEXT = ["--tokens", "300", "--context-length", "32", "--quiet"]


@pytest.fixture(scope="module")
def bound_document(trained_paper_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bound") / "out"
    assert main(["bound", str(trained_paper_run), "--out", str(out), *TEXT]) == 0
    return out, json.loads((out / "bound.json").read_text())


def test_bound_writes_its_outputs_and_no_bound_is_violated(bound_document):
    out, document = bound_document
    assert (out / "bound_pareto.png").stat().st_size > 0
    (result,) = document.values()
    assert result["n_tokens"] >= 300 and result["blocks"] == [0, 1]
    for row in result["per_block"]:
        for e, entry in row["explanations"].items():
            brute = entry["strategies"]["brute_force"]
            assert brute["violations"] == brute["violations_total"] == 0
            assert brute["ratio_total"] == pytest.approx(1.0)
            for s, cell in entry["strategies"].items():
                assert cell["violations"] == 0 and cell["violations_total"] == 0, (e, s)
                assert cell["bound_total"] >= entry["measured_total"] * (1 - 1e-9), (e, s)
                if e != "full":
                    assert cell["bound"] >= entry["measured"] * (1 - 1e-9), (e, s)
                assert cell["table_flops_amortised"] == pytest.approx(
                    cell["table_flops"] / result["n_tokens"], rel=0.01)
            if e != "full":
                assert entry["strategies"]["lipschitz"]["cost_ratio"] < 1
        assert row["reconstruction"]["bound"] >= row["reconstruction"]["measured"]


def test_the_end_to_end_bound_is_at_least_the_measured_loss_change(bound_document):
    _, document = bound_document
    (result,) = document.values()
    chain = result["chain"]
    assert chain["chain_blocks"] == [0, 1] and chain["zero_gap"] > 0
    for e, entry in chain["explanations"].items():
        assert set(entry["measured_eps"]) == {"blocks.1.resid_pre", "blocks.1.resid_post"}
        for s, row in entry["strategies"].items():
            for mode in ("token", "global"):
                assert row[mode]["mean_bound"] >= entry["abs_delta"], (e, s, mode)
                assert row[mode]["eps_final"] >= list(entry["measured_eps"].values())[-1]
            assert row["global"]["mean_bound"] >= row["token"]["mean_bound"] - 1e-9
            assert row["verifier_flops_per_token"] > 0
        assert chain["diagnosis"][e].split(":")[0] in ("vacuous", "non-vacuous")


def test_bound_compares_a_family_of_runs(trained_paper_run, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(trained_paper_run, twin, ignore=shutil.ignore_patterns("bound*"))
    out = tmp_path / "family"
    code = main(["bound", str(trained_paper_run), str(twin), "--out", str(out), "--no-chain",
                 "--blocks", "1", *TEXT])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "bound.json").read_text())
    assert set(document) == {trained_paper_run.name, "twin"}
    a, b = document.values()
    assert a["chain"] is None and a["blocks"] == [1]
    assert a["summary"]["keep"]["measured"] == pytest.approx(b["summary"]["keep"]["measured"])
    assert "end to end" not in capsys.readouterr().out


def test_independence_writes_its_outputs(trained_paper_run, tmp_path):
    out = tmp_path / "independence"
    assert main(["independence", str(trained_paper_run), "--out", str(out), "--bins", "4",
                 "--min-count", "2", *TEXT]) == 0
    result = json.loads((out / "independence.json").read_text())
    assert (out / "independence.png").stat().st_size > 0
    assert (out / "pmi_pairs.csv").read_text().startswith("i,j,count,expected,pmi")
    assert result["n_tokens_A"] + result["n_tokens_B"] == result["n_tokens"]
    assert result["coactivations"] > 0 and result["expected_coactivations"] > 0
    for row in result["per_block"]:
        assert row["relative_independence"] >= 0 and row["relative_floor"] > 0
    for pair in result["top_pairs"]:
        assert pair["count"] >= 2 and pair["pmi_low"] <= pair["pmi"] <= pair["pmi_high"]


def test_the_report_shows_both_sections(trained_paper_run, bound_document, tmp_path):
    from crossint.report.html import build_report

    out, _ = bound_document
    independence = tmp_path / "independence"
    assert main(["independence", str(trained_paper_run), "--out", str(independence), *TEXT]) == 0
    page = build_report(trained_paper_run, include=[out, independence])
    assert 'id="bound"' in page and 'id="independence"' in page
    assert "Compact-proof bounds (SPEC §7)" in page and "(this run)" in page
    assert page.count("data:image/png;base64") >= 2
    assert "end to end" in page and "vacuous" in page


# --- bad input: one line each --------------------------------------------------------------------
@pytest.fixture(scope="module")
def resid_run(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    from crossint.data.harvest import harvest

    root = tmp_path_factory.mktemp("resid_run")
    cache = harvest(str(tiny_model_dir), root / "cache", "resid", n_tokens=600,
                    corpus=str(tiny_text_file), context_length=32, batch_size=8,
                    progress=False).path
    run = root / "run"
    assert main(["train", "--activations", str(cache), "--out", str(run), "--features", "32",
                 "--k", "4", "--steps", "10", "--batch-size", "64", "--quiet"]) == 0
    return run


@pytest.mark.parametrize("command", ["bound", "independence"])
def test_a_run_without_mlp_in_fails_in_one_line(command, resid_run, tmp_path, capsys):
    code = main([command, str(resid_run), "--out", str(tmp_path / "out"), *TEXT])
    assert_one_line_error(capsys, code, command, "mlp_in")


@pytest.mark.parametrize("command", ["bound", "independence"])
def test_an_empty_text_set_fails_in_one_line(command, trained_paper_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code = main([command, str(trained_paper_run), "--out", str(tmp_path / "out"), "--corpus",
                 str(empty), *TEXT])
    assert_one_line_error(capsys, code, command, "empty")


def test_an_mlp_without_a_finite_lipschitz_constant_fails_in_one_line(
        trained_paper_run, tmp_path, capsys, monkeypatch):
    from crossint.models.adapter import ModelAdapter

    original = ModelAdapter.mlp_weights

    def sqrt_mlp(self, block):
        return dataclasses.replace(original(self, block), act=lambda t: t.abs().sqrt(),
                                   act_name="sqrt_abs", lipschitz=1.0)

    monkeypatch.setattr(ModelAdapter, "mlp_weights", sqrt_mlp)
    code = main(["bound", str(trained_paper_run), "--out", str(tmp_path / "out"), "--no-chain",
                 *TEXT])
    assert_one_line_error(capsys, code, "bound", "no finite Lipschitz constant",
                          "data range")


def test_several_runs_need_an_output_directory(trained_paper_run, capsys):
    code = main(["bound", str(trained_paper_run), str(trained_paper_run), *TEXT])
    assert_one_line_error(capsys, code, "bound", "--out")


def test_the_commands_are_registered_without_importing_torch():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys; from crossint.cli import "
                           "build_parser; build_parser(); print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    assert torch.get_num_threads() >= 1
