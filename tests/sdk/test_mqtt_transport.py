"""The MQTT transport against a real Mosquitto that comes and goes."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from edgetune.transport import TransportError, open_transport

from helpers.brokers import free_port
from helpers.waiting import wait_for


def test_connect_retries_with_backoff_until_the_broker_appears(mosquitto_factory, caplog):
    caplog.set_level(logging.WARNING, logger="edgetune.transport.mqtt")
    port = free_port()
    transport = open_transport(f"mqtt://127.0.0.1:{port}", client_id="early", connect_timeout=30)
    done = threading.Event()
    threading.Thread(target=lambda: (transport.connect(), done.set()), daemon=True).start()
    time.sleep(2.5)
    assert not done.is_set()
    mosquitto_factory(port)
    assert done.wait(20), "did not connect once the broker was up"
    attempts = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert 1 <= len(attempts) <= 4, "backoff should space the attempts out, not spin"
    assert "attempt 1" in attempts[0].getMessage() and f"127.0.0.1:{port}" in attempts[0].getMessage()
    transport.close()


def test_connect_timeout_gives_a_clear_error():
    transport = open_transport(f"mqtt://127.0.0.1:{free_port()}", client_id="x", connect_timeout=1.5)
    with pytest.raises(TransportError, match="unreachable after 2 s .* is the broker running"):
        transport.connect()


def test_subscriptions_and_queued_publishes_survive_a_broker_restart(mosquitto_factory):
    url, stop = mosquitto_factory()
    received: list[bytes] = []
    got = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        received.append(payload)
        if payload == b"after the restart":
            got.set()

    subscriber = open_transport(url, client_id="sub", connect_timeout=10)
    subscriber.connect()
    subscriber.subscribe("t/#", on_message)
    publisher = open_transport(url, client_id="pub", connect_timeout=10)
    publisher.connect()
    stop()
    time.sleep(0.5)
    publisher.publish("t/queued", b"sent while the broker was down")  # paho keeps it
    mosquitto_factory(int(url.rsplit(":", 1)[1]))  # the broker comes back on the same port
    publisher.flush(timeout=30)  # resent after reconnecting, and acknowledged
    # the subscriber renewed its subscription on reconnect: a new message reaches it
    deadline = time.monotonic() + 30
    while not got.is_set() and time.monotonic() < deadline:
        publisher.publish("t/after", b"after the restart")
        got.wait(0.5)
    assert got.is_set(), received
    subscriber.close()
    publisher.close()


def test_many_qos1_publishes_neither_deadlock_nor_lose_acknowledgements(mosquitto_url):
    """Regression: holding a lock of ours around paho's publish deadlocked against on_publish."""
    transport = open_transport(mosquitto_url, client_id="burst", connect_timeout=10)
    transport.connect()
    done = threading.Event()

    def burst() -> None:
        for i in range(20_000):
            transport.publish("burst/x", b"%d" % i, qos=1 if i % 3 else 0)
        transport.flush(timeout=60)
        done.set()

    threading.Thread(target=burst, daemon=True).start()
    assert done.wait(90), "publishing stalled"
    transport.close()


def test_broker_url_credentials_are_percent_decoded_and_cluster_nodes_checked():
    from edgetune.transport import BrokerUrl
    from edgetune.transport.mirrored import MirroredTransport

    url = BrokerUrl.parse("mqtt://dev-1%40plant:p%3Ass@node-a:1884")
    assert (url.username, url.password, url.host, url.port) == ("dev-1@plant", "p:ss", "node-a", 1884)
    mirrored = open_transport("mqtt://node-a:1883", "agg", cluster_nodes=("mqtt://node-b:1883",))
    assert isinstance(mirrored, MirroredTransport)
    (mirror,) = mirrored.mirrors
    assert (mirror.client_id, mirror.retained_only, mirrored.primary.retained_only) == ("agg-node2", True, False)
    with pytest.raises(TransportError, match="memory"):
        open_transport("memory://x", "agg", cluster_nodes=("mqtt://node-b:1883",))
    with pytest.raises(TransportError, match="not mqtt://node-a:1883 itself"):
        open_transport("mqtt://node-a:1883", "agg", cluster_nodes=("mqtt://node-a:1883",))


def test_a_cluster_node_down_at_start_holds_nothing_up_and_gets_the_retained_messages_later(mosquitto_factory):
    """The daemon's mirrored client (``cluster_nodes``): with the other node down it connects
    through the primary alone, and what it published retained meanwhile reaches that node once
    it is up (two plain Mosquittos stand for two nodes: what goes through each is what counts)."""
    from edgetune.transport.mirrored import MirroredTransport

    url_a, _ = mosquitto_factory()
    port_b = free_port()
    url_b = f"mqtt://127.0.0.1:{port_b}"
    client = open_transport(url_a, "daemon", cluster_nodes=(url_b,), connect_timeout=2)
    assert isinstance(client, MirroredTransport)
    started = time.monotonic()
    client.connect(grace_s=1.0)
    assert time.monotonic() - started < 10 and client.connected and client.nodes_connected == [False]
    client.publish("edgetune/v1/f/task", b"round 1", retain=True)
    client.flush(10)  # (the primary's acknowledgement; the node that is down holds nothing up)
    mosquitto_factory(port_b)
    assert wait_for(lambda: client.nodes_connected == [True], 30)
    reader = open_transport(url_b, "reader", connect_timeout=10)
    got = []
    reader.subscribe("edgetune/v1/f/task", lambda topic, payload: got.append(payload))
    reader.connect()
    assert wait_for(lambda: got == [b"round 1"], 15), got
    reader.close()
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 15
