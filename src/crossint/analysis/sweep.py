"""The interaction-penalty sweep (the paper's Figure 1): measuring a set of runs trained with
different λ and collecting one summary row per λ.

Training lives in `crossint sweep` (the analysis never trains); this module names the run
directories, measures each finished run with :func:`crossint.analysis.interactions.analyse_run`
(re-using a previous measurement of the same weights with the same settings), and writes
``sweep.json`` and ``sweep.png``.

Every row's numbers come from held-out text (SPEC §4 analysis of the run):

- ``dominant_share``: SPEC §4.2 plain mean over tokens × neurons × blocks;
- ``recon_loss``: SPEC §3.3 L_rec = mean_b Σ_x ‖(a − â)·s_x‖², normalised units with s_x
  estimated on the same held-out tokens (``train_recon_loss``: the last logged training value);
- ``fvu``: SPEC §3.6 FVU averaged over hookpoints;
- ``pairwise_interaction``: total SPEC §4.5 pairwise mass per token, Σ_blocks Σ_{i≠j} I[i, j]
  (= the mean §9.2 interaction score); ``pairwise_interaction_mean`` divides it by H(H − 1),
  the mean off-diagonal entry of I.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossint.errors import CrossintError
from crossint.io import atomic_write_json, read_json, sha256_file

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
INTERACTIONS_DIR = "interactions"
ENTRY_KEYS = ("dominant_share", "dominant_share_active", "recon_loss", "fvu",
              "pairwise_interaction", "pairwise_interaction_mean", "nondominant",
              "nondominant_fraction", "measured_gap", "bound", "l0", "n_tokens")


def parse_lambdas(text: str) -> list[float]:
    """``"0,100,300"`` -> [0.0, 100.0, 300.0]: finite, >= 0, distinct, at least one."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise CrossintError("--lambdas needs at least one value, e.g. 0,100,1000")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise CrossintError(
                f"--lambdas must be comma-separated numbers >= 0, got {part!r}"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise CrossintError(f"--lambdas values must be finite numbers >= 0, got {part}")
        values.append(value)
    if len(set(values)) != len(values):
        raise CrossintError(f"--lambdas lists a value twice: {text}")
    return values


def lambda_name(value: float) -> str:
    """Directory name of one λ: ``lambda_0``, ``lambda_1000``, ``lambda_0.5``, ``lambda_1e-05``."""
    text = str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)
    return f"lambda_{text.replace('+', '')}"


def lambda_dir(out_dir: str | Path, value: float) -> Path:
    return Path(out_dir) / lambda_name(value)


def is_finished(run_dir: str | Path) -> bool:
    """A run whose training ended and whose crosscoder was saved."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not (config.is_file() and (run_dir / "model.safetensors").is_file()):
        return False
    document = read_json(config, "run config")
    return isinstance(document, dict) and document.get("status") == "finished"


def measure_run(run_dir: str | Path, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """The interaction analysis of a finished run, written to RUN/interactions/. A previous one
    is re-used when it measured these exact weights with the same ``settings`` (keyword
    arguments of ``analyse_run``)."""
    import inspect

    from crossint.analysis.interactions import (
        RESULT_NAME,
        analyse_run,
        request_record,
        write_outputs,
    )

    run_dir = Path(run_dir)
    out_dir = run_dir / INTERACTIONS_DIR
    previous = out_dir / RESULT_NAME
    if previous.is_file():
        result = read_json(previous, "interactions result")
        arguments = inspect.signature(analyse_run).bind(run_dir, **settings)
        arguments.apply_defaults()
        request = request_record(arguments.arguments)
        if (isinstance(result, dict) and result.get("request") == request
                and result.get("crosscoder_sha256") == sha256_file(run_dir / "model.safetensors")):
            return result
    result = analyse_run(run_dir, progress=progress, **settings)
    write_outputs(result, out_dir)
    return result


def sweep_entry(value: float, run_dir: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """One row of sweep.json from a run's interactions result and its final training metrics."""
    row = {"lambda": float(value)}
    row.update({key: result.get(key) for key in ENTRY_KEYS})
    document = read_json(Path(run_dir) / "config.json", "run config")
    final = (document.get("final_metrics") if isinstance(document, dict) else None) or {}
    row["train_recon_loss"] = final.get("rec_loss")
    row["train_fvu"] = final.get("fvu")
    row["run"] = str(run_dir)
    return row


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """sweep.json (the rows, ascending λ) and the two-panel sweep.png."""
    from crossint.report.plots import plot_sweep

    rows = sorted(rows, key=lambda row: row["lambda"])
    out_dir = Path(out_dir)

    def column(key: str) -> list[float]:
        return [math.nan if row[key] is None else row[key] for row in rows]

    png = plot_sweep(column("lambda"), column("dominant_share"), column("recon_loss"),
                     column("pairwise_interaction"), out_dir / SWEEP_PNG)
    return {"json": atomic_write_json(out_dir / SWEEP_JSON, list(rows)), "png": png}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of a sweep (printed by `crossint sweep`)."""

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    lines = [f"{'lambda':>10}{'share':>9}{'L_rec':>11}{'FVU':>9}{'pairwise':>11}{'L0':>7}"]
    for row in sorted(rows, key=lambda r: r["lambda"]):
        lines.append(f"{row['lambda']:>10g}{fmt(row['dominant_share'], '>9.4f')}"
                     f"{fmt(row['recon_loss'], '>11.4g')}{fmt(row['fvu'], '>9.4f')}"
                     f"{fmt(row['pairwise_interaction'], '>11.4g')}{fmt(row['l0'], '>7.1f')}")
    return "\n".join(lines)


# --- comparing sweeps: the share-vs-cost frontier ---------------------------------------------
# SPEC §12: the paper's Figure 1 on TinyStories-Instruct-33M, (λ, dominant share, L_rec).
PAPER_FIGURE1 = ((0.0, 0.305, 1962.0), (100.0, 0.447, 1849.0), (200.0, 0.516, 1769.0),
                 (1000.0, 0.816, 2363.0), (2000.0, 0.923, 2451.0), (10000.0, 0.930, 4268.0))


def read_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``sweep_dir/sweep.json`` (from `crossint sweep`), checked."""
    path = Path(sweep_dir) / SWEEP_JSON
    rows = read_json(path, "sweep results")
    needed = ("lambda", "dominant_share", "recon_loss")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in needed)
            for row in rows):
        raise CrossintError(f"{path} is not a sweep: expected a list of rows with numeric "
                            f"{', '.join(needed)} (written by `crossint sweep`)")
    return rows


def frontier(rows: Sequence[dict[str, Any]], where: str = "sweep") -> list[dict[str, float]]:
    """(λ, share, L_rec / L_rec(λ = 0)) per row, ascending λ: the cost of each share relative
    to the same settings without the penalty."""
    baseline = [row["recon_loss"] for row in rows if row["lambda"] == 0]
    if not baseline or not baseline[0] > 0:
        raise CrossintError(f"{where} has no λ = 0 run with a positive recon_loss to compare "
                            "against: add 0 to --lambdas and re-run the sweep")
    return [{"lambda": float(row["lambda"]), "dominant_share": float(row["dominant_share"]),
             "recon_ratio": float(row["recon_loss"]) / baseline[0]}
            for row in sorted(rows, key=lambda row: row["lambda"])]


def best_share_within(points: Sequence[dict[str, float]], max_ratio: float
                      ) -> dict[str, float] | None:
    """The point with the highest share whose L_rec ratio is at most ``max_ratio``."""
    eligible = [point for point in points if point["recon_ratio"] <= max_ratio]
    return max(eligible, key=lambda point: point["dominant_share"], default=None)
