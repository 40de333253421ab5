"""Peer-supplied strings in logs (logsafe.py): escaped, cut, and repeated drops counted."""

from __future__ import annotations

from edgetune.logsafe import DropLog, shown


def test_shown_escapes_control_characters_and_cuts_long_values():
    assert shown("a\nb\r\x1b[31m") == "a\\nb\\r\\x1b[31m"
    assert shown("é ok") == "é ok"
    long = shown("x" * 1000, limit=10)
    assert long == "x" * 10 + "…(+990)"
    assert shown(12345) == "12345"


def test_drop_log_admits_a_burst_per_interval_and_reports_what_it_held_back():
    now = [0.0]
    drops = DropLog(burst=2, interval_s=10.0, clock=lambda: now[0])
    assert [drops.admit("d", "bad")[0] for _ in range(5)] == [True, True, False, False, False]
    assert drops.admit("other", "bad") == (True, 0)  # per sender
    now[0] = 11.0
    assert drops.admit("d", "bad") == (True, 3)  # the next window says how many were not logged
    assert drops.admit("d", "bad") == (True, 0)


def test_drop_log_memory_is_bounded_under_distinct_senders():
    drops = DropLog(burst=1, max_keys=100)
    for i in range(10_000):
        drops.admit(f"sender-{i}", "bad")
    assert len(drops._window) <= 100


def test_drop_log_caps_one_reason_over_all_senders():
    now = [0.0]
    drops = DropLog(burst=5, interval_s=10.0, clock=lambda: now[0], reason_burst=3)
    assert [drops.admit(f"s{i}", "unknown")[0] for i in range(6)] == [True] * 3 + [False] * 3
    assert drops.admit("s0", "other")[0]  # another reason has its own budget
    now[0] = 11.0
    assert drops.admit("s4", "unknown") == (True, 1)  # and what was held back is said
