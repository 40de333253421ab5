"""What a peer sent, made safe to log: escaped, truncated, and repeated drops rate-limited.

Device ids, topics, error messages and refusal details can be chosen by whoever publishes.
Written into a log verbatim, a newline forges a log line and a 100 KB topic costs 100 KB of
log per message. ``shown`` escapes every non-printable character (a newline becomes ``\\n``)
and cuts long values with a count of what was cut; ``DropLog`` logs the first few drops of
each (sender, reason) per interval and counts the rest, so a flood costs a few lines a minute.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

#: characters of a peer-supplied value that reach a log line
DEFAULT_LIMIT = 160


def shown(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as text with non-printable characters escaped, at most ``limit`` characters
    of it (``…(+N)`` says how many were cut)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped + (f"…(+{cut})" if cut > 0 else "")


class DropLog:
    """Says, per (sender, reason), whether a drop should be logged: the first ``burst`` in each
    ``interval_s``; later ones are counted and summed up in the next line that is logged. A
    reason gets at most ``reason_burst`` lines per interval over all senders, so a flood from
    made-up senders (one drop each) is not a line each either."""

    def __init__(self, burst: int = 5, interval_s: float = 60.0, clock=time.monotonic, max_keys: int = 10_000,
                 reason_burst: int = 50):
        self.burst, self.interval_s, self.clock, self.max_keys = burst, interval_s, clock, max_keys
        self.reason_burst = reason_burst
        self._reasons: dict[str, tuple[float, int]] = {}
        self._window: dict[tuple[str, str], tuple[float, int]] = {}
        self._suppressed: Counter = Counter()
        self._lock = threading.Lock()

    def admit(self, sender: str, reason: str) -> tuple[bool, int]:
        """(log this one?, how many of this kind were suppressed since the last logged one)."""
        key = (sender[:200], reason[:64])
        now = self.clock()
        with self._lock:
            start, count = self._window.get(key, (now, 0))
            if now - start >= self.interval_s:
                start, count = now, 0
            count += 1
            if len(self._window) >= self.max_keys and key not in self._window:
                self._window.clear()  # (a flood of distinct senders: start over rather than grow)
                self._suppressed.clear()
            self._window[key] = (start, count)
            r_start, r_count = self._reasons.get(key[1], (now, 0))
            if now - r_start >= self.interval_s:
                r_start, r_count = now, 0
            if len(self._reasons) >= 1_000 and key[1] not in self._reasons:
                self._reasons.clear()
            self._reasons[key[1]] = (r_start, r_count + 1)
            if count <= self.burst and r_count < self.reason_burst:
                return True, self._suppressed.pop(key, 0)
            self._suppressed[key] += 1
            return False, 0
