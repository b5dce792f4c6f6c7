"""Hookpoint names (SPEC §2): ``blocks.{l}.{site}``, and the crosscoder layouts built from them.

Pure functions over names; the model adapter maps names to modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from crossint.errors import CrossintError

# Order is the order in which the tensors appear inside a block.
SITES: tuple[str, ...] = (
    "resid_pre",
    "attn_in",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_pre",
    "mlp_post",
    "mlp_out",
    "resid_post",
)
RESID_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
PAPER_SITES: tuple[str, ...] = ("resid_pre", "attn_in", "resid_mid", "mlp_in")
LAYOUTS: tuple[str, ...] = ("paper", "resid")

# Canonical block numbers only ("blocks.1", not "blocks.01"): a name is a dictionary key.
_PATTERN = re.compile(r"^blocks\.(0|[1-9]\d*)\.([a-z_]+)$")


def hookpoint(block: int, site: str) -> str:
    return f"blocks.{block}.{site}"


def all_hookpoints(n_blocks: int) -> list[str]:
    return [hookpoint(l, s) for l in range(n_blocks) for s in SITES]


def split_hookpoint(name: str) -> tuple[int, str] | None:
    """(l, site) of a well-formed ``blocks.{l}.{site}`` name, else None (no block-count check:
    for names read back from files, where the model may not be loaded)."""
    match = _PATTERN.match(name) if isinstance(name, str) else None
    if match and match.group(2) in SITES:
        return int(match.group(1)), match.group(2)
    return None


def blocks_with_site(names: Sequence[str], site: str) -> list[int]:
    """The blocks l (sorted) whose ``blocks.{l}.{site}`` is among ``names``."""
    return sorted({parsed[0] for parsed in map(split_hookpoint, names)
                   if parsed is not None and parsed[1] == site})


def n_blocks_spanned(names: Sequence[str]) -> int:
    """One more than the largest block any of ``names`` reads (0 for none)."""
    return 1 + max((parsed[0] for parsed in map(split_hookpoint, names) if parsed), default=-1)


def parse_hookpoint(name: str, n_blocks: int) -> tuple[int, str]:
    """Split ``blocks.{l}.{site}`` into (l, site), or raise an error listing the valid names."""
    parsed = split_hookpoint(name)
    if parsed is not None and parsed[0] < n_blocks:
        return parsed
    raise CrossintError(
        f"unknown hookpoint {name!r}: valid hookpoints are blocks.{{0..{n_blocks - 1}}}.{{site}} "
        f"with site one of {', '.join(SITES)} (e.g. {hookpoint(0, 'mlp_in')})"
    )


def sort_key(name: str, n_blocks: int) -> tuple[int, int]:
    """Position of a hookpoint in the forward pass."""
    block, site = parse_hookpoint(name, n_blocks)
    return block, SITES.index(site)


def resolve_layout(layout: str | Sequence[str], n_blocks: int) -> list[str]:
    """Expand a layout name (SPEC §2) or validate an explicit list of hookpoints.

    ``paper``: resid_pre, attn_in, resid_mid, mlp_in of every block + the last resid_post.
    ``resid``: resid_pre of every block + the last resid_post.
    A comma-separated string is read as an explicit list.
    """
    if isinstance(layout, str):
        if layout == "paper":
            names = [hookpoint(l, s) for l in range(n_blocks) for s in PAPER_SITES]
            return names + [hookpoint(n_blocks - 1, "resid_post")]
        if layout == "resid":
            names = [hookpoint(l, "resid_pre") for l in range(n_blocks)]
            return names + [hookpoint(n_blocks - 1, "resid_post")]
        if "," not in layout and not layout.startswith("blocks."):
            raise CrossintError(
                f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)} or a comma-separated "
                f"list of hookpoints such as blocks.0.mlp_in,blocks.1.mlp_in"
            )
        layout = [part.strip() for part in layout.split(",") if part.strip()]
    names = list(layout)
    if not names:
        raise CrossintError("empty hookpoint list: name at least one hookpoint")
    for name in names:
        parse_hookpoint(name, n_blocks)
    if len(set(names)) != len(names):
        raise CrossintError(f"hookpoint list has duplicates: {names}")
    return names
