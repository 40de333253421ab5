"""When a device may train: the edge machine has a job of its own, and training waits for it
(docs/operations.md).

A policy is any callable returning ``(allowed, why not)``. The device asks it before every
training step; while it says no, training pauses where it is (the model, the optimizer, the
steps done and the round all kept), the device tells the aggregator it is busy (an
``ErrorReport`` with code ``busy``, which the daemon records and does not count as giving up),
and asks again every ``check_s``; once allowed it says ``resumed`` and goes on from the same
step. Built in, each off unless configured (``PolicySettings``):

- ``IdleCpu(max_busy)``: the rest of the machine used at most this share of its CPUs over the
  last interval (from ``/proc/stat``, this process's own use taken out);
- ``TimeWindow("22:00-06:00")``: local time inside the window (it may wrap midnight);
- ``MainsPower()``: on mains power, where the OS says (``/sys/class/power_supply``); a machine
  whose OS says nothing (no battery) counts as on mains.
"""

from __future__ import annotations

import datetime as dt
import re
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgetune.device")

__all__ = ["Policy", "PolicySettings", "IdleCpu", "TimeWindow", "MainsPower", "all_of", "policy_from_settings"]

#: ``() -> (allowed, why not)``
Policy = Callable[[], tuple[bool, str]]

_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class PolicySettings:
    """The ``[policy]`` table of ``edgetune device run --config`` (flags: ``--idle-cpu``,
    ``--train-window``, ``--mains-only``)."""

    #: train only while the rest of the machine uses at most this share of its CPUs (None: any)
    idle_cpu: float | None = None
    #: train only inside this local-time window, "HH:MM-HH:MM" (None: any time)
    window: str | None = None
    #: train only on mains power, where the OS tells
    mains_only: bool = False
    #: while paused, ask again every this many seconds
    check_s: float = 5.0

    def __post_init__(self) -> None:
        if self.idle_cpu is not None and not 0 < self.idle_cpu <= 1:
            raise ValueError(f"policy idle_cpu must be in (0, 1] (a share of the CPUs), got {self.idle_cpu!r}")
        if self.window is not None:
            TimeWindow(self.window)  # (raises, naming the problem)
        if not self.check_s > 0:
            raise ValueError(f"policy check_s must be > 0, got {self.check_s!r}")

    @property
    def active(self) -> bool:
        return self.idle_cpu is not None or self.window is not None or self.mains_only


class TimeWindow:
    def __init__(self, window: str, now: Callable[[], dt.datetime] = dt.datetime.now):
        found = _WINDOW.match(window.strip())
        if not found:
            raise ValueError(f"policy window {window!r} is not HH:MM-HH:MM (e.g. 22:00-06:00)")
        h1, m1, h2, m2 = map(int, found.groups())
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise ValueError(f"policy window {window!r}: hours are 0-23 and minutes 0-59")
        self.start, self.end, self.window, self.now = h1 * 60 + m1, h2 * 60 + m2, window, now

    def __call__(self) -> tuple[bool, str]:
        t = self.now()
        minute = t.hour * 60 + t.minute
        inside = (self.start <= minute < self.end) if self.start <= self.end else (minute >= self.start or minute < self.end)
        return inside, "" if inside else f"outside the training window {self.window} (local time {t:%H:%M})"


class MainsPower:
    def __init__(self, root: Path = Path("/sys/class/power_supply")):
        self.root = Path(root)

    def __call__(self) -> tuple[bool, str]:
        supplies = sorted(self.root.glob("*")) if self.root.is_dir() else []
        mains = [s for s in supplies if _read(s / "type") == "Mains"]
        batteries = [s for s in supplies if _read(s / "type") == "Battery"]
        if not mains and not batteries:
            return True, ""  # (the OS says nothing of its power: a machine without a battery)
        if any(_read(s / "online") == "1" for s in mains):
            return True, ""
        if not mains and all(_read(b / "status") in ("Charging", "Full", "Not charging") for b in batteries):
            return True, ""
        return False, "on battery"


class IdleCpu:
    """The share of the machine's CPUs the rest of the machine used between two calls."""

    def __init__(self, max_busy: float, stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat")):
        self.max_busy, self.stat, self.own = max_busy, Path(stat), Path(own)
        self._last: tuple[int, int, int] | None = None

    def _sample(self) -> tuple[int, int, int] | None:
        """(total jiffies, idle jiffies, this process's jiffies), or None where /proc says nothing."""
        try:
            cpu = self.stat.read_text().splitlines()[0].split()
            mine = self.own.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        values = [int(v) for v in cpu[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle, int(mine[11]) + int(mine[12])  # (utime, stime)

    def __call__(self) -> tuple[bool, str]:
        sample = self._sample()
        last, self._last = self._last, sample
        if sample is None or last is None or sample[0] <= last[0]:
            return True, ""  # (no interval measured yet, or no /proc: nothing says the machine is busy)
        total = sample[0] - last[0]
        others = max(0, (total - (sample[1] - last[1])) - (sample[2] - last[2]))
        share = others / total
        allowed = share <= self.max_busy
        return allowed, "" if allowed else f"the machine's own work uses {share:.0%} of its CPUs (at most {self.max_busy:.0%})"


def all_of(*policies: Policy) -> Policy:
    def check() -> tuple[bool, str]:
        for policy in policies:
            allowed, why = _verdict(policy())
            if not allowed:
                return False, why
        return True, ""
    return check


def policy_from_settings(settings: PolicySettings) -> Policy | None:
    """The policy ``settings`` describe, or None where they allow training at any time."""
    parts: list[Policy] = []
    if settings.window is not None:
        parts.append(TimeWindow(settings.window))
    if settings.mains_only:
        parts.append(MainsPower())
    if settings.idle_cpu is not None:
        parts.append(IdleCpu(settings.idle_cpu))
    return all_of(*parts) if parts else None


def _verdict(value) -> tuple[bool, str]:
    """A policy's answer: ``(allowed, why)``, or a bare bool from an application's own callable."""
    if isinstance(value, tuple):
        return bool(value[0]), str(value[1]) if len(value) > 1 else ""
    return bool(value), "" if value else "the application's policy says not now"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def verdict(policy: Policy, who: str = "") -> tuple[bool, str]:
    """Ask ``policy``; a policy that fails allows training, and that is logged (a broken policy
    must not stop the device)."""
    try:
        return _verdict(policy())
    except Exception as exc:
        log.warning("%s: the training policy failed (%s: %s); training", who, type(exc).__name__, exc)
        return True, ""


def hold(policy: Policy, check_s: float, stop: threading.Event, who: str, report: Callable[[str, str], None],
         time_left: Callable[[], float] | None = None) -> bool:
    """Block while ``policy`` says not now, asking again every ``check_s`` (or until ``stop``,
    or until ``time_left()``, the round's, runs out: the caller's deadline check then ends the
    round for this device); ``report(code, message)`` tells the aggregator ``busy`` and then
    ``resumed``. Whether it paused at all (the caller then leaves the paused time out of its
    compute)."""
    allowed, why = verdict(policy, who)
    if allowed:
        return False
    began = time.monotonic()
    log.info("%s: training paused: %s", who, why)
    report("busy", why)
    while not stop.wait(check_s if time_left is None else max(0.01, min(check_s, time_left()))):
        if verdict(policy, who)[0]:
            break
        if time_left is not None and time_left() <= 0:
            log.info("%s: the round's deadline passed while training was paused", who)
            break
    paused = time.monotonic() - began
    log.info("%s: training resumed after %.0f s", who, paused)
    report("resumed", f"after {paused:.0f} s paused")
    return True


