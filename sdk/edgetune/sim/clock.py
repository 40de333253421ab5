"""Virtual time for a simulated fleet, and how a simulated device's compute advances it.

The simulator freezes time while devices compute for real, then advances it by what the compute
would have taken on each device: the measured duration times ``this machine's GFLOP/s ÷ the
device profile's`` (:class:`MachineSpeed` measures the first; it is re-measured now and then so
that other load on this machine, which slows the training and the measurement alike, cancels
out of the ratio).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from ..clock import Clock, DeviceClock, Slowdown
from ..wire import DeviceProfile


class SimTime(Clock):
    """The simulation's clock, shared by the daemon and the devices. Only the simulator moves
    it (``advance``), and only while everyone waits."""

    def __init__(self, epoch: float | None = None):
        self._now = 0.0
        #: wall time of virtual time 0 (round records carry wall times)
        self.epoch = time.time() if epoch is None else epoch
        self._lock = threading.Lock()
        self._waiting: set[threading.Condition] = set()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self.epoch + self._now

    def wait(self, condition: threading.Condition, seconds: float) -> None:
        """Wait until notified: an item arrived, or the simulator advanced the time (a short
        real-time bound guards against a missed notification)."""
        with self._lock:
            self._waiting.add(condition)
        try:
            condition.wait(0.05)
        finally:
            with self._lock:
                self._waiting.discard(condition)

    def advance(self, to: float) -> None:
        if to > self._now:
            self._now = to
        with self._lock:
            waiting = list(self._waiting)
        for condition in waiting:
            with condition:
                condition.notify_all()


class SimulatedDeviceClock(DeviceClock):
    """A device's timeline in the simulator: virtual, ahead of the fleet's while the device
    is busy computing (it handles messages only when it is done, like a real device loop)."""

    def __init__(self, fleet_time: SimTime, slowdown: Slowdown):
        super().__init__(slowdown)
        self.fleet_time = fleet_time
        self._local = 0.0
        #: called with the dtype at the start of each ``computing`` block (the simulator measures
        #: this machine again and marks its memory gauge)
        self.on_compute: Callable[[str], None] | None = None
        #: every block of compute: when it started (virtual s) and how long it took the device
        self.blocks: list[dict] = []

    def now(self) -> float:
        return max(self._local, self.fleet_time.monotonic())

    def arrival(self) -> float:
        # delivered at the fleet's time; the device may still be busy (ahead) then
        return self.fleet_time.monotonic()

    def factor(self) -> float:
        return float(self.slowdown(self.dtype))

    def _advance(self, device_s: float, real_s: float) -> None:
        self._local = self.now() + device_s

    @contextlib.contextmanager
    def computing(self, dtype: str = "float32") -> Iterator[DeviceClock]:
        if self.on_compute is not None:
            self.on_compute(dtype)
        start = self.now()
        with super().computing(dtype) as clock:
            yield clock
        self.blocks.append({"start": round(start, 3), "seconds": round(self.spent, 3)})


class MachineSpeed:
    """This machine's sustained matmul GFLOP/s per dtype, on the threads training uses: the
    median of the last few short measurements of that dtype, taken again when older than
    ``refresh_s`` (a dtype is measured only once some device computes in it).

    The simulator measures again before every device's block of compute (``before_compute``):
    other load on the machine then slows the measurement as it slows the training, and the
    ratio the simulated time is scaled by stays right."""

    def __init__(self, threads: int | None = None, seconds: float = 0.25, refresh_s: float = 120.0,
                 measure: Callable[[str, float], float] | None = None):
        self.threads = threads
        self.seconds = seconds
        self.refresh_s = refresh_s
        self._measure = measure or self._measure_here
        self._samples: dict[str, deque] = {}
        self._last: dict[str, float] = {}

    def _measure_here(self, dtype: str, seconds: float) -> float:
        from ..profiling.measure import _numpy_step, _torch_available, _torch_step, time_square_matmul

        if not _torch_available():
            return time_square_matmul(_numpy_step, seconds).gflops
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        return time_square_matmul(_torch_step(dtype), seconds).gflops

    def refresh(self, dtype: str = "float32", force: bool = False) -> None:
        if not force and time.monotonic() - self._last.get(dtype, -float("inf")) < self.refresh_s:
            return
        self._samples.setdefault(dtype, deque(maxlen=3)).append(self._measure(dtype, self.seconds))
        self._last[dtype] = time.monotonic()

    def before_compute(self, dtype: str) -> None:
        """A device is about to compute in ``dtype``: measure it now (and float32, which a
        profile without a figure for ``dtype`` is timed in)."""
        self.refresh("float32", force=True)
        if dtype != "float32":
            self.refresh(dtype, force=True)

    def gflops(self, dtype: str = "float32") -> float:
        self.refresh(dtype)
        return statistics.median(self._samples[dtype])

    @property
    def measured(self) -> dict[str, float]:
        """The current figure of every dtype measured so far."""
        return {dtype: statistics.median(samples) for dtype, samples in self._samples.items()}

    def slowdown(self, profile: DeviceProfile) -> Slowdown:
        """How many times slower than this machine ``profile``'s device computes in a dtype (below
        1: faster). A dtype the profile has no figure for runs there at its float32 speed (it has
        no fast path for it), while here it ran at this machine's speed in that dtype."""

        def factor(dtype: str) -> float:
            there = profile.gflops.get(dtype) or profile.gflops.get("float32") or next(iter(profile.gflops.values()))
            return self.gflops(dtype) / there

        return factor


__all__ = ["MachineSpeed", "SimTime", "SimulatedDeviceClock"]
