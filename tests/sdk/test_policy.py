"""Training policies (edgetune.policy): the built-in checks against fake /proc and /sys files
and a fixed clock, and a device over Mosquitto that its policy pauses mid-round: the aggregator
records it as busy (not as giving up), it resumes from the step it was at, and its update is
counted once."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from edgetune.policy import IdleCpu, MainsPower, PolicySettings, TimeWindow, all_of, policy_from_settings

from helpers.fleet import fleet_config, start_aggregator, start_device, stop_fleet


def at(hour: int, minute: int = 0):
    return lambda: dt.datetime(2026, 12, 7, hour, minute)


def test_a_time_window_may_wrap_midnight():
    assert TimeWindow("09:00-17:30", at(9))()[0] and not TimeWindow("09:00-17:30", at(17, 30))()[0]
    night = "22:00-06:00"
    assert TimeWindow(night, at(23, 59))()[0] and TimeWindow(night, at(5, 59))()[0]
    allowed, why = TimeWindow(night, at(12))()
    assert not allowed and "22:00-06:00" in why and "12:00" in why
    for bad in ("22-06", "25:00-06:00", "10:61-11:00"):
        with pytest.raises(ValueError, match="window"):
            TimeWindow(bad)


def supply(root, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def test_mains_power_as_the_os_tells(tmp_path):
    assert MainsPower(tmp_path / "none")() == (True, "")  # (the OS says nothing: no battery)
    supply(tmp_path / "a", "AC", type="Mains", online="1")
    supply(tmp_path / "a", "BAT0", type="Battery", status="Discharging")
    assert MainsPower(tmp_path / "a")()[0]
    supply(tmp_path / "b", "AC", type="Mains", online="0")
    supply(tmp_path / "b", "BAT0", type="Battery", status="Discharging")
    assert MainsPower(tmp_path / "b")() == (False, "on battery")
    supply(tmp_path / "c", "BAT0", type="Battery", status="Charging")  # (a battery that charges is on mains)
    assert MainsPower(tmp_path / "c")()[0]


def test_idle_cpu_takes_out_this_process_own_use(tmp_path):
    stat, own = tmp_path / "stat", tmp_path / "self"

    def sample(user: int, idle: int, mine: int) -> None:
        stat.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
        own.write_text(f"42 (python3 (x)) S {' '.join(['0'] * 10)} {mine} 0 0\n")

    policy = IdleCpu(0.5, stat, own)
    sample(0, 0, 0)
    assert policy() == (True, "")  # (no interval yet)
    sample(80, 20, 70)  # 100 jiffies: 80 busy, 70 of them ours: the rest of the machine used 10 %
    assert policy()[0]
    sample(160, 40, 80)  # 100 more: 80 busy, 10 ours: 70 %
    allowed, why = policy()
    assert not allowed and "70%" in why


def test_policies_combine_and_settings_build_them():
    assert all_of(lambda: True, lambda: (True, ""))() == (True, "")
    assert all_of(lambda: True, lambda: (False, "lunch"))() == (False, "lunch")
    assert policy_from_settings(PolicySettings()) is None
    assert policy_from_settings(PolicySettings(window="00:00-23:59", mains_only=True)) is not None
    with pytest.raises(ValueError, match="idle_cpu"):
        PolicySettings(idle_cpu=1.5)
    with pytest.raises(ValueError, match="window"):
        PolicySettings(window="later")


def test_a_paused_device_resumes_and_its_update_counts_once_over_mosquitto(mosquitto_url, tmp_path):
    fleet = f"policy-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(mosquitto_url, fleet_config(tmp_path, fleet, rounds=2, planning=False))
    allowed, asked = threading.Event(), []

    def lunch_break() -> tuple[bool, str]:  # (the machine's own job runs until the test says so)
        asked.append(allowed.is_set())
        return allowed.is_set(), "the line is running a batch"

    devices = [start_device(mosquitto_url, fleet, i, **(dict(policy=lunch_break, policy_check_s=0.2) if i == 2 else {}))
               for i in range(3)]
    try:
        # paused: asked again and again, while the other two have sent their round-1 updates
        assert wait(lambda: len(asked) >= 5 and all(1 in d.rounds_done for d in devices[:2]), 60)
        assert aggregator.state.round == 0  # (the round waits for it: busy, not gone)
        allowed.set()
        assert aggregator.finished.wait(120)
    finally:
        stop_fleet(aggregator, thread, devices)
    first = next(r for r in aggregator.store.rounds() if r["round"] == 1)
    assert "busy: the line is running a batch" in first["busy"]["dev-2"] and "resumed" in first["busy"]["dev-2"]
    assert "dev-2" not in first.get("declined", {})
    rows = [d for d in first["devices"] if d["device_id"] == "dev-2"]
    assert len(rows) == 1  # counted once
    # it went on from where it was: the same tokens trained as a device that never paused
    assert rows[0]["train_tokens"] == next(d for d in first["devices"] if d["device_id"] == "dev-0")["train_tokens"]
    assert devices[2].rounds_done == [1, 2]


def wait(condition, timeout: float) -> bool:
    from helpers.waiting import wait_for

    return wait_for(condition, timeout)
