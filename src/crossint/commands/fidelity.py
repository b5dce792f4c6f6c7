"""`crossint fidelity RUN [RUN ...] --block L --out DIR`: keep/drop-feature schemes at one MLP,
spliced back into the model (SPEC §6.1), for several runs on the same held-out texts."""

from __future__ import annotations

import argparse

from crossint.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fidelity",
        help="how much of an MLP's work survives with one feature per neuron (SPEC §6.1)",
        description=(
            "Rebuild block L's MLP from each crosscoder's features under the schemes none, "
            "drop_random, drop_second, drop_largest, keep_largest and zero (features ranked by "
            "their |contribution| per token and neuron), write â(resid_mid) + MLP_scheme over "
            "resid_post, finish the forward pass, and report the fidelity "
            "Φ = 1 − (L_scheme − L_model)/(L_zero − L_model) with 95% bootstrap intervals over "
            "texts and the keep ratio Φ_keep_largest/Φ_none. Every run is measured on the same "
            "held-out texts. Writes OUT/fidelity.json and OUT/fidelity.png (grouped bars, one "
            "panel per block) and prints a table. Each run must read blocks.L.resid_mid and "
            "blocks.L.mlp_in (the paper layout does)."
        ),
        epilog="examples: crossint fidelity runs/base runs/pen --block 1 --texts 200 "
               "--out runs/fid;  crossint fidelity runs/base runs/pen --all-blocks --out "
               "runs/fid_all",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN",
                        help="run directories (model.safetensors + config.json) of one model")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--block", type=int, metavar="L", help="the block whose MLP is rebuilt")
    where.add_argument("--all-blocks", action="store_true",
                       help="every block that all runs can rebuild, one at a time")
    parser.add_argument("--out", required=True, help="output directory")
    common.add_heldout_text_arguments(parser, texts=200)
    parser.add_argument("--scheme-seed", type=int, default=0,
                        help="seed of drop_random and of the bootstrap (default %(default)s)")
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(args.out, "fidelity"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.fidelity import fidelity, format_table, write_outputs

    result = fidelity(
        args.run_dirs,
        common.heldout_request(args),
        blocks=None if args.all_blocks else [args.block],
        scheme_seed=args.scheme_seed,
        progress=not args.quiet,
    )
    paths = write_outputs(result, args.out)
    print(format_table(result))
    print(f"wrote {paths['json']} and {paths['plot'].name}")
    return 0
