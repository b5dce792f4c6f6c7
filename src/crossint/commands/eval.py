"""`crossint eval RUN_DIR --out DIR`: standard metrics and CE-loss recovered on held-out text."""

from __future__ import annotations

from crossint.commands import common
from crossint.rundir import EVAL


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a trained crosscoder on held-out text (FVU, L0, dead/dense, CE recovered)",
        description=(
            "Run the crosscoder's subject model on held-out text, reconstruct every hookpoint, "
            "and splice each residual-stream reconstruction back into the model. Writes "
            "OUT/eval.json with keys fvu (per hookpoint), l0, dead_fraction, dense_fraction, "
            "ce_recovered (per resid hookpoint, zero-ablation baseline) and "
            "ce_recovered_mean_ablation, and prints a table."
        ),
    )
    common.add_run_arguments(parser, EVAL)
    common.add_heldout_text_arguments(parser, tokens=20_000)
    common.add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    with common.locked_output(common.output_dir(args, EVAL), "eval"):
        return _run(args)


def _run(args) -> int:
    from crossint.analysis.evaluate import evaluate, format_table
    from crossint.io import atomic_write_json

    result = evaluate(args.run_dir, common.heldout_request(args), progress=not args.quiet)
    path = atomic_write_json(common.output_dir(args, EVAL) / EVAL.name, result)
    print(format_table(result))
    print(f"wrote {path}")
    return 0
