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
