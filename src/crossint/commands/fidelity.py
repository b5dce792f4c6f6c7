"""`crossint fidelity RUN [RUN ...] --block L --out DIR`: keep/drop-feature schemes at one MLP,
spliced back into the model (SPEC §6.1), for several runs on the same held-out texts."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossint.commands.common import add_analysis_run_arguments, add_heldout_text_arguments
from crossint.rundir import FIDELITY


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
    add_heldout_text_arguments(parser, texts=200)
    parser.add_argument("--scheme-seed", type=int, default=0,
                        help="seed of drop_random and of the bootstrap (default %(default)s)")
    add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.analysis.fidelity import SCHEMES, fidelity, format_table
    from crossint.commands.common import heldout_request
    from crossint.io import atomic_write_json
    from crossint.report.plots import plot_fidelity

    result = fidelity(
        args.run_dirs,
        heldout_request(args),
        blocks=None if args.all_blocks else [args.block],
        scheme_seed=args.scheme_seed,
        progress=not args.quiet,
    )
    out_dir = Path(args.out)
    json_path = atomic_write_json(out_dir / FIDELITY.name, result)
    blocks = [b["block"] for b in next(iter(result.values()))["per_block"]]
    phi, ci = {}, {}
    for block in blocks:
        panel = f"block {block}"
        for name, entry in result.items():
            summary = next(b for b in entry["per_block"] if b["block"] == block)
            phi.setdefault(panel, {})[name] = [summary["phi"][s] for s in SCHEMES]
            ci.setdefault(panel, {})[name] = [summary["phi_ci"][s] for s in SCHEMES]
    plot_fidelity(SCHEMES, phi, ci, out_dir / FIDELITY.file("plot"))
    print(format_table(result))
    print(f"wrote {json_path} and {out_dir / 'fidelity.png'}")
    return 0
