"""The attack suite, with the daemon's default flags, on a real Mosquitto with a signed fleet:
one legitimate, correctly signed device lies; the others are honest (docs/security.md).

Each test is one attack from the issue that made "safe by default" a requirement, and checks
both halves: the liar is bounded or refused, and the honest devices' rounds go on."""

from __future__ import annotations

import uuid

import numpy as np
from test_federation import start_aggregator
from test_security import SHAPES, SPEC, Manual, _wait

from edgetune.simulate import TINY, LightDevice, simulated_delta
from edgetune.transport import open_transport
from edgetune.wire import TrainSettings
from edgetune.wire.signing import Signer, write_key_file
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.influence import InfluenceBounds
from edgetune_aggregator.metrics import AggregatorMetrics


def _signed_fleet(url: str, tmp_path, name: str, honest=("dev-0", "dev-1"), liar="dev-2", **settings):
    """A daemon with default bounds, honest LightDevices and a hand-driven liar, all signed."""
    fleet = f"{name}-{uuid.uuid4().hex[:8]}"
    signers = {d: Signer.generate(d) for d in (*honest, liar)}
    write_key_file(tmp_path / "keys.json", fleet, {d: s.public_key for d, s in signers.items()})
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=len(honest) + 1,
                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, train=TrainSettings(), planning=False,
                  evaluate_final=False, device_keys=tmp_path / "keys.json") | settings
    metrics = AggregatorMetrics(fleet)
    aggregator, thread = start_aggregator(url, AggregatorConfig(**fields), metrics=metrics)
    devices = [LightDevice(open_transport(url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d, TINY,
                           signer=signers[d]).start() for d in honest]
    manual = Manual(url, fleet, signers[liar])
    assert _wait(lambda: aggregator.state is not None and aggregator._task is not None)
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
    assert _wait(lambda: aggregator.state.global_version >= 1, 60)
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
    assert _wait(lambda: any(r["round"] == 1 for r in aggregator.store.rounds()), 60)
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
    from test_federation import Observer, fleet_config, workload

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
