"""The end-to-end demo on the embedded story model: harvest → train → eval → MLP interactions
→ clusters → HTML report, in minutes on a CPU (every stage resumable).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from crossint import rundir
from crossint.analysis.recipe import DemoSettings, harvest_and_train
from crossint.io import atomic_write_json
from crossint.rundir import RunDir

if TYPE_CHECKING:
    from crossint.models.adapter import ModelAdapter


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, progress: bool = True
) -> dict:
    """Run the demo into ``out_dir`` and return (and write) ``summary.json``."""
    settings = settings or DemoSettings()
    from crossint.analysis.clustering import cluster_run, write_cluster_outputs
    from crossint.analysis.evaluate import evaluate
    from crossint.analysis.interactions import analyse_interactions, write_outputs
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
    run = RunDir(run_dir)
    atomic_write_json(run.result(rundir.EVAL), result)
    timings["eval_s"] = time.perf_counter() - stage

    # The point of crossint: how far each MLP neuron is from one feature (SPEC §4).
    stage = time.perf_counter()
    interactions = analyse_interactions(
        run_dir,
        n_tokens=settings.eval_tokens // 2,
        context_length=settings.context_length,
        progress=progress,
    )
    write_outputs(interactions, run.result_dir(rundir.INTERACTIONS))
    timings["interactions_s"] = time.perf_counter() - stage

    # Clusters of interacting features (SPEC §10) and one HTML page of everything.
    stage = time.perf_counter()
    clusters = cluster_run(run_dir, n_tokens=settings.eval_tokens // 2,
                           context_length=settings.context_length, progress=progress)
    write_cluster_outputs(*clusters, run.result_dir(rundir.CLUSTERS))
    report = write_report(run_dir, run_dir / "report.html")
    timings["clusters_report_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - start

    summary = _summary(
        settings=settings, adapter=adapter, hookpoints=cache.hookpoints, out_dir=out_dir,
        run_dir=run_dir, result=result, interactions=interactions, clusters=clusters,
        report=report, timings=timings,
    )
    atomic_write_json(out_dir / rundir.SUMMARY.name, summary)
    return summary


def _summary(*, settings: DemoSettings, adapter: ModelAdapter, hookpoints: list[str],
             out_dir: Path, run_dir: Path, result: dict, interactions: dict, clusters: tuple,
             report: Path, timings: dict[str, float]) -> dict:
    """``summary.json``: the settings, the model, where every output is and the headline
    numbers of each stage."""
    run = RunDir(run_dir)
    ce = list(result["ce_recovered"].values())
    return {
        "settings": asdict(settings),
        "model": {
            "name": adapter.name,
            "family": adapter.family,
            "blocks": adapter.n_blocks,
            "d_model": adapter.d_model,
            "d_mlp": adapter.d_mlp,
        },
        "hookpoints": hookpoints,
        "cache": str(out_dir / "cache"),
        "run": str(run_dir),
        "eval": str(run.result(rundir.EVAL)),
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
        "interactions": str(run.result(rundir.INTERACTIONS)),
        "clusters": {method: {"n_clusters": clusters[0]["n_clusters"][method],
                              "coherence": clusters[0]["coherence"][method]["score"],
                              "z": clusters[0]["coherence"][method]["z"]}
                     for method in clusters[0]["coherence"]},
        "report": str(report),
        "timings": {key: round(value, 1) for key, value in timings.items()},
    }


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
