"""Locks: a readers-writer lock between the threads using one Retriever, and a writer lock
between the processes updating one index directory.

ReadWriteLock: many searches at once, one update at a time with no search running.

USearch has open reports of concurrent `add` calls leaving unreachable graph nodes, and an
update touches the vector index and the metadata store together, so every update holds the
write side; searches share the read side. Writers are preferred: once one waits, new
readers queue behind it, so a stream of searches cannot starve an update.

directory_lock: two processes that load an index, update it and save it at the same time
would each save their own update over the other's, so every update of an index directory
(`press index add/remove/build`, `Retriever.save`, `Retriever.updating`) holds the
directory's writer lock from before it loads until after it saves. Readers take no lock:
saves replace files by atomic renames (retrieval/store.py), so a search never waits.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

from compress import file_locks


class ReadWriteLock:
    """`with lock.read():` for searches, `with lock.write():` for updates. Not re-entrant."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads inside read()
        self._writing = False  # a thread is inside write()
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# --- one writer per index directory, across processes

LOCK_FILE = "write.lock"


@contextlib.contextmanager
def directory_lock(directory: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold `directory`'s writer lock: one holder at a time across processes and threads.

    compress/file_locks.py's exclusive flock on DIRECTORY/write.lock (created if missing, never
    deleted); the kernel drops it when its holder exits, however it exits, so a killed writer
    leaves no stale lock. Re-entrant in the holding thread, so a command can hold it around
    load, update and save.

    Args:
      directory: an existing directory.
      on_wait: called once, before blocking, if another holder has the lock.
    """
    with file_locks.exclusive(os.path.join(os.path.realpath(directory), LOCK_FILE), on_wait):
        yield
