"""`crossint frontier SWEEP [SWEEP ...] --out FILE.png`: what λ sweeps buy against what it costs,
on one plot: any interaction or fidelity measure against a reconstruction cost."""

from __future__ import annotations

import argparse
from pathlib import Path

COSTS_HELP = ("recon_ratio (held-out L_rec / the sweep's λ = 0 L_rec; default), mlp_in_fvu "
              "(held-out FVU at the mlp_in hookpoints, where the penalties act), recon_loss, fvu")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "frontier",
        help="plot an interaction or fidelity measure against reconstruction cost for λ sweeps",
        description=(
            "Read SWEEP/sweep.json of each sweep (from `crossint sweep`) and plot --measure "
            "against --cost, one line per sweep (any penalty kinds), each point labelled with "
            "its λ, the target region shaded and, with --paper, the paper's points where it "
            "reports the measure. Measures: any number of a sweep row (dominant_share, "
            "additivity_error, pairwise_interaction, fvu, ...) or, for sweeps run with "
            "--fidelity-texts, phi_<scheme>@<block> (e.g. phi_keep_largest@1, "
            "phi_independent@all: every block replaced at once) and keep_ratio@<block>. "
            "Writes FILE.png and FILE.json (the points, the best value within the target cost "
            "per sweep, whether the target is met) and prints a table."
        ),
        epilog="example: crossint frontier runs/sweep_dominance runs/sweep_additivity --measure "
               "phi_independent@all --target 0.7 --out runs/frontier_ind.png",
    )
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep directory")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="output plot")
    parser.add_argument("--measure", default="dominant_share", metavar="NAME",
                        help="what the penalty buys (default %(default)s)")
    parser.add_argument("--cost", default="recon_ratio", metavar="NAME", help=COSTS_HELP)
    parser.add_argument("--labels", metavar="A,B,...",
                        help="comma-separated legend labels, one per sweep (default: the "
                             "directory names)")
    parser.add_argument("--target", "--target-share", dest="target", type=float, default=0.8,
                        help="value the measure should reach (default %(default)s)")
    parser.add_argument("--target-cost", "--target-ratio", dest="target_cost", type=float,
                        default=1.3, help="largest cost allowed (default %(default)s)")
    parser.add_argument("--paper", action="store_true",
                        help="add the paper's points (SPEC §12: the dominant share, and Φ at "
                             "block 1, against the L_rec ratio)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.analysis.frontier import compare_sweeps, format_comparison, write_comparison
    from crossint.errors import CrossintError

    labels = args.labels.split(",") if args.labels else [Path(s).name for s in args.sweeps]
    if len(labels) != len(args.sweeps):
        raise CrossintError(f"--labels has {len(labels)} labels for {len(args.sweeps)} sweeps")
    if len(set(labels)) != len(labels):
        raise CrossintError(f"each sweep needs its own label, got {labels}: pass --labels "
                            "(the default labels are the directory names)")
    document = compare_sweeps(dict(zip(labels, args.sweeps, strict=True)), args.measure,
                              args.cost, args.target, args.target_cost, args.paper)
    print(format_comparison(document))
    paths = write_comparison(document, args.out)
    print(f"wrote {paths['png']} and {paths['json'].name}")
    return 0
