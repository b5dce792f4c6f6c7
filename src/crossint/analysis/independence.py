"""Probabilistic independence of a trained crosscoder's features on held-out text (SPEC §8;
usage in docs/bounds.md).

Orchestration only: the subject model runs on held-out text, the crosscoder encodes it, and
every number comes from :mod:`crossint.interactions.independence`. The held-out contexts are
split into halves A (the first) and B (the second): the per-feature binned distributions are
estimated on B, an independent sample of A's size is drawn from them, and at every block the
neurons' output distribution under independence is compared with A's measured one by the
Wasserstein-1 distance, next to the same distance between B's and A's measured distributions
(the finite-sample floor: what two samples of the real joint distribution differ by) and
between A's reconstruction and the model's own MLP (what the crosscoder's reconstruction
itself costs). Distances are divided by each neuron's standard deviation on A.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.analysis.heldout import HeldoutRequest, capture_tokens, request_from
from crossint.analysis.interactions import AnalysisSetup, prepare_analysis
from crossint.errors import CrossintError
from crossint.interactions import independence as I
from crossint.interactions.additivity import full_post, iter_terms
from crossint.interactions.contributions import active_features
from crossint.io import atomic_write_json, atomic_write_text, json_safe, sha256_file
from crossint.models.hookpoints import hookpoint
from crossint.rundir import RunDir

INDEPENDENCE_TOKENS = 10_000
PAIR_COLUMNS = ("i", "j", "count", "expected", "pmi", "pmi_low", "pmi_high", "correlation")
PMI_BINS = 40


def analyse_independence(run_dir: str | Path, request: HeldoutRequest | None = None, *,
                         blocks: Sequence[int] | None = None, bins: int = 16,
                         top_pairs: int = 50, min_count: int = 5, seed: int = 0,
                         progress: bool = True, **text: Any) -> dict[str, Any]:
    """SPEC §8 measures of one run; the independence.json document (default 10,000 held-out
    tokens). ``top_pairs`` pairs with at least ``min_count`` co-activations are listed,
    ranked by the lower end of their PMI interval; ``bins`` per-feature histogram bins;
    ``seed`` seeds the independent sample."""
    for name, value, least in (("bins", bins, 1), ("top pairs", top_pairs, 0),
                               ("min count", min_count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CrossintError(f"{name} must be an integer >= {least}, got {value!r}")
    request = request_from(request, text, n_tokens=INDEPENDENCE_TOKENS)
    setup = prepare_analysis(run_dir, "independence", request, blocks)
    halves, accumulator = _collect(setup, progress)
    if accumulator.n_tokens == 0:
        raise CrossintError(f"corpus {setup.request.corpus!r} gave no usable (non-special) "
                            "tokens")
    if not halves["A"]["f"] or not halves["B"]["f"]:
        raise CrossintError("the independence test needs at least two held-out contexts "
                            "(halves A and B); ask for more --tokens")
    pairs = I.pair_table(accumulator)
    H = setup.crosscoder.config.n_features
    hist = I.feature_histograms(halves["B"]["f"], H, bins)
    generator = torch.Generator().manual_seed(seed)
    per_block = [_block_distances(setup, fblock, halves, hist, generator)
                 for fblock in setup.fblocks]
    return json_safe({
        "run": str(run_dir), "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
        "model": setup.adapter.name, "n_tokens": accumulator.n_tokens,
        "n_tokens_A": sum(f.shape[0] for f in halves["A"]["f"]),
        "n_tokens_B": sum(f.shape[0] for f in halves["B"]["f"]),
        "bins": bins, "seed": seed, "min_count": min_count,
        **_pair_summary(accumulator, pairs, top_pairs, min_count),
        "blocks": setup.blocks, "per_block": per_block,
        "summary": _distance_summary(per_block),
        "request": {**setup.request.record(),
                    "blocks": None if blocks is None else sorted(set(blocks))},
    })


def _collect(setup: AnalysisSetup, progress: bool
             ) -> tuple[dict[str, dict[str, list]], I.CoactivationAccumulator]:
    """One pass: the co-activation sums over every token, and per half the sparse feature
    activations and the model's own ``mlp_in`` of every analysed block."""
    from tqdm.auto import tqdm

    accumulator = I.CoactivationAccumulator(setup.crosscoder.config.n_features)
    halves: dict[str, dict[str, list]] = {h: {"f": [], "x": []} for h in "AB"}
    n_contexts = sum(ids.shape[0] for ids in setup.batches)
    seen = 0
    columns = [setup.hookpoints.index(hookpoint(b, "mlp_in")) for b in setup.blocks]
    with torch.no_grad():
        for ids_BS in tqdm(setup.batches, desc="independence", unit="batch",
                           disable=not progress, dynamic_ncols=True):
            captured = capture_tokens(setup.adapter, ids_BS.to(setup.request.device),
                                      setup.hookpoints, setup.special_ids)
            f_TH = setup.crosscoder.encode(captured.acts_TXD).cpu()
            accumulator.update(active_features(f_TH))
            counts = captured.keep_BS.sum(dim=1).tolist()
            x_TLD = captured.acts_TXD[:, columns].cpu().double()
            for f, x in zip(f_TH.split(counts), x_TLD.split(counts), strict=True):
                half = "A" if seen < n_contexts // 2 else "B"  # a context stays in one half
                seen += 1
                if f.shape[0]:
                    halves[half]["f"].append(f.double().to_sparse())
                    halves[half]["x"].append(x)
    return halves, accumulator


def _posts(fblock: Any, f_parts: list[Tensor]) -> Tensor:
    """The neurons of a block's MLP on the reconstruction of each token's features (T×N)."""
    out = []
    for f in f_parts:
        dense = f.to_dense() if f.is_sparse else f
        for _, terms in iter_terms(active_features(dense), fblock):
            out.append(full_post(terms, fblock.mlp.act))
    return torch.cat(out)


def _block_distances(setup: AnalysisSetup, fblock: Any, halves: dict[str, dict[str, list]],
                     hist: I.FeatureHistograms, generator: torch.Generator) -> dict[str, Any]:
    index = setup.blocks.index(fblock.block)
    with torch.no_grad():
        post_A = _posts(fblock, halves["A"]["f"])
        post_B = _posts(fblock, halves["B"]["f"])
        sample = list(I.sample_independent(hist, post_A.shape[0], generator))
        post_ind = _posts(fblock, sample)
        x_A = torch.cat([x[:, index] for x in halves["A"]["x"]])
        post_model = fblock.mlp.post(x_A)
    std_N = post_A.std(dim=0)
    alive = std_N > 1e-12
    distances = {
        "independence": I.wasserstein_1d(post_ind, post_A),
        "floor": I.wasserstein_1d(post_B, post_A),
        "reconstruction": I.wasserstein_1d(post_model, post_A),
    }
    row: dict[str, Any] = {"block": fblock.block, "neurons": int(alive.sum())}
    for name, w_N in distances.items():
        row[f"w1_{name}"] = float(w_N.mean())
        row[f"relative_{name}"] = float((w_N[alive] / std_N[alive]).mean())
    worst = torch.argsort(torch.where(alive, distances["independence"] / std_N.clamp(min=1e-12),
                                      torch.zeros_like(std_N)), descending=True)[:5]
    row["worst_neurons"] = [{"neuron": int(n), "relative": float(
        distances["independence"][n] / std_N[n]), "floor": float(distances["floor"][n] / std_N[n])}
        for n in worst.tolist()]
    row["excess"] = row["relative_independence"] / row["relative_floor"] if row[
        "relative_floor"] else math.nan
    return row


def _distance_summary(per_block: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("relative_independence", "relative_floor", "relative_reconstruction")
    out = {key: sum(b[key] for b in per_block) / len(per_block) for key in keys}
    out["excess"] = (out["relative_independence"] / out["relative_floor"]
                     if out["relative_floor"] else math.nan)
    return out


def _pair_summary(acc: I.CoactivationAccumulator, pairs: I.PairTable, top_pairs: int,
                  min_count: int) -> dict[str, Any]:
    T = acc.n_tokens
    observed = float(pairs.n_Q.sum())
    expected = I.expected_coactivations(acc.count_H, T)
    kept = pairs.n_Q >= min_count
    order = torch.argsort(torch.where(kept, pairs.low_Q, torch.full_like(pairs.low_Q,
                                                                          -math.inf)),
                          descending=True)[:min(top_pairs, int(kept.sum()))]
    weights = pairs.n_Q / max(observed, 1.0)
    edges = torch.linspace(float(pairs.pmi_Q.min()) if pairs.pmi_Q.numel() else -1.0,
                           float(pairs.pmi_Q.max()) if pairs.pmi_Q.numel() else 1.0,
                           PMI_BINS + 1, dtype=torch.float64)
    hist = torch.histogram(pairs.pmi_Q, bins=edges, weight=pairs.n_Q).hist if pairs.pmi_Q.numel() \
        else torch.zeros(PMI_BINS, dtype=torch.float64)
    corr = pairs.corr_Q[kept]
    corr_ok = corr[torch.isfinite(corr)]
    return {
        "active_features": int((acc.count_H > 0).sum()),
        "mean_active": float(acc.count_H.sum()) / T,
        "coactive_pairs": int(pairs.n_Q.numel()),
        "coactivations": observed, "expected_coactivations": expected,
        "coactivation_excess": observed / expected if expected else math.nan,
        "mean_pmi": float((weights * pairs.pmi_Q).sum()),
        "pairs_min_count": int(kept.sum()),
        **_significance(acc, pairs, min_count),
        "mean_correlation": float(corr_ok.mean()) if corr_ok.numel() else None,
        "mean_abs_correlation": float(corr_ok.abs().mean()) if corr_ok.numel() else None,
        "pmi_histogram": {"bin_edges": edges.tolist(), "counts": hist.tolist()},
        "top_pairs": [{"i": int(pairs.i_Q[q]), "j": int(pairs.j_Q[q]), "count": int(pairs.n_Q[q]),
                       "expected": float(pairs.expected_Q[q]), "pmi": float(pairs.pmi_Q[q]),
                       "pmi_low": float(pairs.low_Q[q]), "pmi_high": float(pairs.high_Q[q]),
                       "correlation": float(pairs.corr_Q[q])} for q in order.tolist()],
    }


def _significance(acc: I.CoactivationAccumulator, pairs: I.PairTable, min_count: int
                  ) -> dict[str, Any]:
    """Among the pairs expected to co-activate at least ``min_count`` times if independent
    (co-active or not, so the selection does not depend on the observed count): the
    fractions whose 95% PMI interval lies above and below 0. A pair never co-active has the
    upper end log(z²/expected) < 0 when expected > z² ≈ 3.84."""
    population = I.pairs_expected_at_least(acc.count_H, acc.n_tokens, min_count)
    if population == 0:
        return {"pairs_expected": 0, "pmi_above_zero": None, "pmi_below_zero": None}
    expected = pairs.expected_Q >= min_count * (1 - 1e-12)
    never = population - int(expected.sum())
    below = int((pairs.high_Q[expected] < 0).sum())
    if min_count > I.WILSON_Z ** 2:
        below += never
    return {"pairs_expected": population,
            "pmi_above_zero": int((pairs.low_Q[expected] > 0).sum()) / population,
            "pmi_below_zero": below / population}



def pairs_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PAIR_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in PAIR_COLUMNS})
    return buffer.getvalue()


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """independence.json (last), pmi_pairs.csv and independence.png."""
    from crossint.report.plots import plot_independence

    paths = rundir.INDEPENDENCE.paths(out_dir)
    atomic_write_text(paths["pairs_csv"], pairs_csv(result["top_pairs"]))
    histogram = result["pmi_histogram"]
    blocks = [row["block"] for row in result["per_block"]]
    distances = {label: [row[key] for row in result["per_block"]] for label, key in (
        ("independent vs measured", "relative_independence"),
        ("floor (two halves of the data)", "relative_floor"),
        ("reconstruction vs model", "relative_reconstruction"))}
    plot_independence(histogram["bin_edges"], histogram["counts"], blocks, distances,
                      paths["distance"])
    atomic_write_json(paths["json"], result)
    return paths


def format_table(result: dict[str, Any], n_pairs: int = 5) -> str:
    def fmt(value: Any, spec: str = ".3g") -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "n/a"

    lines = [
        f"model {result['model']}  tokens {result['n_tokens']}  co-active pairs "
        f"{result['coactive_pairs']}  co-activations {fmt(result['coactivations'], '.0f')} vs "
        f"{fmt(result['expected_coactivations'], '.0f')} if independent "
        f"({fmt(result['coactivation_excess'])}×)",
        f"mean PMI per co-activation {fmt(result['mean_pmi'])}; of {result['pairs_expected']} "
        f"pairs expected to co-activate ≥ {result['min_count']} times, PMI > 0 for "
        f"{fmt(result['pmi_above_zero'], '.1%')} and < 0 for "
        f"{fmt(result['pmi_below_zero'], '.1%')} (95% intervals); magnitude correlation of "
        f"pairs co-active ≥ {result['min_count']} times {fmt(result['mean_correlation'])} "
        f"(|r| {fmt(result['mean_abs_correlation'])})",
        f"{'block':<7}{'W1/std indep':>14}{'floor':>10}{'recon':>10}{'excess':>9}",
    ]
    for row in result["per_block"]:
        lines.append(f"{row['block']!s:<7}{fmt(row['relative_independence']):>14}"
                     f"{fmt(row['relative_floor']):>10}{fmt(row['relative_reconstruction']):>10}"
                     f"{fmt(row['excess']):>9}")
    for r in result["top_pairs"][:n_pairs]:
        lines.append(f"  {r['i']}, {r['j']}: {r['count']} co-activations ({fmt(r['expected'])} "
                     f"expected), PMI {fmt(r['pmi'])} [{fmt(r['pmi_low'])}, "
                     f"{fmt(r['pmi_high'])}], r {fmt(r['correlation'])}")
    return "\n".join(lines)
