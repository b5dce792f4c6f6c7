"""Compact-proof bounds of a trained crosscoder on held-out text (SPEC §7; usage in
docs/bounds.md).

Orchestration only: the subject model runs on held-out text, the crosscoder encodes its
activations, and every number comes from :mod:`crossint.interactions.bounds` (per block: each
strategy's bound on each explanation's error, its FLOPs) and :mod:`crossint.interactions.chain`
(the end-to-end bound on |ΔCE| per token), in float64 with the model's own weights. The
spliced model whose loss the chain bounds is the SPEC §4.7 all-blocks splice: every analysed
block's ``mlp_out`` replaced by the explanation (the fidelity surrogates
``none``/``keep_largest``/``independent``), special tokens keeping the model's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.bound_chain import ChainState
from crossint.analysis.fidelity import run_names
from crossint.analysis.heldout import HeldoutRequest, capture_tokens, request_from
from crossint.analysis.interactions import AnalysisSetup, prepare_analysis
from crossint.errors import CrossintError
from crossint.interactions import bounds as B
from crossint.interactions.contributions import active_features
from crossint.io import atomic_write_json, json_safe, sha256_file
from crossint.models.hookpoints import hookpoint
from crossint.rundir import RunDir

BOUND_TOKENS = 10_000  # default held-out tokens


# --- per-block accumulation ----------------------------------------------------------------------
@dataclass
class BlockSums:
    """Running sums over tokens of one block's measured errors and bounds (float64)."""

    n: int = 0
    gap: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    bound: dict[tuple[str, str], float] = field(default_factory=dict)
    bound_total: dict[tuple[str, str], float] = field(default_factory=dict)
    violations: dict[tuple[str, str], int] = field(default_factory=dict)
    violations_total: dict[tuple[str, str], int] = field(default_factory=dict)
    recon: float = 0.0
    recon_bound: float = 0.0

    def add(self, cb: B.ChunkBounds) -> dict[tuple[str, str], Tensor]:
        """Add one chunk; returns its per-token total bounds by (explanation, strategy)."""
        assert cb.total is not None and cb.recon_bound is not None
        totals = {}
        self.n += cb.recon_bound.numel()
        self.recon += float(cb.total["full"].sum())
        self.recon_bound += float(cb.recon_bound.sum())
        for e in B.EXPLANATIONS:
            _add(self.gap, e, float(cb.gap[e].sum()))
            _add(self.total, e, float(cb.total[e].sum()))
            for s in B.strategies_for(e):
                key = (e, s)
                total_B = cb.total_bound(e, s)
                totals[key] = total_B
                _add(self.bound_total, key, float(total_B.sum()))
                _add(self.violations_total, key, int((total_B < cb.total[e]).sum()))
                if e != "full":
                    bound_B = cb.bounds[e][s]
                    _add(self.bound, key, float(bound_B.sum()))
                    _add(self.violations, key, int((bound_B < cb.gap[e]).sum()))
        return totals


def _add(sums: dict, key: Any, value: float) -> None:
    sums[key] = sums.get(key, 0) + value


# --- one run -------------------------------------------------------------------------------------
@dataclass
class _RunState:
    """Everything one run's pass over the held-out batches accumulates."""

    setup: AnalysisSetup
    verifiers: dict[int, B.BlockVerifier]
    sums: dict[int, BlockSums]
    chain: ChainState | None
    active_sum: float = 0.0
    n_tokens: int = 0


def analyse_bound(run_dir: str | Path, request: HeldoutRequest | None = None, *,
                  blocks: Sequence[int] | None = None, chain: bool = True,
                  chunk_tokens: int | None = None, progress: bool = True,
                  **text: Any) -> dict[str, Any]:
    """Every strategy's bound on every analysed block (and, with ``chain``, the end-to-end
    bound on |ΔCE|) for one run; the per-run entry of bound.json. Default 10,000 held-out
    tokens of the training cache's corpus."""
    from tqdm.auto import tqdm

    request = request_from(request, text, n_tokens=BOUND_TOKENS)
    setup = prepare_analysis(run_dir, "bound", request, blocks)
    if not setup.batches:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no held-out text")
    state = _RunState(setup, {b.block: B.block_verifier(b) for b in setup.fblocks},
                      {b.block: BlockSums() for b in setup.fblocks},
                      ChainState.start(setup) if chain else None)
    with torch.no_grad():
        for ids_BS in tqdm(setup.batches, desc="bound", unit="batch", disable=not progress,
                           dynamic_ncols=True):
            _add_batch(state, ids_BS.to(setup.request.device), chunk_tokens)
    if state.n_tokens == 0:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no usable (non-special) "
                            "tokens")
    return json_safe(_run_result(run_dir, state, blocks))


def _add_batch(state: _RunState, ids_BS: Tensor, chunk_tokens: int | None) -> None:
    setup = state.setup
    names = list(setup.hookpoints)
    if state.chain is not None:
        names += [h for h in state.chain.hookpoints if h not in names]
    captured = capture_tokens(setup.adapter, ids_BS, names, setup.special_ids)
    acts_TXD = captured.acts_TXD[:, :len(setup.hookpoints)]
    f_TH = setup.crosscoder.encode(acts_TXD)
    active = active_features(f_TH.double())
    state.active_sum += float(active.counts_B.double().sum())
    state.n_tokens += active.n_tokens
    errors: dict[tuple[str, str], dict[int, Tensor]] = {}
    outputs: dict[str, dict[int, Tensor]] = {}
    for fblock in setup.fblocks:
        x_TD = acts_TXD[:, setup.hookpoints.index(hookpoint(fblock.block, "mlp_in"))]
        per_key, per_output = _block_pass(state, fblock, active, x_TD.double(), chunk_tokens)
        for key, values in per_key.items():
            errors.setdefault(key, {})[fblock.block] = values
        for name, values in per_output.items():
            outputs.setdefault(name, {})[fblock.block] = values
    if state.chain is not None:
        state.chain.add(ids_BS, captured, outputs, errors)


def _block_pass(state: _RunState, fblock: Any, active: Any, x_TD: Tensor,
                chunk_tokens: int | None) -> tuple[dict[tuple[str, str], Tensor],
                                                   dict[str, Tensor]]:
    """One block over one batch: accumulate its sums; return per token every (explanation,
    strategy)'s bound on ‖MLP(x) − E(x̂)‖ and every explanation's (and ``zero``'s) MLP
    output, in the batch's token order."""
    T, D = x_TD.shape
    per_key = {(e, s): x_TD.new_zeros(T) for e in B.EXPLANATIONS for s in B.strategies_for(e)}
    per_output = {name: x_TD.new_zeros(T, D) for name in (*B.EXPLANATIONS, "zero")}
    for tokens_B, chunk in B.iter_chunks(active, fblock, x_TD, chunk_tokens):
        cb = B.chunk_bounds(chunk, state.verifiers[fblock.block])
        for key, total_B in state.sums[fblock.block].add(cb).items():
            per_key[key][tokens_B] = total_B
        assert cb.outputs is not None
        for name, out_BD in cb.outputs.items():
            per_output[name][tokens_B] = out_BD
    return per_key, per_output


def _run_result(run_dir: str | Path, state: _RunState, blocks: Sequence[int] | None
                ) -> dict[str, Any]:
    setup = state.setup
    K = state.active_sum / state.n_tokens
    per_block = [_block_result(state, fblock, K) for fblock in setup.fblocks]
    mlp = setup.fblocks[0].mlp
    result = {
        "run": str(run_dir), "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
        "model": setup.adapter.name, "n_tokens": state.n_tokens, "mean_active": K,
        "dims": {"D": setup.adapter.d_model, "N": setup.fblocks[0].n_neurons,
                 "H": setup.crosscoder.config.n_features, "gated": mlp.gated,
                 "activation": mlp.act_name},
        "blocks": setup.blocks, "per_block": per_block,
        "summary": _summary(per_block),
        "request": {**setup.request.record(),
                    "blocks": None if blocks is None else sorted(set(blocks))},
    }
    result["chain"] = None if state.chain is None else state.chain.result(result)
    return result


def _block_result(state: _RunState, fblock: Any, K: float) -> dict[str, Any]:
    sums, verifier = state.sums[fblock.block], state.verifiers[fblock.block]
    n, mlp = sums.n, fblock.mlp
    N, D, H = fblock.n_neurons, fblock.d_HD.shape[1], fblock.d_HD.shape[0]
    explanations = {}
    for e in B.EXPLANATIONS:
        brute = B.strategy_flops(e, "brute_force", K, N, D, mlp.gated, mlp.act_name)
        brute_total = B.strategy_flops(e, "brute_force", K, N, D, mlp.gated, mlp.act_name,
                                       total=True)
        rows = {}
        for s in B.strategies_for(e):
            flops = B.strategy_flops(e, s, K, N, D, mlp.gated, mlp.act_name)
            flops_total = B.strategy_flops(e, s, K, N, D, mlp.gated, mlp.act_name, total=True)
            tables = B.table_flops(s, H, N, D, mlp.gated, mlp.act_name,
                                   verifier.table_flops_total)
            rows[s] = {
                "bound": sums.bound.get((e, s), 0.0) / n if e != "full" else 0.0,
                "bound_total": sums.bound_total[(e, s)] / n,
                "violations": sums.violations.get((e, s), 0),
                "violations_total": sums.violations_total[(e, s)],
                "flops_per_token": flops, "flops_per_token_total": flops_total,
                "cost_ratio": flops / brute, "cost_ratio_total": flops_total / brute_total,
                "table_flops": tables, "table_flops_amortised": tables / n,
            }
        measured, measured_total = sums.gap[e] / n, sums.total[e] / n
        for row in rows.values():
            row["ratio"] = row["bound"] / measured if measured > 0 else math.nan
            row["ratio_total"] = row["bound_total"] / measured_total
        explanations[e] = {"measured": measured, "measured_total": measured_total,
                           "strategies": rows}
    table = verifier.table
    return {"block": fblock.block, "explanations": explanations,
            "reconstruction": {"measured": sums.recon / n, "bound": sums.recon_bound / n},
            "table": {"lo": table.lo, "hi": table.hi, "cells": table.n_cells,
                      "rebuilds": verifier.rebuilds, "lipschitz": verifier.lipschitz(),
                      "flops": verifier.table_flops_total}}


def _summary(per_block: list[dict[str, Any]]) -> dict[str, Any]:
    """Per explanation and strategy over all blocks: ratio of summed bounds to summed measured
    errors, FLOPs per token summed over blocks, and their cost relative to brute force."""
    out: dict[str, Any] = {}
    for e in B.EXPLANATIONS:
        measured = sum(b["explanations"][e]["measured"] for b in per_block)
        measured_total = sum(b["explanations"][e]["measured_total"] for b in per_block)
        brute = sum(b["explanations"][e]["strategies"]["brute_force"]["flops_per_token"]
                    for b in per_block)
        rows = {}
        for s in B.strategies_for(e):
            cells = [b["explanations"][e]["strategies"][s] for b in per_block]
            bound = sum(c["bound"] for c in cells)
            flops = sum(c["flops_per_token"] for c in cells)
            rows[s] = {
                "bound": bound, "bound_total": sum(c["bound_total"] for c in cells),
                "ratio": bound / measured if measured > 0 else math.nan,
                "ratio_total": sum(c["bound_total"] for c in cells) / measured_total,
                "worst_block_ratio": max((c["ratio"] for c in cells), default=math.nan),
                "flops_per_token": flops, "cost_ratio": flops / brute,
                "table_flops_amortised": sum(c["table_flops_amortised"] for c in cells),
                "violations": sum(c["violations"] + c["violations_total"] for c in cells),
            }
        out[e] = {"measured": measured, "measured_total": measured_total, "strategies": rows}
    return out


# --- JSON, files and the table -------------------------------------------------------------------

def analyse_bounds(run_dirs: Sequence[str | Path], request: HeldoutRequest | None = None,
                   **options: Any) -> dict[str, Any]:
    """:func:`analyse_bound` for every run (the same held-out request); the bound.json
    document ``{run name: result}``."""
    if not run_dirs:
        raise CrossintError("give at least one run directory")
    names = run_names(run_dirs)
    return {name: analyse_bound(run, request, **options)
            for name, run in zip(names, run_dirs, strict=True)}


def pareto_points(document: dict[str, Any], explanation: str) -> list[dict[str, Any]]:
    """One point per run and strategy: summed bound ÷ summed measured error over blocks against
    FLOPs per token summed over blocks (the compact-proofs picture)."""
    points = []
    for name, result in document.items():
        summary = result["summary"][explanation]
        for s, row in summary["strategies"].items():
            points.append({"run": name, "strategy": s, "ratio": row["ratio"],
                           "flops": row["flops_per_token"]})
    return points


def write_outputs(document: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """bound.json (last) and the Pareto plot (keep and independent explanations side by
    side)."""
    from crossint.report.plots import plot_bound_pareto

    paths = rundir.BOUND.paths(out_dir)
    panels = {e: pareto_points(document, e) for e in ("keep", "independent")}
    plot_bound_pareto(panels, paths["pareto"])
    atomic_write_json(paths["json"], document)
    return paths


def format_table(document: dict[str, Any]) -> str:
    """Per run and block: the keep-dominant error and each strategy's ratio and cost."""
    lines = []
    for name, result in document.items():
        lines.append(f"{name}: {result['n_tokens']} tokens, mean L0 {result['mean_active']:.1f}"
                     f" (bound ÷ measured, FLOPs ÷ brute force; keep-dominant explanation)")
        header = f"  {'block':<6}{'measured':>10}" + "".join(
            f"{s:>20}" for s in B.STRATEGIES[1:])
        lines.append(header)
        for row in result["per_block"]:
            keep = row["explanations"]["keep"]
            cells = "".join(
                " " + f"{_fmt(keep['strategies'][s]['ratio'], '.3g')} / "
                f"{_fmt(keep['strategies'][s]['cost_ratio'], '.3f'):<9}".rjust(19)
                for s in B.STRATEGIES[1:])
            lines.append(f"  {row['block']!s:<6}{keep['measured']:>10.4g}{cells}")
        if result.get("chain"):
            lines.extend("  " + line for line in result["chain"]["lines"])
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"
