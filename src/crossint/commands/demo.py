"""`crossint demo --out DIR`: the whole pipeline on the embedded story model."""

from __future__ import annotations

import argparse
from dataclasses import fields

from crossint.commands import common


def register(subparsers) -> None:
    from crossint.analysis.recipe import DemoSettings

    parser = subparsers.add_parser(
        "demo",
        help="end to end on the embedded story model: harvest, train, evaluate, interactions",
        description=(
            "Harvest paper-layout activations from the embedded story model, train a BatchTopK "
            "crosscoder on them, evaluate it on held-out stories, measure its features' "
            "interactions at the MLP neurons (DIR/crosscoder/interactions/), cluster them "
            "(DIR/crosscoder/clusters/), write the HTML report DIR/crosscoder/report.html and "
            "DIR/summary.json. "
            "Re-running the same command resumes an interrupted demo."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output directory")
    for f in fields(DemoSettings):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args) -> int:
    with common.locked_output(args.out, "demo"):
        return _run(args)


def _run(args) -> int:
    from crossint.analysis.demo import DemoSettings, format_summary, run_demo

    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    summary = run_demo(args.out, settings, progress=not args.quiet)
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json")
    return 0
