"""Print the compact-proof and independence tables of docs/results.md from `crossint bound` and
`crossint independence` outputs.

    python scripts/bound_table.py runs/bound_family/bound.json [--independence DIR ...]

Per run and block: the measured error of each explanation, every strategy's mean bound, bound ÷
measured and FLOPs per token ÷ brute force; then the end-to-end |ΔCE| bound next to the measured
|ΔCE| and the zero-ablation gap; then, per independence directory, the PMI and push-forward
summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def fmt(value: Any, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def block_rows(result: dict[str, Any], explanation: str) -> list[str]:
    """One markdown row per block and strategy: measured, bound, ratio, FLOPs, cost ratio."""
    rows = []
    for block in result["per_block"]:
        entry = block["explanations"][explanation]
        for name, s in entry["strategies"].items():
            rows.append(f"| {block['block']} | {name} | {fmt(entry['measured'], '.4g')} | "
                        f"{fmt(s['bound'], '.4g')} | {fmt(s['ratio'])} | "
                        f"{fmt(s['flops_per_token'], '.3g')} | {fmt(s['cost_ratio'], '.3f')} | "
                        f"{s['violations']} |")
    return rows


def block_table(name: str, result: dict[str, Any], explanation: str) -> str:
    head = (f"**{name}**, explanation `{explanation}` ({result['n_tokens']} tokens, mean L0 "
            f"{result['mean_active']:.1f}, D {result['dims']['D']}, N {result['dims']['N']}, "
            f"H {result['dims']['H']})\n\n"
            "| block | strategy | measured | bound | bound ÷ measured | FLOPs/token | "
            "÷ brute force | violations |\n|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *block_rows(result, explanation)])


def target_lines(name: str, result: dict[str, Any]) -> list[str]:
    """The issue's per-block target: interval within 5× at ≤ 1/10 of brute force FLOPs."""
    lines = []
    for block in result["per_block"]:
        s = block["explanations"]["keep"]["strategies"]["interval"]
        ok = s["ratio"] <= 5 and s["cost_ratio"] <= 0.1
        lines.append(f"- {name} block {block['block']}: interval ÷ measured {fmt(s['ratio'])} "
                     f"(≤ 5: {'yes' if s['ratio'] <= 5 else 'no'}), FLOPs ÷ brute force "
                     f"{fmt(s['cost_ratio'], '.3f')} (≤ 0.1: "
                     f"{'yes' if s['cost_ratio'] <= 0.1 else 'no'}) → "
                     f"{'met' if ok else 'not met'}")
    return lines


def chain_table(document: dict[str, Any]) -> str:
    rows = ["| run | explanation | measured \\|ΔCE\\| | bound (exact block errors) | best "
            "certified bound (strategy) | zero-ablation gap | verifier FLOPs ÷ forward pass |",
            "|---|---|---|---|---|---|---|"]
    for name, result in document.items():
        chain = result.get("chain")
        if not chain:
            continue
        for e, entry in chain["explanations"].items():
            strategies = entry["strategies"]
            exact = strategies["brute_force"]["token"]["mean_bound"]
            best = min((s for s in strategies if s != "brute_force"),
                       key=lambda s: strategies[s]["token"]["mean_bound"])
            cost = (strategies[best]["verifier_flops_per_token"]
                    / chain["brute_force_flops_per_token"])
            rows.append(f"| {name} | {e} | {fmt(entry['abs_delta'], '.4g')} | {fmt(exact, '.4g')}"
                        f" | {fmt(strategies[best]['token']['mean_bound'], '.4g')} ({best}) | "
                        f"{fmt(chain['zero_gap'], '.4g')} | {fmt(cost, '.3f')} |")
    return "\n".join(rows)


def independence_rows(directories: list[str]) -> str:
    rows = ["| run | tokens | co-activations ÷ independent | mean PMI | PMI > 0 / < 0 (95%) | "
            "mean r (\\|r\\|) | per block W₁/std: independent / floor / reconstruction |",
            "|---|---|---|---|---|---|---|"]
    for directory in directories:
        r = json.loads((Path(directory) / "independence.json").read_text())
        blocks = "; ".join(f"{b['block']}: {fmt(b['relative_independence'])} / "
                           f"{fmt(b['relative_floor'])} / {fmt(b['relative_reconstruction'])}"
                           for b in r["per_block"])
        rows.append(f"| {Path(r['run']).name} | {r['n_tokens']} | "
                    f"{fmt(r['coactivation_excess'], '.3f')} | {fmt(r['mean_pmi'])} | "
                    f"{fmt(r['pmi_above_zero'], '.1%')} / {fmt(r['pmi_below_zero'], '.1%')} | "
                    f"{fmt(r['mean_correlation'])} ({fmt(r['mean_abs_correlation'])}) | "
                    f"{blocks} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bound_json")
    parser.add_argument("--explanations", default="keep,independent")
    parser.add_argument("--independence", nargs="*", default=[])
    args = parser.parse_args()
    document = json.loads(Path(args.bound_json).read_text())
    for name, result in document.items():
        for explanation in args.explanations.split(","):
            print(block_table(name, result, explanation), end="\n\n")
        print("\n".join(target_lines(name, result)), end="\n\n")
        if result.get("chain"):
            for e, text in result["chain"]["diagnosis"].items():
                print(f"- {name} {e}: {text}")
            print()
    print(chain_table(document), end="\n\n")
    if args.independence:
        print(independence_rows(args.independence))


if __name__ == "__main__":
    main()
