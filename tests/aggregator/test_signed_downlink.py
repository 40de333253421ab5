"""A signed downlink over Mosquitto: devices holding the fleet key refuse a forged global
adapter, a replayed one, a task of an earlier run, a tampered chunk and an unsigned message,
log and count each, and keep training on the last good version.

The attacker here can publish anything on the aggregator's topics (an anonymous broker: what
whoever controls a broker can do), and replays what it recorded there earlier, byte for byte.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict

import numpy as np

from edgetune.downlink import STATE_FILE, DownlinkGuard
from edgetune.simulate import LightDevice
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import GlobalAdapter, Signed, Topics, chunk_payload, decode_message, encode_message
from edgetune.wire.signing import FleetKey, FleetSigner
from edgetune_aggregator.daemon import AggregatorConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.waiting import wait_for

REFUSALS = ("unknown_key", "bad_signature", "replayed", "unsigned")


class Recorder:
    """A bystander recording every payload the aggregator publishes, as it crossed the broker."""

    def __init__(self, url: str, fleet: str):
        self.topics = Topics(fleet)
        self.transport = open_transport(url, client_id=f"rec-{uuid.uuid4().hex[:6]}", connect_timeout=10)
        self.transport.connect()
        self.payloads: dict[str, list[bytes]] = defaultdict(list)
        self._lock = threading.Lock()
        for topic in (self.topics.task, self.topics.global_adapter + "/+"):
            self.transport.subscribe(topic, self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        if payload:
            with self._lock:
                self.payloads[topic].append(payload)

    def global_frames(self, version: int) -> list[tuple[str, bytes]]:
        """The chunks of the signed global adapter ``version`` as published (topic, payload)."""
        by_transfer: dict[str, dict[int, tuple[str, bytes]]] = defaultdict(dict)
        with self._lock:
            for topic, payloads in self.payloads.items():
                if topic.startswith(self.topics.global_adapter + "/"):
                    for payload in payloads:  # (a chunk seen twice, replayed or redelivered, counts once)
                        chunk = decode_message(payload)
                        by_transfer[chunk.transfer][chunk.index] = (topic, payload)
        for indexed in by_transfer.values():
            frames = [indexed[i] for i in sorted(indexed)]
            whole = b"".join(decode_message(p).data for _, p in frames)
            if decode_message(decode_message(whole).payload).version == version:
                return frames
        raise AssertionError(f"global v{version} was not seen")

    def close(self) -> None:
        self.transport.close()


def _aggregator(url: str, fleet: str, state_dir, key_file, rounds: int, on_round=None):
    config = AggregatorConfig(fleet=fleet, state_dir=state_dir, rounds=rounds, min_devices=2, round_timeout_s=60,
                              join_timeout_s=60, adapter=SPEC, planning=False, evaluate_final=False,
                              model_from_first_hello=True, fleet_key=key_file)
    return start_aggregator(url, config, on_round=on_round)


def _device(url: str, fleet: str, name: str, fleet_pub, state_dir) -> LightDevice:
    # (as 'edgetune device run --fleet-key fleet.pub' configures it)
    device = LightDevice(open_transport(url, client_id=f"{fleet}-{name}", connect_timeout=10), fleet, name,
                         fleet_key=fleet_pub, state_dir=state_dir)
    # A chunked transfer repeated within this window is taken for a QoS 1 redelivery and dropped
    # unseen: no window, so that the replay of an adapter reaches the signature check it tests.
    device.channel.reassembler.remember_s = 0.0
    return device.start()


def _tampered(frames: list[tuple[str, bytes]], max_packet: int) -> list[bytes]:
    """The same signed adapter with one value of its tensors changed, re-chunked so that every
    chunk and the transfer digest are consistent: only the signature can tell."""
    whole = b"".join(decode_message(p).data for _, p in frames)
    signed = decode_message(whole)
    inner = bytearray(signed.payload)
    inner[-3] ^= 0x40  # (the envelope's data is last: a byte of a tensor)
    forged = Signed(signed.device_id, signed.key_id, signed.nonce, bytes(inner), signed.signature, signed.issued)
    return chunk_payload(encode_message(forged), max_packet)


def test_devices_refuse_a_forged_replayed_or_tampered_downlink(mosquitto_url, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    fleet = f"signed-{uuid.uuid4().hex[:6]}"
    fleet_signer = FleetSigner.generate()
    key_file, pub_file = tmp_path / "fleet.key", tmp_path / "fleet.pub"
    key_file.write_bytes(fleet_signer.private_pem())
    pub_file.write_bytes(fleet_signer.public_pem())
    topics = Topics(fleet)
    recorder = Recorder(mosquitto_url, fleet)
    devices = [_device(mosquitto_url, fleet, f"dev-{i}", pub_file, tmp_path / f"dev-{i}") for i in range(2)]
    attacker = open_transport(mosquitto_url, client_id=f"{fleet}-attacker", connect_timeout=10)
    attacker.connect()
    try:
        # An earlier run of the fleet (another state dir: another run id), recorded on the broker.
        old, old_thread = _aggregator(mosquitto_url, fleet, tmp_path / "old", key_file, rounds=1)
        old_thread.join(60)
        assert old.finished.is_set()
        old_task = [p for p in recorder.payloads[topics.task] if decode_message(decode_message(p).payload).round == 1]
        assert old_task
        attacks: dict[str, int] = {}

        def attack(record) -> None:
            if record.round != 2:
                return
            before = [dict(d.channel.drops) for d in devices]
            # 1. a forged global adapter: signed, but with another key (unknown_key)
            forger = Channel(attacker, topics.sender_of, signer=FleetSigner.generate())
            good = devices[0].global_adapter
            forged = GlobalAdapter(good.version + 5, good.round + 5, good.model_fingerprint, good.adapter,
                                   {n: np.ones_like(t) for n, t in good.tensors.items()})
            forger.send_retained(topics.global_adapter, forged, 0)
            # 2. this run's global v0, genuine, replayed
            for topic, payload in recorder.global_frames(0):
                attacker.publish(topic, payload, qos=1, retain=True)
            # 3. the earlier run's round-1 task, genuine, replayed
            attacker.publish(topics.task, old_task[-1], qos=1, retain=True)
            # 4. global v1 with a tensor altered and its chunks made consistent again
            for index, frame in enumerate(_tampered(recorder.global_frames(1), 1 << 20)):
                attacker.publish(f"{topics.global_adapter}/{index}", frame, qos=1, retain=True)
            # 5. an unsigned global adapter
            Channel(attacker, topics.sender_of).send_retained(topics.global_adapter, forged, 0)
            attacker.flush()
            expected = {"unknown_key": 1, "bad_signature": 1, "replayed": 2, "unsigned": 1}
            assert wait_for(lambda: all(d.channel.drops[r] - b.get(r, 0) >= n for d, b in zip(devices, before)
                                        for r, n in expected.items()), 30), [dict(d.channel.drops) for d in devices]
            attacks.update(expected)

        aggregator, thread = _aggregator(mosquitto_url, fleet, tmp_path / "new", key_file, rounds=3, on_round=attack)
        thread.join(120)
        assert aggregator.finished.is_set() and attacks
        final = aggregator.store.load_global(3)
        for device in devices:  # trained every round, on the genuine adapters, and holds the last
            assert device.rounds_done[-3:] == [1, 2, 3]  # (after the earlier run's round)
            assert device.global_adapter.version == 3
            for name, tensor in final.tensors.items():
                np.testing.assert_array_equal(device.global_adapter.tensors[name], tensor)
            assert device.task.run_id == aggregator.state.run_id
            assert device.downlink.verifies and (tmp_path / device.device_id / STATE_FILE).is_file()
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert all(reason in logged for reason in REFUSALS)
        assert aggregator.members.devices["dev-0"].capabilities.verifies_downlink
        assert not aggregator.drops  # (the devices' own messages all passed)
    finally:
        for device in devices:
            device.stop()
        attacker.close()
        recorder.close()


def test_a_restarted_device_still_refuses_an_older_task(tmp_path):
    """The newest number per retained topic survives a restart (the state dir): an older
    genuine task offered to the restarted device is refused; without a state dir it would be
    taken (what the file is for)."""
    signer = FleetSigner.generate()
    (tmp_path / "fleet.pub").write_bytes(signer.public_pem())
    key = FleetKey.load(tmp_path / "fleet.pub")
    topics = Topics("f")
    older = signer.sign(topics.task, encode_message(_task(1)))
    newer = signer.sign(topics.task, encode_message(_task(2)))
    first = DownlinkGuard(topics, key, tmp_path / "state")
    assert first.open(topics.task, newer)[0].round == 2
    assert first.open(topics.task, newer)[0].round == 2  # (the same message again: a redelivery)
    restarted = DownlinkGuard(topics, key, tmp_path / "state")
    assert restarted.open(topics.task, older)[1] == "replayed"
    assert DownlinkGuard(topics, key).open(topics.task, older)[0].round == 1
    unsigned = DownlinkGuard(topics, key).open(topics.task, _task(3))
    assert unsigned[0] is None and unsigned[1] == "unsigned"
    # another topic's signature does not carry over (a receipt replayed as the task)
    moved = signer.sign(topics.receipt("d"), encode_message(_task(4)))
    assert DownlinkGuard(topics, key).open(topics.task, moved)[1] == "bad_signature"
    # a device without the fleet key unwraps what is signed, verifying nothing
    assert DownlinkGuard(topics).open(topics.task, older)[0].round == 1


def _task(round_number: int):
    from edgetune.wire import RoundTask, TaskKind

    return RoundTask(round_number, TaskKind.TRAIN, 0, "0123456789abcdef", run_id="run")


def test_a_daemon_whose_count_is_behind_counts_on_from_what_its_devices_hold(tmp_path):
    """A new state dir on a host whose clock is behind the old one's: the devices hold messages
    numbered beyond this daemon's count, say so in their hello, and the daemon counts on from
    there and publishes its task and adapter again, so the fleet trains instead of every device
    refusing it as a replay. The devices' record is bound to the fleet key: another key's
    numbers say nothing."""
    import json
    import time

    fleet = f"behind-{uuid.uuid4().hex[:6]}"
    signer = FleetSigner.generate()
    key_file, pub_file = tmp_path / "fleet.key", tmp_path / "fleet.pub"
    key_file.write_bytes(signer.private_pem())
    pub_file.write_bytes(signer.public_pem())
    ahead = time.time_ns() // 1000 + 3_600_000_000  # an hour ahead of this clock
    topics = Topics(fleet)
    for name in ("dev-0", "dev-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text(json.dumps({
            "format": 1, "fleet": fleet, "key": FleetKey.load(pub_file).key_id,
            "newest": {topics.task: [ahead, "00" * 32], topics.global_adapter: [ahead, "00" * 32]}}))
    devices = [_device(f"memory://{fleet}", fleet, name, pub_file, tmp_path / name) for name in ("dev-0", "dev-1")]
    try:
        assert all(d.downlink.newest_issued() == ahead for d in devices)
        aggregator, thread = _aggregator(f"memory://{fleet}", fleet, tmp_path / "state", key_file, rounds=2)
        thread.join(60)
        assert aggregator.finished.is_set()
        assert all(d.rounds_done == [1, 2] for d in devices)
        assert aggregator.channel.signer.last_issued > ahead
        assert aggregator.store.load_issued() > ahead  # (on record before use: a restart counts on too)
    finally:
        for device in devices:
            device.stop()
    other = DownlinkGuard(topics, FleetKey(FleetSigner.generate().public_key), tmp_path / "dev-0")
    assert other.newest_issued() == 0


def test_the_chunked_adapters_record_survives_a_restart(tmp_path):
    """The global adapter arrives on ``global/{i}`` but is signed (and recorded) for ``global``:
    after a restart, an older genuine adapter is still refused."""
    signer = FleetSigner.generate()
    (tmp_path / "fleet.pub").write_bytes(signer.public_pem())
    key, topics = FleetKey.load(tmp_path / "fleet.pub"), Topics("f")

    def adapter(version):
        return signer.sign(topics.global_adapter, encode_message(GlobalAdapter(
            version, version, "0123456789abcdef", SPEC, {"a": np.full((2, 2), version, np.float32)})))

    older, newer = adapter(1), adapter(2)
    first = DownlinkGuard(topics, key, tmp_path)
    assert first.open(topics.global_adapter + "/0", newer)[0].version == 2
    restarted = DownlinkGuard(topics, key, tmp_path)
    assert restarted.open(topics.global_adapter + "/1", older)[1] == "replayed"
    assert restarted.open(topics.global_adapter + "/0", newer)[0].version == 2  # (a redelivery of the same)
