"""Argument definitions shared by several subcommands (not a subcommand itself)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from crossint.rundir import Result, RunDir

# = crossint.analysis.heldout.HELDOUT_SEED; not imported so that `--help` never loads torch.
HELDOUT_SEED = 12345


def add_heldout_text_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    tokens: int | None = None,
    seed_flag: str = "--seed",
    batch_flag: str = "--batch-size",
    *,
    texts: int | None = None,
) -> None:
    """Which held-out text an analysis runs the subject model on: the flags behind a
    ``crossint.analysis.heldout.HeldoutRequest`` (``heldout_request(args)`` builds it).

    Either ``--tokens`` (default ``tokens``) or ``--texts`` (default ``texts``: a count of
    contexts), then ``--corpus``, the seed, ``--context-length`` and the batch size; `crossint
    sweep` renames the seed and batch flags because its own ``--seed`` and ``--batch-size`` are
    the training ones. Values land in ``tokens``/``texts``, ``corpus``, ``text_seed``,
    ``context_length`` and ``text_batch_size``.
    """
    if (tokens is None) == (texts is None):
        raise ValueError("give exactly one of tokens and texts")
    if tokens is not None:
        parser.add_argument("--tokens", type=int, default=tokens, metavar="N",
                            help="held-out (non-special) tokens to use (default %(default)s)")
    else:
        parser.add_argument("--texts", type=int, default=texts, metavar="N",
                            help="held-out texts (contexts of --context-length tokens; the "
                                 "bootstrap resamples them; default %(default)s)")
    parser.add_argument(
        "--corpus",
        help="stories | FILE.txt | FILE.jsonl | hf:NAME (default: the training cache's corpus; "
             "a file or hf: corpus is read only in its held-out part, the ~10%% of documents "
             "that harvests leave out)",
    )
    parser.add_argument(seed_flag, dest="text_seed", type=int, default=HELDOUT_SEED,
                        metavar="SEED",
                        help="held-out story seed (default %(default)s; harvests use 0; file "
                             "corpora ignore it)")
    parser.add_argument("--context-length", type=int, metavar="S",
                        help="default: the training cache's context length")
    parser.add_argument(batch_flag, dest="text_batch_size", type=int, default=16, metavar="N",
                        help="contexts per forward pass of the subject model (default "
                             "%(default)s)")


def heldout_request(args: argparse.Namespace, **overrides: Any):  # noqa: ANN201 (lazy import)
    """The ``HeldoutRequest`` of an analysis command's flags (``add_heldout_text_arguments``,
    plus ``--model`` and ``--device`` where the command has them); ``overrides`` replace
    fields. Invalid values raise CrossintError naming the flag."""
    from crossint.analysis.heldout import HeldoutRequest

    count = ({"n_texts": args.texts} if getattr(args, "texts", None) is not None
             else {"n_tokens": args.tokens})
    fields = {"corpus": args.corpus, "seed": args.text_seed,
              "context_length": args.context_length, "batch_size": args.text_batch_size,
              "model": getattr(args, "model", None),
              "device": getattr(args, "device", None) or "cpu", **count}
    request = HeldoutRequest(**{**fields, **overrides})
    check_device(request.device)
    return request


def check_device(device: str) -> None:
    """CrossintError for a --device torch cannot use here (a CUDA device on a CPU-only install,
    an unknown name), before anything is loaded."""
    import torch

    from crossint.errors import CrossintError

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CrossintError(f"--device {device} is not available here ({reason}): use --device "
                            f"cpu") from None


def add_run_arguments(parser: argparse.ArgumentParser, result: Result) -> None:
    """The analysed run (positional RUN) and --out, by default the run's directory for
    ``result`` (RUN/eval, RUN/interactions, ...)."""
    parser.add_argument("run_dir", metavar="RUN",
                        help="run directory with model.safetensors + config.json")
    parser.add_argument("--out", help=f"output directory (default: RUN/{result.subdir})")


def output_dir(args: argparse.Namespace, result: Result) -> Path:
    """--out, or the run's own directory for ``result``."""
    return Path(args.out) if args.out else RunDir(args.run_dir).result_dir(result)


def locked_output(directory: str | Path, command: str) -> contextlib.AbstractContextManager:
    """Hold the exclusive lock of the output directory while ``crossint COMMAND`` runs
    (``crossint.lock``): a second command writing there stops with a one-line error, and an
    --out that is a file or cannot be written fails before any work."""
    from crossint.lock import locked

    return locked(directory, f"crossint {command}")


def add_analysis_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--quiet`` of the commands that analyse saved runs."""
    parser.add_argument("--model", help="override the subject model recorded in the run(s)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


RECIPE_FLAGS = ("tokens", "steps", "features", "context_length")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes of the built-in harvest-and-train recipe
    (``crossint.analysis.recipe.DemoSettings``) that
    commands which build their own crosscoder let the user change."""
    parser.add_argument("--tokens", type=int, help="harvested tokens (default 100000)")
    parser.add_argument("--steps", type=int, help="crosscoder training steps (default 1500)")
    parser.add_argument("--features", type=int, help="dictionary size H (default 1536)")
    parser.add_argument("--context-length", type=int, help="tokens per context (default 128)")


def recipe_settings(args: argparse.Namespace):  # noqa: ANN201 (DemoSettings, imported lazily)
    """``DemoSettings`` with the recipe flags the user gave."""
    import dataclasses

    from crossint.analysis.recipe import DemoSettings

    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k, None) is not None}
    return dataclasses.replace(DemoSettings(), **given)
