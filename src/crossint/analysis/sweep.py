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
from crossint.io import atomic_write_json, sha256_file
from crossint.rundir import RunDir

if TYPE_CHECKING:
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import ActivationSource, TrainConfig
    from crossint.interactions.penalty import Penalty

ENTRY_KEYS = ("dominant_share", "dominant_share_active", "recon_loss", "fvu",
              "pairwise_interaction", "pairwise_interaction_mean", "nondominant",
              "nondominant_fraction", "measured_gap", "bound", "additivity_error",
              "additivity_error_sq", "feature_effect", "l0", "n_tokens")
FIDELITY_KEYS = ("phi", "phi_ci", "keep_ratio", "keep_ratio_ci")


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


def sweep_entry(value: float, run_dir: str | Path, result: dict[str, Any],
                fidelity: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of sweep.json from a run's interactions result, its final training metrics and,
    if measured, its fidelity entry (Φ per block and with all blocks replaced at once)."""
    row = {"lambda": float(value)}
    row.update({key: result.get(key) for key in ENTRY_KEYS})
    mlp_in = [v for h, v in (result.get("fvu_per_hookpoint") or {}).items()
              if h.endswith(".mlp_in") and isinstance(v, (int, float))]
    row["mlp_in_fvu"] = sum(mlp_in) / len(mlp_in) if mlp_in else None
    final = RunDir(run_dir).read_config().get("final_metrics") or {}
    row["train_recon_loss"] = final.get("rec_loss")
    row["train_fvu"] = final.get("fvu")
    if fidelity is not None:
        row["fidelity"] = {
            "per_block": {str(b["block"]): {k: b[k] for k in FIDELITY_KEYS}
                          for b in fidelity["per_block"]},
            "all_blocks": {k: fidelity["all_blocks"][k] for k in FIDELITY_KEYS},
        }
    row["run"] = str(run_dir)
    return row


def measure_fidelity(run_dir: str | Path, request: HeldoutRequest,
                     progress: bool = True) -> dict[str, Any]:
    """The fidelity of a finished run at every block it can rebuild and all at once, written to
    RUN/fidelity/ (its entry of fidelity.json); re-used for the same weights and request."""
    from crossint.analysis.fidelity import fidelity, write_outputs

    run = RunDir(run_dir)
    request = request.resolve(run_dir)
    name = run.path.name or str(run.path)
    stored = run.read_result(rundir.FIDELITY)
    entry = stored.get(name) if isinstance(stored, dict) else None
    if (isinstance(entry, dict) and entry.get("request") == request.record()
            and entry.get("crosscoder_sha256") == sha256_file(run.weights)):
        return entry
    result = fidelity([run.path], request, progress=progress)
    write_outputs(result, run.result_dir(rundir.FIDELITY))
    return result[name]


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
    # λ = 0 trains no penalty whatever its kind: one λ = 0 run serves the sweeps of every kind
    if saved_penalty != penalty and (saved_penalty.weight, penalty.weight) != (0.0, 0.0):
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
    fidelity: HeldoutRequest | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train one crosscoder per λ into ``out_dir/lambda_<λ>/`` with ``penalty``'s kind and
    options (its own weight is ignored), measure each on the held-out text of ``request``
    (default: ``HeldoutRequest(n_tokens=50_000)`` on the training corpus; ``measure``: the
    other keyword arguments of ``analyse_interactions``, e.g. ``top_pairs``) and, when
    ``fidelity`` (a request counting texts) is given, its fidelity (RUN/fidelity/); write
    sweep.json, sweep.png and the sweep's settings.
    Re-running skips finished runs (refusing ones trained with other settings), resumes
    interrupted ones and re-uses measurements of the same weights. Every run logs its dominant
    share and L_int, so the subject model is loaded once. ``log`` receives a line per λ saying
    what happens to it. Returns the rows of sweep.json."""
    from crossint.analysis.heldout import HeldoutRequest
    from crossint.analysis.interactions import INTERACTION_TOKENS
    from crossint.interactions.penalty import DominancePenalty, source_blocks

    template = penalty if penalty is not None else DominancePenalty()
    request = request or HeldoutRequest(n_tokens=INTERACTION_TOKENS)
    out_dir = Path(out_dir)
    runs = [(float(value), lambda_dir(out_dir, value)) for value in lambdas]
    train_sweep_runs(source, runs, crosscoder_config, train_config, template, progress, log)
    rows = []
    for value, run_dir in runs:
        result = measure_run(run_dir, request, progress=progress, **(measure or {}))
        entry = measure_fidelity(run_dir, fidelity, progress) if fidelity else None
        rows.append(sweep_entry(value, run_dir, result, entry))
    atomic_write_json(out_dir / rundir.SWEEP.file("settings"), {
        "activations": str(Path(source.path).resolve()) if hasattr(source, "path") else None,
        "lambdas": [value for value, _ in runs],
        "crosscoder": crosscoder_config.to_dict(),
        "train": train_config.to_dict(),
        "penalty": template.with_weight(0.0).record(source_blocks(source)),
        "measurement": {**request.record(), **(measure or {})},
        "fidelity": fidelity.record() if fidelity else None,
    })
    write_sweep(rows, out_dir)
    return rows


def train_sweep_runs(source: ActivationSource, runs: Sequence[tuple[float, Path]],
                     crosscoder_config: CrosscoderConfig, train_config: TrainConfig,
                     template: Penalty, progress: bool,
                     log: Callable[[str], None] | None) -> None:
    """Train (or resume, or skip when finished with these settings) the run of every λ."""
    from crossint.interactions.penalty import load_penalty_mlps, train_with_penalty

    mlps = load_penalty_mlps(source, device=train_config.device)
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


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of a sweep (printed by `crossint sweep`); with fidelity, Φ of the
    keep-dominant and independent surrogates with every block replaced at once."""

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    with_fidelity = any("fidelity" in row for row in rows)
    head = (f"{'lambda':>10}{'share':>9}{'L_rec':>11}{'FVU':>9}{'mlp_in':>9}{'additivity':>12}"
            f"{'pairwise':>11}{'L0':>7}")
    lines = [head + (f"{'Φ_keep@all':>12}{'Φ_ind@all':>11}" if with_fidelity else "")]
    for row in sorted(rows, key=lambda r: r["lambda"]):
        line = (f"{row['lambda']:>10g}{fmt(row['dominant_share'], '>9.4f')}"
                f"{fmt(row['recon_loss'], '>11.4g')}{fmt(row['fvu'], '>9.4f')}"
                f"{fmt(row.get('mlp_in_fvu'), '>9.4f')}{fmt(row.get('additivity_error'), '>12.4g')}"
                f"{fmt(row['pairwise_interaction'], '>11.4g')}{fmt(row['l0'], '>7.1f')}")
        if with_fidelity:
            phi = ((row.get("fidelity") or {}).get("all_blocks") or {}).get("phi") or {}
            line += (f"{fmt(phi.get('keep_largest'), '>12.3f')}"
                     f"{fmt(phi.get('independent'), '>11.3f')}")
        lines.append(line)
    return "\n".join(lines)
