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

from crossint.analysis.evaluate import ReconstructionStats
from crossint.analysis.heldout import (
    HELDOUT_SEED,
    capture_tokens,
    heldout_batches,
    load_run,
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
    mlp_in_blocks,
)
from crossint.interactions.contributions import NeuronStats
from crossint.io import atomic_write_json, atomic_write_text, sha256_file
from crossint.models.hookpoints import parse_hookpoint

SHARE_BINS = 20
LOCATION_GROUPS = 32
RESULT_NAME = "interactions.json"
PAIRS_CSV = "top_pairs.csv"
PLOT_NAMES = {
    "share": "dominant_share_hist.png",
    "location": "interaction_location.png",
    "pairs": "top_pairs.png",
}
REQUEST_KEYS = ("n_tokens", "corpus", "seed", "context_length", "batch_size", "model", "blocks",
                "top_pairs", "delta2_pairs")
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
        share_A = stats.share_BN[stats.active_BN].double().cpu()
        counts = torch.histc(share_A, bins=self.bins, min=0.0, max=1.0)
        nondominant_N = stats.nondominant_BN.double().sum(dim=0).cpu()
        if block in self.histograms:
            self.histograms[block] += counts
            self.nondominant_N[block] += nondominant_N
        else:
            self.histograms[block], self.nondominant_N[block] = counts, nondominant_N


def select_blocks(crosscoder: Any, blocks: Sequence[int] | None, run_dir: str | Path) -> list[int]:
    """The requested blocks (default: every block whose mlp_in the crosscoder reads)."""
    available = mlp_in_blocks(crosscoder)
    if not available:
        raise CrossintError(
            f"the crosscoder in {run_dir} reads no blocks.{{l}}.mlp_in hookpoint (it reads "
            f"{', '.join(crosscoder.config.hookpoints)}); MLP interactions need the MLP inputs: "
            "train on a cache harvested with the paper layout"
        )
    if blocks is None:
        return available
    missing = sorted(set(blocks) - set(available))
    if missing:
        raise CrossintError(
            f"the crosscoder in {run_dir} has no mlp_in hookpoint for block(s) "
            f"{', '.join(map(str, missing))}; it reads mlp_in of blocks "
            f"{', '.join(map(str, available))}"
        )
    return sorted(set(blocks))


def check_model_matches(adapter: Any, model_info: dict[str, Any], widths: set[int],
                        what: str) -> None:
    """Refuse a subject model whose architecture differs from the one ``what`` was made from."""
    if widths and widths != {adapter.d_model}:
        raise CrossintError(
            f"model {adapter.name!r} has d_model {adapter.d_model}, but {what} has width "
            f"{'/'.join(str(w) for w in sorted(widths))}: pass the model it was made from"
        )
    differences = [
        f"{key} {model_info[key]!r} (model has {getattr(adapter, key)!r})"
        for key in ("model_type", "n_blocks", "d_model")
        if key in model_info and model_info[key] != getattr(adapter, key)
    ]
    if differences:
        raise CrossintError(
            f"model {adapter.name!r} does not match {what}, which records "
            f"{', '.join(differences)}: pass the model it was made from"
        )


def check_model(crosscoder: Any, adapter: Any, manifest: dict[str, Any], run_dir: str | Path,
                ) -> None:
    """Refuse a subject model that is not the one the crosscoder was trained on."""
    check_model_matches(adapter, manifest.get("model_info") or {}, {crosscoder.config.d_model},
                        f"the crosscoder in {run_dir}")
    for name in crosscoder.config.hookpoints:
        parse_hookpoint(name, adapter.n_blocks)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null, tensors become numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Tensor):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def request_record(arguments: dict[str, Any]) -> dict[str, Any]:
    """What an analysis was asked for (the ``REQUEST_KEYS`` of its arguments), as recorded in
    interactions.json: a stored result is re-used only for the same request. Device and chunk
    size are left out: they do not change the numbers."""
    request = {key: arguments[key] for key in REQUEST_KEYS}
    if request["blocks"] is not None:
        request["blocks"] = sorted(set(request["blocks"]))
    return request


@dataclass
class AnalysisSetup:
    """What every held-out MLP analysis of a run starts from: the crosscoder and its subject
    model (checked to match), the analysed blocks with their float64 feature blocks, and the
    held-out batches."""

    crosscoder: Any
    adapter: Any
    blocks: list[int]
    fblocks: list[Any]
    hookpoints: list[str]
    special_ids: set[int]
    batches: list[Tensor]
    corpus: str
    seed: int
    context_length: int


def prepare_analysis(run_dir: str | Path, command: str, n_tokens: int, corpus: str | None,
                     seed: int, context_length: int | None, batch_size: int, model: str | None,
                     blocks: Sequence[int] | None, device: str) -> AnalysisSetup:
    """Load and check a run for `crossint {command}`. ``corpus`` and ``context_length`` default
    to the training cache's (else built-in stories, 128)."""
    from crossint.models.adapter import load_model

    for name, value in (("tokens", n_tokens), ("batch size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise CrossintError(f"{name} must be a positive integer, got {value!r}")
    crosscoder, model_name = load_run(run_dir, command=command)
    block_ids = select_blocks(crosscoder, blocks, run_dir)
    manifest = training_manifest(run_dir)
    corpus = corpus or manifest.get("corpus", "stories")
    context_length = context_length or manifest.get("context_length", 128)
    crosscoder.to(device)
    adapter = load_model(model or model_name, device=device)
    check_model(crosscoder, adapter, manifest, run_dir)
    batches = heldout_batches(adapter, corpus, seed, context_length, n_tokens, batch_size)
    mlps = {block: adapter.mlp_weights(block) for block in block_ids}
    return AnalysisSetup(
        crosscoder=crosscoder, adapter=adapter, blocks=block_ids,
        fblocks=feature_blocks(crosscoder, mlps, dtype=torch.float64),
        hookpoints=list(crosscoder.config.hookpoints), special_ids=adapter.special_token_ids(),
        batches=batches, corpus=corpus, seed=seed, context_length=context_length,
    )


def analyse_run(
    run_dir: str | Path,
    n_tokens: int = 50_000,
    corpus: str | None = None,
    seed: int = HELDOUT_SEED,
    context_length: int | None = None,
    batch_size: int = 16,
    model: str | None = None,
    blocks: Sequence[int] | None = None,
    top_pairs: int = 50,
    delta2_pairs: int = 50,
    chunk_tokens: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the MLP interactions of a saved crosscoder; returns the interactions.json dict.

    ``corpus`` and ``context_length`` default to the training cache's (else built-in stories,
    128); the text ``seed`` differs from the harvest's so stories are held out. Top pairs are
    ranked by total mass I[i, j] = strength × frequency (SPEC §4.6); ratio, Hadamard and Δ² are
    measured for the first max(top_pairs, delta2_pairs) of them and ``delta2_spearman`` is the
    rank correlation of each cheap measure with Δ² over the first ``delta2_pairs``.
    """
    from tqdm.auto import tqdm

    for name, value in (("top pairs", top_pairs), ("Δ² pairs", delta2_pairs)):
        if not isinstance(value, int) or value < 0:
            raise CrossintError(f"{name} must be an integer >= 0, got {value!r}")
    request = request_record({
        "n_tokens": n_tokens, "corpus": corpus, "seed": seed, "context_length": context_length,
        "batch_size": batch_size, "model": model, "blocks": blocks, "top_pairs": top_pairs,
        "delta2_pairs": delta2_pairs,
    })
    setup = prepare_analysis(run_dir, "interactions", n_tokens, corpus, seed, context_length,
                             batch_size, model, blocks, device)
    crosscoder, adapter, block_ids, fblocks = (setup.crosscoder, setup.adapter, setup.blocks,
                                               setup.fblocks)
    corpus, context_length = setup.corpus, setup.context_length
    hookpoints, special_ids, batches = setup.hookpoints, setup.special_ids, setup.batches
    H = crosscoder.config.n_features
    pairwise = PairwiseAccumulator(H, block_ids)
    meter = MLPInteractionMeter(fblocks, chunk_tokens, pairwise)
    located = LocatedShareSummary()
    meter.shares = located  # the meter feeds every block's NeuronStats to its summary
    recon = ReconstructionStats(crosscoder.config.n_positions, H)
    norm_sum_X = torch.zeros(crosscoder.config.n_positions, dtype=torch.float64)
    score_sum = 0.0
    stored_f: list[Tensor] = []  # sparse feature activations, for the Δ² pass
    with torch.no_grad():
        for ids_BS in tqdm(batches, desc="interactions", unit="batch", disable=not progress,
                           dynamic_ncols=True):
            acts_NXD = capture_tokens(adapter, ids_BS.to(device), hookpoints, special_ids)[2]
            f_NH = crosscoder.encode(acts_NXD)
            recon.update(acts_NXD.cpu(), crosscoder.decode(f_NH).cpu(), f_NH.cpu())
            norm_sum_X += acts_NXD.double().norm(dim=-1).sum(dim=0).cpu()
            score_sum += float(meter.update(f_NH).double().sum())
            stored_f.append(f_NH.to_sparse())
    n = recon.n_tokens
    if n == 0:
        raise CrossintError(f"corpus {corpus!r} gave no usable (non-special) tokens")
    summary = meter.result()
    result_pairs = pairwise.result()

    # SPEC §4.6 measures of the top-ranked triplets (second pass over the stored activations).
    n_measured = max(top_pairs, delta2_pairs)
    top = result_pairs.top_triplets(n_measured, by="total")
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
    del stored_f
    rows = []
    for p in range(min(top_pairs, n_measured)):
        rows.append({
            "i": int(top["i"][p]), "j": int(top["j"][p]), "block": int(top["block"][p]),
            "total": float(top["total"][p]), "strength": float(top["strength"][p]),
            "frequency": float(top["count"][p]) / max(result_pairs.n_tokens, 1),
            "coactive_tokens": int(top["count"][p]),
            "ratio": float(measures["ratio"][p]), "hadamard": float(measures["hadamard"][p]),
            "delta2": float(measures["delta2"][p]),
        })
    n_rank = min(delta2_pairs, n_measured)
    spearman: dict[str, Any] = {"n_pairs": n_rank}
    if n_rank:
        cheap = {name: measures[name][:n_rank] for name in ("ratio", "hadamard")}
        cheap.update({name: top[name][:n_rank].double().cpu() for name in ("strength", "total")})
        spearman.update(measure_correlations(measures["delta2"][:n_rank], cheap))

    # Reconstruction on the same tokens (SPEC §3.3 L_rec in normalised units, §3.6 FVU).
    D = crosscoder.config.d_model
    scale_X = math.sqrt(D) / (norm_sum_X / n)
    fvu_X = recon.fvu_X()
    recon_loss = float((scale_X.pow(2) * recon.sq_error_X).sum() / n)

    # Per block: shares, gap and bound, pairwise mass, location profile.
    triplets = result_pairs.triplets()
    mass_by_block = {b: float(triplets["total"][triplets["block"] == b].sum()) for b in block_ids}
    location, neuron_ranges = [], None
    per_block = []
    for fblock in fblocks:
        b = fblock.block
        stats = summary["blocks"][b]
        per_neuron_N = located.nondominant_N[b] * fblock.w_out_N.double().cpu() / n
        groups = torch.tensor_split(torch.arange(per_neuron_N.numel()),
                                    min(LOCATION_GROUPS, per_neuron_N.numel()))
        location.append([float(per_neuron_N[g].mean()) for g in groups])
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
            "lipschitz": fblock.mlp.lipschitz,
            "activation": fblock.mlp.act_name,
        })
    pairwise_total = sum(mass_by_block.values())
    result = {
        "run": str(run_dir),
        "crosscoder_sha256": sha256_file(Path(run_dir) / "model.safetensors"),
        "model": adapter.name,
        "corpus": corpus,
        "seed": seed,
        "context_length": context_length,
        "n_tokens": n,
        "blocks": block_ids,
        "dominant_share": summary["dominant_share"],
        "dominant_share_active": summary["dominant_share_active"],
        "active_fraction": summary["active_fraction"],
        "nondominant": summary["mean_nondominant"],
        "nondominant_fraction": summary["nondominant_fraction"],
        "bound": summary["mean_bound"],
        "measured_gap": summary["mean_gap"],
        "pairwise_interaction": pairwise_total,
        "pairwise_interaction_mean": pairwise_total / (H * (H - 1)) if H > 1 else 0.0,
        "interaction_score_mean": score_sum / n,
        "recon_loss": recon_loss,
        "fvu": float(fvu_X.mean()),
        "fvu_per_hookpoint": {h: float(fvu_X[x]) for x, h in enumerate(hookpoints)},
        "l0": recon.l0_sum / n,
        "per_block": per_block,
        "top_pairs": rows,
        "delta2_spearman": spearman,
        "share_histogram": {
            "bin_edges": [i / located.bins for i in range(located.bins + 1)],
            "counts": {str(b): located.histograms[b].tolist() for b in block_ids},
        },
        "location": {"blocks": block_ids, "neuron_ranges": neuron_ranges, "strength": location},
        "request": request,
    }
    return _clean(result)


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

    out_dir = Path(out_dir)
    paths = {"json": out_dir / RESULT_NAME, "csv": out_dir / PAIRS_CSV}
    paths.update({key: out_dir / name for key, name in PLOT_NAMES.items()})
    atomic_write_text(paths["csv"], pairs_csv(result["top_pairs"]))
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
