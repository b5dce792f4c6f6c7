"""`crossint bound RUN [RUN ...] --out DIR`: compact-proof bounds per MLP block and end to end
(SPEC §7): each verifier strategy's bound on each explanation's error, its FLOPs, and the bound
on |ΔCE| of the model with the explanation spliced in."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.rundir import BOUND


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bound",
        help="compact-proof bounds of a crosscoder's explanation of the MLPs (SPEC §7)",
        description=(
            "Run the subject model on held-out text and, for every block whose mlp_in the "
            "crosscoder reads, bound the error of three explanations of the MLP (full feature "
            "sum, keep-dominant, independent effects) with several verifier strategies "
            "(feature tables, the SPEC §4.3 Lipschitz bound, per-neuron intervals, exact "
            "neurons with a low-rank output bound, brute force), each checked against the "
            "measured error and costed in FLOPs per token. Then chain the block errors "
            "through attention and the norms to a bound on |ΔCE| per token of the model with "
            "every explained MLP spliced in (--no-chain skips it). Writes OUT/bound.json and "
            "OUT/bound_pareto.png (bound ÷ measured against verifier FLOPs, one point per run "
            "and strategy) and prints a table."
        ),
        epilog="examples: crossint bound runs/base --out runs/bound_base;  crossint bound "
               "runs/base runs/pen --tokens 10000 --out runs/bound_family",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN",
                        help="run directories (model.safetensors + config.json) of one model")
    parser.add_argument("--out", help="output directory (default with one run: RUN/bound)")
    common.add_heldout_text_arguments(parser, tokens=10_000)
    parser.add_argument("--blocks", help="comma-separated blocks to explain (default: every "
                                         "block whose mlp_in the crosscoder reads)")
    parser.add_argument("--no-chain", action="store_true",
                        help="per-block bounds only: skip the end-to-end |ΔCE| bound")
    parser.add_argument("--chunk-tokens", type=int,
                        help="tokens per chunk of the contribution tensors (default: automatic)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossint.errors import CrossintError
    from crossint.rundir import RunDir

    if args.out is None and len(args.run_dirs) > 1:
        raise CrossintError("give --out when bounding several runs")
    out = Path(args.out) if args.out else RunDir(args.run_dirs[0]).result_dir(BOUND)
    with common.locked_output(out, "bound"):
        return _run(args, out)


def _run(args: argparse.Namespace, out) -> int:  # noqa: ANN001
    from crossint.analysis.bounds import analyse_bounds, format_table, write_outputs
    from crossint.commands.interactions import parse_blocks

    document = analyse_bounds(
        args.run_dirs,
        common.heldout_request(args),
        blocks=parse_blocks(args.blocks),
        chain=not args.no_chain,
        chunk_tokens=args.chunk_tokens,
        progress=not args.quiet,
    )
    paths = write_outputs(document, out)
    print(format_table(document))
    print(f"wrote {paths['json']} and {paths['pareto'].name}")
    return 0
