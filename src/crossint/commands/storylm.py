"""`crossint storylm`: train, sample from, and inspect the embedded story language model."""

from __future__ import annotations

import argparse

# The settings that produced the packaged weights (crossint/assets/storylm); keep in sync with
# docs/storylm.md.
TRAIN_DEFAULTS = {
    "steps": 2000, "batch_size": 16, "context_length": 256, "lr": 3e-3, "seed": 0,
    "vocab_size": 2048, "threads": 1,
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "storylm",
        help="the embedded story language model: train it, generate text, print the corpus",
        description=(
            "storylm is crossint's built-in model: a 4-block GPT-Neo trained on procedurally "
            "generated instruction stories (Summary / Features / Words / Story). The packaged "
            "weights were produced by 'crossint storylm train' with its default settings."
        ),
    )
    actions = parser.add_subparsers(dest="storylm_command", metavar="ACTION")
    actions.required = True
    _register_train(actions)
    _register_generate(actions)
    _register_stories(actions)
    parser.set_defaults(run=run)  # every action runs through run(), by storylm_command


def _add_default_flag(parser: argparse.ArgumentParser, name: str, kind: type, text: str) -> None:
    """--NAME defaulting to TRAIN_DEFAULTS[name], with that default named at the end of its help."""
    default = TRAIN_DEFAULTS[name]
    parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                        help=f"{text} (default {default})")


def _register_train(actions) -> None:
    train = actions.add_parser(
        "train",
        help="train the tokenizer and model from scratch on generated stories",
        description=(
            "Train a BPE tokenizer and a GPT-Neo (4 blocks, hidden 128) on stories from seed 0, "
            "report held-out loss (stories from seed 1) against the unigram baseline, and save "
            "everything with save_pretrained plus a training.json. The defaults reproduce the "
            "packaged model: crossint storylm train --out src/crossint/assets/storylm"
        ),
    )
    train.add_argument("--out", required=True, help="output directory (replaced when complete)")
    _add_default_flag(train, "steps", int, "optimizer steps")
    _add_default_flag(train, "batch_size", int, "contexts per step")
    _add_default_flag(train, "context_length", int, "tokens per context, BOS included")
    _add_default_flag(train, "lr", float, "peak AdamW learning rate; warmup then cosine")
    _add_default_flag(train, "seed", int, "seed for initialisation and batch order")
    _add_default_flag(train, "vocab_size", int, "BPE vocabulary size")
    train.add_argument("--n-train-tokens", type=int, default=None,
                       help="size of the training stream; default: one pass of "
                            "steps x batch-size x (context-length - 1) tokens")
    _add_default_flag(train, "threads", int,
                      "torch CPU threads; 1 is fastest when other work shares the cores")
    train.add_argument("--quiet", action="store_true", help="no progress bar or eval lines")


def _register_generate(actions) -> None:
    gen = actions.add_parser(
        "generate",
        help="continue a prompt with a storylm model",
        description="Sample a continuation of --prompt. A story prompt looks like "
                    "'Summary: ...\\nFeatures: Dialogue\\nWords: ...\\nStory:' "
                    "(use `crossint storylm stories` to see real ones).",
    )
    gen.add_argument("--model", default="default",
                     help="model directory, or 'default' for the packaged model (default)")
    gen.add_argument("--prompt", required=True,
                     help="text to continue; the two characters \\n are read as a newline")
    gen.add_argument("--max-new-tokens", type=int, default=200,
                     help="stop after this many new tokens, or at end of text (default 200)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--temperature", type=float, default=0.7,
                     help="sampling temperature; 0 decodes greedily (default 0.7)")


def _register_stories(actions) -> None:
    stories = actions.add_parser(
        "stories",
        help="print generated documents from the built-in story corpus",
        description="Print documents of the story stream; seed 0 is the training stream.",
    )
    stories.add_argument("--n", type=int, default=3, help="how many documents (default 3)")
    stories.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from crossint.errors import CrossintError

    if args.storylm_command == "stories":
        from crossint.toys.stories import generate_stories

        if args.n < 1:
            raise CrossintError(f"--n must be a positive integer, got {args.n}")
        for i, story in enumerate(generate_stories(args.n, args.seed)):
            if i:
                print("\n" + "=" * 40 + "\n")
            print(story.text)
        return 0

    if args.storylm_command == "generate":
        from crossint.toys.storylm import generate

        prompt = args.prompt.replace("\\n", "\n")
        text = generate(args.model, prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        temperature=args.temperature)
        print(prompt + text)
        return 0

    from crossint.toys.storylm import train_storylm

    result = train_storylm(
        args.out, steps=args.steps, batch_size=args.batch_size,
        context_length=args.context_length, lr=args.lr, seed=args.seed,
        n_train_tokens=args.n_train_tokens, vocab_size=args.vocab_size,
        num_threads=args.threads, progress=not args.quiet,
    )
    print(f"saved to {args.out}: held-out loss {result['heldout_loss_nats']:.4f} nats/token "
          f"(unigram baseline {result['unigram_entropy_nats']:.4f}), "
          f"{result['n_parameters']:,} parameters, {result['total_seconds']:.0f} s")
    return 0
