"""`crossint interactions RUN --out DIR`: MLP feature interactions of a trained crosscoder on
held-out text (SPEC §4): dominant share, keep-dominant bound and gap, top pairs, Δ² validation."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.rundir import INTERACTIONS


def parse_blocks(text: str | None) -> list[int] | None:
    """``"0,2"`` -> [0, 2]; None stays None (all mlp_in blocks)."""
    from crossint.errors import CrossintError

    if text is None:
        return None
    try:
        blocks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CrossintError(
            f"--blocks must be comma-separated block numbers such as 0,2, got {text!r}"
        ) from None
    if not blocks or min(blocks) < 0:
        raise CrossintError(f"--blocks must list block numbers >= 0, got {text!r}")
    return blocks


def add_measurement_arguments(parser: argparse.ArgumentParser, seed_flag: str = "--seed",
                              batch_flag: str = "--batch-size") -> None:
    """Held-out text and pair settings, shared with `crossint sweep` (which names the seed and
    batch-size flags differently: its own --seed and --batch-size are the training ones)."""
    group = parser.add_argument_group("interaction measurement")
    common.add_heldout_text_arguments(group, tokens=50_000, seed_flag=seed_flag,
                                      batch_flag=batch_flag)
    group.add_argument("--top-pairs", type=int, default=50,
                       help="pairs listed in interactions.json and top_pairs.csv "
                            "(default %(default)s)")
    group.add_argument("--delta2-pairs", type=int, default=50,
                       help="top pairs over which the cheap measures are rank-correlated with "
                            "the exact second difference Δ² (SPEC §4.6; default %(default)s)")
    group.add_argument("--chunk-tokens", type=int,
                       help="tokens per chunk of the contribution tensors (default: automatic)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "interactions",
        help="measure MLP feature interactions of a trained crosscoder (SPEC §4)",
        description=(
            "Run the crosscoder's subject model on held-out text, encode its activations with "
            "the crosscoder, and decompose every MLP neuron's pre-activation into per-feature "
            "contributions using the model's own MLP weights (SPEC §4.1). Writes "
            "OUT/interactions.json (dominant_share, nondominant, bound, measured_gap, per_block, "
            "top_pairs, delta2_spearman, pairwise_interaction, recon_loss, fvu), "
            "OUT/top_pairs.csv and three plots: dominant_share_hist.png, "
            "interaction_location.png and top_pairs.png. The crosscoder must read "
            "blocks.{l}.mlp_in of every analysed block."
        ),
        epilog="example: crossint interactions runs/pen --tokens 50000 --out "
               "runs/pen/interactions",
    )
    common.add_run_arguments(parser, INTERACTIONS)
    add_measurement_arguments(parser)
    parser.add_argument("--blocks", help="comma-separated blocks to analyse (default: every "
                                         "block whose mlp_in the crosscoder reads)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(common.output_dir(args, INTERACTIONS), "interactions"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.interactions import analyse_interactions, format_table, write_outputs

    result = analyse_interactions(
        args.run_dir,
        common.heldout_request(args),
        blocks=parse_blocks(args.blocks),
        top_pairs=args.top_pairs,
        delta2_pairs=args.delta2_pairs,
        chunk_tokens=args.chunk_tokens,
        progress=not args.quiet,
    )
    paths = write_outputs(result, common.output_dir(args, INTERACTIONS))
    print(format_table(result))
    print(f"wrote {paths['json']}, {paths['pairs_csv'].name} and 3 plots")
    return 0
