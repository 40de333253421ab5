"""Versions, promotion and rollback (docs/operations.md): every global adapter is a recorded
version; devices serve the promoted one, checked by digest, while rounds build newer ones; a
rollback serves an older version again and restarts training from a copy of it.

Over Mosquitto with light devices (the device protocol edge applications run, answering with
seeded deltas): what each device serves is compared, by digest, with the version on disk.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from edgetune.adapters.digest import adapter_digest
from edgetune.simulate import LightDevice
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import GlobalAdapter, Serving, ServingReport, Topics
from edgetune_aggregator import control
from edgetune_aggregator.cli import main
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.store import StateStore
from edgetune_aggregator.versions import VersionLog

from helpers.fleet import SPEC, start_aggregator, stop_fleet
from helpers.waiting import wait_for


def light(url: str, fleet: str, index: int, tmp_path, **kwargs) -> LightDevice:
    transport = open_transport(url, client_id=f"{fleet}-d{index}-{uuid.uuid4().hex[:4]}", connect_timeout=10)
    return LightDevice(transport, fleet, f"d{index}", state_dir=tmp_path / f"d{index}", **kwargs)


def config(tmp_path, fleet: str, **overrides) -> AggregatorConfig:
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=None, min_devices=3, round_timeout_s=30,
                  join_timeout_s=30, adapter=SPEC, planning=False, evaluate_final=False, model_from_first_hello=True)
    return AggregatorConfig(**(fields | overrides))


def served_by_all(devices, version: int) -> bool:
    return all(d.promoted.version == version for d in devices)


# --- pieces -------------------------------------------------------------------------------------


def test_digest_names_the_values_not_the_encoding():
    rng = np.random.default_rng(0)
    tensors = {"a.lora_A": rng.normal(size=(4, 8)).astype(np.float32), "a.lora_B": np.zeros((8, 4), np.float32)}
    digest = adapter_digest(tensors)
    assert digest == adapter_digest(dict(reversed(list(tensors.items()))))  # (name order)
    assert digest == adapter_digest({k: v.astype(np.float64) for k, v in tensors.items()})  # same float32 values
    flipped = {**tensors, "a.lora_B": tensors["a.lora_B"].copy()}
    flipped["a.lora_B"][3, 1] = np.float32(1e-30)
    assert adapter_digest(flipped) != digest
    assert adapter_digest(tensors, {"a.merged_A": np.ones((1, 8), np.float32)}) != digest
    # a shape is part of it: the same bytes laid out otherwise are another adapter
    assert adapter_digest({"a.lora_A": tensors["a.lora_A"].reshape(8, 4), "a.lora_B": tensors["a.lora_B"]}) != digest


def test_requests_are_checked_and_applied_in_order(tmp_path):
    first = control.submit(tmp_path, "promote", 3, "canary looked fine")
    second = control.submit(tmp_path, "rollback", 1)
    (tmp_path / "control" / "zzz.json").write_text("{not json")
    found = control.pending(tmp_path)
    assert [r.id for _, r in found[:2]] == [first.id, second.id]
    assert isinstance(found[2][1], str)  # (a bad file is reported, not applied)
    with pytest.raises(ValueError, match="action"):
        control.Request("delete", 1, "x", 0.0)
    with pytest.raises(ValueError, match="version"):
        control.Request("promote", -1, "x", 0.0)
    for path, _ in found:
        control.done(path)
    assert control.pending(tmp_path) == []


def test_the_commands_refuse_what_the_fleet_does_not_have(tmp_path, capsys):
    assert main(["promote", "3", "--state-dir", str(tmp_path)]) == 2
    assert "no fleet" in capsys.readouterr().err
    (tmp_path / "state.json").write_text(json.dumps({"global_version": 0, "serving_version": None}))
    assert main(["promote", "3", "--state-dir", str(tmp_path)]) == 2
    assert "no version 3" in capsys.readouterr().err
    assert main(["rollback", "seven", "--state-dir", str(tmp_path)]) == 2
    assert control.pending(tmp_path) == []


# --- a fleet ------------------------------------------------------------------------------------


def test_manual_promotion_and_rollback_over_mosquitto(mosquitto_url, tmp_path, capsys):
    fleet = f"ops-{uuid.uuid4().hex[:6]}"
    state_dir = tmp_path / "state"
    aggregator, thread = start_aggregator(mosquitto_url, config(tmp_path, fleet, promote="manual"))
    devices = [light(mosquitto_url, fleet, i, tmp_path).start() for i in range(3)]
    try:
        assert wait_for(lambda: aggregator.state is not None and aggregator.state.global_version >= 2, 60)
        assert all(d.promoted.adapter is None for d in devices)  # manual: nothing is served until promoted

        # promote v2: every device serves exactly v2 (digest equal to the stored version's)
        assert main(["promote", "v2", "--state-dir", str(state_dir), "--reason", "looks good"]) == 0
        store, versions = StateStore(state_dir), VersionLog(state_dir)
        v2 = store.load_global(2)
        assert versions.get(2).digest == adapter_digest(v2.tensors, v2.merged)
        assert wait_for(lambda: served_by_all(devices, 2), 30)
        for device in devices:
            assert device.promoted.digest == versions.get(2).digest
            assert all(np.array_equal(device.promoted.adapter.tensors[n], v2.tensors[n]) for n in v2.tensors)

        # rounds go on building newer versions while the fleet serves v2
        assert wait_for(lambda: aggregator.state.global_version >= 4, 60)
        assert served_by_all(devices, 2) and aggregator.state.serving_version == 2
        assert wait_for(lambda: aggregator.rollout.serving_counts() == {2: 3}, 30)

        # rollback to v1: served at once; training restarts from a copy of v1
        assert main(["rollback", "1", "--state-dir", str(state_dir)]) == 0
        assert wait_for(lambda: served_by_all(devices, 1), 30)
        v1 = VersionLog(state_dir).get(1)
        assert all(d.promoted.digest == v1.digest for d in devices)
        assert wait_for(lambda: any(r.strategy == "rollback" for r in aggregator.fleet.versions.all()), 60)
        copy = next(r for r in aggregator.fleet.versions.all() if r.strategy == "rollback")
        assert (copy.parent, copy.digest) == (1, v1.digest) and copy.note == "rollback to v1"
        # the next version is built on the copy, from updates against it
        assert wait_for(lambda: aggregator.fleet.versions.get(copy.version + 1) is not None, 60)
        assert aggregator.fleet.versions.get(copy.version + 1).parent == copy.version
        # (the version is recorded as the round closes, the round's record just after: wait for both)
        assert wait_for(lambda: any(r.get("new_version") == copy.version + 1 for r in store.rounds()), 30)
        rounds = {r["new_version"]: r for r in store.rounds() if r.get("new_version") is not None}
        assert rounds[copy.version + 1]["base_version"] == copy.version
        assert wait_for(lambda: aggregator.rollout.serving_counts() == {1: 3}, 30)
    finally:
        stop_fleet(aggregator, thread, devices)
    assert control.pending(state_dir) == []

    # what the operator sees
    capsys.readouterr()
    assert main(["versions", "--state-dir", str(state_dir)]) == 0
    table = capsys.readouterr().out
    assert "serving" in next(line for line in table.splitlines() if line.startswith("v1 "))
    assert "rollback to v1" in table
    listed = (main(["versions", "--state-dir", str(state_dir), "--json"]), json.loads(capsys.readouterr().out))[1]
    assert listed["serving"] == 1 and {v["version"]: v["served_by"] for v in listed["versions"]}[1] == 3

    # a restarted device serves v1 from its state dir before it hears from the fleet
    again = light(mosquitto_url, fleet, 0, tmp_path)
    assert again.promoted.version == 1 and again.promoted.digest == v1.digest


def test_automatic_promotion_serves_each_new_version(tmp_path):
    fleet = f"auto-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    # (the final evaluation round is where the last version is judged, and so served)
    aggregator, thread = start_aggregator(url, config(tmp_path, fleet, rounds=3, evaluate_final=True))
    devices = [light(url, fleet, i, tmp_path).start() for i in range(3)]
    try:
        assert aggregator.finished.wait(60)
        assert wait_for(lambda: served_by_all(devices, 3), 30)
        versions = aggregator.fleet.versions.all()
        assert [r.version for r in versions] == [0, 1, 2, 3]
        assert [r.parent for r in versions] == [None, 0, 1, 2]
        assert versions[0].strategy == "initial" and all(r.strategy == "fedit" for r in versions[1:])
        assert all(r.contributors == ["d0", "d1", "d2"] for r in versions[1:])
        assert all("train_loss" in r.metrics for r in versions[1:])
        # what devices measured of a version, in the round that trained on it
        assert all("ppl" in r.metrics and r.metrics["evaluated_by"] == 3 for r in versions)
        # (light devices score no served version next to the round's: the gate cannot judge, and
        # automatic promotion serves each version as it would without a gate)
        assert all(r.gate["passed"] is None and "scored both" in r.gate["reason"] for r in versions[1:])
    finally:
        stop_fleet(aggregator, thread, devices)


def test_a_device_serves_nothing_whose_digest_differs(tmp_path, caplog):
    """A notice naming v5 with one digest, and a v5 on the served topic with another (a stale
    retained message, a broker that altered it, a bug): the device refuses it, says so, and
    keeps serving what it served."""
    fleet = f"digest-{uuid.uuid4().hex[:6]}"
    url, topics = f"memory://{fleet}", Topics(fleet)
    device = light(url, fleet, 0, tmp_path).start()
    sender = open_transport(url, client_id="fake-aggregator")
    sender.connect()
    channel = Channel(sender, topics.sender_of)
    reports = []
    Channel(sender, topics.sender_of).subscribe(topics.of("serving_report", "d0"), lambda t, m: reports.append(m))
    shapes = {"m.lora_A": (2, 4), "m.lora_B": (4, 2)}
    adapter = GlobalAdapter(5, 5, device.worker.manifest.fingerprint, SPEC,
                            {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()})
    other = GlobalAdapter(5, 5, adapter.model_fingerprint, SPEC, {n: np.full(s, 0.25, np.float32) for n, s in shapes.items()})
    try:
        channel.send_retained(topics.served(5), other)
        sender.publish(topics.serving, channel.prepare(topics.serving, Serving(5, adapter_digest(adapter.tensors)))[0],
                       retain=True)
        assert wait_for(lambda: reports, 10)
        refused = unwrap_report(reports[0])
        assert not refused.switched and refused.reason.startswith("digest_mismatch")
        assert device.promoted.adapter is None and device.channel.drops["digest_mismatch"] == 1
        # the genuine v5 arrives: served
        channel.send_retained(topics.served(5), adapter, 1)
        assert wait_for(lambda: device.promoted.version == 5, 10)
        assert unwrap_report(reports[-1]).switched
    finally:
        device.stop()
        sender.close()


def unwrap_report(message) -> ServingReport:
    from edgetune.wire.signing import unwrap

    report = unwrap(message)
    assert isinstance(report, ServingReport)
    return report


def test_what_a_rollback_abandons_is_never_served(tmp_path):
    """Automatic promotion and a rollback that arrives while a round is open: the version that
    round builds (on the rolled-back lineage) is recorded and never served; what is served
    afterwards descends from the copy of the older version."""
    fleet = f"abandon-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    from edgetune_aggregator.gate import GateSettings

    aggregator, thread = start_aggregator(url, config(tmp_path, fleet, gate=GateSettings(max_regression=None)))
    devices = [light(url, fleet, i, tmp_path, think_s=0.2).start() for i in range(3)]
    try:
        assert wait_for(lambda: aggregator.state is not None and aggregator.state.global_version >= 3, 60)
        assert wait_for(lambda: aggregator.task is not None and aggregator.task.round > aggregator.state.round, 30)
        control.submit(tmp_path / "state", "rollback", 1)  # (while a round is open)
        assert wait_for(lambda: any(r.strategy == "rollback" for r in aggregator.fleet.versions.all()), 60)
        copy = next(r for r in aggregator.fleet.versions.all() if r.strategy == "rollback")
        assert wait_for(lambda: aggregator.state.serving_version > copy.version, 60)
    finally:
        stop_fleet(aggregator, thread, devices)
    versions = {r.version: r for r in aggregator.fleet.versions.all()}
    abandoned = [r for r in versions.values() if "rolled back to v1" in r.note]
    assert abandoned and all("served from" not in r.note for r in abandoned)

    def descends_from_copy(version: int) -> bool:
        while version is not None and version != copy.version:
            version = versions[version].parent
        return version == copy.version

    later = [r for r in versions.values() if r.version > copy.version and "served from" in r.note]
    assert later and all(descends_from_copy(r.version) for r in later)
