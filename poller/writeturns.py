"""Whose turn it is to write: an in-process lock on SQLite's single write lock, with the daemon's
own work ahead of housekeeping.

SQLite lets one transaction write at a time. A connection that finds the lock taken sleeps in
SQLite's busy handler (1, 2, 5 ... 100 ms steps) and only then looks again, so a pruner that starts
its next chunk the moment it commits can keep the writer waiting for most of a second (measured:
931 ms for chunks that each held the lock under 60 ms). Within one process the handoff can be exact
instead: writers queue on a condition here, are woken the moment the holder commits, and
background work (pruning) waits while anyone else is waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WriteTurns:
    """A reentrant write lock where background holders yield to every other waiter."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0  # foreground waiters: background turns wait while this is > 0
        self._background = 0

    @contextmanager
    def turn(self, *, background: bool = False) -> Iterator[None]:
        """Hold the write turn for the block; ``background`` turns go only when nobody else waits."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:  # a transaction opened inside another (same thread)
                self._depth += 1
            else:
                if background:
                    self._background += 1
                else:
                    self._waiting += 1
                try:
                    while self._owner is not None or (background and self._waiting):
                        self._cond.wait()
                finally:
                    if background:
                        self._background -= 1
                    else:
                        self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()

    def waiting(self) -> tuple[int, int]:
        """How many foreground and background writers wait for the turn now."""
        with self._cond:
            return self._waiting, self._background
