"""Atomic file writes: a reader never sees a half-written file, an interrupted write loses nothing.

Every file crossint writes goes through these helpers: write to a temporary name in the same
directory, flush and fsync, then ``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(_file_mode())  # mkstemp makes owner-only files; results are for everyone
        os.replace(tmp, path)
    except Exception as e:
        _raise_if_disk_full(e, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# How writers report a full disk: errno, or the Rust error text of safetensors (SafetensorError
# "IoError(Os { code: 28, kind: StorageFull, ... })"), or torch.save's failed stream write.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_DISK_FULL_TEXT = ("no space left", "storagefull", "code: 28", "os error 28", "quota exceeded")
_LOW_SPACE_BYTES = 1 << 20  # a write that failed with less than this left ran out of space


def is_disk_full(error: BaseException, directory: str | Path | None = None) -> bool:
    """Whether ``error`` says the disk (or quota) is full; with ``directory``, a failure while
    its file system has less than 1 MiB free counts too (torch.save does not say why)."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    if any(marker in text for marker in _DISK_FULL_TEXT):
        return True
    if directory is None:
        return False
    try:
        return shutil.disk_usage(directory).free < _LOW_SPACE_BYTES
    except OSError:
        return False


def disk_full_error(path: str | Path) -> Exception:
    from crossint.errors import CrossintError

    return CrossintError(
        f"no space left on the disk holding {path}: nothing half-written was kept; free some "
        f"disk space (or write elsewhere) and run the same command again, with --resume for "
        f"train (harvest, train and sweep continue where they stopped)"
    )


def _raise_if_disk_full(error: Exception, path: Path) -> None:
    if is_disk_full(error, path.parent):
        raise disk_full_error(path) from error


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh sibling directory, then put it in place of ``path``:
    an interrupted write leaves the old directory (if any) as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            write(tmp)
        except Exception as e:
            _raise_if_disk_full(e, path)
            raise
        # mkdtemp and some savers create owner-only modes; a model directory is for everyone.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or corrupt file into a CrossintError naming it."""
    from crossint.errors import CrossintError

    path = Path(path)
    if not path.is_file():
        raise CrossintError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossintError(f"{what} {path} is corrupt (not valid JSON: {e})") from None


def json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN/Inf become null, tensors and arrays their numbers
    (anything with ``tolist``), keys strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

