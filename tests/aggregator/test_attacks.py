"""The attack suite, with the daemon's default flags, on a real Mosquitto with a signed fleet:
one legitimate, correctly signed device lies; the others are honest (docs/security.md).

Each test is one attack from the issue that made "safe by default" a requirement, and checks
both halves: the liar is bounded or refused, and the honest devices' rounds go on."""

from __future__ import annotations

import uuid

import numpy as np

from edgetune.simulate import TINY, LightDevice, simulated_delta
from edgetune.transport import open_transport
from edgetune.wire import TrainSettings
from edgetune.wire.signing import Signer, write_key_file
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.influence import InfluenceBounds
from edgetune_aggregator.metrics import AggregatorMetrics

from helpers.journal import has
from helpers.fleet import SPEC, Observer, fleet_config, join_device, start_aggregator, workload
from helpers.manual import SHAPES, Manual, memory_fleet
from helpers.waiting import wait_for


def _signed_fleet(url: str, tmp_path, name: str, honest=("dev-0", "dev-1"), liar="dev-2", **settings):
    """A daemon with default bounds, honest LightDevices and a hand-driven liar, all signed."""
    fleet = f"{name}-{uuid.uuid4().hex[:8]}"
    signers = {d: Signer.generate(d) for d in (*honest, liar)}
    write_key_file(tmp_path / "keys.json", fleet, {d: s.public_key for d, s in signers.items()})
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=len(honest) + 1,
                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, train=TrainSettings(), planning=False,
                  evaluate_final=False, device_keys=tmp_path / "keys.json", model=TINY) | settings
    metrics = AggregatorMetrics(fleet)
    aggregator, thread = start_aggregator(url, AggregatorConfig(**fields), metrics=metrics)
    devices = [LightDevice(open_transport(url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d, TINY,
                           signer=signers[d]).start() for d in honest]
    manual = Manual(url, fleet, signers[liar])
    assert wait_for(lambda: aggregator.state is not None and aggregator.task is not None)
    manual.run_id = aggregator.state.run_id
    return aggregator, thread, metrics, devices, manual


def _stop(thread, devices, manual) -> None:
    thread.join(timeout=120)
    assert not thread.is_alive()
    for device in devices:
        device.stop()
    manual.close()


def _rejected_globals(metrics: AggregatorMetrics) -> float:
    return metrics.registry.get_sample_value("edgetune_globals_rejected_total") or 0.0


def test_a_ten_million_sample_liar_and_a_1e38_delta_are_bounded_by_default(mosquitto_url, tmp_path):
    aggregator, thread, metrics, devices, liar = _signed_fleet(mosquitto_url, tmp_path, "liar")
    liar.send(liar.update(1, samples=10_000_000))  # within --max-samples: only the relative cap stops it
    assert wait_for(lambda: aggregator.state.global_version >= 1, 60)
    huge = {n: np.full(s, 1e38, np.float32) for n, s in SHAPES.items()}  # finite, far beyond anyone's norm
    liar.send(liar.update(2, huge, version=1))
    _stop(thread, devices, liar)

    rounds = aggregator.store.rounds()
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "aggregated"), (2, "aggregated")]
    first = {d["device_id"]: d for d in rounds[0]["devices"]}
    assert first["dev-2"]["counted_samples"] == 4.0 * 10  # the ratio × the round's median claim
    assert first["dev-2"]["weight"] == 40 / (40 + 10 + 10)
    assert first["dev-0"]["counted_samples"] is None and first["dev-0"]["weight"] == 10 / 60
    # v1 is exactly the bounded weighted mean
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    for name in SHAPES:
        d = {dev: simulated_delta(SHAPES, dev, 1)[name].astype(np.float64) for dev in ("dev-0", "dev-1", "dev-2")}
        mean = (10 * d["dev-0"] + 10 * d["dev-1"] + 40 * d["dev-2"]) / 60
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + mean, rtol=1e-5, atol=1e-7)

    second = {d["device_id"]: d for d in rounds[1]["devices"]}
    norms = sorted(d["norm"] for d in second.values())
    assert np.isclose(second["dev-2"]["norm_scale"] * second["dev-2"]["norm"], 5.0 * norms[1], rtol=1e-9)
    assert second["dev-0"]["norm_scale"] is None and second["dev-1"]["norm_scale"] is None
    v2 = aggregator.store.load_global(2)
    assert all(np.all(np.isfinite(t)) for t in v2.tensors.values())
    moved = max(float(np.max(np.abs(v2.tensors[n] - v1.tensors[n]))) for n in SHAPES)
    assert moved < 1.0  # honest deltas are ~1e-3 per element; the liar's pull is 5 typical updates at most
    assert _rejected_globals(metrics) == 0


def test_with_the_bounds_switched_off_the_guard_still_refuses_to_publish(mosquitto_url, tmp_path):
    aggregator, thread, metrics, devices, liar = _signed_fleet(
        mosquitto_url, tmp_path, "guard", rounds=2, influence=InfluenceBounds(sample_ratio=None, norm_ratio=None))
    huge = {n: np.full(s, 1e38, np.float32) for n, s in SHAPES.items()}
    liar.send(liar.update(1, huge))
    assert wait_for(lambda: any(r["round"] == 1 for r in aggregator.store.rounds()), 60)
    liar.send(liar.update(2, version=0))  # the fleet is still on v0: round 1 published nothing
    _stop(thread, devices, liar)

    rounds = aggregator.store.rounds()
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "rejected"), (2, "aggregated")]
    note = rounds[0]["note"]
    assert "not published" in note and "dev-0, dev-1, dev-2" in note, note
    assert rounds[0]["new_version"] is None and rounds[1]["base_version"] == 0
    assert aggregator.state.global_version == 1
    assert _rejected_globals(metrics) == 1
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    assert all(np.all(np.isfinite(t)) for t in v1.tensors.values())
    for name in SHAPES:  # v1 is round 2's honest mean: round 1's poison left nothing behind
        mean = np.mean([simulated_delta(SHAPES, d, 2)[name] for d in ("dev-0", "dev-1", "dev-2")], axis=0)
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + mean, rtol=1e-5, atol=1e-7)


def test_an_impossible_profile_excludes_only_its_device(mosquitto_url, tmp_path):
    """One profile with a NaN uplink, one with a throughput no hardware has: those two sit out
    with a short reason naming the field; the honest device is planned and the round merges."""
    from edgetune.device import Device, DeviceConfig
    from edgetune.wire import DeviceProfile

    fleet = f"profiles-{uuid.uuid4().hex[:8]}"
    aggregator, thread = start_aggregator(mosquitto_url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                                      start_devices=3, evaluate_final=False,
                                                                      round_timeout_s=60))
    tasks = Observer(mosquitto_url, fleet)
    profiles = [DeviceProfile("roomy", 8 << 30, {"float32": 50.0}, 2, ()),
                DeviceProfile("nan", 8 << 30, {"float32": 50.0}, 2, (), uplink_mbps=float("nan")),
                DeviceProfile("slow", 8 << 30, {"float32": 1e-300}, 2, ())]
    devices = []
    for i, profile in enumerate(profiles):
        device = Device(DeviceConfig(fleet, f"dev-{i}", profile=profile),
                        open_transport(mosquitto_url, client_id=f"{fleet}-{i}", connect_timeout=10), workload(i))
        device.connect()
        devices.append(device.start())
    thread.join(timeout=120)
    assert not thread.is_alive()
    task = [t for t in tasks.tasks if t.round == 1][-1]
    assert set(task.plans) == {"dev-0"}
    assert "uplink_mbps is nan" in task.excluded["dev-1"], task.excluded
    assert "gflops[float32] is 1e-300" in task.excluded["dev-2"], task.excluded
    assert all(len(reason) < 200 for reason in task.excluded.values())
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and [d["device_id"] for d in record["devices"]] == ["dev-0"]
    for device in devices:
        device.stop()
    tasks.close()


def test_a_signed_result_on_another_topic_and_an_unsigned_error_report_are_refused(mosquitto_url, tmp_path, caplog):
    import logging

    from edgetune.wire import ErrorReport, encode_message

    caplog.set_level(logging.INFO)
    aggregator, thread, metrics, devices, liar = _signed_fleet(mosquitto_url, tmp_path, "kinds", rounds=1)
    topics = liar.topics
    # a correctly signed Update, published where presence goes: it must not count as a result
    liar.transport.publish(topics.presence(liar.id), liar.channel.prepare(topics.presence(liar.id), liar.update(1))[0])
    # an error report without a signature would make the round stop waiting for dev-2
    liar.transport.publish(topics.error(liar.id), encode_message(ErrorReport(liar.id, 1, "deadline_missed", "x")))
    liar.transport.flush()
    assert wait_for(lambda: aggregator.drops["unexpected_kind"] >= 1 and aggregator.drops["unsigned"] >= 1, 30), \
        dict(aggregator.drops)
    assert not has(tmp_path / "state", 1, "dev-2")
    liar.send(liar.update(1))  # the real result still counts: min_devices is 3
    _stop(thread, devices, liar)
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and len(record["devices"]) == 3 and record["declined"] == {}


def test_device_chosen_strings_cannot_forge_or_flood_the_log(mosquitto_url, tmp_path, caplog):
    import logging

    from edgetune.wire import ErrorReport

    caplog.set_level(logging.INFO)
    aggregator, thread, metrics, devices, liar = _signed_fleet(mosquitto_url, tmp_path, "logs", rounds=1)
    topics = liar.topics
    forged = "late\n2026-12-04 12:00:00 edgetune_aggregator.daemon: round 1 aggregated with 3 device(s)"
    liar.send_error = lambda msg: liar.channel.send(topics.error(liar.id), msg)
    liar.send_error(ErrorReport(liar.id, 0, "oom_backoff", forged + "x" * 100_000))
    long_topic = f"{topics.base}/update/{'y' * 60_000}"
    for _ in range(50):  # a flood of one drop: a few lines, then a count
        liar.transport.publish(long_topic, b"\x00not msgpack")
    liar.transport.flush()
    assert wait_for(lambda: aggregator.drops.total() >= 40, 30), dict(aggregator.drops)
    assert wait_for(lambda: "oom_backoff" in caplog.text, 30)
    liar.send(liar.update(1))
    _stop(thread, devices, liar)
    lines = caplog.text.splitlines()
    assert not any(line.startswith("2026-12-04 12:00:00") for line in lines)  # no forged line
    assert any("late\\n2026-12-04" in line for line in lines)  # escaped, on the line it belongs to
    assert max(len(line) for line in lines) < 2_000  # 100 KB message, 60 KB topic: cut
    flood = [r for r in caplog.records if "dropped message from" in r.getMessage() and "yyyy" in r.getMessage()]
    assert 1 <= len(flood) <= 5, len(flood)


def _tmpfs(path, size: str):
    import subprocess

    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a real full disk needs one): {done.stderr.decode().strip()}")
    return lambda: subprocess.run(["umount", "-l", str(path)], check=False)


def test_healthz_says_degraded_while_the_disk_is_full_and_recovers(mosquitto_url, tmp_path):
    """A real full filesystem (a 4 MiB tmpfs, filled) under the state dir mid-round."""
    import json
    import urllib.error
    import urllib.request

    from edgetune_aggregator.metrics import HealthServer

    mount = tmp_path / "disk"
    unmount = _tmpfs(mount, "4m")
    try:
        fleet = f"full-{uuid.uuid4().hex[:8]}"
        metrics = AggregatorMetrics(fleet)
        server = HealthServer(metrics, port=0, stale_after_s=30)
        port = server.start()
        config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=mount / "state", rounds=1, min_devices=2, start_devices=1,
                                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, planning=False,
                                  evaluate_final=False)
        aggregator, thread = start_aggregator(mosquitto_url, config, metrics=metrics)

        def health() -> dict:
            try:
                return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
            except urllib.error.HTTPError as exc:
                return json.loads(exc.read())

        devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d,
                               TINY, resend_after_s=2.0) for d in ("dev-0", "dev-1")]
        devices[0].start()
        assert wait_for(lambda: aggregator.task is not None, 60)
        filler = mount / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError:
                pass
        devices[1].start()
        assert wait_for(lambda: aggregator.drops["internal_error"] >= 1, 60), dict(aggregator.drops)
        assert wait_for(lambda: health()["status"] == "degraded", 10), health()["reasons"]
        report = health()
        assert any("storage" in r and "No space left" in r for r in report["reasons"]), report
        filler.unlink()
        assert wait_for(lambda: health()["status"] == "ok", 20), health()
        thread.join(timeout=120)
        assert not thread.is_alive()
        (record,) = aggregator.store.rounds()
        assert record["status"] == "aggregated" and len(record["devices"]) == 2  # the resends got in
        for device in devices:
            device.stop()
        server.close()
    finally:
        unmount()


# --- the fleet's model is the operator's ------------------------------------------------------


def _state_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_hostile_first_hello_does_not_stop_honest_devices(mosquitto_url, tmp_path):
    """The daemon is pinned to the devices' model (as --model-manifest does). Before any honest
    device, a signed liar says hello for another model, then for a 50-million-parameter
    adapter under the fleet's fingerprint, then with a hello beyond the pinned size: all three
    are refused, nothing is allocated or written for them, and the honest round merges."""
    import dataclasses

    from edgetune.simulate import manifest
    from edgetune.wire import Capabilities, Hello

    fleet = f"pin-{uuid.uuid4().hex[:8]}"
    signers = {d: Signer.generate(d) for d in ("dev-0", "dev-1", "dev-2")}
    write_key_file(tmp_path / "keys.json", fleet, {d: s.public_key for d, s in signers.items()})
    config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=2, round_timeout_s=60,
                              join_timeout_s=60, adapter=SPEC, planning=False, evaluate_final=False,
                              device_keys=tmp_path / "keys.json", model=TINY)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    liar = Manual(mosquitto_url, fleet, signers["dev-2"], model=manifest("another", 4, 64, 32, 128, 256))
    hello_topic = liar.topics.hello(liar.id)

    def say(model) -> None:
        hello = Hello(liar.id, "test", model, Capabilities(), 10)
        liar.transport.publish(hello_topic, liar.channel.prepare(hello_topic, hello)[0])
        liar.transport.flush()

    huge = manifest("huge", 48, 4096, 4096, 11008, 32000)  # LoRA r=4 on q,v: 3 M parameters a layer
    say(dataclasses.replace(huge, fingerprint=TINY.fingerprint))
    padded = dict(TINY.modules) | {f"pad.{i}.{'p' * 40}": (1, 1) for i in range(3_000)}
    say(dataclasses.replace(TINY, modules=padded))  # > the pinned hello limit: not even decoded
    assert wait_for(lambda: aggregator.drops["model_mismatch"] >= 2 and aggregator.drops["oversize"] >= 1, 30), \
        dict(aggregator.drops)
    assert aggregator.devices == {} and aggregator.state is None
    assert _state_bytes(tmp_path / "state") < 64 << 10
    devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d, TINY,
                           signer=signers[d]).start() for d in ("dev-0", "dev-1")]
    thread.join(timeout=120)
    assert not thread.is_alive()
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and sorted(d["device_id"] for d in record["devices"]) == ["dev-0", "dev-1"]
    assert aggregator.state.model == TINY and "dev-2" not in aggregator.devices
    assert _state_bytes(tmp_path / "state") < 1 << 20
    for device in devices:
        device.stop()
    liar.close()


def test_by_default_the_fleet_is_the_default_models_and_a_resume_keeps_its_pin(tmp_path):
    """No --model-manifest: the daemon is pinned to the default model's shipped manifest; a
    state dir of another model is not resumed under it."""
    import pytest

    from edgetune.transport import open_transport as open_memory
    from edgetune_aggregator.daemon import Aggregator
    from edgetune_aggregator.fleet_model import default_manifest
    from edgetune_aggregator.intake import hello_limit

    memory = open_memory(f"memory://default-{uuid.uuid4().hex[:6]}", client_id="agg")
    aggregator = Aggregator(AggregatorConfig(fleet="f", state_dir=tmp_path / "a"), memory)
    assert aggregator.pinned == default_manifest() and aggregator.pinned.fingerprint == "2c451d5c898bd94a"
    assert len(aggregator.pinned.modules) == 210 and aggregator.intake.hello_limit == hello_limit(default_manifest())
    assert aggregator.intake.hello_limit < 256 << 10
    with pytest.raises(ValueError, match="not both"):
        AggregatorConfig(fleet="f", state_dir=tmp_path, model=TINY, model_from_first_hello=True)
    trusting = Aggregator(AggregatorConfig(fleet="f", state_dir=tmp_path / "b", model_from_first_hello=True), memory)
    assert trusting.pinned is None

    # a fleet of TINY on disk, then a daemon pinned (by default) to the default model
    from edgetune_aggregator.store import FleetState, StateStore

    StateStore(tmp_path / "c").save_state(FleetState("f", TINY, SPEC))
    with pytest.raises(RuntimeError, match="--model-manifest"):
        Aggregator(AggregatorConfig(fleet="f", state_dir=tmp_path / "c", adapter=SPEC), memory).startup.resume()


def test_a_previous_runs_retained_finished_task_does_not_send_a_device_home(mosquitto_url, tmp_path):
    """Run A finishes (its "finished" task and final adapter stay retained); a device that
    connects before run B's daemon is up waits, then trains in B and leaves when B finishes."""
    import time

    fleet = f"runs-{uuid.uuid4().hex[:8]}"
    first, thread = start_aggregator(mosquitto_url, fleet_config(tmp_path / "a", fleet, rounds=1, min_devices=1,
                                                                 evaluate_final=False))
    veteran = join_device(mosquitto_url, fleet, 0)
    thread.join(timeout=120)
    assert not thread.is_alive() and first.finished.is_set()
    assert veteran.finished.wait(30)  # it took part in run A: A's end is its end
    veteran.stop()

    newcomer = join_device(mosquitto_url, fleet, 1)
    time.sleep(3.0)  # long enough to read the retained task and adapter of run A
    assert not newcomer.finished.is_set() and newcomer._waiting_for_run == first.state.run_id
    second, thread = start_aggregator(mosquitto_url, fleet_config(tmp_path / "b", fleet, rounds=1, min_devices=1,
                                                                  evaluate_final=False))
    thread.join(timeout=120)
    assert not thread.is_alive() and second.state.run_id != first.state.run_id
    assert newcomer.finished.wait(30) and newcomer.rounds_done == [1]
    (record,) = second.store.rounds()
    assert [d["device_id"] for d in record["devices"]] == ["dev-1"]
    newcomer.stop()


# --- an open fleet (no device keys) -----------------------------------------------------------


def _fake_hellos(url: str, fleet: str, count: int) -> None:
    """``count`` made-up devices say hello and come online, as anyone on an open broker can."""
    from edgetune.wire import Capabilities, Hello, Presence, Topics, encode_message

    topics = Topics(fleet)
    faker = open_transport(url, client_id=f"faker-{uuid.uuid4().hex[:6]}", connect_timeout=10)
    faker.connect()
    for i in range(count):
        device = f"fake-{i:04d}"
        faker.publish(topics.hello(device), encode_message(Hello(device, "x", TINY, Capabilities(), 10)))
        faker.publish(topics.presence(device), encode_message(Presence(device, True)))
    faker.flush()
    faker.close()


def test_made_up_hellos_cannot_hold_an_open_fleets_rounds_open(mosquitto_url, tmp_path):
    """No keys, --quorum 1.0, a 10-minute deadline: 300 fake devices join after round 1. They
    are asked, but only devices heard from before hold a round open, so round 2 closes on the
    honest answers (the join would time out long before the deadline otherwise)."""
    fleet = f"open-{uuid.uuid4().hex[:8]}"
    config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=2, quorum=1.0,
                              round_timeout_s=600, join_timeout_s=60, adapter=SPEC, planning=False,
                              evaluate_final=False, model=TINY)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d,
                           TINY, think_s=1.0).start() for d in ("dev-0", "dev-1")]
    assert wait_for(lambda: aggregator.state is not None and aggregator.state.round >= 1, 60)
    _fake_hellos(mosquitto_url, fleet, 300)
    assert wait_for(lambda: len(aggregator.online) >= 302, 30), len(aggregator.online)
    thread.join(timeout=120)
    assert not thread.is_alive()
    rounds = aggregator.store.rounds()
    assert [(r["round"], r["status"], len(r["devices"])) for r in rounds] == [(1, "aggregated", 2), (2, "aggregated", 2)]
    assert aggregator.answered == {"dev-0": 1, "dev-1": 1}
    for device in devices:
        device.stop()


def test_an_admission_list_keeps_everyone_else_out(tmp_path):
    url, fleet, aggregator, thread = _memory_open_fleet(tmp_path, admit=frozenset({"dev-0"}))
    _fake_hellos(url, fleet, 5)
    device = LightDevice(open_transport(url, client_id=f"{fleet}-dev-0"), fleet, "dev-0", TINY).start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert aggregator.drops["not_admitted"] == 5 and set(aggregator.devices) == {"dev-0"}
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated"
    device.stop()


def _memory_open_fleet(tmp_path, **settings):
    return memory_fleet(tmp_path, "admit", model=TINY, **settings)
