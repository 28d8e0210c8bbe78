"""One run at a time per output folder: an advisory lock that dies with its process.

Two commands writing the same folder would interleave their files (two searches
appending to one ``history.jsonl``). Each command holds an exclusive ``flock`` on the
folder itself (its directory entry: no lock file is left behind) while it writes
there, and a second one is refused at once. The operating system drops the lock when
its process ends, so a crashed or killed run never leaves a folder locked.

Within one process the lock is counted, not refused: a job that opens its directory
in two phases holds it once. Where ``fcntl`` does not exist (Windows) nothing is
locked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring.
    fcntl = None  # type: ignore[assignment]


class FolderInUseError(RuntimeError):
    """Another process holds the lock of the folder."""


_guard = threading.Lock()
_held: dict[str, list[int]] = {}  # real path -> [file descriptor, holds in this process]


def acquire(folder: str, message: str) -> None:
    """Lock the existing directory ``folder`` for this process.

    Raises :class:`FolderInUseError` with ``message`` when another process holds it.
    """
    key = os.path.realpath(folder)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return
        if fcntl is None:
            _held[key] = [-1, 1]
            return
        fd = os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(message) from None
        _held[key] = [fd, 1]


def release(folder: str) -> None:
    """Undo one :func:`acquire` of ``folder``; the last one unlocks it."""
    key = os.path.realpath(folder)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            if entry[0] >= 0:
                os.close(entry[0])  # closing the descriptor drops the flock


@contextmanager
def folder_lock(folder: str, message: str) -> Iterator[None]:
    """Hold the lock of the existing directory ``folder`` for the ``with`` block."""
    acquire(folder, message)
    try:
        yield
    finally:
        release(folder)
