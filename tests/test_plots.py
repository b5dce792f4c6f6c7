"""Plots (crossint.report.plots): each function writes a non-empty PNG atomically and rejects
data of the wrong shape with a CrossintError."""

from __future__ import annotations

import math

import pytest

from crossint.errors import CrossintError
from crossint.report.plots import (
    plot_interaction_location,
    plot_share_histograms,
    plot_sweep,
    plot_top_pairs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_share_histograms(tmp_path):
    edges = [i / 4 for i in range(5)]
    path = plot_share_histograms(edges, {0: [1, 2, 3, 4], 1: [0, 0, 0, 0]},
                                 tmp_path / "a" / "share.png")
    assert_png(path)
    with pytest.raises(CrossintError, match="3 histogram counts for 4 bins"):
        plot_share_histograms(edges, {0: [1, 2, 3]}, tmp_path / "bad.png")
    with pytest.raises(CrossintError, match="no blocks"):
        plot_share_histograms(edges, {}, tmp_path / "bad.png")


def test_interaction_location(tmp_path):
    path = plot_interaction_location([[0.1, 0.2, 0.3], [0.0, math.nan, 0.5]], [0, 3],
                                     tmp_path / "a" / "loc.png", [[0, 4], [4, 8], [8, 12]])
    assert_png(path)
    assert_png(plot_interaction_location([[1.0]], [2], tmp_path / "b" / "one.png"))
    with pytest.raises(CrossintError, match="one row of group values per block"):
        plot_interaction_location([[0.1, 0.2]], [0, 1], tmp_path / "bad.png")


def test_top_pairs(tmp_path):
    assert_png(plot_top_pairs(["1→2 @ block 0", "3→1 @ block 1"], [0.5, 0.25],
                              tmp_path / "a" / "pairs.png"))
    assert_png(plot_top_pairs([], [], tmp_path / "b" / "none.png"))  # no co-active pairs
    with pytest.raises(CrossintError, match="2 pair labels for 1 values"):
        plot_top_pairs(["a", "b"], [1.0], tmp_path / "bad.png")


def test_sweep(tmp_path):
    assert_png(plot_sweep([1000, 0, 100], [0.8, 0.3, 0.45], [2300, 1960, 1850], [0.1, 1.0, 0.6],
                          tmp_path / "a" / "sweep.png"))
    assert_png(plot_sweep([0], [0.3], [math.nan], [None], tmp_path / "b" / "single.png"))
    with pytest.raises(CrossintError, match="one value per λ"):
        plot_sweep([0, 1], [0.3], [1.0, 2.0], [1.0, 2.0], tmp_path / "bad.png")
