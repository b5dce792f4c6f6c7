"""The one exception type users see.

The CLI prints a CrossintError's message on one line and exits non-zero, without a traceback,
so every message must say what was wrong and what would be valid.
"""


class CrossintError(Exception):
    """A problem with the user's input, files or configuration (not a bug in crossint)."""
