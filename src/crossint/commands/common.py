"""Argument definitions shared by several subcommands (not a subcommand itself)."""

from __future__ import annotations

import argparse

# = crossint.analysis.heldout.HELDOUT_SEED; not imported so that `--help` never loads torch.
HELDOUT_SEED = 12345


def add_heldout_text_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    tokens: int | None,
    seed_flag: str = "--seed",
    batch_flag: str = "--batch-size",
) -> None:
    """Which held-out text an analysis runs the subject model on (``crossint.analysis.heldout``).

    Values land in ``tokens``, ``corpus``, ``text_seed``, ``context_length`` and
    ``text_batch_size``; `crossint sweep` renames the seed and batch flags because its own
    ``--seed`` and ``--batch-size`` are the training ones. ``tokens=None``: no ``--tokens`` flag
    (the command counts texts instead).
    """
    if tokens is not None:
        parser.add_argument(
            "--tokens",
            type=int,
            default=tokens,
            metavar="N",
            help="held-out (non-special) tokens to use (default %(default)s)",
        )
    parser.add_argument(
        "--corpus",
        help="stories | FILE.txt | FILE.jsonl | hf:NAME (default: the training cache's corpus)",
    )
    parser.add_argument(
        seed_flag,
        dest="text_seed",
        type=int,
        default=HELDOUT_SEED,
        metavar="SEED",
        help="held-out text seed (default %(default)s; harvests use 0)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        metavar="S",
        help="default: the training cache's context length",
    )
    parser.add_argument(
        batch_flag,
        dest="text_batch_size",
        type=int,
        default=16,
        metavar="N",
        help="contexts per forward pass of the subject model (default %(default)s)",
    )


def add_analysis_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--quiet`` of the commands that analyse saved runs."""
    parser.add_argument("--model", help="override the subject model recorded in the run(s)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


RECIPE_FLAGS = ("tokens", "steps", "features", "context_length")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes of the demo's harvest-and-train recipe (``crossint.demo.DemoSettings``) that
    commands which build their own crosscoder let the user change."""
    parser.add_argument("--tokens", type=int, help="harvested tokens (default 100000)")
    parser.add_argument("--steps", type=int, help="crosscoder training steps (default 1500)")
    parser.add_argument("--features", type=int, help="dictionary size H (default 1536)")
    parser.add_argument("--context-length", type=int, help="tokens per context (default 128)")


def recipe_settings(args: argparse.Namespace):  # noqa: ANN201 (DemoSettings, imported lazily)
    """``DemoSettings`` with the recipe flags the user gave."""
    import dataclasses

    from crossint.demo import DemoSettings

    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k, None) is not None}
    return dataclasses.replace(DemoSettings(), **given)
