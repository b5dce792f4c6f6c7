"""Hookpoint names and layouts (SPEC §2)."""

from __future__ import annotations

import pytest

from crossint.errors import CrossintError
from crossint.models import hookpoints as hp


def test_hookpoint_round_trip_and_forward_order():
    names = hp.all_hookpoints(3)
    assert len(names) == 3 * len(hp.SITES)
    assert names[0] == "blocks.0.resid_pre" and names[-1] == "blocks.2.resid_post"
    for name in names:
        block, site = hp.parse_hookpoint(name, 3)
        assert hp.hookpoint(block, site) == name
    assert sorted(names[::-1], key=lambda n: hp.sort_key(n, 3)) == names


@pytest.mark.parametrize(
    "bad", ["blocks.3.mlp_in", "blocks.0.mlp", "blocks.01.mlp_in", "block.0.mlp_in", "mlp_in", ""]
)
def test_unknown_hookpoint_error_lists_valid_names(bad):
    with pytest.raises(CrossintError) as err:
        hp.parse_hookpoint(bad, 3)
    message = str(err.value)
    assert repr(bad) in message and "blocks.{0..2}" in message
    assert all(site in message for site in hp.SITES)


def test_paper_layout_has_4L_plus_1_names():
    names = hp.resolve_layout("paper", 4)
    assert len(names) == 17
    assert names[:4] == [
        "blocks.0.resid_pre", "blocks.0.attn_in", "blocks.0.resid_mid", "blocks.0.mlp_in",
    ]  # fmt: skip
    assert names[-1] == "blocks.3.resid_post"


def test_resid_layout_and_explicit_lists():
    assert hp.resolve_layout("resid", 2) == [
        "blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post",
    ]  # fmt: skip
    assert hp.resolve_layout("blocks.1.mlp_in,blocks.0.mlp_out", 2) == [
        "blocks.1.mlp_in", "blocks.0.mlp_out",
    ]  # fmt: skip
    assert hp.resolve_layout("blocks.0.mlp_in", 2) == ["blocks.0.mlp_in"]
    assert hp.resolve_layout(["blocks.0.mlp_pre"], 2) == ["blocks.0.mlp_pre"]


@pytest.mark.parametrize(
    "layout, match",
    [
        ("papper", "unknown layout"),
        ([], "empty"),
        ("blocks.0.mlp_in,blocks.0.mlp_in", "duplicates"),
        (["blocks.5.mlp_in"], "unknown hookpoint"),
    ],
)
def test_bad_layouts(layout, match):
    with pytest.raises(CrossintError, match=match):
        hp.resolve_layout(layout, 2)
