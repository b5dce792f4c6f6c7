"""`crossint attention RUN --out DIR`: attention feature interactions of a trained crosscoder on
held-out text (SPEC §5): the strict dominance test per head with its bound, the (query feature,
key feature) score table over the pairs that meet within the attention window, and the key
overlaps of query features."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.commands.interactions import parse_blocks
from crossint.rundir import ATTENTION


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="measure attention feature interactions of a trained crosscoder (SPEC §5)",
        description=(
            "Run the crosscoder's subject model on held-out text, encode its activations with "
            "the crosscoder, and split every attention head's queries and keys at "
            "blocks.{l}.attn_in into per-feature parts with the model's own weights (rotary "
            "positions and grouped-query attention included). Per head: the strict dominance "
            "test (one feature per query and per key position: ‖Δp‖₁, head-output error and "
            "the bound ‖Δp‖₁ ≤ 2‖Δscore‖∞), the score Q_ab of every (query feature, key "
            "feature) pair that meets within the window, sparse with counts, the pairs whose "
            "score departs most from the query feature's average (with example contexts), and "
            "the key overlap of co-active query features. Writes OUT/attention.json, "
            "OUT/attention_pairs.csv and three plots: attention_dominance.png, "
            "attention_pairs.png and attention_pattern.png."
        ),
        epilog="example: crossint attention runs/pen --blocks 1,2 --tokens 20000 --out "
               "runs/pen/attention",
    )
    common.add_run_arguments(parser, ATTENTION)
    group = parser.add_argument_group("attention measurement")
    common.add_heldout_text_arguments(group, tokens=20_000)
    group.add_argument("--blocks", help="comma-separated blocks to analyse (default: every "
                                        "block whose attn_in the crosscoder reads)")
    group.add_argument("--top-pairs", type=int, default=20,
                       help="feature pairs listed per head (default %(default)s)")
    group.add_argument("--examples", type=int, default=3,
                       help="example contexts per listed pair (default %(default)s)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(common.output_dir(args, ATTENTION), "attention"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.attention import analyse_attention, format_table, write_outputs

    result = analyse_attention(
        args.run_dir,
        common.heldout_request(args),
        blocks=parse_blocks(args.blocks),
        top_pairs=args.top_pairs,
        examples=args.examples,
        progress=not args.quiet,
    )
    paths = write_outputs(result, common.output_dir(args, ATTENTION))
    print(format_table(result))
    print(f"wrote {paths['json']}, {paths['pairs_csv'].name} and 3 plots")
    return 0
