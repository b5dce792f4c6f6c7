"""Print the penalty-kind tables of docs/results.md from sweep directories (`crossint sweep ...
--fidelity-texts N`): reconstruction next to Φ per block and with every block replaced at once.

    python scripts/penalty_table.py runs/kind_additivity_s runs/kind_additivity_effect_s
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crossint.analysis.frontier import measure_value
from crossint.rundir import FIDELITY, SWEEP

SCHEMES = ("none", "keep_largest", "independent")


def kind_label(label: str, row: dict[str, Any]) -> str:
    return "none (no penalty)" if row["lambda"] == 0 else label


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def phi_cell(row: dict[str, Any], where: str) -> str:
    """Φ_none / Φ_keep_largest / Φ_ind at one block (or ``all``)."""
    return " / ".join(fmt(measure_value(row, f"phi_{scheme}@{where}")) for scheme in SCHEMES)


def interval(row: dict[str, Any], scheme: str, where: str) -> str:
    fidelity = row.get("fidelity") or {}
    summary = (fidelity.get("all_blocks") if where == "all"
               else (fidelity.get("per_block") or {}).get(where)) or {}
    low_high = (summary.get("phi_ci") or {}).get(scheme)
    return "–" if not low_high else f"[{low_high[0]:.2f}, {low_high[1]:.2f}]"


def unique_baselines(sweeps: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """Drop the λ = 0 rows of later sweeps that share the first one's run (same L_rec): one
    λ = 0 run serves every kind, and its row is printed once."""
    seen: set[float] = set()
    for _, rows in sweeps:
        for row in [r for r in rows if r["lambda"] == 0]:
            if row["recon_loss"] in seen:
                rows.remove(row)
            seen.add(row["recon_loss"])


def sweep_rows(path: Path) -> tuple[str, list[dict[str, Any]]]:
    files = SWEEP.paths(path)
    rows = json.loads(files["json"].read_text())
    config = json.loads(files["settings"].read_text()) if files["settings"].exists() else {}
    penalty = config.get("penalty") or {}
    label = penalty.get("kind", path.name)
    if penalty.get("normalise", "none") not in ("none", None):
        label += f" ({penalty['normalise']})"
    return label, sorted(rows, key=lambda row: row["lambda"])


def blocks_of(rows: list[dict[str, Any]]) -> list[str]:
    fidelity = next((row["fidelity"] for row in rows if row.get("fidelity")), None)
    return sorted((fidelity or {}).get("per_block", {}), key=int)


def ce_increases(row: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """Absolute CE increase (nats/token) over the model of each scheme, per block and ``all``,
    from the run's fidelity.json."""
    path = FIDELITY.paths(Path(row["run"]) / FIDELITY.subdir)["json"]
    if not path.exists():
        return None
    (entry,) = json.loads(path.read_text()).values()
    summaries = {str(b["block"]): b for b in entry["per_block"]} | {"all": entry["all_blocks"]}
    return {where: {scheme: s["ce_scheme"][scheme] - s["ce_model"]
                    for scheme in (*SCHEMES, "zero") if scheme in s["ce_scheme"]}
            for where, s in summaries.items()}


def print_ce_table(sweeps: list[tuple[str, list[dict[str, Any]]]], blocks: list[str]) -> None:
    wheres = [*blocks, "all"]
    print("\n| kind | λ | " + " | ".join(
        f"ΔCE {'all blocks' if w == 'all' else 'block ' + w}: none / keep / ind (zero)"
        for w in wheres) + " |")
    print("|" + "---|" * (2 + len(wheres)))
    for label, rows in sweeps:
        for row in rows:
            ce = ce_increases(row)
            if ce is None:
                continue
            cells = [" / ".join(fmt(ce[w].get(s)) for s in SCHEMES) + f" ({fmt(ce[w]['zero'])})"
                     for w in wheres]
            print(f"| {kind_label(label, row)} | {row['lambda']:g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    args = parser.parse_args()
    first = [sweep_rows(path) for path in args.sweeps]
    blocks = blocks_of(first[0][1])
    baselines = {label: next((r["recon_loss"] for r in rows if r["lambda"] == 0), None)
                 for label, rows in first}
    unique_baselines(first)
    print("| kind | λ | L_rec (× λ=0) | FVU | mlp_in FVU | A | share | "
          + " | ".join(f"Φ block {b}: none / keep / ind" for b in blocks)
          + " | Φ all blocks: none / keep / ind | Φ_ind all, 95% CI |")
    print("|" + "---|" * (9 + len(blocks)))
    for label, rows in first:
        base = baselines[label]
        for row in rows:
            ratio = row["recon_loss"] / base if base else None
            print(f"| {kind_label(label, row)} | {row['lambda']:g} "
                  f"| {fmt(row['recon_loss'], '.1f')} "
                  f"({fmt(ratio, '.2f')}×) | {fmt(row.get('fvu'))} | {fmt(row.get('mlp_in_fvu'))} "
                  f"| {fmt(row.get('additivity_error'), '.2f')} "
                  f"| {fmt(row.get('dominant_share'))} | "
                  + " | ".join(phi_cell(row, b) for b in blocks)
                  + f" | {phi_cell(row, 'all')} | {interval(row, 'independent', 'all')} |")
    print_ce_table(first, blocks)


if __name__ == "__main__":
    main()
