"""One writer per output directory: an exclusive lock held while a command writes into it.

``harvest``, ``train``, ``sweep`` and the analyses that write a directory take the lock of their
output directory before they write anything. The lock is a file in that directory
(``crossint.rundir.LOCK``) holding the owner's pid, host, command and start time, locked with
``flock``: the kernel drops the lock when its process ends, even by SIGKILL, so a lock file left
by a dead process is stale and the next command takes it over. A second command that finds the
lock held stops with a CrossintError naming the owner, before it writes anything.

Taking the lock also checks that the directory can be written (it creates it if needed): an
``--out`` that is a file or lies in a read-only place fails here, with a one-line message. On
release the lock file is removed, and so are the directories the lock created if nothing else
was written into them (a command that failed early leaves no empty directories).

Locks are re-entrant within one process: ``train`` inside ``crossint train`` (both lock the run
directory) or a sweep's runs inside the sweep's own lock work as expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossint.errors import CrossintError
from crossint.rundir import LOCK

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock files, stale ones removed by hand
    fcntl = None  # type: ignore[assignment]


@dataclass
class _Held:
    fd: int
    path: Path
    created: list[Path] = field(default_factory=list)
    count: int = 1


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def lock_path(directory: str | Path) -> Path:
    return Path(directory) / LOCK


def read_owner(directory: str | Path) -> dict[str, Any] | None:
    """What the lock file of ``directory`` says about its (last) owner, None if there is none."""
    try:
        owner = json.loads(lock_path(directory).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def acquire(directory: str | Path, command: str = "crossint") -> None:
    """Take the exclusive lock of ``directory`` (created if missing) for ``command``.

    Raises CrossintError when another process holds it, or when the directory cannot be made or
    written. Pair every call with :func:`release` (or use :func:`locked`)."""
    directory = Path(directory)
    created = make_output_dir(directory)
    key = os.path.realpath(directory)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
            return
        try:
            fd = _lock_file(lock_path(directory), command)
        except BaseException:
            _remove_empty(created)
            raise
        _HELD[key] = _Held(fd, lock_path(directory), created)


def release(directory: str | Path) -> None:
    """Give the lock back (the last release of a re-entrant lock removes the lock file, then
    the directories :func:`acquire` created, if they are empty)."""
    key = os.path.realpath(directory)
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count:
            return
        del _HELD[key]
        # Unlink while still holding the lock: a process waiting on this file sees that it is
        # gone (another inode than the path's) and starts over on a fresh file.
        with contextlib.suppress(OSError):
            held.path.unlink()
        os.close(held.fd)
        _remove_empty(held.created)


@contextlib.contextmanager
def locked(directory: str | Path, command: str = "crossint") -> Iterator[Path]:
    """``with locked(out_dir, "crossint train"):`` hold the lock of ``out_dir`` for the block."""
    acquire(directory, command)
    try:
        yield Path(directory)
    finally:
        release(directory)


def holds_lock(directory: str | Path) -> bool:
    """Whether this process holds the lock of ``directory``."""
    return os.path.realpath(directory) in _HELD


def make_output_dir(directory: Path) -> list[Path]:
    """Create ``directory`` (and missing parents); returns the directories created, innermost
    first. CrossintError when a part of the path is a file or may not be written."""
    if directory.exists() and not directory.is_dir():
        raise CrossintError(f"output path {directory} exists and is not a directory: choose "
                            "another --out")
    missing = []
    for path in (directory, *directory.parents):
        if path.is_dir():
            break
        missing.append(path)
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.insert(0, path)
    except FileExistsError:
        _remove_empty(created)
        if path.is_dir():  # made by another process in the meantime
            return make_output_dir(directory)
        raise CrossintError(f"cannot create output directory {directory}: {path} exists and "
                            "is not a directory; choose another --out") from None
    except NotADirectoryError:
        _remove_empty(created)
        raise CrossintError(f"cannot create output directory {directory}: a part of the path "
                            "is a file, not a directory; choose another --out") from None
    except PermissionError:
        _remove_empty(created)
        raise CrossintError(f"cannot create output directory {directory}: permission denied "
                            f"in {path.parent}; choose an --out you can write to") from None
    except OSError as e:  # a read-only file system, a full disk, a path /proc will not hold
        _remove_empty(created)
        raise CrossintError(f"cannot create output directory {directory}: "
                            f"{(e.strerror or type(e).__name__).lower()} at {path}; choose an "
                            f"--out you can write to") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CrossintError(f"cannot write into output directory {directory}: permission "
                            "denied; choose an --out you can write to")
    return created


def _remove_empty(directories: list[Path]) -> None:
    for path in directories:  # innermost first
        try:
            path.rmdir()
        except OSError:
            return


def _owner_record(command: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode("utf-8")


def _busy(path: Path) -> CrossintError:
    owner = read_owner(path.parent) or {}
    who = (f"process {owner.get('pid', '?')} ({owner.get('command', 'crossint')}, on "
           f"{owner.get('host', '?')} since {owner.get('since', '?')})" if owner
           else "another process")
    return CrossintError(
        f"{path.parent} is in use by {who}: two commands writing one directory would corrupt "
        f"it; wait for that one to finish, or choose another --out"
    )


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except PermissionError:
        raise CrossintError(f"cannot write into output directory {path.parent}: permission "
                            "denied; choose an --out you can write to") from None


def _lock_file(path: Path, command: str) -> int:
    """The descriptor of the locked lock file, with this process's record in it."""
    if fcntl is None:  # pragma: no cover
        try:
            fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise CrossintError(f"{_busy(path)} (if no crossint command runs there, delete "
                                f"{path})") from None
    else:
        while True:
            fd = _open(path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                os.close(fd)
                raise _busy(path) from None
            # The previous owner may have removed the file between our open and our lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
    # A record left by a process that died without releasing (SIGKILL, power loss) is stale:
    # the kernel dropped its lock, so it is overwritten here.
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, _owner_record(command))
    return fd
