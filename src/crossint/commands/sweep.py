"""`crossint sweep --activations CACHE --lambdas 0,100,1000 --out DIR`: one crosscoder per
interaction-penalty weight λ on the same cache and seed, each measured on held-out text; the
paper's Figure 1 (dominant share and reconstruction vs λ, pairwise interaction vs λ)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def _check_finished(run_dir: Path, cc_config, train_config, record: dict) -> None:  # noqa: ANN001
    """A finished run is re-used only if it was trained with exactly these settings."""
    from crossint.commands.train import PENALTY_CONFIG_KEY, recorded_penalty
    from crossint.crosscoder.train import read_run_configs
    from crossint.errors import CrossintError

    saved_cc, saved_tc = read_run_configs(run_dir)
    free = {"checkpoint_every", "log_every", "device"}
    differences = [
        f"{name}={saved[name]!r} (now {wanted[name]!r})"
        for saved, wanted in ((saved_cc.to_dict(), cc_config.to_dict()),
                              (saved_tc.to_dict(), train_config.to_dict()))
        for name in wanted if name not in free and saved.get(name) != wanted[name]
    ]
    saved_penalty = recorded_penalty(run_dir)
    if saved_penalty != record:
        differences.append(f"{PENALTY_CONFIG_KEY}={saved_penalty!r} (now {record!r})")
    if differences:
        raise CrossintError(
            f"{run_dir} holds a finished run with other settings: {', '.join(differences)}; "
            "use the same settings or a new --out"
        )


def run(args: argparse.Namespace) -> int:
    from crossint.analysis.sweep import (
        format_table,
        is_finished,
        lambda_dir,
        measure_run,
        parse_lambdas,
        sweep_entry,
        write_sweep,
    )
    from crossint.commands.train import (
        PENALTY_CONFIG_KEY,
        cache_blocks,
        load_penalty_mlps,
        new_configs,
        penalty_plugins,
        penalty_settings,
    )
    from crossint.crosscoder.train import train
    from crossint.data.cache import ActivationCache
    from crossint.errors import CrossintError
    from crossint.io import atomic_write_json

    lambdas = parse_lambdas(args.lambdas)
    if args.tokens < 1:
        raise CrossintError(f"--tokens must be positive, got {args.tokens}")
    cache = ActivationCache(args.activations)
    cc_config, train_config = new_configs(args, cache)
    blocks = cache_blocks(cache)
    # Every run (λ = 0 included) logs its dominant share, so the model is always needed.
    mlps = load_penalty_mlps(cache, device=train_config.device)
    out = Path(args.out)
    runs = []
    for value in lambdas:
        settings = penalty_settings(args, weight=value)
        record = settings.record(blocks)
        run_dir = lambda_dir(out, value)
        runs.append((value, run_dir))
        if is_finished(run_dir):
            _check_finished(run_dir, cc_config, train_config, record)
            print(f"λ={value:g}: finished run in {run_dir}, skipped")
            continue
        losses, metrics = penalty_plugins(settings, mlps, log=True)
        if not args.quiet:
            print(f"λ={value:g}: training {run_dir}")
        train(cc_config, train_config, cache, run_dir, resume=True, progress=not args.quiet,
              extra_losses=losses, extra_metrics=metrics,
              extra_config={PENALTY_CONFIG_KEY: record})
    rows = []
    for value, run_dir in runs:
        result = measure_run(
            run_dir, progress=not args.quiet, n_tokens=args.tokens, corpus=args.corpus,
            seed=args.text_seed, context_length=args.context_length,
            batch_size=args.text_batch_size, top_pairs=args.top_pairs,
            delta2_pairs=args.delta2_pairs, chunk_tokens=args.chunk_tokens,
            device=train_config.device,
        )
        rows.append(sweep_entry(value, run_dir, result))
    atomic_write_json(out / "sweep_config.json", {
        "activations": str(Path(args.activations).resolve()),
        "lambdas": lambdas,
        "crosscoder": cc_config.to_dict(),
        "train": train_config.to_dict(),
        "penalty": penalty_settings(args, weight=0.0).record(blocks),
        "measurement": {"tokens": args.tokens, "corpus": args.corpus, "seed": args.text_seed,
                        "context_length": args.context_length},
    })
    paths = write_sweep(rows, out)
    print(format_table(rows))
    print(f"wrote {paths['json']} and {paths['png'].name}")
    return 0
