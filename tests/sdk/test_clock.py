"""Device clocks: real, stretched to an emulated board, simulated; and the simulator's links.

Compute is faked with a controllable ``perf_counter`` so the arithmetic is checked exactly:
a device twice as slow as this machine must report twice the compute time."""

from __future__ import annotations

import threading
import time

import pytest

from edgetune import clock as clock_module
from edgetune.clock import DeviceClock, ThrottledClock
from edgetune.sim.clock import MachineSpeed, SimTime, SimulatedDeviceClock
from edgetune.sim.network import Link, Scheduler
from edgetune.wire import DeviceProfile


class FakeTimer:
    """``time.perf_counter`` as the clocks see it: moves only when told (compute "happens")."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timer(monkeypatch):
    fake = FakeTimer()
    monkeypatch.setattr(clock_module.time, "perf_counter", fake)
    return fake


def compute(clock: DeviceClock, timer: FakeTimer, seconds: list[float], dtype: str = "float32") -> float:
    """Run "compute" of these durations (a checkpoint after each) inside one block."""
    with clock.computing(dtype):
        for s in seconds:
            timer.now += s
            clock.checkpoint()
    return clock.spent


def test_a_device_twice_as_slow_reports_twice_the_compute_time(timer):
    time_ = SimTime()
    same = SimulatedDeviceClock(time_, lambda dtype: 1.0)
    slow = SimulatedDeviceClock(time_, lambda dtype: 2.0)
    assert compute(same, timer, [1.5, 0.5]) == pytest.approx(2.0)
    assert compute(slow, timer, [1.5, 0.5]) == pytest.approx(4.0)
    # the device's own timeline moved by exactly that, the fleet's not at all
    assert slow.now() == pytest.approx(4.0) and same.now() == pytest.approx(2.0)
    assert time_.monotonic() == 0.0
    assert slow.blocks == [{"start": 0.0, "seconds": 4.0}]


def test_the_slowdown_follows_the_dtype_the_plan_computes_in(timer):
    speeds = {"float32": 3.0, "bfloat16": 10.0}
    device = SimulatedDeviceClock(SimTime(), lambda dtype: speeds[dtype])
    assert compute(device, timer, [1.0], "bfloat16") == pytest.approx(10.0)
    assert compute(device, timer, [1.0], "float32") == pytest.approx(3.0)


def test_a_simulated_device_faster_than_this_machine_takes_less_time(timer):
    fast = SimulatedDeviceClock(SimTime(), lambda dtype: 0.5)
    assert compute(fast, timer, [2.0]) == pytest.approx(1.0)


def test_an_idle_simulated_device_follows_the_fleet_time(timer):
    time_ = SimTime()
    device = SimulatedDeviceClock(time_, lambda dtype: 2.0)
    compute(device, timer, [1.0])  # busy until t = 2
    time_.advance(1.0)
    assert device.now() == pytest.approx(2.0)  # still busy: its own time is ahead
    time_.advance(5.0)
    assert device.now() == pytest.approx(5.0)  # idle: the fleet's time
    compute(device, timer, [1.0])
    assert device.now() == pytest.approx(7.0)  # the next compute starts from there


def test_the_real_clock_accounts_compute_as_it_is(timer):
    assert compute(DeviceClock(), timer, [1.25]) == pytest.approx(1.25)


def test_a_throttled_device_sleeps_until_its_compute_took_the_emulated_time():
    """Real time: 0.05 s of CPU work on a device 4 times slower lasts about 0.2 s, however busy
    this machine is (the work is counted in CPU time, so contention eats into the sleep)."""
    throttled = ThrottledClock(lambda dtype: 4.0)
    started = time.monotonic()
    with throttled.computing():
        end = time.process_time() + 0.05
        while time.process_time() < end:
            pass
        throttled.checkpoint()
    elapsed = time.monotonic() - started
    assert throttled.spent == pytest.approx(0.2, rel=0.2)
    assert elapsed >= 0.19


def test_a_throttled_clock_never_speeds_a_device_up(timer):
    assert ThrottledClock(lambda dtype: 0.25).factor() == 1.0


def test_machine_speed_scales_by_the_profile_and_falls_back_to_float32():
    measured = []

    def measure(dtype, seconds):
        measured.append(dtype)
        return {"float32": 120.0, "bfloat16": 480.0}[dtype]

    speed = MachineSpeed(measure=measure, refresh_s=3600)
    pi = DeviceProfile("pi", 2 << 30, {"float32": 30.0})
    slowdown = speed.slowdown(pi)
    assert slowdown("float32") == pytest.approx(4.0)
    assert measured == ["float32"]  # measured once, and only what was needed
    # no bf16 figure on the pi: bf16 runs there at its float32 speed, here at this machine's bf16
    assert slowdown("bfloat16") == pytest.approx(480.0 / 30.0)
    both = DeviceProfile("amx", 2 << 30, {"float32": 240.0, "bfloat16": 240.0})
    assert speed.slowdown(both)("bfloat16") == pytest.approx(2.0)
    assert measured == ["float32", "bfloat16"]
    speed.before_compute("bfloat16")  # a block of compute begins: both measured again
    assert measured == ["float32", "bfloat16", "float32", "bfloat16"]


def test_a_link_sends_one_message_after_another_at_its_bandwidth():
    link = Link(uplink_mbps=8.0, downlink_mbps=80.0)  # 1 MB/s up, 10 MB/s down
    assert link.upload(0.0, 1_000_000) == pytest.approx(1.0)
    assert link.upload(0.5, 1_000_000) == pytest.approx(2.0)  # queued behind the first
    assert link.upload(5.0, 500_000) == pytest.approx(5.5)
    assert link.download(0.0, 1_000_000) == pytest.approx(0.1)
    assert link.up_seconds == pytest.approx(2.5)
    assert Link(None, None).upload(3.0, 10**9) == 3.0  # (no figure: no delay)


def test_the_scheduler_runs_actions_in_time_order():
    scheduler, ran = Scheduler(), []
    for when, name in ((2.0, "b"), (1.0, "a"), (2.0, "c"), (9.0, "z")):
        scheduler.at(when, lambda name=name: ran.append(name))
    assert scheduler.next_time() == 1.0
    for action in scheduler.due(2.0):
        action()
    assert ran == ["a", "b", "c"] and len(scheduler) == 1


def test_the_daemons_inbox_waits_in_simulated_time():
    """An inbox on simulated time gives up only when the simulator advances past its timeout."""
    import queue

    from edgetune_aggregator.inbox import Inbox

    time_ = SimTime()
    inbox = Inbox(1 << 20, time_)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_get(inbox, queue)))
    reader.start()
    deadline = time.monotonic() + 5
    while inbox.waiting is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inbox.waiting == (0.0, 30.0)  # waiting at t = 0 until t = 30
    time.sleep(0.2)
    assert not outcome  # real time passing changes nothing
    time_.advance(29.0)
    time.sleep(0.2)
    assert not outcome
    time_.advance(30.0)
    reader.join(5)
    assert outcome == ["empty"]


def _get(inbox, queue_module):
    try:
        return inbox.get(30.0)
    except queue_module.Empty:
        return "empty"
