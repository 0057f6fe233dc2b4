"""Which waiting requests get the engine's free rows: a fair share per submission.

Requests wait in groups, one group per submission (an HTTP request with all its prompts, a
batch line, one `Engine.generate` call). Rows go to the waiting group that holds the fewest
of them (the oldest such group on a tie), so a request of 400 prompts takes rows only as
fast as every single-prompt request beside it, instead of holding the queue until its last
prompt has started.

That alone would leave a fan-out that arrived at an idle engine holding every row until its
prompts finish. With `preempt`, when no row is free and a waiting group holds fewer than its
fair share (rows divided by the groups holding or wanting rows), a group holding more than
its share gives up one row for it: the engine frees that row and puts its request back at the
head of its group, to be prefilled again (prompt and tokens so far) when its turn comes, and
to continue exactly where it stopped (sampling is keyed by seed and token count). Nothing is
given up while every group is within its share, so one client alone keeps every row: the
scheme costs nothing until someone else is waiting.

With `cap`, a group is not given a row beyond its share (ceil(rows / groups holding or wanting
rows)) even when rows are free, as long as another group holds or wants rows: a decode step
costs more with every row it carries (on a CPU, where a step of many rows is compute-bound),
so a fan-out filling the rows the single requests leave free slows every one of them. The cap
trades the fan-out's throughput for the others' latency; alone, a group still takes every row.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiting items in groups; `schedule` says which to admit and which groups give up a row.

    Not thread-safe: the engine calls it under its queue lock.
    """

    def __init__(self) -> None:
        self._groups: dict[Hashable, collections.deque[T]] = {}  # insertion order = arrival order
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for waiting in self._groups.values():
            yield from waiting

    def put(self, group: Hashable, items: list[T]) -> None:
        """Queue items behind the group's others (a new group queues behind every other)."""
        if items:
            self._groups.setdefault(group, collections.deque()).extend(items)
            self._size += len(items)

    def put_front(self, group: Hashable, item: T) -> None:
        """Put back an item that gave up its row: first of its group."""
        self._groups.setdefault(group, collections.deque()).appendleft(item)
        self._size += 1

    def remove_if(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out the items `drop` selects (cancelled requests); returns them."""
        removed = []
        for group in list(self._groups):
            kept = collections.deque()
            for item in self._groups[group]:
                (removed if drop(item) else kept).append(item)
            if kept:
                self._groups[group] = kept
            else:
                del self._groups[group]
        self._size -= len(removed)
        return removed

    def schedule(self, free: int, held: collections.Counter, rows: int,
                 preempt: bool = True, cap: bool = False) -> tuple[list[T], list[Hashable]]:
        """Items to admit into the `free` rows, and the groups that each give up one row for them.

        Args:
          free: rows free now.
          held: rows each group holds now (groups holding none may be absent).
          rows: all the engine's rows.
          preempt: whether a group above its fair share gives up rows to a waiting one below it.
          cap: whether a group stops at its fair share while other groups hold or want rows.
        Returns (items taken out of the queue, in admission order; one group per row to free).
        """
        held = collections.Counter({g: n for g, n in held.items() if n > 0})
        admit, victims = [], []
        while self._groups:
            group = min(self._groups, key=lambda g: held[g])  # fewest rows held; oldest on a tie
            if cap:
                groups = len(held.keys() | self._groups.keys())
                if groups > 1 and held[group] >= -(-rows // groups):
                    break  # every waiting group is at its share
            if free == 0:
                if not preempt:
                    break
                share = max(1, rows // len(held.keys() | self._groups.keys()))
                if held[group] >= share:
                    break
                victim = max((g for g in held if held[g] > share and g != group), key=held.__getitem__, default=None)
                if victim is None:
                    break
                held[victim] -= 1
                victims.append(victim)
                free += 1
            waiting = self._groups[group]
            admit.append(waiting.popleft())
            if not waiting:
                del self._groups[group]
            self._size -= 1
            held[group] += 1
            free -= 1
        return admit, victims
