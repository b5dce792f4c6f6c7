"""`crossint eval RUN_DIR --out DIR`: standard metrics and CE-loss recovered on held-out text."""

from __future__ import annotations

from pathlib import Path

from crossint.commands.common import add_analysis_run_arguments, add_heldout_text_arguments
from crossint.rundir import EVAL, RunDir


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
    parser.add_argument(
        "run_dir", metavar="RUN", help="run directory with model.safetensors + config.json"
    )
    parser.add_argument("--out", help="output directory (default: RUN/eval)")
    add_heldout_text_arguments(parser, tokens=20_000)
    add_analysis_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from crossint.analysis.evaluate import evaluate, format_table
    from crossint.commands.common import heldout_request
    from crossint.io import atomic_write_json

    result = evaluate(args.run_dir, heldout_request(args), progress=not args.quiet)
    out_dir = Path(args.out) if args.out else RunDir(args.run_dir).result_dir(EVAL)
    atomic_write_json(out_dir / EVAL.name, result)
    print(format_table(result))
    print(f"wrote {out_dir / 'eval.json'}")
    return 0
