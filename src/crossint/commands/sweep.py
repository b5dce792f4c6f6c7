"""`crossint sweep --activations CACHE --lambdas 0,100,1000 --out DIR`: one crosscoder per
interaction-penalty weight λ on the same cache and seed, each measured on held-out text; the
paper's Figure 1 (dominant share and reconstruction vs λ, pairwise interaction vs λ)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossint.commands import common
from crossint.commands.interactions import add_measurement_arguments
from crossint.commands.train import (
    add_crosscoder_arguments,
    add_optimisation_arguments,
    add_penalty_arguments,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train and measure one crosscoder per interaction-penalty weight λ",
        description=(
            "Train one crosscoder per λ in --lambdas on the same activation cache with the same "
            "settings and seed (SPEC §4.4 penalty λ·L_int), into DIR/lambda_<λ>/, then measure "
            "each on held-out text as `crossint interactions` does (into "
            "DIR/lambda_<λ>/interactions/). Writes DIR/sweep.json, a list of {lambda, "
            "dominant_share, recon_loss, fvu, pairwise_interaction, ...}, and DIR/sweep.png. "
            "Re-running skips finished runs and measurements and resumes interrupted runs from "
            "their last checkpoint. recon_loss is SPEC §3.3 L_rec on the held-out tokens in "
            "normalised units; pairwise_interaction is the SPEC §4.5 pairwise mass per token."
        ),
        epilog="example: crossint sweep --activations cache/ --lambdas 0,100,300,1000,3000 "
               "--steps 3000 --out runs/sweep",
    )
    parser.add_argument("--activations", required=True, metavar="CACHE_DIR",
                        help="activation cache directory (from `crossint harvest`) with "
                             "blocks.{l}.mlp_in hookpoints")
    parser.add_argument("--lambdas", required=True, metavar="L1,L2,...",
                        help="comma-separated penalty weights λ >= 0, e.g. 0,100,1000")
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep directory")
    add_crosscoder_arguments(parser)
    add_optimisation_arguments(parser)
    add_penalty_arguments(parser, with_lambda=False)
    add_measurement_arguments(parser, seed_flag="--text-seed", batch_flag="--text-batch-size")
    parser.add_argument("--fidelity-texts", type=int, metavar="N",
                        help="also measure each run's fidelity (SPEC §6.1, §4.7: Φ of every "
                             "scheme per block and with every block replaced at once) on N "
                             "held-out texts, into DIR/lambda_<λ>/fidelity/ and sweep.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def fidelity_request(args: argparse.Namespace, device: str):  # noqa: ANN201 (lazy import)
    """The held-out texts of --fidelity-texts (the measurement's corpus and seed), or None."""
    if args.fidelity_texts is None:
        return None
    return common.heldout_request(args, device=device, n_tokens=None,
                                  n_texts=args.fidelity_texts)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(args.out, "sweep"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.sweep import format_table, parse_lambdas, run_sweep
    from crossint.commands.train import (
        TRAIN_FLAGS,
        given,
        new_crosscoder_config,
        penalty_from_args,
    )
    from crossint.crosscoder.train import TrainConfig
    from crossint.data.cache import ActivationCache
    from crossint.rundir import SWEEP

    lambdas = parse_lambdas(args.lambdas)
    common.heldout_request(args, device="cpu")  # bad text flags fail before any training
    fidelity_request(args, "cpu")
    cache = ActivationCache(args.activations)
    cc_config = new_crosscoder_config(args, cache)
    train_config = TrainConfig(**given(args, TRAIN_FLAGS))
    measure = {"top_pairs": args.top_pairs, "delta2_pairs": args.delta2_pairs,
               "chunk_tokens": args.chunk_tokens}
    rows = run_sweep(cache, lambdas, cc_config, train_config, args.out,
                     penalty_from_args(args, weight=0.0),
                     common.heldout_request(args, device=train_config.device), measure=measure,
                     fidelity=fidelity_request(args, train_config.device),
                     progress=not args.quiet, log=print)
    print(format_table(rows))
    print(f"wrote {Path(args.out) / SWEEP.name} and {SWEEP.file('plot')}")
    return 0
