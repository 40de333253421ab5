"""Version and capability negotiation: the aggregator serves a device only what it can read,
and tells one it will not serve why and what to upgrade; a peer of an older wire version is
refused with that reason on both sides, never served a model it would misread."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from edgetune.simulate import LightDevice
from edgetune.transport import open_transport
from edgetune.wire import Capabilities, Refusal, Topics, decode_message
from edgetune.wire.codec import PEER_VERSIONS
from edgetune.wire.quantize import PRECISIONS
from edgetune.wire.specs import DELTA_PRECISIONS, WIRE_VERSIONS

from edgetune_aggregator.daemon import AggregatorConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.manual import memory_fleet
from helpers.waiting import wait_for

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
REPO = GOLDEN.parent.parent
#: the last commit that spoke wire v1 (tests/golden/make.py made the v1 files with it)
V1_COMMIT = "e30c2af"


def test_what_a_device_announces_is_what_this_sdk_reads():
    assert WIRE_VERSIONS == PEER_VERSIONS and DELTA_PRECISIONS == PRECISIONS
    caps = Capabilities()
    assert caps.wire == PEER_VERSIONS and caps.precisions == PRECISIONS and caps.merged_delta
    with pytest.raises(ValueError, match="wire versions"):
        Capabilities(wire=())


def _device(url: str, fleet: str, name: str, **capabilities) -> LightDevice:
    """A light device whose hello announces ``capabilities`` (an SDK that reads less)."""
    device = LightDevice(open_transport(url, client_id=f"{fleet}-{name}", connect_timeout=10), fleet, name)
    announced = Capabilities(**capabilities)
    device.worker.capabilities = lambda max_packet: announced
    return device.start()


@pytest.mark.parametrize("case", ["precision", "merged", "admission"])
def test_a_device_the_fleet_cannot_serve_is_told_why_and_the_fleet_goes_on(tmp_path, case, caplog):
    settings, capabilities, reason = {
        "precision": ({"delta_precision": "int8"}, {"precisions": ("fp32", "fp16")}, "unsupported_precision"),
        "merged": ({"strategy": "stack"}, {"merged_delta": False}, "no_merged_delta"),
        "admission": ({"admit": frozenset({"good"})}, {}, "not_admitted"),
    }[case]
    caplog.set_level(logging.WARNING)
    url, fleet, aggregator, thread = memory_fleet(tmp_path, f"negotiate-{case}", **settings)
    limited = _device(url, fleet, "limited", **capabilities)
    good = _device(url, fleet, "good")
    try:
        assert wait_for(lambda: limited.refusals, 30)
        (refusal,) = limited.refusals.values()
        assert isinstance(refusal, Refusal) and refusal.device_id == "limited" and refusal.reason == reason
        if case != "admission":  # (an upgrade is what it takes)
            assert "edgetune" in refusal.upgrade
        assert "limited" not in aggregator.members.devices
        assert aggregator.channel.drops[reason] >= 1
        assert any(reason in r.getMessage() and "limited" in r.getMessage() for r in caplog.records)
        assert any("the aggregator refuses this device" in r.getMessage() for r in caplog.records)
        thread.join(60)
        assert aggregator.finished.is_set() and good.rounds_done == [1] and limited.rounds_done == []
    finally:
        limited.stop()
        good.stop()


def test_a_device_that_reads_the_fleets_wire_is_served(tmp_path):
    """The same device as above is admitted where what it lacks is not used: fedit keeps no
    merged delta, float32 deltas are read by everyone."""
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "negotiate-ok", strategy="fedit")
    device = _device(url, fleet, "older", precisions=("fp32",), merged_delta=False)
    try:
        thread.join(60)
        assert aggregator.finished.is_set() and device.rounds_done == [1] and not device.refusals
    finally:
        device.stop()


def test_a_v1_hello_over_mosquitto_is_refused_with_what_to_upgrade(tmp_path, mosquitto_url, caplog):
    """An older device's hello (tests/golden/v1-hello.msgpack, written by the v1 SDK) reaches
    the daemon through a real broker: it is logged with its sender and the upgrade it needs,
    counted, and answered on the device's refusal topic; the device never joins."""
    caplog.set_level(logging.WARNING)
    fleet = f"negotiate-v1-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(mosquitto_url, AggregatorConfig(
        fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1, round_timeout_s=30, join_timeout_s=20,
        adapter=SPEC, planning=False, evaluate_final=False, model_from_first_hello=True))
    topics = Topics(fleet)
    old = open_transport(mosquitto_url, client_id=f"{fleet}-old", connect_timeout=10)
    answers: list[object] = []
    try:
        old.connect()
        old.subscribe(topics.refusal("dev-1"), lambda topic, payload: answers.append(decode_message(payload)))
        old.publish(topics.hello("dev-1"), (GOLDEN / "v1-hello.msgpack").read_bytes(), retain=True)
        old.flush()
        assert wait_for(lambda: answers, 20)
        (refusal,) = answers
        assert refusal.reason == "schema_version" and "wire v1" in refusal.detail and "edgetune" in refusal.upgrade
        assert aggregator.channel.drops["schema_version"] == 1 and "dev-1" not in aggregator.members.devices
        logged = [r.getMessage() for r in caplog.records if "schema_version" in r.getMessage()]
        assert logged and "dev-1" in logged[0] and "upgrade the sender to edgetune ≥ 0.2" in logged[0]
    finally:
        old.publish(topics.hello("dev-1"), b"", retain=True)
        old.close()
        aggregator.stop()
        thread.join(30)


def test_the_v1_sdk_refuses_what_v2_sends_and_says_so():
    """What an older device sees: the v1 SDK's own decoder (from the commit that made the v1
    golden files) refuses a v2 task with a reason naming both versions, so it never acts on a
    model it would misread."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", V1_COMMIT, "sdk/edgetune"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"this checkout has no git history with {V1_COMMIT} (a source tarball)")
    with tempfile.TemporaryDirectory() as folder:
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
        script = ("import sys; from edgetune.wire import WireError, decode_message\n"
                  "try:\n    decode_message(open(sys.argv[1], 'rb').read())\n"
                  "except WireError as e:\n    print(e.reason, '|', e.detail)\nelse:\n    print('decoded')\n")
        result = subprocess.run([sys.executable, "-c", script, str(GOLDEN / "v2-task.msgpack")], capture_output=True,
                                text=True, env={"PYTHONPATH": str(Path(folder) / "sdk"), "PATH": "/usr/bin:/bin"},
                                timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "schema_version | schema version 2; this side speaks 1"


def test_a_refused_device_joins_once_the_aggregator_restarts_with_the_cause_fixed(tmp_path):
    """The device keeps its hello up and sits tasks out while refused; an aggregator restarted
    with the device on its admission list reads the retained hello and serves it: no restart of
    the device, no new flag on it."""
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "negotiate-restart", admit=frozenset({"other"}),
                                                  join_timeout_s=5)
    device = _device(url, fleet, "late")
    try:
        assert wait_for(lambda: device.refusals, 30)
        aggregator.stop()
        thread.join(30)
        config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state2", rounds=1, min_devices=1,
                                  round_timeout_s=30, join_timeout_s=30, adapter=SPEC, planning=False,
                                  evaluate_final=False, model_from_first_hello=True, admit=frozenset({"late"}))
        aggregator, thread = start_aggregator(url, config)
        thread.join(60)
        assert aggregator.finished.is_set() and device.rounds_done == [1] and not device.refusals
    finally:
        device.stop()


def test_a_refusal_provoked_by_a_hello_forged_in_a_devices_name_is_ignored(tmp_path):
    """Anyone who can publish on an open fleet's broker can send a hello in a device's name; the
    refusal it provokes names that hello's digest, not the device's own, so the device goes on
    (and a refusal replayed from an earlier hello is ignored the same way)."""
    # (the fleet starts once a second device joins: the forged hello comes before it)
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "negotiate-forged", start_devices=2, join_timeout_s=30)
    device = _device(url, fleet, "dev-1")
    second = None
    forger = open_transport(url, client_id=f"{fleet}-forger", connect_timeout=10)
    forger.connect()
    topics = Topics(fleet)
    seen: list[Refusal] = []
    forger.subscribe(topics.refusal("dev-1"), lambda topic, payload: seen.append(decode_message(payload)))
    try:
        assert wait_for(lambda: "dev-1" in aggregator.members.devices, 20)
        forger.publish(topics.hello("dev-1"), (GOLDEN / "v1-hello.msgpack").read_bytes())  # (not retained)
        assert wait_for(lambda: seen, 20)
        assert seen[0].reason == "schema_version" and seen[0].hello
        assert wait_for(lambda: device.has_messages is False, 5) and not device.refusals
        second = _device(url, fleet, "dev-2")
        thread.join(60)
        assert aggregator.finished.is_set() and device.rounds_done == [1] and not device.refusals
    finally:
        device.stop()
        if second is not None:
            second.stop()
        forger.close()


def test_a_flood_of_refusable_hellos_gets_one_answer_per_reason_and_interval(tmp_path):
    """The detail of a refusal is the sender's text (its model, its versions): the daemon answers
    a device once per reason in ``REFUSAL_INTERVAL_S``, whatever the details, and counts every
    hello it drops."""
    from edgetune.simulate import TINY
    from edgetune.wire import Hello, ModelManifest, encode_message

    url, fleet, aggregator, thread = memory_fleet(tmp_path, "negotiate-flood", admit=frozenset({"other"}),
                                                  join_timeout_s=5)
    topics = Topics(fleet)
    client = open_transport(url, client_id=f"{fleet}-flood", connect_timeout=10)
    client.connect()
    answers: list[Refusal] = []
    client.subscribe(topics.refusal("dev-9"), lambda topic, payload: answers.append(decode_message(payload)))
    try:
        for i in range(30):
            model = ModelManifest(f"model-{i}", TINY.fingerprint, TINY.modules, TINY.vocab_size, TINY.hidden_size,
                                  TINY.num_layers, TINY.num_heads, TINY.num_parameters)
            client.publish(topics.hello("dev-9"), encode_message(Hello("dev-9", "flood", model)))
        assert wait_for(lambda: aggregator.channel.drops["not_admitted"] >= 30, 20)
        assert len(answers) == 1 and answers[0].reason == "not_admitted"
    finally:
        client.close()
        aggregator.stop()
        thread.join(30)


def test_in_a_fleet_with_device_keys_an_undecodable_hello_gets_no_answer(tmp_path):
    """Nothing tells who sent a hello that does not decode: a fleet with device keys answers
    only verified hellos, so a forger cannot make the daemon sign refusals for its devices."""
    from edgetune.wire.signing import Signer, write_key_file

    keys = tmp_path / "device_keys.json"
    fleet = f"negotiate-keys-{uuid.uuid4().hex[:6]}"
    write_key_file(keys, fleet, {"dev-1": Signer.generate("dev-1").public_key})
    aggregator, thread = start_aggregator(f"memory://{fleet}", AggregatorConfig(
        fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1, round_timeout_s=30, join_timeout_s=5,
        adapter=SPEC, planning=False, evaluate_final=False, model_from_first_hello=True, device_keys=keys))
    client = open_transport(f"memory://{fleet}", client_id=f"{fleet}-old", connect_timeout=10)
    client.connect()
    topics, answers = Topics(fleet), []
    client.subscribe(topics.refusal("dev-1"), lambda topic, payload: answers.append(payload))
    try:
        client.publish(topics.hello("dev-1"), (GOLDEN / "v1-hello.msgpack").read_bytes())
        assert wait_for(lambda: aggregator.channel.drops["schema_version"] == 1, 20)
        thread.join(30)
        assert answers == []
    finally:
        client.close()
