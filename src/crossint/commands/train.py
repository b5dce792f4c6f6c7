"""`crossint train`: train a crosscoder on a harvested activation cache (SPEC §3), optionally with
the MLP interaction penalty (SPEC §4.4).

The argument groups and the config/penalty plumbing here are shared with `crossint sweep`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossint.errors import CrossintError

if TYPE_CHECKING:
    from crossint.crosscoder.config import CrosscoderConfig
    from crossint.crosscoder.train import ExtraLoss, ExtraMetric, TrainConfig
    from crossint.data.cache import ActivationCache

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
PENALTY_CONFIG_KEY = "interaction_penalty"  # the run's config.json entry recording the penalty


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


def add_penalty_arguments(parser: argparse.ArgumentParser, with_lambda: bool = True) -> None:
    """SPEC §4.4 interaction-penalty flags (``with_lambda``: also --interaction-penalty)."""
    group = parser.add_argument_group("interaction penalty (SPEC §4.4)")
    if with_lambda:
        group.add_argument("--interaction-penalty", type=float, metavar="LAMBDA",
                           help="weight λ of the MLP interaction penalty L_int (default 0: "
                                "none); needs blocks.{l}.mlp_in hookpoints and the subject model")
    group.add_argument("--penalty-weighting", choices=("uniform", "w_out"),
                       help="weight each neuron's S - Mx by 1 (uniform, default) or by "
                            "||W_out[n]|| (the compact-proof bound of SPEC §4.3)")
    group.add_argument("--penalty-normalise", nargs="?", const="total", default=None,
                       choices=("none", "total", "neuron"), metavar="{total,neuron}",
                       help="make L_int scale-free so λ is comparable across models: 'total' "
                            "(the flag alone) divides by the total contribution ΣS (L_int = 1 - "
                            "the mass-weighted dominant share); 'neuron' averages (S - Mx)/S over "
                            "tokens and neurons (L_int = 1 - the dominant share)")
    group.add_argument("--penalty-warmup", type=float, metavar="FRACTION",
                       help="ramp λ linearly from 0 over this fraction of the steps (default 0: "
                            "full λ from the first step)")
    if with_lambda:
        group.add_argument("--log-interactions", action="store_true",
                           help="log the dominant share and the unweighted L_int even when λ = 0 "
                                "(loads the subject model)")


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


# --- the interaction penalty -------------------------------------------------------------------
@dataclass(frozen=True)
class PenaltySettings:
    """What the SPEC §4.4 penalty of a run is; recorded in its config.json."""

    weight: float = 0.0
    weighting: str = "uniform"
    normalise: str = "none"

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)
                and self.weight >= 0):
            raise CrossintError(
                f"--interaction-penalty must be a finite number >= 0, got {self.weight}"
            )
        if self.weighting not in ("uniform", "w_out"):
            raise CrossintError(
                f"--penalty-weighting must be uniform or w_out, got {self.weighting!r}"
            )
        if self.normalise not in ("none", "total", "neuron"):
            raise CrossintError(
                f"--penalty-normalise must be none, total or neuron, got {self.normalise!r}"
            )

    def record(self, blocks: list[int]) -> dict[str, Any]:
        return {"lambda": float(self.weight), "weighting": self.weighting,
                "normalise": self.normalise, "blocks": list(blocks)}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> PenaltySettings:
        record = record or {}
        normalise = record.get("normalise", "none")
        if isinstance(normalise, bool):  # records before the per-neuron normalisation existed
            normalise = "total" if normalise else "none"
        return cls(float(record.get("lambda", 0.0)), record.get("weighting", "uniform"),
                   normalise)


def penalty_settings(args: argparse.Namespace, recorded: dict[str, Any] | None = None,
                     weight: float | None = None) -> PenaltySettings:
    """The penalty from the flags; flags not given fall back to ``recorded`` (a resumed run's
    config.json entry), then to the defaults. ``weight`` overrides --interaction-penalty."""
    base = PenaltySettings.from_record(recorded)
    if weight is None:
        weight = getattr(args, "interaction_penalty", None)
    return PenaltySettings(
        base.weight if weight is None else float(weight),
        args.penalty_weighting or base.weighting,
        base.normalise if args.penalty_normalise is None else args.penalty_normalise,
    )


def mlp_in_blocks_of(hookpoints: list[str], n_blocks: int) -> list[int]:
    """Blocks l whose ``blocks.{l}.mlp_in`` is among ``hookpoints``."""
    from crossint.models.hookpoints import hookpoint

    return [l for l in range(n_blocks) if hookpoint(l, "mlp_in") in hookpoints]


def cache_blocks(cache: ActivationCache) -> list[int]:
    """The cache's mlp_in blocks (block count from its manifest, else from its names)."""
    from crossint.models.hookpoints import parse_hookpoint

    n_blocks = (cache.manifest.get("model_info") or {}).get("n_blocks")
    if not isinstance(n_blocks, int):
        n_blocks = 1 + max(int(name.split(".")[1]) for name in cache.hookpoints
                           if name.startswith("blocks."))
    for name in cache.hookpoints:
        parse_hookpoint(name, n_blocks)
    return mlp_in_blocks_of(list(cache.hookpoints), n_blocks)


def load_penalty_mlps(cache: ActivationCache, device: str = "cpu") -> dict[int, Any]:
    """The subject model's MLP weights for every mlp_in block of ``cache`` (SPEC §4.4 needs the
    model's own W_in and W_out). Errors if the cache has no mlp_in or the model does not fit."""
    from crossint.models.adapter import load_model

    blocks = cache_blocks(cache)
    if not blocks:
        raise CrossintError(
            f"activation cache {cache.path} has no blocks.{{l}}.mlp_in hookpoint (it has "
            f"{', '.join(cache.hookpoints)}); the interaction penalty needs the MLP inputs: "
            "harvest with the paper layout or add blocks.{l}.mlp_in"
        )
    adapter = load_model(cache.model, device=device)
    from crossint.analysis.interactions import check_model_matches

    check_model_matches(adapter, cache.manifest.get("model_info") or {}, set(cache.dims.values()),
                        f"activation cache {cache.path}")
    return {block: adapter.mlp_weights(block) for block in blocks}


def interaction_metrics(
    mlps: dict[int, Any], settings: PenaltySettings
) -> ExtraMetric:
    """A logged-only metric: the unweighted L_int (the same ``interaction_penalty`` call the
    training loss makes) and the plain mean dominant share (SPEC §4.2) of the batch."""
    import torch

    from crossint.interactions import (
        ShareSummary,
        active_features,
        feature_blocks,
        interaction_penalty,
        iter_contributions,
        neuron_stats,
    )

    def metric(crosscoder, acts_BXD, output) -> dict[str, float]:  # noqa: ANN001
        with torch.no_grad():
            blocks = feature_blocks(crosscoder, mlps)
            active = active_features(output.f_BH.detach())
            penalty = interaction_penalty(active, blocks, settings.weighting, settings.normalise)
            shares = ShareSummary()
            for block in blocks:
                for _, contrib in iter_contributions(active, block.d_HD, block.mlp.W_in_DN):
                    shares.update(block.block, neuron_stats(contrib))
        return {"interaction_penalty": float(penalty),
                "dominant_share": float(shares.result()["dominant_share"])}

    return metric


def penalty_plugins(
    settings: PenaltySettings, mlps: dict[int, Any] | None, log: bool
) -> tuple[list[ExtraLoss], list[ExtraMetric]]:
    """The extra loss (λ > 0) and the logged metric (λ > 0 or ``log``) for ``train``."""
    from crossint.interactions import mlp_interaction_loss

    if mlps is None:
        return [], []
    losses = []
    if settings.weight > 0:
        losses.append(mlp_interaction_loss(mlps, settings.weight, settings.weighting,
                                           settings.normalise))
    metrics = [interaction_metrics(mlps, settings)] if (log or settings.weight > 0) else []
    return losses, metrics


def recorded_penalty(out: Path) -> dict[str, Any] | None:
    """The penalty entry of an existing run's config.json (None if none)."""
    from crossint.crosscoder.train import CONFIG_NAME
    from crossint.io import read_json

    path = out / CONFIG_NAME
    if not path.is_file():
        return None
    document = read_json(path, "run config")
    return document.get(PENALTY_CONFIG_KEY) if isinstance(document, dict) else None


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
                             "default to the run's own")
    add_crosscoder_arguments(parser)
    add_optimisation_arguments(parser)
    add_penalty_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.crosscoder.train import (
        CONFIG_NAME,
        checkpoint_path,
        read_run_configs,
        train,
    )
    from crossint.data.cache import ActivationCache

    if args.interaction_penalty is not None and not args.interaction_penalty >= 0:
        raise CrossintError(f"--interaction-penalty must be >= 0, got {args.interaction_penalty}")
    cache = ActivationCache(args.activations)
    out = Path(args.out)
    resuming = args.resume and (checkpoint_path(out).is_file() or (out / CONFIG_NAME).is_file())
    record = None
    if resuming:
        # The run's own settings; any flag given must agree (train() checks and says which).
        cc_config, train_config = read_run_configs(out)
        cc_config = cc_config.replace(**given(args, CROSSCODER_FLAGS))
        train_config = train_config.replace(**given(args, TRAIN_FLAGS))
        record = recorded_penalty(out)
        settings = penalty_settings(args, record)
    else:
        cc_config, train_config = new_configs(args, cache)
        settings = penalty_settings(args)
    mlps = None
    if settings.weight > 0 or args.log_interactions:
        mlps = load_penalty_mlps(cache, device=train_config.device)
    losses, metrics = penalty_plugins(settings, mlps, args.log_interactions)
    extra_config = {PENALTY_CONFIG_KEY: settings.record(cache_blocks(cache))}
    if resuming and record is None and settings == PenaltySettings():
        extra_config = None  # a run started without a penalty record (e.g. by the library)
    crosscoder = train(
        cc_config, train_config, cache, out, resume=args.resume, progress=not args.quiet,
        extra_losses=losses, extra_metrics=metrics, extra_config=extra_config,
    )
    last = last_metrics(out)
    summary = ", ".join(f"{key} {last[key]:.4g}"
                        for key in ("fvu", "l0", "dead_fraction", "dominant_share")
                        if isinstance(last.get(key), (int, float)))
    cfg = crosscoder.config
    penalty = f" with interaction penalty λ={settings.weight:g}" if settings.weight > 0 else ""
    print(f"trained {cfg.n_features}-feature {cfg.trained_activation or cfg.activation} "
          f"crosscoder over {cfg.n_positions} positions{penalty} -> {out}"
          + (f" ({summary})" if summary else ""))
    return 0


def last_metrics(out: Path) -> dict:
    """The last line of a run's metrics.jsonl ({} if none)."""
    import json

    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1]) if lines else {}
