"""`crossint train`: train a crosscoder on a harvested activation cache (SPEC §3)."""

from __future__ import annotations

import argparse

from crossint.errors import CrossintError

# CLI flag -> (config object, field). Flags default to None so a resume can tell which ones the
# user actually gave (those must agree with the run being resumed).
_CROSSCODER_FLAGS = {
    "features": "n_features",
    "k": "k",
    "activation": "activation",
    "aux_k": "aux_k",
    "dead_tokens": "dead_tokens",
    "l1_coefficient": "l1_coefficient",
    "l0_coefficient": "l0_coefficient",
    "jumprelu_bandwidth": "jumprelu_bandwidth",
    "jumprelu_threshold": "jumprelu_init_threshold",
    "train_decoder_bias": "train_decoder_bias",
    "center_inputs": "center_inputs",
    "init_encoder_bias": "init_encoder_bias",
}
_TRAIN_FLAGS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "grad_clip": "grad_clip",
    "aux_alpha": "aux_alpha",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
    "normalisation_tokens": "normalisation_tokens",
    "device": "device",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a crosscoder on an activation cache",
        description=(
            "Train an acausal crosscoder (SPEC §3) on the activations in CACHE_DIR (made by "
            "`crossint harvest`). The run directory gets config.json (settings, the cache path "
            "and the model id), metrics.jsonl, checkpoint/ and, when training ends, the folded "
            "crosscoder (model.safetensors + config.json). Interrupted runs continue exactly "
            "with --resume."
        ),
        epilog=(
            "example: crossint train --activations cache/ --features 2048 --k 20 "
            "--activation batchtopk --steps 3000 --out runs/base"
        ),
    )
    parser.add_argument("--activations", required=True, metavar="CACHE_DIR",
                        help="activation cache directory (from `crossint harvest`)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR from its last checkpoint; settings "
                             "default to the run's own")
    group = parser.add_argument_group("crosscoder")
    group.add_argument("--features", type=int, metavar="H",
                       help="dictionary size H (default 2048)")
    group.add_argument("--k", type=int, metavar="K",
                       help="active features per token for topk/batchtopk, < H (default 20)")
    group.add_argument("--activation", metavar="NAME",
                       help="topk, batchtopk (default), jumprelu or relu (with L1)")
    group.add_argument("--aux-k", type=int, help="AuxK features (default: D/2 x positions)")
    group.add_argument("--dead-tokens", type=int,
                       help="tokens without firing before a feature counts as dead "
                            "(default: min(2M, 10%% of training))")
    group.add_argument("--l1-coefficient", type=float,
                       help="relu: decoder-norm-weighted L1 coefficient (default 5)")
    group.add_argument("--l0-coefficient", type=float,
                       help="jumprelu: L0 coefficient (default 0.1)")
    group.add_argument("--jumprelu-bandwidth", type=float,
                       help="jumprelu: straight-through kernel width (default 0.001)")
    group.add_argument("--jumprelu-threshold", type=float,
                       help="jumprelu: initial threshold (default 0.001)")
    group.add_argument("--train-decoder-bias", action="store_const", const=True, default=None,
                       help="train the decoder bias (default: frozen)")
    group.add_argument("--no-center", dest="center_inputs", action="store_const", const=False,
                       default=None,
                       help="do not centre the encoder's input on the activations' mean; with "
                            "this the decoder bias is frozen at zero, as in the paper")
    group.add_argument("--init-encoder-bias", metavar="{zero,calibrated}",
                       help="encoder bias at init: zero (default) or calibrated so each feature "
                            "fires on about K/H of tokens")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, help="training steps (default 3000)")
    group.add_argument("--batch-size", type=int, help="tokens per step (default 1024)")
    group.add_argument("--lr", type=float,
                       help="peak Adam learning rate (default 1e-3; the paper used 1e-4)")
    group.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    group.add_argument("--grad-clip", type=float, help="gradient-norm clip (default 1.0)")
    group.add_argument("--aux-alpha", type=float, help="AuxK loss weight (default 1/32)")
    group.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (500)")
    group.add_argument("--log-every", type=int, help="steps between metrics lines (10)")
    group.add_argument("--normalisation-tokens", type=int,
                       help="tokens used to estimate the normalisation (default 200000)")
    group.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in flags.items()
            if getattr(args, flag) is not None}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import (
        CONFIG_NAME,
        TrainConfig,
        checkpoint_path,
        read_run_configs,
        train,
    )
    from crossint.data.activations import ActivationCache

    cache = ActivationCache(args.activations)
    out = Path(args.out)
    cc_changes = _given(args, _CROSSCODER_FLAGS)
    tc_changes = _given(args, _TRAIN_FLAGS)
    if args.resume and (checkpoint_path(out).is_file() or (out / CONFIG_NAME).is_file()):
        # The run's own settings; any flag given must agree (train() checks and says which).
        cc_config, train_config = read_run_configs(out)
        cc_config = cc_config.replace(**cc_changes)
        train_config = train_config.replace(**tc_changes)
    else:
        widths = sorted(set(cache.dims.values()))
        if len(widths) != 1:
            detail = ", ".join(f"{h}: {d}" for h, d in cache.dims.items())
            raise CrossintError(
                f"activation cache {cache.path} mixes hookpoint widths ({detail}); a crosscoder "
                "needs one width: harvest hookpoints of one width (e.g. the paper or resid layout)"
            )
        cc_config = CrosscoderConfig(
            hookpoints=list(cache.hookpoints),
            models=[cache.model],
            d_model=widths[0],
            **cc_changes,
        )
        train_config = TrainConfig(**tc_changes)
    crosscoder = train(cc_config, train_config, cache, out, resume=args.resume,
                       progress=not args.quiet)
    metrics = _last_metrics(out)
    summary = ", ".join(f"{key} {metrics[key]:.4g}" for key in ("fvu", "l0", "dead_fraction")
                        if isinstance(metrics.get(key), (int, float)))
    cfg = crosscoder.config
    print(f"trained {cfg.n_features}-feature {cfg.trained_activation or cfg.activation} "
          f"crosscoder over {cfg.n_positions} positions -> {out}"
          + (f" ({summary})" if summary else ""))
    return 0


def _last_metrics(out) -> dict:
    import json

    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1]) if lines else {}
