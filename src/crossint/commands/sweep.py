"""`crossint sweep` (placeholder until implemented)."""

from crossint.errors import CrossintError


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="(not implemented yet)")
    parser.set_defaults(run=run)


def run(args) -> int:
    raise CrossintError("'sweep' is not implemented yet")
