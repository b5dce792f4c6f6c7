"""The end-to-end demo on the embedded story model: harvest → train → eval → MLP interactions
→ clusters → HTML report, in minutes on a CPU.

Every stage writes into one directory and is resumable: re-running the same command after an
interruption continues the harvest and the training where they stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crossint.io import atomic_write_json


@dataclass(frozen=True)
class DemoSettings:
    """Sizes chosen so the whole demo, setup included, fits in about five minutes on two CPU
    cores; the dictionary size and K are the paper's (SPEC §12)."""

    model: str = "storylm"
    layout: str = "paper"
    tokens: int = 100_000
    context_length: int = 128
    features: int = 1536
    k: int = 20
    activation: str = "batchtopk"
    steps: int = 1500
    batch_size: int = 512
    eval_tokens: int = 10_000
    seed: int = 0


def harvest_stories(adapter: Any, cache_dir: Path, settings: DemoSettings,
                    progress: bool = True) -> Any:
    """``settings.tokens`` of built-in stories from ``adapter`` in the settings' layout, as a
    float16 activation cache in ``cache_dir`` (resumed if interrupted)."""
    from crossint.data.harvest import harvest

    return harvest(adapter, cache_dir, settings.layout, n_tokens=settings.tokens,
                   context_length=settings.context_length, dtype="float16", seed=settings.seed,
                   progress=progress)


def train_recipe(source: Any, d_model: int, run_dir: Path, settings: DemoSettings,
                 progress: bool = True) -> None:
    """Train the settings' crosscoder on ``source`` (one cache, or paired caches of two models)
    into ``run_dir`` (resumed if interrupted)."""
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import TrainConfig, train

    models = getattr(source, "models", None) or [source.model]
    crosscoder_config = CrosscoderConfig(
        hookpoints=list(source.hookpoints),
        models=list(models),
        d_model=d_model,
        n_features=settings.features,
        activation=settings.activation,
        k=settings.k,
    )
    train_config = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        seed=settings.seed,
        checkpoint_every=max(1, settings.steps // 5),
    )
    train(crosscoder_config, train_config, source, run_dir, resume=True, progress=progress)


def harvest_and_train(
    adapter: Any, out_dir: Path, settings: DemoSettings, progress: bool = True
) -> tuple[Any, Path, dict[str, float]]:
    """:func:`harvest_stories` into OUT/cache and :func:`train_recipe` into OUT/crosscoder.
    Returns ``(cache, run_dir, {"harvest_s", "train_s"})``."""
    start = time.perf_counter()
    cache = harvest_stories(adapter, out_dir / "cache", settings, progress)
    harvested = time.perf_counter()
    run_dir = out_dir / "crosscoder"
    train_recipe(cache, adapter.d_model, run_dir, settings, progress)
    timings = {"harvest_s": harvested - start, "train_s": time.perf_counter() - harvested}
    return cache, run_dir, timings


def run_demo(
    out_dir: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True
) -> dict:
    """Run the demo into ``out_dir`` and return (and write) ``summary.json``."""
    from crossint.analysis.clustering import cluster_run, write_cluster_outputs
    from crossint.analysis.evaluate import evaluate
    from crossint.analysis.interactions import analyse_run, write_outputs
    from crossint.models.adapter import load_model
    from crossint.report.html import write_report

    out_dir = Path(out_dir)
    start = time.perf_counter()
    adapter = load_model(settings.model)
    cache, run_dir, timings = harvest_and_train(adapter, out_dir, settings, progress)

    stage = time.perf_counter()
    result = evaluate(
        run_dir,
        n_tokens=settings.eval_tokens,
        context_length=settings.context_length,
        progress=progress,
    )
    atomic_write_json(run_dir / "eval" / "eval.json", result)
    timings["eval_s"] = time.perf_counter() - stage

    # The point of crossint: how far each MLP neuron is from one feature (SPEC §4).
    stage = time.perf_counter()
    interactions = analyse_run(
        run_dir,
        n_tokens=settings.eval_tokens // 2,
        context_length=settings.context_length,
        progress=progress,
    )
    write_outputs(interactions, run_dir / "interactions")
    timings["interactions_s"] = time.perf_counter() - stage

    # Clusters of interacting features (SPEC §10) and one HTML page of everything.
    stage = time.perf_counter()
    clusters = cluster_run(run_dir, n_tokens=settings.eval_tokens // 2,
                           context_length=settings.context_length, progress=progress)
    write_cluster_outputs(*clusters, run_dir / "clusters")
    report = write_report(run_dir, run_dir / "report.html")
    timings["clusters_report_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - start

    ce = list(result["ce_recovered"].values())
    summary = {
        "settings": asdict(settings),
        "model": {
            "name": adapter.name,
            "family": adapter.family,
            "blocks": adapter.n_blocks,
            "d_model": adapter.d_model,
            "d_mlp": adapter.d_mlp,
        },
        "hookpoints": cache.hookpoints,
        "cache": str(out_dir / "cache"),
        "run": str(run_dir),
        "eval": str(run_dir / "eval" / "eval.json"),
        "fvu_mean": result["fvu_mean"],
        "fvu": result["fvu"],
        "l0": result["l0"],
        "dead_fraction": result["dead_fraction"],
        "dense_fraction": result["dense_fraction"],
        "ce_model": result["ce_model"],
        "ce_recovered_mean": sum(ce) / len(ce) if ce else None,
        "ce_recovered": result["ce_recovered"],
        "dominant_share": interactions["dominant_share"],
        "keep_dominant_gap": interactions["measured_gap"],
        "keep_dominant_bound": interactions["bound"],
        "interactions": str(run_dir / "interactions" / "interactions.json"),
        "clusters": {method: {"n_clusters": clusters[0]["n_clusters"][method],
                              "coherence": clusters[0]["coherence"][method]["score"],
                              "z": clusters[0]["coherence"][method]["z"]}
                     for method in clusters[0]["coherence"]},
        "report": str(report),
        "timings": {key: round(value, 1) for key, value in timings.items()},
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    t = summary["timings"]
    lines = [
        f"crosscoder over {len(summary['hookpoints'])} hookpoints of {summary['model']['name']} "
        f"({summary['model']['blocks']} blocks, d_model {summary['model']['d_model']})",
        f"  FVU (mean over hookpoints)  {summary['fvu_mean']:.4f}",
        f"  L0                          {summary['l0']:.1f}",
        f"  dead / dense features       {summary['dead_fraction']:.3f} / "
        f"{summary['dense_fraction']:.3f}",
        f"  CE loss of the model        {summary['ce_model']:.4f}",
    ]
    if summary["ce_recovered_mean"] is not None:
        lines.append(f"  CE recovered (mean resid)   {summary['ce_recovered_mean']:.3f}")
    lines += [
        f"  MLP dominant share          {summary['dominant_share']:.3f}",
        f"  keep-dominant error / bound {summary['keep_dominant_gap']:.3g} / "
        f"{summary['keep_dominant_bound']:.3g}",
        f"  time: harvest {t['harvest_s']}s, train {t['train_s']}s, eval {t['eval_s']}s, "
        f"interactions {t['interactions_s']}s, clusters + report {t['clusters_report_s']}s, "
        f"total {t['total_s']}s",
        f"  report: {summary['report']}",
    ]
    return "\n".join(lines)
