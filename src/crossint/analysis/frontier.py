"""Frontiers: what a penalty buys (an interaction or fidelity measure) against what it costs (a
reconstruction measure), read from λ sweeps, with the paper's points where it reports them.

Measures are read from a ``sweep.json`` row by name (:func:`measure_value`):

- a top-level number of the row: ``dominant_share``, ``additivity_error``, ``fvu``,
  ``pairwise_interaction``, ``measured_gap``, ... (see ``analysis.sweep.ENTRY_KEYS``);
- ``phi_<scheme>@<block>``: fidelity Φ of a SPEC §6.1 scheme or the §4.7 surrogate at one block
  (``phi_keep_largest@1``, ``phi_independent@3``), or with every block replaced at once
  (``phi_independent@all``); ``keep_ratio@<block>`` likewise (sweeps run with fidelity).

Costs (:data:`COSTS`): ``recon_ratio`` (held-out L_rec over the sweep's own λ = 0 L_rec),
``mlp_in_fvu`` (held-out FVU averaged over the ``mlp_in`` hookpoints, where the penalties act),
``recon_loss`` and ``fvu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossint import rundir
from crossint.errors import CrossintError
from crossint.io import read_json

COSTS: tuple[str, ...] = ("recon_ratio", "mlp_in_fvu", "recon_loss", "fvu")
LOWER_IS_BETTER = frozenset({"additivity_error", "additivity_error_sq", "nondominant",
                             "measured_gap", "bound", "pairwise_interaction", "fvu",
                             "recon_loss", "mlp_in_fvu"})
# SPEC §12: the paper's Figure 1 (λ, dominant share, L_rec) on TinyStories-Instruct-33M ...
PAPER_FIGURE1 = ((0.0, 0.305, 1962.0), (100.0, 0.447, 1849.0), (200.0, 0.516, 1769.0),
                 (1000.0, 0.816, 2363.0), (2000.0, 0.923, 2451.0), (10000.0, 0.930, 4268.0))
# ... and its Figure 2 at block 1 for λ = 0 and 1000 (Φ per scheme).
PAPER_FIGURE2_BLOCK1 = {0.0: {"none": 0.736, "drop_random": 0.708, "drop_second": 0.600,
                              "drop_largest": 0.048, "keep_largest": 0.290},
                        1000.0: {"none": 0.377, "drop_random": 0.377, "drop_second": 0.361,
                                 "drop_largest": 0.053, "keep_largest": 0.351}}


def read_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``sweep_dir/sweep.json`` (from `crossint sweep`), checked."""
    path = Path(sweep_dir) / rundir.SWEEP.name
    rows = read_json(path, rundir.SWEEP.what)
    needed = ("lambda", "recon_loss")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in needed)
            for row in rows):
        raise CrossintError(f"{path} is not a sweep: expected a list of rows with numeric "
                            f"{', '.join(needed)} (written by `crossint sweep`)")
    return rows


def measure_value(row: dict[str, Any], name: str) -> float | None:
    """The measure ``name`` of one sweep row (None where the row does not have it)."""
    if "@" not in name:
        value = row.get(name)
        return float(value) if isinstance(value, (int, float)) else None
    measure, where = name.split("@", 1)
    fidelity = row.get("fidelity") or {}
    summary = (fidelity.get("all_blocks") if where == "all"
               else (fidelity.get("per_block") or {}).get(where))
    if not isinstance(summary, dict):
        return None
    if measure.startswith("phi_"):
        value = (summary.get("phi") or {}).get(measure[len("phi_"):])
    else:
        value = summary.get(measure)
    return float(value) if isinstance(value, (int, float)) else None


def frontier(rows: Sequence[dict[str, Any]], measure: str = "dominant_share",
             cost: str = "recon_ratio", where: str = "sweep") -> list[dict[str, float]]:
    """(λ, measure, cost) per row with both, ascending λ. ``recon_ratio`` divides each L_rec by
    the sweep's λ = 0 L_rec (the cost of a measure relative to the same settings unpenalised)."""
    if cost not in COSTS:
        raise CrossintError(f"unknown cost {cost!r}: choose one of {', '.join(COSTS)}")
    baseline = None
    if cost == "recon_ratio":
        baseline = next((row["recon_loss"] for row in rows if row["lambda"] == 0), None)
        if not isinstance(baseline, (int, float)) or not baseline > 0:
            raise CrossintError(f"{where} has no λ = 0 run with a positive recon_loss to compare "
                                "against: add 0 to --lambdas and re-run the sweep")
    points = []
    for row in sorted(rows, key=lambda row: row["lambda"]):
        value = measure_value(row, measure)
        spent = (row["recon_loss"] / baseline if baseline is not None
                 else measure_value(row, cost))
        if value is not None and spent is not None and math.isfinite(value):
            points.append({"lambda": float(row["lambda"]), "value": value, "cost": spent})
    if not points:
        raise CrossintError(
            f"{where} has no {measure!r} against {cost!r} (a fidelity measure needs a sweep run "
            "with --fidelity-texts; see `crossint frontier --help` for the measures)"
        )
    return points


def best_within(points: Sequence[dict[str, float]], max_cost: float,
                higher_is_better: bool = True) -> dict[str, float] | None:
    """The point with the best value among those costing at most ``max_cost``."""
    eligible = [point for point in points if point["cost"] <= max_cost]
    sign = 1.0 if higher_is_better else -1.0
    return max(eligible, key=lambda point: sign * point["value"], default=None)


def paper_points(measure: str, cost: str) -> list[dict[str, float]]:
    """The paper's points for ``measure`` against ``cost`` (SPEC §12), [] where it has none:
    the dominant share (Figure 1) and Φ at block 1 (Figure 2, λ = 0 and 1000) against the L_rec
    ratio."""
    if cost != "recon_ratio":
        return []
    rows = [{"lambda": lam, "dominant_share": share, "recon_loss": loss}
            for lam, share, loss in PAPER_FIGURE1]
    for row in rows:
        schemes = PAPER_FIGURE2_BLOCK1.get(row["lambda"])
        if schemes:
            row["fidelity"] = {"per_block": {"1": {"phi": schemes}}}
    try:
        return frontier(rows, measure, cost, where="the paper")
    except CrossintError:
        return []


def is_higher_better(measure: str) -> bool:
    return measure.split("@", 1)[0] not in LOWER_IS_BETTER


def compare_sweeps(sweeps: dict[str, str | Path], measure: str = "dominant_share",
                   cost: str = "recon_ratio", target: float = 0.8, target_cost: float = 1.3,
                   paper: bool = False) -> dict[str, Any]:
    """Every sweep's frontier of ``measure`` against ``cost``, the best value within
    ``target_cost`` and whether it reaches ``target`` (the frontier.json document)."""
    if not (math.isfinite(target) and math.isfinite(target_cost) and target_cost > 0):
        raise CrossintError(f"--target must be finite and --target-cost positive, got {target} "
                            f"and {target_cost}")
    higher = is_higher_better(measure)
    reported = paper_points(measure, cost) if paper else []
    if paper and not reported:
        raise CrossintError(f"the paper reports no {measure!r} against {cost!r}; it has the "
                            "dominant share and phi_<scheme>@1 against recon_ratio")
    curves = {label: frontier(read_sweep(path), measure, cost, where=str(path))
              for label, path in sweeps.items()}
    if reported:
        curves["paper (SPEC §12)"] = reported
    summary = {}
    for label, points in curves.items():
        best = best_within(points, target_cost, higher)
        met = best is not None and (best["value"] >= target if higher else best["value"] <= target)
        summary[label] = {"points": points, "best_within_cost": best, "target_met": met}
    return {"measure": measure, "cost": cost, "target": target, "target_cost": target_cost,
            "higher_is_better": higher, "sweeps": {k: str(v) for k, v in sweeps.items()},
            "curves": summary}


def format_comparison(document: dict[str, Any]) -> str:
    """A table: per sweep, the best value within the target cost and whether it meets it."""
    within = f"best ≤ {document['target_cost']:g}"
    lines = [f"{document['measure']} against {document['cost']} "
             f"(target {'≥' if document['higher_is_better'] else '≤'} {document['target']:g})",
             f"{'sweep':<24}{within:>20}{'at cost':>10}{'target met':>12}"]
    for label, curve in document["curves"].items():
        best = curve["best_within_cost"]
        value = f"{best['value']:.3f} (λ {best['lambda']:g})" if best else "none"
        spent = f"{best['cost']:.3f}" if best else "-"
        lines.append(f"{label:<24}{value:>20}{spent:>10}"
                     f"{'yes' if curve['target_met'] else 'no':>12}")
    return "\n".join(lines)


def write_comparison(document: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """The plot and, beside it, the document as JSON (same name, .json)."""
    from crossint.io import atomic_write_json
    from crossint.report.plots import plot_frontier

    out = Path(out)
    curves = {label: curve["points"] for label, curve in document["curves"].items()}
    cost_labels = {"recon_ratio": "L_rec / L_rec(λ = 0)", "mlp_in_fvu": "FVU at mlp_in"}
    png = plot_frontier(curves, out, document["measure"],
                        cost_labels.get(document["cost"], document["cost"]),
                        (document["target"], document["target_cost"]),
                        document["higher_is_better"])
    return {"png": png, "json": atomic_write_json(out.with_suffix(".json"), document)}
