"""A device's own profile: measured on its first start, cached beside its state, measured again
when the machine changes; emulating a slower class caps the figures."""

from __future__ import annotations

import json

import pytest

from edgetune.device import announced_profile
from edgetune.clock import DeviceClock, ThrottledClock
from edgetune.profiling import auto
from edgetune.profiling.auto import cpu_model, limit_to, machine_fingerprint, self_profile
from edgetune.wire import DeviceProfile


@pytest.fixture
def measurements(monkeypatch):
    """Count the slow measurements; each returns this "machine": 100 GFLOP/s, 16 GiB."""
    calls = []

    def measure_profile(name=None, uplink_mbps=None, seconds=2.0):
        calls.append(name)
        return DeviceProfile(name or "host", 16 << 30, {"float32": 100.0, "bfloat16": 300.0}, 4,
                             ("bfloat16", "int8", "nf4"), source="measured in a test")

    monkeypatch.setattr("edgetune.profiling.measure.measure_profile", measure_profile)
    return calls


def test_the_first_start_measures_and_later_starts_use_the_cache(tmp_path, measurements):
    first = self_profile(tmp_path, "dev-1")
    assert measurements == ["dev-1"] and not first.cached
    assert (tmp_path / "profile.yaml").is_file() and (tmp_path / "machine.json").is_file()
    second = self_profile(tmp_path, "dev-1")
    assert measurements == ["dev-1"] and second.cached
    assert second.profile.gflops == first.profile.gflops == {"float32": 100.0, "bfloat16": 300.0}
    assert second.profile.quantization == ("bfloat16", "int8", "nf4")
    # memory is what is free now (read at every start), whole MiB
    assert second.profile.memory_bytes > 0 and second.profile.memory_bytes % (1 << 20) == 0
    assert second.profile.memory_bytes != 16 << 30


def test_reprofile_and_a_changed_machine_measure_again(tmp_path, measurements, monkeypatch):
    self_profile(tmp_path, "dev-1")
    self_profile(tmp_path, "dev-1", reprofile=True)
    assert len(measurements) == 2
    self_profile(tmp_path, "dev-1", threads=1)  # training threads are part of what was measured
    assert len(measurements) == 3
    fingerprint = machine_fingerprint(1)
    monkeypatch.setattr(auto, "machine_fingerprint", lambda threads=None: {**fingerprint, "cpu": "another CPU"})
    self_profile(tmp_path, "dev-1", threads=1)
    assert len(measurements) == 4
    saved = json.loads((tmp_path / "machine.json").read_text())
    assert saved["fingerprint"]["cpu"] == "another CPU"


def test_a_damaged_cache_is_measured_again(tmp_path, measurements):
    self_profile(tmp_path, "dev-1")
    (tmp_path / "profile.yaml").write_text("name: [unbalanced\n")
    assert not self_profile(tmp_path, "dev-1").cached
    (tmp_path / "machine.json").write_text("not json")
    assert not self_profile(tmp_path, "dev-1").cached
    assert len(measurements) == 3


def test_emulating_a_class_caps_every_figure_and_stretches_compute(tmp_path, measurements):
    pi = DeviceProfile("raspberry-pi-4", 2 << 30, {"float32": 16.0}, 4, ("bfloat16", "int8", "nf4"), uplink_mbps=5.0)
    emulated = self_profile(tmp_path, "dev-1", emulate=pi)
    assert emulated.emulated and emulated.profile.name == "raspberry-pi-4"
    assert emulated.profile.gflops == {"float32": 16.0}  # no bfloat16 figure: no fast bf16 there
    assert emulated.profile.memory_bytes <= 2 << 30 and emulated.profile.uplink_mbps == 5.0
    assert emulated.slowdown("float32") == pytest.approx(100.0 / 16.0)
    # no bf16 figure for the class: bf16 runs there at its float32 speed, here at 300 GFLOP/s
    assert emulated.slowdown("bfloat16") == pytest.approx(300.0 / 16.0)
    fast = DeviceProfile("big", 1 << 40, {"float32": 1000.0}, 64)
    capped = limit_to(emulated.measured, fast)
    assert capped.gflops == {"float32": 100.0} and capped.memory_bytes == emulated.measured.memory_bytes
    assert capped.cores == 4 and capped.quantization == ()


def test_announced_profile_follows_the_devices_options(tmp_path, measurements):
    profile, clock = announced_profile("fleet", "dev-1", state_dir=tmp_path)
    assert profile.name == "dev-1" and type(clock) is DeviceClock
    none, _ = announced_profile("fleet", "dev-1", plan=False, state_dir=tmp_path)
    assert none is None
    given = DeviceProfile("given", 1 << 30, {"float32": 1.0})
    assert announced_profile("fleet", "dev-1", profile=given)[0] is given
    pi = tmp_path / "pi.yaml"
    pi.write_text("name: pi\nmemory: 2 GiB\ngflops: {float32: 25}\n")
    profile, clock = announced_profile("fleet", "dev-1", state_dir=tmp_path, emulate=pi)
    assert profile.name == "pi" and isinstance(clock, ThrottledClock)
    assert clock.slowdown("float32") == pytest.approx(4.0)
    assert len(measurements) == 1  # (all of it from one measurement)


def test_default_state_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert auto.default_state_dir("plant-7", "line-1") == tmp_path / "edgetune" / "plant-7" / "line-1"


def test_cpu_model_reads_x86_and_arm_cpuinfo():
    assert cpu_model("processor\t: 0\nmodel name\t: Intel(R) N100\n") == "Intel(R) N100"
    assert cpu_model("processor : 0\nBogoMIPS : 108\nModel : Raspberry Pi 4 Model B Rev 1.4\n") == \
        "Raspberry Pi 4 Model B Rev 1.4"
    assert cpu_model("") == ""
