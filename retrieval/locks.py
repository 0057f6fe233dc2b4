"""A readers-writer lock: many searches at once, one update at a time with no search running.

USearch has open reports of concurrent `add` calls leaving unreachable graph nodes, and an
update touches the vector index and the metadata store together, so every update holds the
write side; searches share the read side. Writers are preferred: once one waits, new
readers queue behind it, so a stream of searches cannot starve an update.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


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
