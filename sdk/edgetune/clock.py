"""How devices and the daemon experience time: the wall clock, a slower board emulated on a
faster machine, or the fleet simulator's virtual time.

Everything that waits or measures a round's duration asks a clock, so the same protocol and
trainer code runs

- on a real board (:class:`DeviceClock`: time is the machine's own);
- as a slower board emulated here (:class:`ThrottledClock`): each stretch of compute is followed
  by a sleep that makes it last as long as it would on the slower board. ``edgetune device run
  --emulate CLASS.yaml`` and the demo use it, so a plan made for a Raspberry Pi really takes a
  Raspberry Pi's time;
- in the fleet simulator (``edgetune.sim``): compute advances the device's virtual time by the
  measured duration times the same slowdown, and nothing sleeps.

The slowdown of a stretch of compute is ``this machine's GFLOP/s ÷ the emulated device's`` in the
dtype the matmuls run in (float32, or bfloat16 for a bfloat16 base): the cost model's own
assumption that a device's kernels scale with its matmul throughput (``docs/planner.md``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: dtype -> how many times slower the device is than this machine (1: as fast)
Slowdown = Callable[[str], float]


class Clock:
    """What the daemon reads: a monotonic clock for deadlines and wall time for records."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, condition: threading.Condition, seconds: float) -> None:
        """Wait on ``condition`` (held) for at most ``seconds`` of this clock's time."""
        condition.wait(seconds)


#: the daemon's default clock
WALL = Clock()


class DeviceClock:
    """A device's timeline, real by default.

    ``computing(dtype)`` brackets the work of a round (training, evaluation, scoring);
    ``checkpoint()`` inside it accounts for the work done since the previous checkpoint, and
    returns how many device seconds it stood for. Subclasses decide what accounting means.
    """

    def __init__(self, slowdown: Slowdown | None = None):
        self.slowdown = slowdown or (lambda dtype: 1.0)
        self.dtype = "float32"
        self._mark: float | None = None
        self._cpu = 0.0
        #: device seconds of compute accounted in the current ``computing`` block
        self.spent = 0.0

    def now(self) -> float:
        return time.monotonic()

    def arrival(self) -> float:
        """The time, on this device's timeline, of a message arriving now (read on the network
        thread, while the device may be busy)."""
        return self.now()

    @contextlib.contextmanager
    def computing(self, dtype: str = "float32") -> Iterator[DeviceClock]:
        self.dtype, self.spent, self._mark, self._cpu = dtype, 0.0, time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.checkpoint()
            self._mark = None

    def checkpoint(self) -> float:
        """Account for the compute since the last checkpoint; device seconds it stood for."""
        if self._mark is None:
            return 0.0
        real = time.perf_counter() - self._mark
        device = self._device_seconds(real, time.process_time() - self._cpu)
        self._advance(device, real)
        self.spent += device
        self._mark, self._cpu = time.perf_counter(), time.process_time()  # (after any sleep: not compute)
        return device

    def rest(self) -> None:
        """The time since the last checkpoint was no compute (training paused by a policy):
        it is not accounted."""
        if self._mark is not None:
            self._mark, self._cpu = time.perf_counter(), time.process_time()

    def _device_seconds(self, real_s: float, cpu_s: float) -> float:
        """What ``real_s`` of compute here (``cpu_s`` of CPU time) stands for on the device."""
        return real_s * self.factor()

    def factor(self) -> float:
        """How many times slower than this machine the current compute is on the device."""
        return 1.0

    def _advance(self, device_s: float, real_s: float) -> None:
        """The device spent ``device_s`` on compute that took ``real_s`` here."""


class ThrottledClock(DeviceClock):
    """A slower device emulated in real time: compute is stretched by sleeping. A device
    faster than this machine cannot be emulated faster than it is (the factor is at least 1).

    The work done is measured in CPU time (per training thread), not wall time: when other
    processes share this machine (the demo's devices do), the wall time of the same work grows
    but the device should take its class's time for it, so the sleep shrinks to make up for it.
    Only when this machine is too busy to keep up does the device run late."""

    def __init__(self, slowdown: Slowdown | None = None, threads: int = 1):
        super().__init__(slowdown)
        self.threads = max(1, threads)

    def factor(self) -> float:
        return max(1.0, float(self.slowdown(self.dtype)))

    def _device_seconds(self, real_s: float, cpu_s: float) -> float:
        return max(real_s, cpu_s / self.threads * self.factor())

    def _advance(self, device_s: float, real_s: float) -> None:
        if device_s > real_s:
            time.sleep(device_s - real_s)


__all__ = ["WALL", "Clock", "DeviceClock", "Slowdown", "ThrottledClock"]
