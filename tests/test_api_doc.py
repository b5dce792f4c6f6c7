"""docs/api.md is a script that runs: every step of the documented Python API, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
NUMBER = re.compile(r"-?\d+\.?\d*")


def doc_blocks(fence: str) -> list[str]:
    return re.findall(rf"```{fence}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_the_api_page_runs_and_prints_what_it_says(tmp_path):
    (script,) = doc_blocks("python")
    assert script.startswith("import crossint\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)  # ~150 s on an idle 2-core machine
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    (documented,) = doc_blocks("text")
    documented = documented.strip().splitlines()
    # Same words; numbers as documented up to the last digits (other CPUs round differently).
    assert len(printed) == len(documented), "\n".join(printed)
    for got, want in zip(printed, documented, strict=True):
        assert NUMBER.sub("#", got) == NUMBER.sub("#", want), got
        for a, b in zip(NUMBER.findall(got), NUMBER.findall(want), strict=True):
            assert float(a) == pytest.approx(float(b), rel=0.02, abs=0.002), (got, want)
    # The penalty did what it is for, and resuming a finished run changed nothing.
    share = {line.split(":")[0]: float(line.split("share ")[1].split(",")[0])
             for line in printed if "dominant share" in line}
    assert share["runs/pen"] > share["runs/plain"] + 0.05
    assert (tmp_path / "runs/sweep/sweep.json").is_file()
