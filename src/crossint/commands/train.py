"""`crossint train`: train a crosscoder on a harvested activation cache, or on activations
streamed from the model (``crossint.data.stream``) (SPEC §3), optionally with the MLP
interaction penalty (SPEC §4.4).

The argument groups and the config/penalty plumbing here are shared with `crossint sweep`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from crossint.errors import CrossintError

if TYPE_CHECKING:
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.source import ActivationSource
    from crossint.crosscoder.train import TrainConfig
    from crossint.data.cache import ActivationCache
    from crossint.data.stream import StreamingActivations
    from crossint.interactions.penalty import Penalty
    from crossint.rundir import RunDir

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
    "autocast": "autocast",
    "data_parts": "data_parts",
}
# Streaming flag -> StreamingActivations argument (with --model instead of --activations).
STREAM_FLAGS = {
    "corpus": "corpus",
    "text_field": "text_field",
    "context_length": "context_length",
    "model_batch_size": "batch_size",
    "buffer_tokens": "buffer_tokens",
    "include_special": "include_special",
    "model_dtype": "model_dtype",
}
STREAM_DEFAULTS = {"corpus": "stories", "text_field": "text", "context_length": 128,
                   "batch_size": 32, "seed": 0, "include_special": False,
                   "model_dtype": "float32"}


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
    group.add_argument("--autocast", choices=["bfloat16"],
                       help="mixed precision: forward pass and loss in bfloat16 under "
                            "torch.autocast (parameters and optimiser stay float32; default: "
                            "float32 throughout)")
    group.add_argument("--data-parts", type=int, metavar="P",
                       help="deal the cache's shards into P fixed parts, each giving B/P tokens "
                            "of every batch (default: one per torchrun process when the shards "
                            "deal into even parts, so each reads only its own; else 1: every "
                            "process reads the whole cache). One process with --data-parts P "
                            "trains what P processes train")


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


def new_crosscoder_config(args: argparse.Namespace, source: ActivationSource
                          ) -> CrosscoderConfig:
    """A fresh crosscoder config for ``source`` from the flags given."""
    from crossint.crosscoder.config import CrosscoderConfig

    widths = sorted(set(source.dims.values()))
    if len(widths) != 1:
        detail = ", ".join(f"{h}: {d}" for h, d in source.dims.items())
        raise CrossintError(
            f"activation cache {getattr(source, 'path', '')} mixes hookpoint widths ({detail}); "
            "a crosscoder needs one width: harvest hookpoints of one width (e.g. the paper or "
            "resid layout)"
        )
    return CrosscoderConfig(
        hookpoints=list(source.hookpoints),
        models=[source.model],
        d_model=widths[0],
        **given(args, CROSSCODER_FLAGS),
    )


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of a stream (--model instead of --activations); all default to None: a resumed
    run's recorded settings, else STREAM_DEFAULTS."""
    group = parser.add_argument_group(
        "streaming (with --model: no cache; the text is read as `crossint harvest` reads it)")
    group.add_argument("--layout",
                       help="hookpoints: 'paper' (default), 'resid' or a comma-separated list")
    group.add_argument("--corpus", help="'stories' (default), a .txt or .jsonl file, or "
                                        "hf:NAME[:SPLIT[:FIELD]]")
    group.add_argument("--text-field", metavar="FIELD",
                       help="field holding the text in a .jsonl corpus (default text)")
    group.add_argument("--context-length", type=int, metavar="S",
                       help="tokens per context, BOS included (default 128)")
    group.add_argument("--model-batch-size", type=int, metavar="B",
                       help="contexts per forward pass of the model (default 32)")
    group.add_argument("--buffer-tokens", type=int, metavar="N",
                       help="tokens in the shuffle buffer: batches are drawn from N tokens at a "
                            "time (default: the largest power of two whose buffer takes at most "
                            "a quarter of the available memory, at most steps x batch size)")
    group.add_argument("--include-special", action="store_const", const=True, default=None,
                       help="also keep positions holding BOS/EOS/PAD tokens")
    group.add_argument("--model-dtype", choices=["float32", "bfloat16", "float16"],
                       help="dtype the model runs in (default float32; bfloat16 halves a large "
                            "model's memory; activations are trained in float32)")


# --- the command -------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a crosscoder on an activation cache",
        description=(
            "Train an acausal crosscoder (SPEC §3) on the activations in CACHE_DIR (made by "
            "`crossint harvest`), or, with --model, on activations streamed from the model "
            "through a shuffle buffer of --buffer-tokens tokens (no cache on disk; the stream "
            "reads steps x batch size tokens, each once). The run directory gets config.json "
            "(settings, the cache path or the stream's settings, the model id, the interaction "
            "penalty), metrics.jsonl, checkpoint/ and, when "
            "training ends, the folded crosscoder (model.safetensors + config.json). "
            "Interrupted runs continue exactly with --resume. With --interaction-penalty λ > 0 "
            "the loss adds λ·L_int (SPEC §4.4), computed with the subject model's own MLP "
            "weights at every block whose mlp_in the crosscoder reads; metrics.jsonl then logs "
            "`interaction` (λ·L_int), `interaction_penalty` (L_int) and `dominant_share`."
        ),
        epilog=(
            "examples: crossint train --activations cache/ --features 2048 --k 20 "
            "--activation batchtopk --steps 3000 --interaction-penalty 1000 --out runs/pen; "
            "crossint train --model storylm --corpus stories --layout paper --steps 3000 "
            "--out runs/streamed"
        ),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--activations", metavar="CACHE_DIR",
                       help="activation cache directory (from `crossint harvest`)")
    where.add_argument("--model", metavar="NAME_OR_PATH",
                       help="stream the activations from this model instead, writing no cache "
                            "('storylm', a hub id in the local cache or a local directory); it "
                            "runs on --device")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR from its last checkpoint; settings "
                             "default to the run's own (RUN_DIR must hold a run: the cache "
                             "must be the one it started on, moved or copied caches are fine; a "
                             "stream needs --model again and continues where it stopped)")
    add_stream_arguments(parser)
    add_crosscoder_arguments(parser)
    add_optimisation_arguments(parser)
    add_penalty_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.crosscoder.distributed import ranks_from_environment, writer_lock
    from crossint.rundir import RunDir

    if args.resume and not RunDir(args.out).has_run():
        # The rule of harvest --resume too: --resume continues something or stops.
        raise CrossintError(f"--resume: {args.out} holds no training run to continue; leave out "
                            "--resume to start one")
    # Under torchrun only rank 0 writes (and locks) the run directory.
    with writer_lock(args.out, "crossint train", ranks_from_environment()):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.crosscoder.distributed import ranks_from_environment
    from crossint.crosscoder.train import TrainConfig, read_run_configs
    from crossint.interactions.penalty import run_penalty, train_with_penalty
    from crossint.rundir import RunDir

    run_dir = RunDir(args.out)
    resuming = args.resume and (run_dir.checkpoint.is_file() or run_dir.config.is_file())
    cache = open_cache(args) if args.activations is not None else None
    if resuming:
        # The run's own settings; any flag given must agree (train() checks and says which).
        cc_config, train_config = read_run_configs(run_dir.path)
        cc_config = cc_config.replace(**given(args, CROSSCODER_FLAGS))
        train_config = train_config.replace(**given(args, TRAIN_FLAGS))
        penalty = penalty_from_args(args, recorded=run_penalty(run_dir.path))
    else:
        train_config = TrainConfig(**given(args, TRAIN_FLAGS))
        penalty = penalty_from_args(args)
    source = cache or stream_from_args(args, train_config, run_dir if resuming else None)
    if not resuming:
        cc_config = new_crosscoder_config(args, source)
    crosscoder = train_with_penalty(
        cc_config, train_config, source, run_dir.path, penalty, resume=args.resume,
        log_interactions=args.log_interactions, progress=not args.quiet,
    )
    if not ranks_from_environment().is_main:
        return 0  # rank 0 reports the run
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


def open_cache(args: argparse.Namespace) -> ActivationCache:
    """The cache --activations names; the streaming flags are refused with it."""
    from crossint.data.cache import ActivationCache

    stray = [f"--{flag.replace('_', '-')}" for flag in ("layout", *STREAM_FLAGS)
             if getattr(args, flag) is not None]
    if stray:
        raise CrossintError(f"{', '.join(stray)} only apply when streaming with --model, not to "
                            f"a cache (its harvest fixed them)")
    return ActivationCache(args.activations)


def stream_from_args(args: argparse.Namespace, train_config: TrainConfig,
                     resumed: RunDir | None) -> StreamingActivations:
    """The stream of steps x batch size tokens that --model and the streaming flags ask for:
    where a flag is not given, a resumed run's recorded setting, else the default."""
    import torch

    from crossint.crosscoder.memory import available_bytes
    from crossint.data.corpus import corpus_file
    from crossint.data.stream import StreamingActivations, buffer_tokens_for_memory
    from crossint.models.adapter import load_model

    recorded, layout = {}, args.layout
    if resumed is not None:
        document = resumed.read_config()
        recorded = (document.get("source") or {}).get("stream") or {}
        layout = layout or (document.get("training_crosscoder") or {}).get("hookpoints")
    layout = layout or "paper"
    settings = {**STREAM_DEFAULTS, **recorded, **given(args, STREAM_FLAGS)}
    # A corpus file is recorded by its absolute path, so a resume from elsewhere finds it.
    settings["corpus"] = corpus_file(settings["corpus"]) or settings["corpus"]
    n_tokens = train_config.steps * train_config.batch_size
    adapter = load_model(args.model, device=train_config.device, dtype=settings["model_dtype"])
    if "buffer_tokens" not in settings:
        bytes_per_token = 4 * sum(adapter.hookpoint_dim(h) for h in adapter.resolve_layout(layout))
        settings["buffer_tokens"] = buffer_tokens_for_memory(
            available_bytes(torch.device("cpu")), bytes_per_token, n_tokens)
        if settings["buffer_tokens"] < train_config.batch_size:
            raise CrossintError(
                f"a shuffle buffer in a quarter of the available memory holds only "
                f"{settings['buffer_tokens']} tokens, fewer than a batch of "
                f"{train_config.batch_size}: use a smaller --batch-size or free memory"
            )
    source = StreamingActivations(adapter, n_tokens, layout, progress=not args.quiet, **settings)
    source.check_batch_size(train_config.batch_size)
    return source
