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
    sub = parser.add_subparsers(dest="storylm_command", metavar="ACTION")
    sub.required = True

    train = sub.add_parser(
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
    d = TRAIN_DEFAULTS
    train.add_argument("--steps", type=int, default=d["steps"],
                       help=f"optimizer steps (default {d['steps']})")
    train.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help=f"contexts per step (default {d['batch_size']})")
    train.add_argument("--context-length", type=int, default=d["context_length"],
                       help=f"tokens per context, BOS included (default {d['context_length']})")
    train.add_argument("--lr", type=float, default=d["lr"],
                       help=f"peak AdamW learning rate; warmup then cosine (default {d['lr']})")
    train.add_argument("--seed", type=int, default=d["seed"],
                       help=f"seed for initialisation and batch order (default {d['seed']})")
    train.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                       help=f"BPE vocabulary size (default {d['vocab_size']})")
    train.add_argument("--n-train-tokens", type=int, default=None,
                       help="size of the training stream; default: one pass of "
                            "steps x batch-size x (context-length - 1) tokens")
    train.add_argument("--threads", type=int, default=d["threads"],
                       help="torch CPU threads; 1 is fastest when other work shares the cores "
                            f"(default {d['threads']})")
    train.add_argument("--quiet", action="store_true", help="no progress bar or eval lines")
    train.set_defaults(run=run)

    gen = sub.add_parser(
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
    gen.set_defaults(run=run)

    stories = sub.add_parser(
        "stories",
        help="print generated documents from the built-in story corpus",
        description="Print documents of the story stream; seed 0 is the training stream.",
    )
    stories.add_argument("--n", type=int, default=3, help="how many documents (default 3)")
    stories.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    stories.set_defaults(run=run)


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
