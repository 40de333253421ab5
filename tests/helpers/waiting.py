"""Polling for what another thread or process makes true (a daemon's counters, a file on disk,
a device's progress), so that tests wait exactly as long as needed instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 0.05


def wait_for(condition: Callable[[], object], timeout: float = 60.0) -> bool:
    """True as soon as ``condition()`` is truthy, False if it still is not after ``timeout``
    seconds; tests write ``assert wait_for(...)``. The condition is checked every 50 ms and once
    more at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL_S)
    return bool(condition())
