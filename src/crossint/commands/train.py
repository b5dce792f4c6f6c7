"""`crossint train`: train a crosscoder on a harvested activation cache (SPEC §3), optionally with
the MLP interaction penalty (SPEC §4.4).

The argument groups and the config/penalty plumbing here are shared with `crossint sweep`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from crossint.errors import CrossintError

if TYPE_CHECKING:
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import TrainConfig
    from crossint.data.cache import ActivationCache
    from crossint.interactions.penalty import Penalty

# CLI flag -> (config object, field). Flags default to None so a resume can tell which ones the
# user actually gave (those must agree with the run being resumed).
CROSSCODER_FLAGS = {
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
TRAIN_FLAGS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "grad_clip": "grad_clip",
    "aux_alpha": "aux_alpha",
    "penalty_warmup": "extra_loss_warmup",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
    "normalisation_tokens": "normalisation_tokens",
    "device": "device",
}


# --- shared argument groups --------------------------------------------------------------------
def add_crosscoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The crosscoder's architecture flags (all default to None: the config's defaults)."""
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


def add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimiser and schedule flags (all default to None: TrainConfig's defaults)."""
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


# Kept here so that `--help` never imports torch; a test checks they match the penalty registry.
PENALTY_KINDS_HELP = (
    "dominance (default: SPEC §4.4, the paper's non-dominant input S − Mx), keep_error (the MLP "
    "output error of keeping only each neuron's dominant feature) or additivity (the MLP output "
    "error of adding up each feature's effect alone; SPEC §4.7)"
)
PENALTY_OPTION_FLAGS = ("sample", "weighting", "normalise")  # --penalty-X sets option X of the kind


def add_penalty_arguments(parser: argparse.ArgumentParser, with_lambda: bool = True) -> None:
    """Interaction-penalty flags (``with_lambda``: also --interaction-penalty). Each option flag
    --penalty-X sets option X of the chosen kind (``crossint.interactions.penalty``)."""
    group = parser.add_argument_group("interaction penalty (SPEC §4.4)")
    if with_lambda:
        group.add_argument("--interaction-penalty", type=float, metavar="LAMBDA",
                           help="weight λ of the MLP interaction penalty L_int (default 0: "
                                "none); needs blocks.{l}.mlp_in hookpoints and the subject model")
    group.add_argument("--penalty-kind", metavar="KIND",
                       help=f"what L_int measures: {PENALTY_KINDS_HELP}")
    group.add_argument("--penalty-weighting", choices=("uniform", "w_out"),
                       help="dominance: weight each neuron's S - Mx by 1 (uniform, default) or "
                            "by ||W_out[n]|| (the compact-proof bound of SPEC §4.3)")
    group.add_argument("--penalty-normalise", nargs="?", const="total", default=None,
                       choices=("none", "total", "neuron", "effect"),
                       metavar="{total,neuron,effect}",
                       help="dominance: make L_int scale-free so λ is comparable across models: "
                            "'total' (the flag alone) divides by the total contribution ΣS "
                            "(L_int = 1 - the mass-weighted dominant share); 'neuron' averages "
                            "(S - Mx)/S over tokens and neurons (L_int = 1 - the dominant share). "
                            "keep_error, additivity: 'effect' divides each block's error by its "
                            "features' whole effect on the MLP ‖MLP(x̂) − MLP(c)‖², so that "
                            "shrinking the features does not pay and every block counts alike")
    group.add_argument("--penalty-sample", type=float, metavar="FRACTION",
                       help="compute L_int on this fraction of each batch's tokens (default 1: "
                            "all): an unbiased estimate at that fraction of the penalty's cost")
    group.add_argument("--penalty-warmup", type=float, metavar="FRACTION",
                       help="ramp λ linearly from 0 over this fraction of the steps (default 0: "
                            "full λ from the first step)")
    if with_lambda:
        group.add_argument("--log-interactions", action="store_true",
                           help="log the dominant share and the unweighted L_int even when λ = 0 "
                                "(loads the subject model)")


def penalty_from_args(args: argparse.Namespace, weight: float | None = None,
                      recorded: Penalty | None = None) -> Penalty:
    """The penalty the flags ask for. Flags not given fall back to ``recorded`` (a resumed run's
    penalty, if of the same kind), then to the defaults; ``weight`` overrides
    --interaction-penalty. A flag for an option the kind does not have is an error."""
    from crossint.interactions.penalty import DEFAULT_KIND, make_penalty

    kind = args.penalty_kind or (recorded.kind if recorded is not None else DEFAULT_KIND)
    base = recorded if recorded is not None and recorded.kind == kind else None
    if weight is None:
        weight = getattr(args, "interaction_penalty", None)
    if weight is None:
        weight = base.weight if base is not None else 0.0
    options = base.options() if base is not None else {}
    options.update({name: getattr(args, f"penalty_{name}") for name in PENALTY_OPTION_FLAGS
                    if getattr(args, f"penalty_{name}", None) is not None})
    return make_penalty(kind, weight, **options)


def given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The config fields whose flags the user gave."""
    return {field: getattr(args, flag) for flag, field in flags.items()
            if getattr(args, flag, None) is not None}


def new_configs(
    args: argparse.Namespace, cache: ActivationCache
) -> tuple[CrosscoderConfig, TrainConfig]:
    """Fresh crosscoder and training configs for ``cache`` from the flags given."""
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import TrainConfig

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
        **given(args, CROSSCODER_FLAGS),
    )
    return cc_config, TrainConfig(**given(args, TRAIN_FLAGS))


# --- the command -------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a crosscoder on an activation cache",
        description=(
            "Train an acausal crosscoder (SPEC §3) on the activations in CACHE_DIR (made by "
            "`crossint harvest`). The run directory gets config.json (settings, the cache path "
            "and the model id, the interaction penalty), metrics.jsonl, checkpoint/ and, when "
            "training ends, the folded crosscoder (model.safetensors + config.json). "
            "Interrupted runs continue exactly with --resume. With --interaction-penalty λ > 0 "
            "the loss adds λ·L_int (SPEC §4.4), computed with the subject model's own MLP "
            "weights at every block whose mlp_in the crosscoder reads; metrics.jsonl then logs "
            "`interaction` (λ·L_int), `interaction_penalty` (L_int) and `dominant_share`."
        ),
        epilog=(
            "example: crossint train --activations cache/ --features 2048 --k 20 "
            "--activation batchtopk --steps 3000 --interaction-penalty 1000 --out runs/pen"
        ),
    )
    parser.add_argument("--activations", required=True, metavar="CACHE_DIR",
                        help="activation cache directory (from `crossint harvest`)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR from its last checkpoint; settings "
                             "default to the run's own (RUN_DIR must hold a run: the cache "
                             "must be the one it started on, moved or copied caches are fine)")
    add_crosscoder_arguments(parser)
    add_optimisation_arguments(parser)
    add_penalty_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.commands.common import locked_output
    from crossint.rundir import RunDir

    if args.resume and not RunDir(args.out).has_run():
        # The rule of harvest --resume too: --resume continues something or stops.
        raise CrossintError(f"--resume: {args.out} holds no training run to continue; leave out "
                            "--resume to start one")
    with locked_output(args.out, "train"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.crosscoder.train import read_run_configs
    from crossint.data.cache import ActivationCache
    from crossint.interactions.penalty import run_penalty, train_with_penalty
    from crossint.rundir import RunDir

    cache = ActivationCache(args.activations)
    run_dir = RunDir(args.out)
    if args.resume and (run_dir.checkpoint.is_file() or run_dir.config.is_file()):
        # The run's own settings; any flag given must agree (train() checks and says which).
        cc_config, train_config = read_run_configs(run_dir.path)
        cc_config = cc_config.replace(**given(args, CROSSCODER_FLAGS))
        train_config = train_config.replace(**given(args, TRAIN_FLAGS))
        penalty = penalty_from_args(args, recorded=run_penalty(run_dir.path))
    else:
        cc_config, train_config = new_configs(args, cache)
        penalty = penalty_from_args(args)
    crosscoder = train_with_penalty(
        cc_config, train_config, cache, run_dir.path, penalty, resume=args.resume,
        log_interactions=args.log_interactions, progress=not args.quiet,
    )
    last = run_dir.last_metrics()
    summary = ", ".join(f"{key} {last[key]:.4g}"
                        for key in ("fvu", "l0", "dead_fraction", "dominant_share")
                        if isinstance(last.get(key), (int, float)))
    cfg = crosscoder.config
    with_penalty = f" with interaction penalty {penalty.describe()}" if penalty.weight > 0 else ""
    print(f"trained {cfg.n_features}-feature {cfg.trained_activation or cfg.activation} "
          f"crosscoder over {cfg.n_positions} positions{with_penalty} -> {run_dir.path}"
          + (f" ({summary})" if summary else ""))
    return 0
