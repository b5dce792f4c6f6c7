"""`crossint independence RUN --out DIR`: how far a crosscoder's features are from
probabilistic independence (SPEC §8): co-activation PMI, magnitude correlations, and the error of
pushing independent per-feature distributions through each MLP."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.rundir import INDEPENDENCE


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "independence",
        help="deviation of a crosscoder's features from independence (SPEC §8)",
        description=(
            "Run the subject model on held-out text and encode it with the crosscoder. Reports "
            "the co-activation PMI of feature pairs (top pairs with counts and 95%% intervals), "
            "the correlation of their magnitudes when co-active, and, per block whose mlp_in "
            "the crosscoder reads, the Wasserstein distance per neuron between the MLP's output "
            "distribution under independent features (per-feature binned distributions of one "
            "half of the contexts, sampled independently) and the measured one (the other "
            "half), next to the floor between the two halves. Writes OUT/independence.json, "
            "OUT/pmi_pairs.csv and OUT/independence.png."
        ),
        epilog="example: crossint independence runs/base --tokens 10000 --out "
               "runs/independence_base",
    )
    common.add_run_arguments(parser, INDEPENDENCE)
    common.add_heldout_text_arguments(parser, tokens=10_000)
    parser.add_argument("--blocks", help="comma-separated blocks (default: every block whose "
                                         "mlp_in the crosscoder reads)")
    parser.add_argument("--bins", type=int, default=16,
                        help="histogram bins per feature (default %(default)s)")
    parser.add_argument("--top-pairs", type=int, default=50,
                        help="pairs listed, by the lower end of their PMI interval (default "
                             "%(default)s)")
    parser.add_argument("--min-count", type=int, default=5,
                        help="co-activations a listed pair needs (default %(default)s)")
    parser.add_argument("--sample-seed", type=int, default=0,
                        help="seed of the independent sample (default %(default)s)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = common.output_dir(args, INDEPENDENCE)
    with common.locked_output(out, "independence"):
        return _run(args, out)


def _run(args: argparse.Namespace, out) -> int:  # noqa: ANN001
    from crossint.analysis.independence import (
        analyse_independence,
        format_table,
        write_outputs,
    )
    from crossint.commands.interactions import parse_blocks

    result = analyse_independence(
        args.run_dir,
        common.heldout_request(args),
        blocks=parse_blocks(args.blocks),
        bins=args.bins,
        top_pairs=args.top_pairs,
        min_count=args.min_count,
        seed=args.sample_seed,
        progress=not args.quiet,
    )
    paths = write_outputs(result, out)
    print(format_table(result))
    print(f"wrote {paths['json']}, {paths['pairs_csv'].name} and {paths['distance'].name}")
    return 0
