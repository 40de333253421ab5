"""The fleet simulator: real devices and the real daemon in simulated time (tiny models).

The devices here run the same ``Device`` protocol and trainers as ``edgetune device run``; a
``MachineSpeed`` with a fixed figure makes every slowdown exact, so "slower than the deadline"
is certain, not a matter of this machine's load."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edgetune.sim import FleetError, MachineSpeed, Simulation, fleet_from_dict, load_fleet

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def fixed_speed(gflops: float = 100.0) -> MachineSpeed:
    """This machine "measures" ``gflops`` in every dtype."""
    return MachineSpeed(measure=lambda dtype, seconds: gflops, refresh_s=1e9)


def write_profile(folder: Path, name: str, gflops: float, memory: str = "8 GiB", uplink: float = 100.0,
                  downlink: float = 100.0) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmemory: {memory}\ngflops: {{float32: {gflops}}}\ncores: 2\n"
                    f"uplink_mbps: {uplink}\ndownlink_mbps: {downlink}\nsource: a test\n")
    return str(path)


def tiny_fleet(tmp_path: Path, devices: list[dict], **overrides) -> dict:
    fleet = {"name": f"sim-{uuid.uuid4().hex[:6]}", "model": "tiny-llama", "rounds": 1, "deadline_s": 30,
             "adapter": {"rank": 4, "alpha": 8}, "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 0.01,
                                                           "eval_blocks": 2},
             "data": {"records": 60}, "aggregator": {"evaluate_final": False}, "devices": devices}
    fleet.update(overrides)
    return fleet


def test_a_device_too_slow_for_the_deadline_misses_the_round_and_stops_training(tmp_path):
    """Unplanned (one configuration for all): the slow device's first step already ends past
    the deadline. The daemon closes the round at the deadline without it, as it would in
    production; the device stops after that step instead of training the other two."""
    fast = write_profile(tmp_path, "fast", 1e6)
    slow = write_profile(tmp_path, "slow", 1e-3)  # 10⁵ times slower than this "machine"
    spec = fleet_from_dict(tiny_fleet(tmp_path, [{"class": fast, "name": "fast"}, {"class": slow, "name": "slow"}]))
    result = Simulation(spec, tmp_path / "out", speed=fixed_speed(), plan=False).run()
    (train,) = [r for r in result.rounds if r["kind"] == "train"]
    assert train["status"] == "aggregated"
    assert [d["device_id"] for d in train["devices"]] == ["fast"]
    assert train["asked"] == ["fast", "slow"]
    assert train["duration_s"] == pytest.approx(30, abs=0.5)  # it waited for it, until the deadline
    slow_trace = result.trace["devices"]["slow"]
    assert not [s for s in slow_trace["sent"] if s["topic"] == "update"]
    (error,) = [s for s in slow_trace["sent"] if s["topic"] == "error"]
    assert error["start"] > 30  # it knew only after its (slow) first step
    later = [r for r in result.rounds if r["round"] > train["round"]]
    assert all("slow" not in r.get("declined", {}) for r in later)  # (a late report decides nothing)


def test_the_planner_leaves_out_a_device_that_cannot_make_the_deadline(tmp_path):
    fast = write_profile(tmp_path, "fast", 1e6)
    slow = write_profile(tmp_path, "slow", 1e-3)
    spec = fleet_from_dict(tiny_fleet(tmp_path, [{"class": fast, "name": "fast"}, {"class": slow, "name": "slow"}]))
    result = Simulation(spec, tmp_path / "out", speed=fixed_speed()).run()
    (train,) = [r for r in result.rounds if r["kind"] == "train"]
    assert set(train["plans"]) == {"fast"} and "slow" in train["excluded"]
    assert "deadline" in train["excluded"]["slow"]
    assert train["plans"]["fast"]["predicted_step_s"] > 0


def test_an_update_that_arrives_after_the_deadline_is_refused_as_the_daemon_refuses_it(tmp_path):
    """A slow uplink: training fits, but the upload does not: the update really arrives late."""
    fast = write_profile(tmp_path, "fast", 1e6)
    dialup = write_profile(tmp_path, "dialup", 1e6, uplink=0.002)  # 2 kbit/s up: a minute per update
    spec = fleet_from_dict(tiny_fleet(tmp_path, [{"class": fast, "name": "fast"}, {"class": dialup, "name": "dialup"}],
                                      rounds=2))
    result = Simulation(spec, tmp_path / "out", speed=fixed_speed(), plan=False).run()
    first = next(r for r in result.rounds if r["kind"] == "train")
    assert [d["device_id"] for d in first["devices"]] == ["fast"]
    assert first["duration_s"] == pytest.approx(30, abs=0.5)  # waited for it until the deadline
    later = [r for r in result.rounds if r["round"] > first["round"]]
    assert sum(r["dropped"].get("stale_round", 0) for r in later) >= 1  # its update, when it came
    sent = [s for s in result.trace["devices"]["dialup"]["sent"] if s["topic"] == "update"]
    assert sent and sent[0]["arrives"] - sent[0]["start"] > 30


def test_fleet_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FleetError, match="devices"):
        fleet_from_dict({"name": "x"})
    with pytest.raises(FleetError, match="no device class 'nope'"):
        fleet_from_dict({"devices": [{"class": "nope"}]})
    with pytest.raises(FleetError, match="one per device"):
        fleet_from_dict({"devices": [{"class": "raspberry-pi-5-8gb", "count": 2, "data": ["generated"]}]})
    with pytest.raises(FleetError, match="deadline_s"):
        fleet_from_dict({"deadline_s": -1, "devices": [{"class": "raspberry-pi-5-8gb"}]})
    spec = load_fleet(ROOT / "profiles" / "fleets" / "fedpipe-8.yaml")
    assert len(spec.devices) == 8 and len({d.profile.name for d in spec.devices}) >= 4
    assert len({d.data for d in spec.devices}) == 8  # one category per device


@pytest.mark.slow
def test_edgetune_simulate_runs_a_fleet_and_writes_a_report_that_renders(tmp_path):
    """The command line, as a user runs it: 4 devices of 4 classes, 2 rounds, a tiny model; the
    report's every image loads in a real Chromium."""
    from helpers.browser import Page

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(json.dumps(tiny_fleet(tmp_path, [
        {"class": c, "count": 1} for c in ("raspberry-pi-4-4gb-gateway", "jetson-orin-nano-8gb", "intel-n100-16gb",
                                           "xeon-d-8core-32gb")], rounds=2, aggregator={})))
    out = tmp_path / "sim"
    result = subprocess.run([sys.executable, "-m", "edgetune", "simulate", "--fleet", str(fleet), "--out", str(out),
                             "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1 (train) aggregated" in result.stdout and "round 2 (train) aggregated" in result.stdout
    assert "report:" in result.stdout
    rounds = json.loads((out / "state" / "rounds.json").read_text())
    plans = next(r for r in rounds if r["kind"] == "train")["plans"]
    assert len(plans) == 4
    trace = json.loads((out / "state" / "simulation.json").read_text())
    slowdowns = {d["class"]: d["slowdown_float32"] for d in trace["devices"].values()}
    assert slowdowns["raspberry-pi-4-4gb-gateway"] > slowdowns["xeon-d-8core-32gb"]  # 16 vs 256 GFLOP/s
    report = out / "report" / "index.html"
    with Page(report.as_uri()) as page:
        images = page.images()
        text = page.evaluate("document.body.innerText")
    assert len(images) >= 5
    for image in images:
        assert image["complete"] and image["width"] >= 300 and image["height"] >= 200, image
        assert (out / "report" / image["src"]).stat().st_size > 5_000
    assert "raspberry-pi-4-4gb-gateway" in text and "rank" in text


@pytest.mark.slow
def test_a_simulation_over_mosquitto(mosquitto_url, tmp_path):
    """``--broker``: the same fleet over a real broker (its delivery takes no simulated time)."""
    fast = write_profile(tmp_path, "fast", 1e6)
    slow = write_profile(tmp_path, "slower", 50.0)  # twice as slow as this "machine"
    spec = fleet_from_dict(tiny_fleet(tmp_path, [{"class": fast, "name": "fast"}, {"class": slow, "name": "slower"}],
                                      rounds=2))
    result = Simulation(spec, tmp_path / "out", broker=mosquitto_url, speed=fixed_speed()).run()
    trains = [r for r in result.rounds if r["kind"] == "train"]
    assert [r["status"] for r in trains] == ["aggregated", "aggregated"]
    assert all(len(r["devices"]) == 2 for r in trains)
    devices = result.trace["devices"]
    assert devices["slower"]["slowdown_float32"] == pytest.approx(2.0)


def test_edgetune_report_draws_any_state_dir_and_says_what_is_wrong(tmp_path, capsys):
    from edgetune.cli import main

    fast = write_profile(tmp_path, "fast", 1e6)
    spec = fleet_from_dict(tiny_fleet(tmp_path, [{"class": fast, "name": "one"}]))
    result = Simulation(spec, tmp_path / "out", speed=fixed_speed()).run()
    assert main(["report", str(result.state_dir), "--out", str(tmp_path / "r")]) == 0
    assert f"report: {tmp_path / 'r' / 'index.html'}" in capsys.readouterr().out
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<script" not in page and "one" in page and "timeline.png" in page
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "is not an aggregator state dir" in capsys.readouterr().err


def test_what_devices_sent_is_shown_as_text_not_markup(tmp_path):
    from edgetune.report.data import RunData
    from edgetune.report.page import render

    record = {"round": 1, "kind": "train", "status": "aggregated", "base_version": 0, "new_version": 1,
              "duration_s": 3.0, "devices": [], "asked": ["d"], "excluded": {}, "dropped": {},
              "declined": {"d": "deadline_missed: <img src=x onerror=alert(1)>"}, "note": "<b>n</b>", "plans": {}}
    page = render(RunData(tmp_path, "f", [record]), [("participation.png", "who answered")])
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "<b>n</b>" not in page
