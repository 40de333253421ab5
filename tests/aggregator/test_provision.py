"""``edgetune-aggregator provision`` against a real Mosquitto over real TLS: the generated CA,
certificates, password file, ACL and configuration let the daemon and each device in, keep
everyone else out, and pin each device to its own topics."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import queue
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from edgetune.wire import DEVICE_TOPIC_KINDS, Topics
from edgetune_aggregator.provision import (
    ProvisionConfig,
    acl_text,
    add_provision_parser,
    mosquitto_password_line,
    parse_broker_hosts,
    parse_device_ids,
    provision,
    run_provision,
)

from helpers.brokers import start_provisioned_broker, stop_process

pytestmark = pytest.mark.timeout(60)

FLEET = "prov"
TOPICS = Topics(FLEET)
WAIT_S = 5.0
NOT_AUTHORIZED = 0x87  # what Mosquitto 2.0 answers a denied QoS 1 PUBLISH with (MQTT 5)
ACCEPTED = (0x00, 0x10)  # success, or "no matching subscribers" when nobody listens


# --- a broker and clients -----------------------------------------------------------------


@dataclass
class Broker:
    out: Path
    port: int
    auth: str
    process: subprocess.Popen[bytes]


def _broker(tmp_path: Path, auth: str, devices: tuple[str, ...] = ("device-000", "device-001")) -> Iterator[Broker]:
    out = tmp_path / "fleet"
    provision(ProvisionConfig(FLEET, out, devices, broker_hosts=("127.0.0.1",), port=8883, auth=auth))
    process, port = start_provisioned_broker(out, tmp_path)
    try:
        yield Broker(out, port, auth, process)
    finally:
        stop_process(process)


@pytest.fixture
def cert_broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _broker(tmp_path, "cert")


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _broker(tmp_path, "password")


class Client:
    """A paho MQTT 5 client whose callbacks only feed queues, so a test waits with a timeout."""

    def __init__(self, port: int, ca: Path, cert: Path | None = None, key: Path | None = None,
                 username: str | None = None, password: str | None = None):
        self.port = port
        self.outcome: int | str = "not started"  # CONNACK code, "disconnected", "failed", "timeout"
        self.acks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.mqtt = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.mqtt.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        self.mqtt.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc.value)
        self.mqtt.on_connect_fail = lambda c, u: self.connack.put("failed")
        self.mqtt.on_disconnect = lambda c, u, flags, rc, props: self.connack.put("disconnected")
        self.mqtt.on_publish = lambda c, u, mid, rc, props: self.acks.put(("pub", mid, rc.value))
        self.mqtt.on_subscribe = lambda c, u, mid, rcs, props: self.acks.put(("sub", mid, [r.value for r in rcs]))
        self.mqtt.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))

    def connect(self) -> bool:
        """True once the broker accepted us; False if TLS or the CONNECT was refused."""
        return self.start() and self.accepted()

    def start(self) -> bool:
        try:
            self.mqtt.connect("127.0.0.1", self.port, keepalive=10)
        except (ssl.SSLError, OSError) as exc:
            self.outcome = repr(exc)
            return False
        self.mqtt.loop_start()
        return True

    def accepted(self) -> bool:
        try:
            self.outcome = self.connack.get(timeout=WAIT_S)
        except queue.Empty:
            self.outcome = "timeout"
        if self.outcome != 0:
            self.close()
        return self.outcome == 0

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()

    def _ack(self, kind: str, mid: int):
        while True:
            got_kind, got_mid, code = self.acks.get(timeout=WAIT_S)
            if (got_kind, got_mid) == (kind, mid):
                return code

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK's reason code (QoS 1)."""
        return self._ack("pub", self.mqtt.publish(topic, payload, qos=1, retain=retain).mid)

    def subscribe(self, topic_filter: str) -> int:
        """The SUBACK's reason code: the granted QoS, or ≥ 0x80 for a refusal."""
        _, mid = self.mqtt.subscribe(topic_filter, qos=1)
        return self._ack("sub", mid)[0]

    def received_until(self, fence: tuple[str, bytes]) -> list[tuple[str, bytes]]:
        """Every message up to and including ``fence`` (topic, payload). Mosquitto delivers one
        publisher's messages in order, so whatever it let through before the fence is here."""
        got = []
        while not got or got[-1] != fence:
            got.append(self.messages.get(timeout=WAIT_S))
        return got


def login(broker: Broker, who: str) -> Client:
    folder = broker.out / ("aggregator" if who == "aggregator" else f"devices/{who}")
    if broker.auth == "cert":
        client = Client(broker.port, folder / "ca.crt", folder / "client.crt", folder / "client.key")
    else:
        client = Client(broker.port, folder / "ca.crt", username=who,
                        password=(folder / "password").read_text().strip())
    assert client.connect(), f"{who} could not connect; see mosquitto.log"
    return client


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


# --- over the broker ----------------------------------------------------------------------


def test_a_device_publishes_only_on_its_own_topics(cert_broker, clients):
    aggregator, device = login(cert_broker, "aggregator"), login(cert_broker, "device-000")
    clients += [aggregator, device]
    assert aggregator.subscribe(f"{TOPICS.base}/#") == 1

    for kind in DEVICE_TOPIC_KINDS:  # every kind a device sends is allowed
        assert device.publish(f"{TOPICS.base}/{kind}/device-000", kind.encode()) == 0
    forbidden = [TOPICS.update("device-001"), TOPICS.task, TOPICS.global_chunk(0), TOPICS.aggregator_status,
                 TOPICS.receipt("device-000"), TOPICS.artifact_data("device-000"),
                 "edgetune/v1/other/update/device-000"]
    for topic in forbidden:
        assert device.publish(topic, b"forged") == NOT_AUTHORIZED, topic
    fence = (TOPICS.update("device-000"), b"fence")
    device.publish(*fence)

    expected = [(f"{TOPICS.base}/{kind}/device-000", kind.encode()) for kind in DEVICE_TOPIC_KINDS]
    assert aggregator.received_until(fence) == expected + [fence]


def test_with_a_certificate_the_username_is_its_cn_whatever_the_client_claims(cert_broker, clients):
    folder = cert_broker.out / "devices" / "device-000"
    impostor = Client(cert_broker.port, folder / "ca.crt", folder / "client.crt", folder / "client.key",
                      username="aggregator", password="x")
    assert impostor.connect()
    clients.append(impostor)
    assert impostor.publish(TOPICS.task, b"forged") == NOT_AUTHORIZED
    assert impostor.publish(TOPICS.update("device-000"), b"ok") in ACCEPTED


def test_a_device_reads_what_is_for_all_devices_and_for_itself_only(cert_broker, clients):
    aggregator = login(cert_broker, "aggregator")
    clients.append(aggregator)
    # retained before the device subscribes, as the daemon publishes tasks and adapters
    for topic in (TOPICS.task, TOPICS.global_chunk(0), TOPICS.receipt("device-001"), TOPICS.update("device-001")):
        assert aggregator.publish(topic, b"retained", retain=True) in ACCEPTED

    device = login(cert_broker, "device-000")
    clients.append(device)
    filters = [TOPICS.receipt("device-001"), TOPICS.all_devices("update"), TOPICS.artifact_data("device-001"),
               f"{TOPICS.base}/#", TOPICS.task, f"{TOPICS.global_adapter}/+", TOPICS.aggregator_status,
               TOPICS.artifact_offer("ort") + "/+", TOPICS.artifact_data("device-000"), TOPICS.receipt("device-000")]
    for topic_filter in filters:
        # Mosquitto 2.0 grants every subscription and checks read access on delivery; a broker
        # that refuses at SUBACK time (0x87) is as good
        assert device.subscribe(topic_filter) in (1, NOT_AUTHORIZED)

    for topic in (TOPICS.receipt("device-001"), TOPICS.artifact_data("device-001"), TOPICS.update("device-001"),
                  TOPICS.hello("device-001"), TOPICS.aggregator_status, TOPICS.artifact_offer("ort") + "/0",
                  TOPICS.artifact_data("device-000"), TOPICS.receipt("device-000")):
        assert aggregator.publish(topic, b"live") == 0

    topics = {topic for topic, _ in device.received_until((TOPICS.receipt("device-000"), b"live"))}
    assert topics == {TOPICS.task, TOPICS.global_chunk(0), TOPICS.aggregator_status,
                      TOPICS.artifact_offer("ort") + "/0", TOPICS.artifact_data("device-000"),
                      TOPICS.receipt("device-000")}


def test_only_the_fleets_certificates_get_in(cert_broker, tmp_path):
    ca, broker, other = cert_broker.out / "broker" / "ca.crt", cert_broker.out / "broker", tmp_path / "other"
    provision(ProvisionConfig(FLEET, other, ("device-000",)))
    password = (cert_broker.out / "aggregator" / "password").read_text().strip()
    attempts = {
        "no certificate": Client(cert_broker.port, ca),
        "password, no certificate": Client(cert_broker.port, ca, username="aggregator", password=password),
        "right CN, another CA": Client(cert_broker.port, ca, other / "aggregator" / "client.crt",
                                       other / "aggregator" / "client.key"),
        "the broker's (server-only) certificate": Client(cert_broker.port, ca, broker / "server.crt",
                                                         broker / "server.key"),
    }
    # refused after the TLS 1.3 handshake, so paho notices only on its next poll: wait in parallel
    started = {name: client.start() for name, client in attempts.items()}
    assert {name: started[name] and client.accepted() for name, client in attempts.items()} == dict.fromkeys(
        attempts, False)
    assert all(client.outcome != "timeout" for client in attempts.values())  # refused, not lost


def test_password_mode_end_to_end(password_broker, clients):
    aggregator, device = login(password_broker, "aggregator"), login(password_broker, "device-001")
    clients += [aggregator, device]
    assert aggregator.subscribe(TOPICS.all_devices("update")) == 1
    assert device.publish(TOPICS.update("device-000"), b"forged") == NOT_AUTHORIZED
    assert device.publish(TOPICS.update("device-001"), b"mine") == 0
    assert aggregator.received_until((TOPICS.update("device-001"), b"mine")) == [(TOPICS.update("device-001"), b"mine")]

    ca = password_broker.out / "broker" / "ca.crt"
    theirs = (password_broker.out / "devices" / "device-000" / "password").read_text().strip()
    for refused in (Client(password_broker.port, ca, username="device-001", password="wrong"),
                    Client(password_broker.port, ca, username="device-001", password=theirs),
                    Client(password_broker.port, ca)):  # anonymous
        assert not refused.connect()
        assert refused.outcome == NOT_AUTHORIZED  # Mosquitto 2.0's CONNACK for a bad login


def test_a_device_added_later_may_publish_once_the_broker_reloads_the_acl(cert_broker, clients):
    provision(ProvisionConfig(FLEET, cert_broker.out, ("device-002",), broker_hosts=("127.0.0.1",)))
    late = login(cert_broker, "device-002")  # its certificate is good at once ...
    clients.append(late)
    assert late.publish(TOPICS.update("device-002"), b"early") == NOT_AUTHORIZED  # ... its rights are not
    cert_broker.process.send_signal(signal.SIGHUP)  # what README.txt says to do after adding devices
    deadline = time.monotonic() + WAIT_S
    while late.publish(TOPICS.update("device-002"), b"late") not in ACCEPTED:
        assert time.monotonic() < deadline, "the reloaded ACL never let device-002 publish"
        time.sleep(0.05)


# --- the files ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_provision_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["provision", *argv])


def test_rerunning_adds_missing_devices_and_keeps_every_credential(tmp_path):
    out = tmp_path / "fleet"
    assert run_provision(parse(["--fleet", FLEET, "--devices", "1", "--out", str(out)])) == 0
    kept = {p: p.read_bytes() for p in (out / "ca").iterdir()}
    kept |= {p: p.read_bytes() for d in ("broker", "aggregator", "devices/device-000") for p in (out / d).iterdir()
             if p.name not in ("passwd", "acl", "mosquitto.conf", "device_keys.json") and p.is_file()}

    assert run_provision(parse(["--fleet", FLEET, "--device-ids", "device-000,sensor-7", "--out", str(out)])) == 0
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["device-000", "sensor-7"]
    # one fleet key for the whole fleet, kept on reruns; the new device gets its public half too
    assert (out / "devices" / "sensor-7" / "fleet.pub").read_bytes() == (out / "aggregator" / "fleet.pub").read_bytes()
    keys = json.loads((out / "aggregator" / "device_keys.json").read_text())
    assert keys["fleet"] == FLEET and keys["format"] == 1 and sorted(keys["keys"]) == ["device-000", "sensor-7"]
    users = [line.split(":")[0] for line in (out / "broker" / "passwd").read_text().splitlines()]
    assert users == ["aggregator", "device-000", "sensor-7"]
    assert "user sensor-7" in (out / "broker" / "acl").read_text()

    # a device missing from the new list is kept: provisioning never revokes silently
    provision(ProvisionConfig(FLEET, out, ("device-001",)))
    assert sorted(json.loads((out / "aggregator" / "device_keys.json").read_text())["keys"]) == [
        "device-000", "device-001", "sensor-7"]


def test_a_rerun_refuses_another_fleets_folder_and_needs_the_ca_key_only_to_issue(tmp_path):
    out = tmp_path / "fleet"
    provision(ProvisionConfig(FLEET, out, ("device-000",)))
    with pytest.raises(ValueError, match="--out: .* fleet 'prov', not 'other'"):
        provision(ProvisionConfig("other", out, ("device-000",)))
    (out / "ca" / "ca.key").rename(tmp_path / "offline.key")
    provision(ProvisionConfig(FLEET, out, ("device-000",)))  # nothing to sign: no key needed
    with pytest.raises(ValueError, match="ca.key"):
        provision(ProvisionConfig(FLEET, out, ("device-000", "device-001")))
    assert not (out / "devices" / "device-001").exists()
    (out / "ca" / "ca.crt").unlink()  # a lost CA is never silently replaced by a new one
    with pytest.raises(ValueError, match="no ca/ca.crt"):
        provision(ProvisionConfig(FLEET, out, ("device-000",)))


def test_certificates_keys_and_modes(tmp_path):
    out = tmp_path / "fleet"
    provision(ProvisionConfig(FLEET, out, ("device-000",), broker_hosts=("mqtt.example.org", "10.0.0.5"), days=30))
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((out / "broker" / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    client = x509.load_pem_x509_certificate((out / "devices" / "device-000" / "client.crt").read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-000"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert 29 <= (client.not_valid_after_utc - client.not_valid_before_utc).days <= 31
    assert client.issuer == ca.subject

    secrets = ["ca/ca.key", "broker/server.key", "broker/passwd", "aggregator/client.key", "aggregator/password",
               "devices/device-000/client.key", "devices/device-000/password", "devices/device-000/signing.key"]
    assert all((out / s).stat().st_mode & 0o777 == 0o600 for s in secrets)
    assert not list(out.rglob("*.tmp"))

    # the fleet key signs the downlink; its public half is in the aggregator's and every device's folder
    from edgetune.wire.signing import FleetKey, FleetSigner

    assert (out / "aggregator/fleet.key").stat().st_mode & 0o777 == 0o600
    signer = FleetSigner.load(out / "aggregator/fleet.key")
    for holder in ("aggregator", "devices/device-000"):
        assert FleetKey.load(out / holder / "fleet.pub").key_id == signer.key_id

    # device_keys.json holds the raw public half of each device's signing key
    signing = serialization.load_pem_private_key((out / "devices/device-000/signing.key").read_bytes(), None)
    raw = base64.b64decode(json.loads((out / "aggregator/device_keys.json").read_text())["keys"]["device-000"])
    assert raw == signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_password_lines_match_mosquitto_passwd():
    # written by mosquitto_passwd 2.0.11 for user alice, password "secret"
    line = ("alice:$7$101$Vp9dOf+pxCIK7o5t$Di638wgk8Xgy2CQKkMzHdVaGOzgula+4rtMw3/33zaJNwQNUCiFtL6vCnC9YSehLaC8YKd"
            "ckeKOR+JJ+Vqk7RA==")
    assert mosquitto_password_line("alice", "secret", salt=base64.b64decode("Vp9dOf+pxCIK7o5t")) == line
    fresh = mosquitto_password_line("bob", "pw").split("$")
    assert fresh[1:3] == ["7", "101"] and len(base64.b64decode(fresh[3])) == 12
    assert base64.b64decode(fresh[4]) == hashlib.pbkdf2_hmac("sha512", b"pw", base64.b64decode(fresh[3]), 101)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_password_lines_match_the_installed_mosquitto_passwd(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "carol", "p4ss:word"], check=True, timeout=10)
    line = passwd.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_password_line("carol", "p4ss:word", salt=salt) == line


def test_the_acl_covers_every_device_topic_kind():
    acl = acl_text("f", ["d1"])
    assert all(f"topic write edgetune/v1/f/{kind}/d1\n" in acl for kind in DEVICE_TOPIC_KINDS)
    assert acl.index("user aggregator") < acl.index("topic ")  # no rule is left for anonymous clients


@pytest.mark.parametrize("kwargs, flag", [
    ({"device_ids": ("aggregator",)}, "--device-ids"),
    ({"device_ids": ("a/b",)}, "--device-ids"),
    ({"device_ids": ("a", "a")}, "--device-ids"),
    ({"fleet": "x#"}, "--fleet"),
    ({"broker_hosts": ("bad host",)}, "--broker-host"),
    ({"port": 0}, "--port"),
    ({"auth": "psk"}, "--auth"),
    ({"days": 0}, "--days"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        provision(ProvisionConfig(**{"fleet": FLEET, "out": tmp_path, "device_ids": ("d",), **kwargs}))
    assert not any(tmp_path.iterdir())


def test_argument_helpers():
    assert parse_device_ids(3, None) == ("device-000", "device-001", "device-002")
    assert parse_device_ids(None, " a, b ,") == ("a", "b")
    with pytest.raises(ValueError, match="--devices N or --device-ids"):
        parse_device_ids(2, "a")
    assert parse_broker_hosts(None) == ("localhost", "127.0.0.1")
    assert parse_broker_hosts(["a.example,10.0.0.1", "a.example", "::1"]) == ("a.example", "10.0.0.1", "::1")
