"""MLP feature interactions of a trained crosscoder on held-out text (SPEC §4).

Orchestration only: the subject model runs on held-out text, the crosscoder encodes its
activations, and every number comes from :mod:`crossint.interactions` with the model's own MLP
weights (float64). One pass accumulates the §4.2 shares, the §4.3 gap and bound, the §4.5 pairwise
matrix, and the reconstruction quality; a second pass over the stored (sparse) feature
activations measures the §4.6 ratio, Hadamard and exact Δ² of the top-ranked pairs.

Decisions where SPEC §4 is silent (documented in docs/interactions.md):
- ``recon_loss`` is SPEC §3.3 L_rec on the held-out tokens, in normalised units whose s_x
  (SPEC §3.4) is estimated on those same tokens (a saved crosscoder has s folded away).
- ``pairwise_interaction`` is the total pairwise mass per token, Σ_{i≠j} I[i, j] over blocks
  (SPEC §4.5). It equals the mean §9.2 score, since Σ_{j≠dom} |p_j| = S − Mx at every neuron.
- The dominant-share histograms count only (token, neuron) pairs with S > 0 (an inactive neuron
  has share 1 by the ε convention and would swamp the plot).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.evaluate import ReconstructionStats
from crossint.analysis.heldout import (
    HeldoutRequest,
    capture_tokens,
    heldout_batches,
    load_subject,
    request_from,
    training_manifest,
)
from crossint.errors import CrossintError
from crossint.interactions import (
    MLPInteractionMeter,
    PairMeasureAccumulator,
    PairwiseAccumulator,
    ShareSummary,
    feature_blocks,
    measure_correlations,
)
from crossint.interactions.additivity import AdditivityMeter
from crossint.interactions.contributions import NeuronStats
from crossint.io import atomic_write_json, atomic_write_text, json_safe, sha256_file
from crossint.models.hookpoints import blocks_with_site, parse_hookpoint
from crossint.rundir import RunDir

SHARE_BINS = 20
LOCATION_GROUPS = 32
INTERACTION_TOKENS = 50_000  # default held-out tokens
PAIR_COLUMNS = ("i", "j", "block", "total", "strength", "frequency", "coactive_tokens", "ratio",
                "hadamard", "delta2")


class LocatedShareSummary(ShareSummary):
    """SPEC §4.2 averages plus, per block, a histogram of the dominant share over active
    (token, neuron) pairs and the per-neuron sum of S − Mx (for the location heatmap)."""

    def __init__(self, bins: int = SHARE_BINS) -> None:
        super().__init__()
        self.bins = bins
        self.histograms: dict[int, Tensor] = {}
        self.nondominant_N: dict[int, Tensor] = {}

    def update(self, block: int, stats: NeuronStats) -> None:
        super().update(block, stats)
        share_E = stats.share_BN[stats.active_BN].double().cpu()
        counts = torch.histc(share_E, bins=self.bins, min=0.0, max=1.0)
        nondominant_N = stats.nondominant_BN.double().sum(dim=0).cpu()
        if block in self.histograms:
            self.histograms[block] += counts
            self.nondominant_N[block] += nondominant_N
        else:
            self.histograms[block], self.nondominant_N[block] = counts, nondominant_N


def select_blocks(crosscoder: Any, blocks: Sequence[int] | None, run_dir: str | Path) -> list[int]:
    """The requested blocks (default: every block whose mlp_in the crosscoder reads)."""
    return select_site_blocks(crosscoder, blocks, run_dir, "mlp_in",
                              "MLP interactions need the MLP inputs")


def select_site_blocks(crosscoder: Any, blocks: Sequence[int] | None, run_dir: str | Path,
                       site: str, need: str) -> list[int]:
    """The requested blocks whose ``site`` the crosscoder reads (default: all of them); a
    CrossintError saying ``need`` when it reads none, or naming the requested ones it lacks."""
    available = blocks_with_site(crosscoder.config.hookpoints, site)
    if not available:
        raise CrossintError(
            f"the crosscoder in {run_dir} reads no blocks.{{l}}.{site} hookpoint (it reads "
            f"{', '.join(crosscoder.config.hookpoints)}); {need}: train on a cache harvested "
            "with the paper layout"
        )
    if blocks is None:
        return available
    missing = sorted(set(blocks) - set(available))
    if missing:
        raise CrossintError(
            f"the crosscoder in {run_dir} has no {site} hookpoint for block(s) "
            f"{', '.join(map(str, missing))}; it reads {site} of blocks "
            f"{', '.join(map(str, available))}"
        )
    return sorted(set(blocks))


def check_model(crosscoder: Any, adapter: Any, manifest: dict[str, Any], run_dir: str | Path,
                ) -> None:
    """Refuse a subject model that is not the one the crosscoder was trained on."""
    from crossint.models.adapter import check_model_matches

    check_model_matches(adapter, manifest.get("model_info") or {}, {crosscoder.config.d_model},
                        f"the crosscoder in {run_dir}")
    for name in crosscoder.config.hookpoints:
        parse_hookpoint(name, adapter.n_blocks)



def request_record(request: HeldoutRequest, blocks: Sequence[int] | None, top_pairs: int,
                   delta2_pairs: int) -> dict[str, Any]:
    """What an analysis was asked for, as interactions.json records it (``request``): the
    resolved held-out request (``HeldoutRequest.record()``: corpus, seed, context length,
    tokens, batch size, model override, text field, split) and the analysis settings. A stored
    result is re-used only for the same request; device and chunk size are left out: they do
    not change the numbers."""
    return {**request.record(), "blocks": None if blocks is None else sorted(set(blocks)),
            "top_pairs": top_pairs, "delta2_pairs": delta2_pairs}


@dataclass
class AnalysisSetup:
    """What every held-out analysis of a run starts from: the crosscoder and its subject
    model (checked to match), the analysed blocks with their float64 feature blocks (MLP, or
    attention for `crossint attention`), and the held-out batches of the (resolved) request."""

    crosscoder: Any
    adapter: Any
    blocks: list[int]
    fblocks: list[Any]
    hookpoints: list[str]
    special_ids: set[int]
    batches: list[Tensor]
    request: HeldoutRequest


def prepare_analysis(run_dir: str | Path, command: str, request: HeldoutRequest,
                     blocks: Sequence[int] | None = None) -> AnalysisSetup:
    """Load and check a run for `crossint {command}` and read the request's held-out text
    (corpus and context length default to the training cache's, else stories, 128)."""
    crosscoder, adapter, request = load_subject(run_dir, request, command)
    block_ids = select_blocks(crosscoder, blocks, run_dir)
    check_model(crosscoder, adapter, training_manifest(run_dir), run_dir)
    batches = heldout_batches(adapter, request)
    mlps = {block: adapter.mlp_weights(block) for block in block_ids}
    return AnalysisSetup(
        crosscoder=crosscoder, adapter=adapter, blocks=block_ids,
        fblocks=feature_blocks(crosscoder, mlps, dtype=torch.float64),
        hookpoints=list(crosscoder.config.hookpoints), special_ids=adapter.special_token_ids(),
        batches=batches, request=request,
    )


def analyse_interactions(
    run_dir: str | Path,
    request: HeldoutRequest | None = None,
    *,
    blocks: Sequence[int] | None = None,
    top_pairs: int = 50,
    delta2_pairs: int = 50,
    chunk_tokens: int | None = None,
    progress: bool = True,
    **text: Any,
) -> dict[str, Any]:
    """Measure the MLP interactions of a saved crosscoder; returns the interactions.json dict.

    ``request`` (a ``HeldoutRequest``) or its fields as keywords (``analyse_interactions(run,
    n_tokens=600)``; default 50,000 tokens of the training cache's corpus and context length,
    held out). Top pairs are ranked by total mass I[i, j] = strength × frequency (SPEC §4.6);
    ratio, Hadamard and Δ² are measured for the first max(top_pairs, delta2_pairs) of them and
    ``delta2_spearman`` is the rank correlation of each cheap measure with Δ² over the first
    ``delta2_pairs``.
    """
    for name, value in (("top pairs", top_pairs), ("Δ² pairs", delta2_pairs)):
        if not isinstance(value, int) or value < 0:
            raise CrossintError(f"{name} must be an integer >= 0, got {value!r}")
    request = request_from(request, text, n_tokens=INTERACTION_TOKENS)
    setup = prepare_analysis(run_dir, "interactions", request, blocks)
    measured = measure_batches(setup, chunk_tokens, progress)
    if measured.recon.n_tokens == 0:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no usable (non-special) tokens")
    pairs = measured.pairwise.result()
    rows, spearman = top_pair_rows(setup.fblocks, pairs, measured.stored_f, top_pairs,
                                   delta2_pairs, progress)
    result = {
        "run": str(run_dir),
        "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
        "model": setup.adapter.name,
        "corpus": setup.request.corpus,
        "seed": setup.request.seed,
        "context_length": setup.request.context_length,
        **summary_metrics(measured, pairs, setup),
        "top_pairs": rows,
        "delta2_spearman": spearman,
        "request": request_record(setup.request, blocks, top_pairs, delta2_pairs),
    }
    return json_safe(result)


@dataclass
class MeasuredBatches:
    """The accumulators of :func:`analyse_interactions`' first pass over the held-out batches."""

    meter: MLPInteractionMeter
    located: LocatedShareSummary
    pairwise: PairwiseAccumulator
    recon: ReconstructionStats
    norm_sum_X: Tensor  # Σ over tokens of ‖a_x‖, float64 (for s_x)
    score_sum: float  # Σ over tokens of the §9.2 interaction score
    stored_f: list[Tensor]  # sparse feature activations per batch, for the Δ² pass
    additivity: AdditivityMeter  # SPEC §4.7 additivity error per block


def measure_batches(setup: AnalysisSetup, chunk_tokens: int | None, progress: bool
                    ) -> MeasuredBatches:
    """One pass: SPEC §4.2 shares, §4.3 gap and bound, §4.5 pairwise matrix, §4.7 additivity
    error, reconstruction."""
    from tqdm.auto import tqdm

    crosscoder = setup.crosscoder
    H = crosscoder.config.n_features
    pairwise = PairwiseAccumulator(H, setup.blocks)
    measured = MeasuredBatches(
        meter=MLPInteractionMeter(setup.fblocks, chunk_tokens, pairwise),
        located=LocatedShareSummary(), pairwise=pairwise,
        recon=ReconstructionStats(crosscoder.config.n_positions, H),
        norm_sum_X=torch.zeros(crosscoder.config.n_positions, dtype=torch.float64),
        score_sum=0.0, stored_f=[],
        additivity=AdditivityMeter(setup.fblocks, chunk_tokens),
    )
    measured.meter.shares = measured.located  # the meter feeds every block's NeuronStats to it
    with torch.no_grad():
        for ids_BS in tqdm(setup.batches, desc="interactions", unit="batch",
                           disable=not progress, dynamic_ncols=True):
            acts_TXD = capture_tokens(setup.adapter, ids_BS.to(setup.request.device),
                                      setup.hookpoints, setup.special_ids).acts_TXD
            f_TH = crosscoder.encode(acts_TXD)
            measured.recon.update(acts_TXD.cpu(), crosscoder.decode(f_TH).cpu(), f_TH.cpu())
            measured.norm_sum_X += acts_TXD.double().norm(dim=-1).sum(dim=0).cpu()
            measured.score_sum += float(measured.meter.update(f_TH).double().sum())
            measured.additivity.update(f_TH)
            measured.stored_f.append(f_TH.to_sparse())
    return measured


def top_pair_rows(fblocks: list[Any], pairs: Any, stored_f: list[Tensor], top_pairs: int,
                  delta2_pairs: int, progress: bool) -> tuple[list[dict[str, Any]], dict]:
    """SPEC §4.6 measures of the top-ranked triplets (a second pass over the stored feature
    activations, which it empties): the top_pairs rows and the Spearman correlations."""
    from tqdm.auto import tqdm

    n_measured = max(top_pairs, delta2_pairs)
    top = pairs.top_triplets(n_measured, by="total")
    n_measured = int(top["i"].numel())
    measures: dict[str, Tensor] = {}
    if n_measured:
        accumulator = PairMeasureAccumulator(fblocks, top["i"].cpu(), top["j"].cpu(),
                                             top["block"].cpu())
        with torch.no_grad():
            for f_sparse in tqdm(stored_f, desc="pair measures", unit="batch",
                                 disable=not progress, dynamic_ncols=True):
                accumulator.update(f_sparse.to_dense())
        measures = accumulator.result()
    stored_f.clear()
    rows = [{
        "i": int(top["i"][p]), "j": int(top["j"][p]), "block": int(top["block"][p]),
        "total": float(top["total"][p]), "strength": float(top["strength"][p]),
        "frequency": float(top["count"][p]) / max(pairs.n_tokens, 1),
        "coactive_tokens": int(top["count"][p]),
        "ratio": float(measures["ratio"][p]), "hadamard": float(measures["hadamard"][p]),
        "delta2": float(measures["delta2"][p]),
    } for p in range(min(top_pairs, n_measured))]
    n_rank = min(delta2_pairs, n_measured)
    spearman: dict[str, Any] = {"n_pairs": n_rank}
    if n_rank:
        cheap = {name: measures[name][:n_rank] for name in ("ratio", "hadamard")}
        cheap.update({name: top[name][:n_rank].double().cpu() for name in ("strength", "total")})
        spearman.update(measure_correlations(measures["delta2"][:n_rank], cheap))
    return rows, spearman


def summary_metrics(measured: MeasuredBatches, pairs: Any, setup: AnalysisSetup
                    ) -> dict[str, Any]:
    """The averages of interactions.json, the per-block rows, histograms and location."""
    summary = measured.meter.result()
    recon, n = measured.recon, measured.recon.n_tokens
    H = setup.crosscoder.config.n_features
    triplets = pairs.triplets()
    mass_by_block = {b: float(triplets["total"][triplets["block"] == b].sum())
                     for b in setup.blocks}
    additivity = measured.additivity.result()
    per_block, location = block_rows(setup.fblocks, summary, measured.located, mass_by_block, n,
                                     additivity)
    pairwise_total = sum(mass_by_block.values())
    fvu_X = recon.fvu_X()
    located = measured.located
    return {
        "n_tokens": n,
        "blocks": setup.blocks,
        "dominant_share": summary["dominant_share"],
        "dominant_share_active": summary["dominant_share_active"],
        "active_fraction": summary["active_fraction"],
        "nondominant": summary["mean_nondominant"],
        "nondominant_fraction": summary["nondominant_fraction"],
        "bound": summary["mean_bound"],
        "measured_gap": summary["mean_gap"],
        "pairwise_interaction": pairwise_total,
        "pairwise_interaction_mean": pairwise_total / (H * (H - 1)) if H > 1 else 0.0,
        "interaction_score_mean": measured.score_sum / n,
        **{key: sum(a[key] for a in additivity.values()) / len(additivity)
           for key in ("additivity_error", "additivity_error_sq", "feature_effect")},
        "recon_loss": normalised_recon_loss(recon, measured.norm_sum_X,
                                            setup.crosscoder.config.d_model),
        "fvu": float(fvu_X.mean()),
        "fvu_per_hookpoint": {h: float(fvu_X[x]) for x, h in enumerate(setup.hookpoints)},
        "l0": recon.l0_sum / n,
        "per_block": per_block,
        "share_histogram": {
            "bin_edges": [i / located.bins for i in range(located.bins + 1)],
            "counts": {str(b): located.histograms[b].tolist() for b in setup.blocks},
        },
        "location": {"blocks": setup.blocks, **location},
    }


def normalised_recon_loss(recon: ReconstructionStats, norm_sum_X: Tensor, d_model: int
                          ) -> float:
    """SPEC §3.3 L_rec on the held-out tokens in normalised units, s_x = √D / mean ‖a_x‖
    estimated on those same tokens (a saved crosscoder has s folded away)."""
    scale_X = math.sqrt(d_model) / (norm_sum_X / recon.n_tokens)
    return float((scale_X.pow(2) * recon.sq_error_X).sum() / recon.n_tokens)


def block_rows(fblocks: list[Any], summary: dict[str, Any], located: LocatedShareSummary,
               mass_by_block: dict[int, float], n: int,
               additivity: dict[int, dict[str, float]],
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per block: shares, gap and bound, pairwise mass, additivity; and the location profile
    (mean ‖W_out[n]‖·(S − Mx) per token in ``LOCATION_GROUPS`` groups of neurons)."""
    strength, neuron_ranges, per_block = [], None, []
    for fblock in fblocks:
        b = fblock.block
        stats = summary["blocks"][b]
        per_neuron_N = located.nondominant_N[b] * fblock.w_out_N.double().cpu() / n
        groups = torch.tensor_split(torch.arange(per_neuron_N.numel()),
                                    min(LOCATION_GROUPS, per_neuron_N.numel()))
        strength.append([float(per_neuron_N[g].mean()) for g in groups])
        neuron_ranges = [[int(g[0]), int(g[-1]) + 1] for g in groups]
        per_block.append({
            "block": b,
            "dominant_share": stats["dominant_share"],
            "dominant_share_active": stats["dominant_share_active"],
            "active_fraction": stats["active_fraction"],
            "nondominant": stats["mean_nondominant"],
            "nondominant_fraction": stats["nondominant_fraction"],
            "mean_S": stats["mean_S"],
            "bound": stats["mean_bound"],
            "measured_gap": stats["mean_gap"],
            "bound_violations": stats["bound_violations"],
            "pairwise_interaction": mass_by_block[b],
            **additivity[b],
            "lipschitz": fblock.mlp.lipschitz,
            "activation": fblock.mlp.act_name,
        })
    return per_block, {"neuron_ranges": neuron_ranges, "strength": strength}


def pairs_csv(rows: list[dict[str, Any]]) -> str:
    """The top pairs as CSV text (columns ``PAIR_COLUMNS``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PAIR_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in PAIR_COLUMNS})
    return buffer.getvalue()


def write_outputs(result: dict[str, Any], out_dir: str | Path, n_bar_pairs: int = 20,
                  ) -> dict[str, Path]:
    """interactions.json, top_pairs.csv and the three plots into ``out_dir``."""
    from crossint.report.plots import (
        plot_interaction_location,
        plot_share_histograms,
        plot_top_pairs,
    )

    paths = rundir.INTERACTIONS.paths(out_dir)
    atomic_write_text(paths["pairs_csv"], pairs_csv(result["top_pairs"]))
    histogram = result["share_histogram"]
    plot_share_histograms(histogram["bin_edges"],
                          {f"{b}": c for b, c in histogram["counts"].items()}, paths["share"])
    location = result["location"]
    plot_interaction_location([[v if v is not None else math.nan for v in row]
                               for row in location["strength"]],
                              location["blocks"], paths["location"], location["neuron_ranges"])
    bars = result["top_pairs"][:n_bar_pairs]
    plot_top_pairs([f"{r['i']}→{r['j']} @ block {r['block']}" for r in bars],
                   [r["total"] for r in bars], paths["pairs"])
    atomic_write_json(paths["json"], result)  # last: its presence means the outputs are complete
    return paths


def format_table(result: dict[str, Any], n_pairs: int = 5) -> str:
    """A short plain-text summary (printed by `crossint interactions`)."""
    lines = [
        f"model {result['model']}  tokens {result['n_tokens']}  FVU {result['fvu']:.4f}  "
        f"L_rec {result['recon_loss']:.4g}  L0 {result['l0']:.1f}",
        f"{'block':<7}{'share':>8}{'share(act)':>12}{'S-Mx':>11}{'gap':>11}{'bound':>11}"
        f"{'pair mass':>11}",
    ]

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    for row in [*result["per_block"], {"block": "all", **result}]:
        lines.append(
            f"{row['block']!s:<7}{fmt(row['dominant_share'], '>8.4f')}"
            f"{fmt(row['dominant_share_active'], '>12.4f')}{fmt(row['nondominant'], '>11.4g')}"
            f"{fmt(row['measured_gap'], '>11.4g')}{fmt(row['bound'], '>11.4g')}"
            f"{fmt(row['pairwise_interaction'], '>11.4g')}"
        )
    if result["top_pairs"]:
        lines.append("top pairs (i -> j @ block: mass/token, strength, frequency, Δ²):")
        for r in result["top_pairs"][:n_pairs]:
            lines.append(f"  {r['i']} -> {r['j']} @ {r['block']}: {fmt(r['total'], '.4g')}, "
                         f"{fmt(r['strength'], '.4g')}, {fmt(r['frequency'], '.3g')}, "
                         f"{fmt(r['delta2'], '.4g')}")
    rho = result["delta2_spearman"]
    if rho.get("n_pairs"):
        parts = ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in rho.items() if k != "n_pairs")
        lines.append(f"Spearman with Δ² over {rho['n_pairs']} pairs: {parts}")
    return "\n".join(lines)
