"""One writer at a time across processes and threads: an exclusive flock on a file.

Two processes appending results to one file, or loading, updating and saving one index
directory, would each write over or beside the other's work: two `press batch` runs on one
output wrote every result twice, and two `press index add` runs lost a document. Their writers
hold `exclusive(path)` for as long as they write.

An exclusive `fcntl.flock` on PATH (created if missing, never deleted: deleting a lock file
others may hold open would let two holders in). The kernel drops the lock when its holder
exits, however it exits, so a killed writer leaves no stale lock. flock belongs to the open
file, not the process, so the holder may open and close PATH itself (as an output it appends
to) without letting go. Re-entrant in the holding thread, so a command can hold it around a
job that takes it again. POSIX only; on NFS, Linux maps flock to byte-range locks, which the
server arbitrates.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from typing import Callable, Iterator


class Held(Exception):
    """The lock is another holder's: for `exclusive(path, refuse=Held(path))` where a caller
    only skips the work (a sweep of what dead writers left)."""


class _Lock:
    """The flock of one path, and who in this process holds it."""

    def __init__(self):
        self.threads = threading.RLock()  # flock does not exclude threads sharing one descriptor
        self.depth = 0  # nested holds by the thread holding `threads`
        self.fd: int | None = None


_locks: dict[str, _Lock] = {}
_locks_guard = threading.Lock()


@contextlib.contextmanager
def exclusive(path: str, on_wait: Callable[[], None] | None = None,
              refuse: BaseException | None = None) -> Iterator[None]:
    """Hold the exclusive lock of the file `path`: one holder at a time across processes and threads.

    Args:
      path: the file (created, 0644, if missing); its directory must exist.
      on_wait: called once, before blocking, if another holder has the lock.
      refuse: raised at once instead of waiting, if another holder has the lock.
    """
    real = os.path.realpath(path)
    with _locks_guard:
        lock = _locks.setdefault(real, _Lock())
    if not lock.threads.acquire(blocking=refuse is None):
        raise refuse
    try:
        if lock.depth == 0:
            fd = os.open(real, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if refuse is not None:
                        raise refuse from None
                    if on_wait is not None:
                        on_wait()
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            lock.fd = fd
        lock.depth += 1
        try:
            yield
        finally:
            lock.depth -= 1
            if lock.depth == 0:
                fd, lock.fd = lock.fd, None
                os.close(fd)  # closing the last descriptor of the open file releases the flock
    finally:
        lock.threads.release()
