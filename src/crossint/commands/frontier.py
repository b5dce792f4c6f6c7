"""`crossint frontier SWEEP [SWEEP ...] --out FILE.png`: compare λ sweeps by the price of a
dominant share, L_rec / L_rec(λ = 0), on one plot (the sweep target of SPEC §4.4 / §12)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "frontier",
        help="plot dominant share against reconstruction cost for one or more λ sweeps",
        description=(
            "Read SWEEP/sweep.json of each sweep (from `crossint sweep`; each needs a λ = 0 run), "
            "divide every run's held-out L_rec by its own sweep's λ = 0 L_rec, and plot the "
            "dominant share against that ratio, one line per sweep, with the target region "
            "shaded. Writes FILE.png and FILE.json (the points, the best share within the "
            "target ratio per sweep, and whether the target is met) and prints a table."
        ),
        epilog="example: crossint frontier runs/sweep runs/sweep_h256 --labels 'H 1536,H 256' "
               "--paper --out runs/frontier.png",
    )
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep directory")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="output plot")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="comma-separated legend labels, one per sweep (default: the "
                             "directory names)")
    parser.add_argument("--target-share", type=float, default=0.8,
                        help="dominant share to reach (default %(default)s)")
    parser.add_argument("--target-ratio", type=float, default=1.3,
                        help="largest L_rec / L_rec(λ = 0) allowed (default %(default)s)")
    parser.add_argument("--paper", action="store_true",
                        help="add the paper's Figure 1 curve (SPEC §12, TinyStories-Instruct-33M)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.analysis.sweep import PAPER_FIGURE1, best_share_within, frontier, read_sweep
    from crossint.errors import CrossintError
    from crossint.io import atomic_write_json
    from crossint.report.plots import plot_frontier

    labels = args.labels.split(",") if args.labels else [Path(s).name for s in args.sweeps]
    if len(labels) != len(args.sweeps):
        raise CrossintError(f"--labels has {len(labels)} labels for {len(args.sweeps)} sweeps")
    if len(set(labels)) != len(labels):
        raise CrossintError(f"each sweep needs its own label, got {labels}: pass --labels "
                            "(the default labels are the directory names)")
    if not 0 < args.target_share <= 1 or not args.target_ratio > 0:
        raise CrossintError("--target-share must be in (0, 1] and --target-ratio positive, got "
                            f"{args.target_share} and {args.target_ratio}")
    curves = {label: frontier(read_sweep(sweep), where=str(sweep))
              for label, sweep in zip(labels, args.sweeps, strict=True)}
    if args.paper:
        rows = [{"lambda": lam, "dominant_share": share, "recon_loss": loss}
                for lam, share, loss in PAPER_FIGURE1]
        curves["paper (SPEC §12)"] = frontier(rows, where="the paper's Figure 1")
    summary = {}
    print(f"{'sweep':<24}{'best share ≤ ' + format(args.target_ratio, 'g') + '×':>20}"
          f"{'at ratio':>10}{'target met':>12}")
    for label, points in curves.items():
        best = best_share_within(points, args.target_ratio)
        met = best is not None and best["dominant_share"] >= args.target_share
        summary[label] = {"points": points, "best_within_ratio": best, "target_met": met}
        share = f"{best['dominant_share']:.3f} (λ {best['lambda']:g})" if best else "none"
        ratio = f"{best['recon_ratio']:.3f}" if best else "-"
        print(f"{label:<24}{share:>20}{ratio:>10}{'yes' if met else 'no':>12}")
    out = Path(args.out)
    plot_frontier(curves, out, args.target_share, args.target_ratio)
    document = {"sweeps": dict(zip(labels, map(str, args.sweeps), strict=True)),
                "target_share": args.target_share, "target_ratio": args.target_ratio,
                "curves": summary}
    written = atomic_write_json(out.with_suffix(".json"), document)
    print(f"wrote {out} and {written.name}")
    return 0
