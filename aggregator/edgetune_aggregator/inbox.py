"""The daemon's inbox: received messages waiting for the round loop, bounded in bytes.

The network thread reassembles and enqueues (the receiver's threads verify and decode them
meanwhile, receiver.py); the round loop checks, journals and acknowledges, which can be slower
than a broker delivers. Unbounded, a burst of a large fleet's
updates would sit in memory all at once (the benchmark measured ~1.1 MiB per SmolLM2 update
of backlog). Bounded, ``put`` blocks the network thread, which stops reading the socket, and
the broker holds the rest in its queue for this client's session: the daemon's memory
depends on the bound, not on the number of devices.
"""

from __future__ import annotations

import queue
import threading
from collections import deque


from edgetune.clock import WALL, Clock

#: what a small message is charged (its fields, the queue entry)
_SMALL = 1024


class Inbox:
    def __init__(self, max_bytes: int, clock: Clock = WALL):
        self.max_bytes = max_bytes
        #: whose time ``get``'s timeout is in: the wall clock, or the fleet simulator's
        self.clock = clock
        #: (when, until) while the reader waits on an empty inbox, in the clock's time: the
        #: fleet simulator advances its virtual time only while the daemon waits here
        self.waiting: tuple[float, float] | None = None
        self._items: deque[tuple[object, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        #: the thread that reads the inbox: it never waits in ``put`` (a broker may hand it
        #: retained messages while it subscribes, and it would wait for itself)
        self.reader: int | None = None

    def put(self, item: object, size: int = _SMALL) -> bool:
        """Enqueue; blocks while the inbox is full (one item always fits, however large).
        False once the inbox is closed: the item is dropped (devices resend what matters)."""
        with self._cond:
            while (self._items and self._bytes + size > self.max_bytes and not self._closed
                   and threading.get_ident() != self.reader):
                self._cond.wait()
            if self._closed:
                return False
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Nobody reads any more (the daemon stops): release a network thread waiting in
        ``put``, or closing the connection would wait for it for ever."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    def get(self, timeout: float) -> object:
        """The oldest item; raises ``queue.Empty`` after ``timeout`` seconds (of the clock's
        time) without one."""
        clock = self.clock
        deadline = clock.monotonic() + timeout
        with self._cond:
            while not self._items:
                now = clock.monotonic()
                left = deadline - now
                if left <= 0:
                    raise queue.Empty
                self.waiting = (now, deadline)
                try:
                    clock.wait(self._cond, left)
                finally:
                    self.waiting = None
            item, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return item

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def empty(self) -> bool:
        return not self._items


def drain(inbox: Inbox, take, timeout: float, most: int, full) -> None:
    """A batch: the first item (waiting up to ``timeout``), then what the inbox holds right now,
    each handed to ``take``, until ``most`` items or ``full()`` (what the batch holds in memory
    waiting for its commit is enough). The round loop's and a worker's group commits."""
    try:
        item = inbox.get(timeout=timeout)
    except queue.Empty:
        return
    for taken in range(1, most + 1):
        take(item)
        if taken == most or inbox.empty or full():
            return
        item = inbox.get(timeout=0)
