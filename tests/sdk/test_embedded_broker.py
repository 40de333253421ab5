"""The embedded broker behaves like Mosquitto for what edgetune relies on.

Retained multi-MiB payloads, last wills and persistent sessions are checked against both
brokers (``broker_url``) with bare paho clients, so a failure points at the broker, not at
edgetune's transport. The rest covers EmbeddedBroker's own lifecycle and errors.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgetune.transport.embedded_broker import EmbeddedBroker

TIMEOUT_S = 10.0


class _Client:
    """A paho client whose callbacks only feed a queue and events, so tests wait with timeouts."""

    def __init__(
        self,
        url: str,
        will: tuple[str, bytes] | None = None,
        client_id: str | None = None,
        clean_session: bool = True,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        if will is not None:
            self.paho.will_set(will[0], will[1], qos=1)
        self.paho.on_connect = lambda *_args: self._connected.set()
        self.paho.on_subscribe = lambda *_args: self._subscribed.set()
        self.paho.on_message = lambda _client, _userdata, message: self.messages.put(message)
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.paho.connect(parts.hostname, parts.port, keepalive=30)
        self.paho.loop_start()
        assert self._connected.wait(TIMEOUT_S), f"no CONNACK from {url}"

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.paho.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT_S), f"no SUBACK for {topic}"

    def next_message(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"no message within {TIMEOUT_S} s")

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@contextmanager
def _client(url: str, client_id: str | None = None, clean_session: bool = True) -> Iterator[_Client]:
    client = _Client(url, client_id=client_id, clean_session=clean_session)
    try:
        yield client
    finally:
        client.close()


def _topic(name: str) -> str:
    return f"edgetune-test/{uuid.uuid4().hex[:8]}/{name}"


def test_retained_large_payload_reaches_late_subscriber(broker_url: str) -> None:
    topic, payload = _topic("adapter"), os.urandom(3 * 512 * 1024)  # 1.5 MiB

    with _client(broker_url) as publisher:
        info = publisher.paho.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=TIMEOUT_S)  # PUBACK: the broker holds the message now
        assert info.is_published()

    with _client(broker_url) as subscriber:
        subscriber.subscribe(topic)
        message = subscriber.next_message()

    assert message.topic == topic
    assert message.retain
    assert message.payload == payload


def test_abrupt_disconnect_publishes_last_will(broker_url: str) -> None:
    topic = _topic("status")

    with _client(broker_url) as watcher:
        watcher.subscribe(topic)
        dying = _Client(broker_url, will=(topic, b"offline"))
        dying.paho.loop_stop()  # stop paho's thread first, so nothing touches the socket we kill
        sock = dying.paho.socket()
        assert sock is not None
        sock.close()  # no DISCONNECT packet: the broker must treat it as a failure

        message = watcher.next_message()

    assert message.topic == topic
    assert message.payload == b"offline"


def test_persistent_session_gets_messages_sent_while_offline(broker_url: str) -> None:
    topic, device = _topic("jobs"), f"device-{uuid.uuid4().hex[:8]}"
    with _client(broker_url, client_id=device, clean_session=False) as client:
        client.subscribe(topic)
    time.sleep(1.5)  # amqtt sweeps sessions it won't keep once a second; outlive one sweep

    with _client(broker_url) as publisher:
        info = publisher.paho.publish(topic, b"job-1", qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
        assert info.is_published()

    with _client(broker_url, client_id=device, clean_session=False) as client:  # no re-subscribe
        assert client.next_message().payload == b"job-1"


def _assert_round_trip(url: str) -> None:
    topic = _topic("ping")
    with _client(url) as client:
        client.subscribe(topic)
        client.paho.publish(topic, b"ping", qos=1)
        assert client.next_message().payload == b"ping"


def test_port_zero_gives_distinct_usable_ports_and_restarts() -> None:
    first, second = EmbeddedBroker(), EmbeddedBroker()
    with first, second:
        assert first.port != second.port
        assert first.url == f"mqtt://127.0.0.1:{first.port}"
        _assert_round_trip(first.url)
        _assert_round_trip(second.url)

    first.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = first.port

    with first:  # the same object starts again after a stop
        _assert_round_trip(first.url)


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        broker = EmbeddedBroker(port=taken)

        with pytest.raises(RuntimeError, match=f"port {taken} .* already in use"):
            broker.start()

    broker.stop()  # a failed start leaves nothing to stop


def test_missing_amqtt_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # makes the import raise ImportError

    with pytest.raises(RuntimeError, match=r"pip install 'edgetune\[broker\]'"):
        EmbeddedBroker().start()


def test_importing_the_module_does_not_import_amqtt() -> None:
    code = "import sys, edgetune.transport.embedded_broker; sys.exit('amqtt' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, "amqtt must only be imported by EmbeddedBroker.start()"
