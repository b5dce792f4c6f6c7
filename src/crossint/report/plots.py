"""Plots of the MLP interaction analysis and the λ sweep (PNG, matplotlib's Agg canvas).

One function per plot; each takes plain data (lists, arrays, dicts) and a path and writes the PNG
atomically. Figures are built without pyplot, so nothing touches a display or global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crossint.errors import CrossintError
from crossint.io import atomic_write

DPI = 120


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def plot_share_histograms(
    bin_edges: Sequence[float],
    counts_by_block: Mapping[Any, Sequence[float]],
    path: str | Path,
    title: str = "Dominant share per block (SPEC §4.2)",
) -> Path:
    """Histogram of the dominant share (Mx + ε)/(S + ε) per block, one panel per block.

    ``counts_by_block[block]`` has ``len(bin_edges) - 1`` counts; bars show the fraction of
    (token, neuron) pairs in each bin."""
    if not counts_by_block:
        raise CrossintError("no blocks to plot a dominant-share histogram for")
    n_bins = len(bin_edges) - 1
    for block, counts in counts_by_block.items():
        if len(counts) != n_bins:
            raise CrossintError(
                f"block {block}: {len(counts)} histogram counts for {n_bins} bins"
            )
    n = len(counts_by_block)
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    figure = _figure(3.2 * columns, 2.6 * rows + 0.4)
    widths = [bin_edges[b + 1] - bin_edges[b] for b in range(n_bins)]
    for index, (block, counts) in enumerate(counts_by_block.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        total = sum(counts)
        fractions = [c / total if total else 0.0 for c in counts]
        axes.bar(list(bin_edges[:-1]), fractions, width=widths, align="edge",
                 color="tab:blue", edgecolor="white", linewidth=0.4)
        mean = (sum(f * (bin_edges[b] + widths[b] / 2) for b, f in enumerate(fractions))
                if total else math.nan)
        axes.set_title(f"block {block}" + (f"  (mean ≈ {mean:.2f})" if total else ""),
                       fontsize=9)
        axes.set_xlim(bin_edges[0], bin_edges[-1])
        axes.set_xlabel("dominant share", fontsize=8)
        if index % columns == 0:
            axes.set_ylabel("fraction of (token, neuron)", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_interaction_location(
    strength_LG: Sequence[Sequence[float]],
    blocks: Sequence[Any],
    path: str | Path,
    neuron_ranges: Sequence[Sequence[int]] | None = None,
    title: str = "Interaction strength by location",
) -> Path:
    """Heatmap of interaction strength, one row per block and one column per neuron group.

    ``strength_LG[l][g]``: mean over the group's neurons of ‖W_out[n]‖·(S − Mx) per token."""
    import numpy as np

    values_LG = np.asarray(strength_LG, dtype=float)
    if values_LG.ndim != 2 or values_LG.shape[0] != len(blocks) or values_LG.shape[1] == 0:
        raise CrossintError(
            f"location heatmap needs one row of group values per block: got shape "
            f"{values_LG.shape} for {len(blocks)} blocks"
        )
    figure = _figure(9.0, 1.8 + 0.5 * len(blocks))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(values_LG, aspect="auto", cmap="viridis", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("‖W_out‖·(S−Mx) per token", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    axes.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=8)
    n_groups = values_LG.shape[1]
    ticks = sorted(set(np.linspace(0, n_groups - 1, min(n_groups, 8)).round().astype(int)))
    labels = ([f"{neuron_ranges[g][0]}" for g in ticks] if neuron_ranges is not None
              else [str(g) for g in ticks])
    axes.set_xticks(ticks, labels, fontsize=8)
    axes.set_xlabel("neuron group (first neuron index)" if neuron_ranges is not None
                    else "neuron group", fontsize=8)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_top_pairs(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    xlabel: str = "interaction mass per token (I[i, j], SPEC §4.5)",
    title: str = "Top interacting feature pairs",
) -> Path:
    """Horizontal bar chart of the strongest pairs, the first label at the top."""
    if len(labels) != len(values):
        raise CrossintError(f"{len(labels)} pair labels for {len(values)} values")
    figure = _figure(7.0, 1.2 + 0.22 * max(len(labels), 3))
    axes = figure.add_subplot(1, 1, 1)
    if labels:
        positions = list(range(len(labels)))[::-1]
        axes.barh(positions, _finite(values), color="tab:orange")
        axes.set_yticks(positions, list(labels), fontsize=7)
    else:
        axes.text(0.5, 0.5, "no co-active feature pairs", ha="center", va="center",
                  transform=axes.transAxes)
        axes.set_yticks([])
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_sweep(
    lambdas: Sequence[float],
    dominant_share: Sequence[float],
    recon_loss: Sequence[float],
    pairwise_interaction: Sequence[float],
    path: str | Path,
    title: str = "Interaction penalty sweep",
) -> Path:
    """Two panels as in the paper's Figure 1: dominant share and reconstruction loss against λ
    (twin axes), and average pairwise interaction against λ. λ = 0 is shown on a symlog axis."""
    n = len(lambdas)
    if n == 0 or not (len(dominant_share) == len(recon_loss) == len(pairwise_interaction) == n):
        raise CrossintError(
            f"sweep plot needs one value per λ: {n} λ, {len(dominant_share)} shares, "
            f"{len(recon_loss)} losses, {len(pairwise_interaction)} interactions"
        )
    order = sorted(range(n), key=lambda i: lambdas[i])
    x = [float(lambdas[i]) for i in order]
    share = _finite([dominant_share[i] for i in order])
    loss = _finite([recon_loss[i] for i in order])
    pairwise = _finite([pairwise_interaction[i] for i in order])
    positive = [v for v in x if v > 0]
    figure = _figure(10.0, 3.8)

    def lambda_axis(axes: Any) -> None:
        if positive:
            axes.set_xscale("symlog", linthresh=min(positive))
        # One labelled tick per swept λ: symlog's own ticks label only powers of ten.
        axes.set_xticks(x, [f"{v:g}" for v in x], fontsize=8)
        axes.minorticks_off()
        axes.set_xlabel("interaction penalty λ")
        axes.grid(alpha=0.3)

    left = figure.add_subplot(1, 2, 1)
    left.plot(x, share, "o-", color="tab:blue", label="dominant share")
    left.set_ylabel("dominant share (SPEC §4.2)", color="tab:blue")
    left.tick_params(axis="y", labelcolor="tab:blue")
    lambda_axis(left)
    twin = left.twinx()
    twin.plot(x, loss, "s--", color="tab:red", label="reconstruction loss")
    twin.set_ylabel("reconstruction loss L_rec (SPEC §3.3)", color="tab:red")
    twin.tick_params(axis="y", labelcolor="tab:red")
    left.set_title("share and reconstruction vs λ", fontsize=10)

    right = figure.add_subplot(1, 2, 2)
    right.plot(x, pairwise, "o-", color="tab:purple")
    right.set_ylabel("pairwise interaction per token (SPEC §4.5)")
    lambda_axis(right)
    right.set_title("average pairwise interaction vs λ", fontsize=10)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def plot_frontier(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    measure_label: str = "dominant share (SPEC §4.2)",
    cost_label: str = "L_rec / L_rec(λ = 0)",
    target: tuple[float, float] | None = None,
    higher_is_better: bool = True,
    title: str | None = None,
) -> Path:
    """One line per sweep: the measure (y) against its cost (x), each point labelled with its
    λ; ``target = (value, max_cost)`` shades the region the measure should reach."""
    if not curves or any(not points for points in curves.values()):
        raise CrossintError("frontier plot needs at least one sweep with at least one point")
    figure = _figure(7.0, 4.6)
    axes = figure.add_subplot(1, 1, 1)
    costs = [p["cost"] for points in curves.values() for p in points]
    values = [p["value"] for points in curves.values() for p in points]
    if target is not None:
        value, max_cost = target
        axes.axvline(max_cost, color="tab:green", lw=0.8, ls=":")
        axes.axhline(value, color="tab:green", lw=0.8, ls=":")
        far = max(values + [value]) * 1.05 + 0.05 if higher_is_better else min(values + [0.0])
        axes.fill_between([min(costs + [max_cost]) * 0.95, max_cost], value, far,
                          color="tab:green", alpha=0.15,
                          label=f"target: {'≥' if higher_is_better else '≤'} {value:g} at "
                                f"≤ {max_cost:g}")
    for label, points in curves.items():
        line, = axes.plot([p["cost"] for p in points], [p["value"] for p in points], "o-",
                          label=label, ms=4)
        for p in points:
            axes.annotate(f"{p['lambda']:g}", (p["cost"], p["value"]),
                          textcoords="offset points", xytext=(3, 3), fontsize=6,
                          color=line.get_color())
    axes.set_xlabel(cost_label)
    axes.set_ylabel(measure_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    axes.set_title(title or f"{measure_label} against {cost_label}", fontsize=10)
    return _save(figure, path)


def plot_fidelity(
    schemes: Sequence[str] | Mapping[str, Sequence[str]],
    phi_by_panel: Mapping[str, Mapping[str, Sequence[float]]],
    ci_by_panel: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: str | Path,
) -> Path:
    """Grouped bars like the paper's Figure 2: one panel per block, schemes on the x axis, one
    bar per run (``phi_by_panel[panel][run]`` aligned with the schemes: one list for every
    panel, or one per panel) with its confidence interval as an error bar."""
    panels = list(phi_by_panel)
    if not panels:
        raise CrossintError("nothing to plot: no fidelity results")
    by_panel = (schemes if isinstance(schemes, Mapping)
                else {panel: schemes for panel in panels})
    widest = max(len(by_panel[panel]) for panel in panels)
    figure = _figure(1.6 + 1.25 * widest, 0.6 + 3.0 * len(panels))
    for index, panel in enumerate(panels):
        schemes = by_panel[panel]
        axes = figure.add_subplot(len(panels), 1, index + 1)
        runs = list(phi_by_panel[panel])
        width = 0.8 / max(len(runs), 1)
        for r, run in enumerate(runs):
            values = _finite(phi_by_panel[panel][run])
            if len(values) != len(schemes):
                raise CrossintError(f"{len(values)} fidelity values for {len(schemes)} schemes")
            intervals = ci_by_panel[panel][run]
            # A percentile interval need not contain the point estimate: clip the bars at it.
            low = [max(v - lo, 0.0) if math.isfinite(v - lo) else 0.0
                   for v, (lo, _) in zip(values, intervals, strict=True)]
            high = [max(hi - v, 0.0) if math.isfinite(hi - v) else 0.0
                    for v, (_, hi) in zip(values, intervals, strict=True)]
            positions = [s + (r - (len(runs) - 1) / 2) * width for s in range(len(schemes))]
            axes.bar(positions, values, width, label=run, yerr=[low, high], capsize=2)
        axes.axhline(0.0, color="black", linewidth=0.6)
        axes.set_xticks(range(len(schemes)), list(schemes), fontsize=8)
        axes.set_ylabel("fidelity Φ", fontsize=8)
        axes.set_title(panel, fontsize=10)
        axes.legend(fontsize=7)
    return _save(figure, path)


def plot_token_scores(
    prompts: Sequence[tuple[Sequence[str], Sequence[float], Sequence[bool]]],
    path: str | Path,
    ylabel: str = "interaction score",
    titles: Sequence[str] | None = None,
) -> Path:
    """One bar panel per prompt: a bar per token (labelled with the token), the tokens flagged
    True drawn in red (the trigger), the others in grey. Non-finite scores (BOS) draw as 0.
    ``titles``: one per panel (e.g. the prompt's group)."""
    if not prompts:
        raise CrossintError("nothing to plot: no prompts")
    longest = max(len(tokens) for tokens, _, _ in prompts)
    figure = _figure(min(4 + 0.14 * longest, 30), 0.4 + 2.4 * len(prompts))
    for index, (tokens, scores, flags) in enumerate(prompts):
        if not len(tokens) == len(scores) == len(flags):
            raise CrossintError("tokens, scores and flags must have the same length")
        axes = figure.add_subplot(len(prompts), 1, index + 1)
        values = [v if math.isfinite(v) else 0.0 for v in _finite(scores)]
        colours = ["tab:red" if flag else "0.6" for flag in flags]
        axes.bar(range(len(values)), values, color=colours, width=0.85)
        labels = [t.replace("Ġ", "·").replace("Ċ", "⏎") for t in tokens]
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axes.set_xlim(-0.6, len(values) - 0.4)
        axes.set_ylabel(ylabel, fontsize=8)
        if titles is not None:
            axes.set_title(titles[index], fontsize=8, loc="left")
    figure.axes[0].set_title("per-token scores (red: trigger tokens)", fontsize=10)
    return _save(figure, path)


def plot_histogram(bin_edges: Sequence[float], counts: Sequence[float], path: str | Path,
                   xlabel: str, title: str) -> Path:
    """Bars of a histogram given by its edges (len(counts) + 1) and counts; log count axis."""
    if len(bin_edges) != len(counts) + 1 or not counts:
        raise CrossintError(f"{len(bin_edges)} bin edges for {len(counts)} counts")
    figure = _figure(6.0, 3.4)
    axes = figure.add_subplot(1, 1, 1)
    widths = [b - a for a, b in zip(bin_edges[:-1], bin_edges[1:], strict=True)]
    axes.bar(list(bin_edges[:-1]), list(counts), width=widths, align="edge", color="tab:blue",
             edgecolor="white")
    if any(c > 0 for c in counts):
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("features")
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_cluster_coherence(coherence: Mapping[str, Mapping[str, float]], path: str | Path,
                           title: str = "Cluster coherence vs random clusters of the same sizes",
                           ) -> Path:
    """One bar per clustering method (its coherence) next to the random baseline's mean with a
    ±1 std error bar, each labelled with the method's z-score."""
    methods = list(coherence)
    if not methods:
        raise CrossintError("nothing to plot: no clustering methods")
    figure = _figure(1.8 + 1.6 * len(methods), 3.4)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(methods))
    scores = _finite([coherence[m].get("score") for m in methods])
    means = _finite([coherence[m].get("random_mean") for m in methods])
    stds = [0.0 if math.isnan(s) else s
            for s in _finite([coherence[m].get("random_std") for m in methods])]
    axes.bar([p - 0.2 for p in positions], scores, 0.4, label="clusters", color="tab:blue")
    axes.bar([p + 0.2 for p in positions], means, 0.4, yerr=stds, capsize=3,
             label="random, same sizes", color="0.7")
    for p, method in zip(positions, methods, strict=True):
        z = coherence[method].get("z")
        if z is not None and math.isfinite(z):
            top = max(v for v in (scores[p], means[p] + stds[p]) if math.isfinite(v))
            axes.text(p, top, f"z = {z:.1f}", ha="center", va="bottom", fontsize=8)
    axes.set_xticks(list(positions), methods, fontsize=8)
    axes.set_ylabel("mean Jaccard of top-token sets", fontsize=8)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7)
    return _save(figure, path)


def plot_ordered_affinity(similarity_UU: Any, sizes: Sequence[int], path: str | Path,
                          title: str = "Normalised interaction affinity, ordered by cluster",
                          ) -> Path:
    """Heatmap of a similarity matrix whose rows are already ordered by cluster, with the
    cluster boundaries drawn."""
    import numpy as np

    values = np.asarray(similarity_UU, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] != sum(sizes):
        raise CrossintError(f"affinity of shape {values.shape} for clusters of total size "
                            f"{sum(sizes)}")
    figure = _figure(5.6, 5.0)
    axes = figure.add_subplot(1, 1, 1)
    positive = values[values > 0]
    top = float(np.quantile(positive, 0.99)) if positive.size else 1.0
    image = axes.imshow(values, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
    for edge in np.cumsum(sizes)[:-1]:
        axes.axhline(edge - 0.5, color="white", linewidth=0.3)
        axes.axvline(edge - 0.5, color="white", linewidth=0.3)
    figure.colorbar(image, ax=axes).ax.tick_params(labelsize=7)
    axes.set_xlabel("feature (ordered by cluster)", fontsize=8)
    axes.set_ylabel("feature (ordered by cluster)", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | Path,
                         keys: Sequence[str] = ("rec_loss", "fvu", "l0", "dominant_share",
                                                "interaction", "dead_fraction"),
                         title: str = "Training curves") -> Path:
    """One small panel per logged metric (those of ``keys`` present in ``rows``) against the
    training step."""
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not present:
        raise CrossintError("nothing to plot: no logged training metrics")
    columns = min(3, len(present))
    n_rows = math.ceil(len(present) / columns)
    figure = _figure(3.4 * columns, 2.5 * n_rows + 0.3)
    for index, key in enumerate(present):
        axes = figure.add_subplot(n_rows, columns, index + 1)
        points = [(r["step"], float(r[key])) for r in rows
                  if isinstance(r.get(key), (int, float)) and "step" in r]
        axes.plot([p[0] for p in points], _finite([p[1] for p in points]), color="tab:blue",
                  linewidth=1.0)
        axes.set_title(key, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        if key in ("rec_loss", "interaction") and all(p[1] > 0 for p in points):
            axes.set_yscale("log")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_attention_dominance(labels: Sequence[str], errors: Sequence[float],
                             tight_bounds: Sequence[float], bounds: Sequence[float],
                             path: str | Path,
                             title: str = "Strict dominance test per head (SPEC §5)") -> Path:
    """Per head (labels "block.head"): the measured mean ‖softmax(full) − softmax(dominant)‖₁
    next to its two bounds (½·range of Δscore, capped at 2; SPEC's 2‖Δscore‖_∞), log scale."""
    import numpy as np

    if not (len(labels) == len(errors) == len(tight_bounds) == len(bounds)):
        raise CrossintError(f"{len(labels)} head labels for {len(errors)} errors, "
                            f"{len(tight_bounds)} and {len(bounds)} bounds")
    figure = _figure(max(5.0, 1.2 + 0.45 * len(labels)), 3.4)
    axes = figure.add_subplot(1, 1, 1)
    if not labels:
        axes.text(0.5, 0.5, "no measured heads", ha="center", va="center",
                  transform=axes.transAxes)
        return _save(figure, path)
    x = np.arange(len(labels))
    for offset, values, colour, name in ((-0.27, errors, "tab:blue", "measured ‖Δp‖₁"),
                                         (0.0, tight_bounds, "tab:green", "½ range(Δscore)"),
                                         (0.27, bounds, "tab:gray", "2‖Δscore‖∞ (SPEC)")):
        axes.bar(x + offset, _finite(values), width=0.27, color=colour, label=name)
    axes.set_yscale("log")
    axes.axhline(2.0, color="black", linewidth=0.6, linestyle=":")
    axes.set_xticks(x, list(labels), fontsize=7, rotation=90 if len(labels) > 16 else 0)
    axes.set_xlabel("block.head", fontsize=8)
    axes.set_ylabel("mean over query positions", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_pair_heatmap(query_features: Sequence[int], key_features: Sequence[int],
                      scores: Sequence[Sequence[float | None]], path: str | Path,
                      title: str = "Q_ab of the strongest feature pairs") -> Path:
    """Heatmap of the pair score Q_ab (query feature rows, key feature columns); pairs that
    never met within the attention window are blank."""
    import numpy as np

    values = np.array([[math.nan if v is None else float(v) for v in row] for row in scores],
                      dtype=float).reshape(len(query_features), len(key_features))
    figure = _figure(1.8 + 0.42 * max(len(key_features), 4),
                     1.4 + 0.36 * max(len(query_features), 4))
    axes = figure.add_subplot(1, 1, 1)
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    image = axes.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-top, vmax=top,
                        interpolation="nearest", aspect="auto")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("Q_ab (score per unit f_a·f_b)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    axes.set_xticks(range(len(key_features)), [str(b) for b in key_features], fontsize=7,
                    rotation=90)
    axes.set_yticks(range(len(query_features)), [str(a) for a in query_features], fontsize=7)
    axes.set_xlabel("key feature b", fontsize=8)
    axes.set_ylabel("query feature a", fontsize=8)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_attention_pattern(tokens: Sequence[str], full: Sequence[Sequence[float]],
                           dominant: Sequence[Sequence[float]], path: str | Path,
                           title: str = "Attention pattern") -> Path:
    """Three panels over one context: the pattern of the full reconstruction, the pattern with
    one feature per query and key position, and their difference."""
    import numpy as np

    full_SS, dominant_SS = np.asarray(full, dtype=float), np.asarray(dominant, dtype=float)
    n = len(tokens)
    if full_SS.shape != (n, n) or dominant_SS.shape != (n, n):
        raise CrossintError(f"patterns of shapes {full_SS.shape} and {dominant_SS.shape} for "
                            f"{n} tokens")
    figure = _figure(15.0, 5.4)
    labels = [t.replace("\n", "⏎") for t in tokens]
    ticks = range(0, n, max(1, n // 24))
    panels = ((full_SS, "full reconstruction", "viridis", 0.0, 1.0),
              (dominant_SS, "one feature per query and key", "viridis", 0.0, 1.0),
              (full_SS - dominant_SS, "full − dominant", "RdBu_r", -1.0, 1.0))
    for index, (values, name, cmap, low, high) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        image = axes.imshow(values, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        figure.colorbar(image, ax=axes, fraction=0.046).ax.tick_params(labelsize=6)
        axes.set_xticks(list(ticks), [labels[i] for i in ticks], fontsize=5, rotation=90)
        axes.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=5)
        axes.set_xlabel("key position", fontsize=8)
        axes.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


# --- the Local Interaction Basis (SPEC §11) ------------------------------------------------------
_REPRESENTATION_COLOURS = {"pca": "tab:gray", "lib": "tab:blue", "crosscoder": "tab:red"}
_LINESTYLES = ("-", "--", "-.", ":")


def plot_lib_graph(layers: Sequence[str], eigenvalues: Sequence[Sequence[float]],
                   edges: Sequence[Sequence[Sequence[float]]], path: str | Path,
                   title: str = "LIB interaction graph (top edges per block)",
                   modules: Sequence[Sequence[int]] | None = None) -> Path:
    """The LIB graph: one column of nodes per node layer (``layers``), node area ∝ √(Λ / the
    layer's largest Λ) (Λ spans orders of magnitude); ``edges[l]`` = [[i, j, weight], ...] from
    node j of layer l to node i of layer l + 1, line width ∝ weight relative to the block's
    largest. Nodes below the lowest one an edge touches (+5, at least 24 shown) are cut off.
    ``modules[k][n]``: node n of layer k's module (Louvain), coloured (the 10 largest; the others
    black)."""
    if len(eigenvalues) != len(layers) or len(edges) != max(len(layers) - 1, 0):
        raise CrossintError(f"{len(layers)} layers need as many eigenvalue lists and one edge "
                            f"list fewer, got {len(eigenvalues)} and {len(edges)}")
    used = [max(int(i), int(j)) for block in edges for i, j, _ in block]
    height = min(max((len(v) for v in eigenvalues), default=1), max(used, default=0) + 6)
    height = max(height, min(24, max((len(v) for v in eigenvalues), default=1)))
    figure = _figure(1.8 + 2.2 * len(layers), 2.4 + 0.12 * height)
    axes = figure.add_subplot(1, 1, 1)
    for l, block in enumerate(edges):
        top = max((float(w) for _, _, w in block), default=0.0) or 1.0
        for i, j, w in block:
            axes.plot([l, l + 1], [j, i], color="tab:blue", alpha=0.25 + 0.6 * float(w) / top,
                      linewidth=0.4 + 3.0 * float(w) / top, zorder=1)
    for l, values in enumerate(eigenvalues):
        shown = [max(float(v), 0.0) for v in values][:height]
        largest = max(shown, default=0.0) or 1.0
        axes.scatter([l] * len(shown), range(len(shown)), zorder=2,
                     color=_module_colours(modules[l] if modules else [], len(shown)),
                     s=[2.0 + 200.0 * math.sqrt(v / largest) for v in shown])
    axes.set_xticks(range(len(layers)), list(layers), fontsize=7)
    axes.set_ylim(height, -1)
    axes.set_ylabel("basis function (descending eigenvalue)", fontsize=8)
    axes.set_xlim(-0.3, len(layers) - 0.7)
    axes.tick_params(labelsize=7)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def _module_colours(module_N: Sequence[int], n: int) -> list[Any]:
    """tab10 colours for modules 0–9 (Louvain modules come sorted by size), black otherwise."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [palette(int(module_N[k])) if k < len(module_N) and 0 <= module_N[k] < 10
            else "black" for k in range(n)]


def plot_edge_weights(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                      path: str | Path,
                      title: str = "Edge-weight distribution (cumulative)") -> Path:
    """Fraction of the total edge weight held by the top k edges against k (log scale), one line
    per "representation block" label; colour by representation, line style by block."""
    figure = _figure(7.0, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    for label, (counts, fractions) in curves.items():
        name, _, block = label.partition(" ")
        style = _LINESTYLES[int(block) % len(_LINESTYLES)] if block.isdigit() else "-"
        axes.plot(list(counts), _finite(fractions), label=label, linestyle=style,
                  color=_REPRESENTATION_COLOURS.get(name), linewidth=1.2)
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("top k edges", fontsize=8)
    axes.set_ylabel("fraction of the edge weight", fontsize=8)
    axes.tick_params(labelsize=7)
    if curves:
        axes.legend(fontsize=6, ncol=3)
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_edge_sparsity(curves: Mapping[str, tuple[Sequence[Sequence[float]], float]],
                       tolerances: Sequence[float], path: str | Path,
                       title: str = "Loss with only the top k edges kept") -> Path:
    """One panel per representation: loss − loss with every edge kept, against k + 1 (log),
    from the bisection's evaluations; ``curves[label] = ([[k, loss], ...], loss_all)`` with
    labels "representation block"; dotted lines at the tolerances."""
    names = list(dict.fromkeys(label.partition(" ")[0] for label in curves)) or ["none"]
    figure = _figure(4.0 * len(names), 3.6)
    for index, name in enumerate(names):
        axes = figure.add_subplot(1, len(names), index + 1)
        for label, (points, loss_all) in curves.items():
            if label.partition(" ")[0] != name:
                continue
            block = label.partition(" ")[2]
            style = _LINESTYLES[int(block) % len(_LINESTYLES)] if block.isdigit() else "-"
            axes.plot([p[0] + 1 for p in points], [p[1] - loss_all for p in points],
                      marker=".", linestyle=style, label=f"block {block}",
                      color=_REPRESENTATION_COLOURS.get(name))
        for tolerance in tolerances:
            axes.axhline(tolerance, color="black", linewidth=0.6, linestyle=":")
        axes.set_xscale("log")
        axes.set_yscale("symlog", linthresh=min([t for t in tolerances if t > 0] or [0.01]))
        axes.set_xlabel("kept edges + 1", fontsize=8)
        axes.set_ylabel("loss − loss with every edge (nats)", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=6)
        axes.set_title(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


_STRATEGY_MARKERS = {"brute_force": "*", "feature_table": "v", "lipschitz": "s", "interval": "o",
                     "lowrank_r0": "^", "lowrank_r4": "D", "lowrank_r16": "P"}


def plot_bound_pareto(panels: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                      title: str = "Compact proofs: bound tightness against verifier cost "
                                   "(SPEC §7)") -> Path:
    """One log–log panel per explanation: bound ÷ measured error against the verifier's FLOPs
    per token, one point per (run, strategy) (``panels[explanation] = [{run, strategy, ratio,
    flops}]``); colour by run, marker by strategy; brute force sits at ratio 1."""
    if not panels:
        raise CrossintError("nothing to plot: no explanations")
    runs = list(dict.fromkeys(p["run"] for points in panels.values() for p in points))
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    figure = _figure(5.0 * len(panels), 4.2)
    for index, (explanation, points) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for p in points:
            ratio, flops = p.get("ratio"), p.get("flops")
            if not (isinstance(ratio, (int, float)) and isinstance(flops, (int, float))
                    and ratio > 0 and flops > 0 and math.isfinite(ratio)):
                continue
            axes.scatter([flops], [ratio], color=colours[p["run"]], s=36,
                         marker=_STRATEGY_MARKERS.get(p["strategy"], "x"))
        axes.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("verifier FLOPs per token (all blocks)", fontsize=8)
        axes.set_ylabel("bound ÷ measured error", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_title(f"{explanation} explanation", fontsize=9)
        handles = [axes.scatter([], [], color="gray", marker=m, label=s)
                   for s, m in _STRATEGY_MARKERS.items()]
        handles += [axes.scatter([], [], color=c, marker="o", label=r) for r, c in colours.items()]
        axes.legend(handles=handles, fontsize=6, loc="center left")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_independence(pmi_edges: Sequence[float], pmi_counts: Sequence[float],
                      blocks: Sequence[Any], distances: Mapping[str, Sequence[float]],
                      path: str | Path,
                      title: str = "Deviation from feature independence (SPEC §8)") -> Path:
    """Left: histogram of the co-activation PMI of co-active pairs (weighted by co-activation
    count). Right: per block, the relative Wasserstein distance of each kind
    (``distances[label]`` one value per block), e.g. independence vs measured next to the
    noise floor."""
    import numpy as np

    if len(pmi_edges) != len(pmi_counts) + 1:
        raise CrossintError(f"{len(pmi_edges)} PMI bin edges for {len(pmi_counts)} counts")
    figure = _figure(10.0, 3.6)
    left = figure.add_subplot(1, 2, 1)
    widths = [b - a for a, b in zip(pmi_edges[:-1], pmi_edges[1:], strict=True)]
    left.bar(list(pmi_edges[:-1]), list(pmi_counts), width=widths, align="edge",
             color="tab:blue", edgecolor="white")
    left.axvline(0.0, color="black", linewidth=0.6, linestyle=":")
    left.set_xlabel("PMI = log P(i,j) / (P(i)P(j))", fontsize=8)
    left.set_ylabel("co-activations", fontsize=8)
    left.tick_params(labelsize=7)
    left.set_title("co-activation PMI", fontsize=9)
    right = figure.add_subplot(1, 2, 2)
    x = np.arange(len(blocks))
    width = 0.8 / max(len(distances), 1)
    for k, (label, values) in enumerate(distances.items()):
        right.bar(x + (k - (len(distances) - 1) / 2) * width, _finite(values), width=width,
                  label=label)
    right.set_xticks(x, [str(b) for b in blocks], fontsize=7)
    right.set_xlabel("block", fontsize=8)
    right.set_ylabel("mean W₁ / std per neuron", fontsize=8)
    right.tick_params(labelsize=7)
    right.legend(fontsize=7)
    right.set_title("neuron output distributions", fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)
