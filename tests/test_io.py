"""Atomic writes: whole files or nothing, with the permissions a plain write would give."""

from __future__ import annotations

import os

import pytest

from crossint.io import atomic_write, atomic_write_json, read_json


def test_written_files_have_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "result.json", {"a": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert read_json(path) == {"a": 1}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "result.json", {"old": True})

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert read_json(path) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
