"""The interaction-penalty sweep (the paper's Figure 1): one crosscoder per λ on the same
activations, settings and seed, each measured on held-out text, one summary row per λ.

:func:`run_sweep` trains every λ with :func:`crossint.interactions.penalty.train_with_penalty`
into ``OUT/lambda_<λ>/`` (skipping finished runs, resuming interrupted ones), measures each
with :func:`crossint.analysis.interactions.analyse_interactions` (re-using a previous
measurement of the same weights with the same settings), and writes ``sweep.json``,
``sweep.png`` and the settings.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossint import rundir
from crossint.errors import CrossintError
from crossint.io import atomic_write_json, read_json, sha256_file
from crossint.rundir import RunDir

if TYPE_CHECKING:
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import ActivationSource, TrainConfig
    from crossint.interactions.penalty import Penalty

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
    return RunDir(run_dir).is_finished()


def measure_run(
    run_dir: str | Path,
    request: Any = None,
    *,
    progress: bool = True,
    blocks: Sequence[int] | None = None,
    top_pairs: int = 50,
    delta2_pairs: int = 50,
    chunk_tokens: int | None = None,
    **text: Any,
) -> dict[str, Any]:
    """The interaction analysis of a finished run, written to RUN/interactions/: ``request``
    (a ``crossint.analysis.heldout.HeldoutRequest``) or its fields as keywords, and the other
    settings of ``analyse_interactions``. A previous result is re-used when it measured these exact
    weights with the same resolved request (``analysis.interactions.request_record``); one
    written before requests recorded the corpus split is re-used only for the built-in stories
    (whose held-out text has not changed) and measured again otherwise."""
    from crossint.analysis.heldout import request_from
    from crossint.analysis.interactions import (
        INTERACTION_TOKENS,
        analyse_interactions,
        request_record,
        write_outputs,
    )

    request = request_from(request, text, n_tokens=INTERACTION_TOKENS).resolve(run_dir)
    run = RunDir(run_dir)
    result = run.read_result(rundir.INTERACTIONS)
    wanted = request_record(request, blocks, top_pairs, delta2_pairs)
    if (isinstance(result, dict) and _same_request(result.get("request"), wanted, run_dir)
            and result.get("crosscoder_sha256") == sha256_file(run.weights)):
        return result
    result = analyse_interactions(run_dir, request, blocks=blocks, top_pairs=top_pairs,
                         delta2_pairs=delta2_pairs, chunk_tokens=chunk_tokens, progress=progress)
    write_outputs(result, run.result_dir(rundir.INTERACTIONS))
    return result


def _same_request(stored: Any, wanted: dict[str, Any], run_dir: str | Path) -> bool:
    """Whether a stored interactions.json ``request`` asked for the ``wanted`` one."""
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.analysis.interactions import request_record

    if stored == wanted:
        return True
    if not isinstance(stored, dict) or "split" in stored or wanted["split"] is not None:
        return False
    # Recorded before requests recorded the split (corpus and context length as given): the
    # same text as now only for stories, which split by seed.
    try:
        legacy = HeldoutRequest.from_record(stored).resolve(run_dir)
        blocks = stored.get("blocks")
        again = request_record(legacy, blocks, stored.get("top_pairs"), stored.get("delta2_pairs"))
    except (CrossintError, TypeError):
        return False
    return again == wanted


def sweep_entry(value: float, run_dir: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """One row of sweep.json from a run's interactions result and its final training metrics."""
    row = {"lambda": float(value)}
    row.update({key: result.get(key) for key in ENTRY_KEYS})
    final = RunDir(run_dir).read_config().get("final_metrics") or {}
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
                     column("pairwise_interaction"), out_dir / rundir.SWEEP.file("plot"))
    return {"json": atomic_write_json(out_dir / rundir.SWEEP.name, list(rows)), "png": png}


def check_finished_run(run_dir: str | Path, crosscoder_config: CrosscoderConfig,
                       train_config: TrainConfig, penalty: Penalty) -> None:
    """A finished run is re-used only if it was trained with exactly these settings."""
    from crossint.crosscoder.train import RESUME_FREE_SETTINGS, read_run_configs
    from crossint.interactions.penalty import CONFIG_KEY, run_penalty

    saved_cc, saved_tc = read_run_configs(run_dir)
    differences = [
        f"{name}={saved[name]!r} (now {wanted[name]!r})"
        for saved, wanted in ((saved_cc.to_dict(), crosscoder_config.to_dict()),
                              (saved_tc.to_dict(), train_config.to_dict()))
        for name in wanted
        if name not in RESUME_FREE_SETTINGS and saved.get(name) != wanted[name]
    ]
    saved_penalty = run_penalty(run_dir)
    if saved_penalty != penalty:
        differences.append(f"{CONFIG_KEY}={saved_penalty.describe()} "
                           f"(now {penalty.describe()})")
    if differences:
        raise CrossintError(
            f"{run_dir} holds a finished run with other settings: {', '.join(differences)}; "
            "use the same settings or a new --out"
        )


def run_sweep(
    source: ActivationSource,
    lambdas: Sequence[float],
    crosscoder_config: CrosscoderConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    penalty: Penalty | None = None,
    request: HeldoutRequest | None = None,
    *,
    measure: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train one crosscoder per λ into ``out_dir/lambda_<λ>/`` with ``penalty``'s kind and
    options (its own weight is ignored), measure each on the held-out text of ``request``
    (default: ``HeldoutRequest(n_tokens=50_000)`` on the training corpus; ``measure``: the
    other keyword arguments of ``analyse_interactions``, e.g. ``top_pairs``) and write
    sweep.json, sweep.png and the sweep's settings.
    Re-running skips finished runs (refusing ones trained with other settings) and resumes
    interrupted ones. Every run logs its dominant share, so the subject model is loaded once.
    ``log`` receives a line per λ saying what happens to it. Returns the rows of sweep.json."""
    from crossint.interactions.penalty import (
        DominancePenalty,
        load_penalty_mlps,
        source_blocks,
        train_with_penalty,
    )

    template = penalty if penalty is not None else DominancePenalty()
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.analysis.interactions import INTERACTION_TOKENS

    measure = dict(measure or {})
    request = request or HeldoutRequest(n_tokens=INTERACTION_TOKENS)
    mlps = load_penalty_mlps(source, device=train_config.device)
    out_dir = Path(out_dir)
    runs = [(float(value), lambda_dir(out_dir, value)) for value in lambdas]
    for value, run_dir in runs:
        wanted = template.with_weight(value)
        if is_finished(run_dir):
            check_finished_run(run_dir, crosscoder_config, train_config, wanted)
            if log:
                log(f"λ={value:g}: finished run in {run_dir}, skipped")
            continue
        if log:
            log(f"λ={value:g}: training {run_dir}")
        train_with_penalty(crosscoder_config, train_config, source, run_dir, wanted, resume=True,
                           log_interactions=True, mlps=mlps, progress=progress)
    rows = [sweep_entry(value, run_dir, measure_run(run_dir, request, progress=progress, **measure))
            for value, run_dir in runs]
    atomic_write_json(out_dir / rundir.SWEEP.file("settings"), {
        "activations": str(Path(source.path).resolve()) if hasattr(source, "path") else None,
        "lambdas": [value for value, _ in runs],
        "crosscoder": crosscoder_config.to_dict(),
        "train": train_config.to_dict(),
        "penalty": template.with_weight(0.0).record(source_blocks(source)),
        "measurement": {**request.record(), **measure},
    })
    write_sweep(rows, out_dir)
    return rows


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
    path = Path(sweep_dir) / rundir.SWEEP.name
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
