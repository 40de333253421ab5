"""The transport over a real MQTT broker (Mosquitto, EMQX, the embedded amqtt), via paho-mqtt.

paho's network thread owns the socket: it retries the first connection and every later one
with exponential backoff (1 s doubling to ``max_backoff_s``), so an unreachable broker means a
log line per attempt, not a crash loop. Subscriptions are remembered and renewed on every
(re)connect because a clean session forgets them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .base import BrokerUrl, Handler, Transport, TransportError, TransportStats, Will, shared, topic_matches

log = logging.getLogger(__name__)
#: payload bytes kept until a handler for them is registered (see ``_on_unmatched``)
_EARLY_BYTES = 64 << 20
#: how long an MQTT 5 broker keeps a persistent session of a disconnected client
_SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttTransport(Transport):
    def __init__(
        self,
        broker: BrokerUrl,
        client_id: str,
        *,
        connect_timeout: float | None = None,
        keepalive: int = 30,
        clean_session: bool = True,
        max_backoff_s: float = 30.0,
        protocol: str = "3.1.1",
        ca_certs: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        retained_only: bool = False,
    ):
        import paho.mqtt.client as paho

        self._paho = paho
        self.broker = broker
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        # A mirror on another node of a cluster (``mirrored.py``) reads what that node keeps
        # retained and nothing else: live messages reach the primary connection already.
        self.retained_only = retained_only
        self.stats = TransportStats()
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._closing = False  # (close() during connect(): the wait ends)
        self._attempts = 0
        self._ever_connected = False
        self._reconnect_callbacks: list = []
        # Messages a persistent session delivers before their handler is registered (they
        # arrive right after CONNACK): kept, bounded, and handed over by subscribe().
        self._early_messages: deque = deque()
        self._early_bytes = 0
        # Acknowledgements by message id. Never call into paho while holding this lock: paho
        # calls on_publish while holding its own, and the opposite order deadlocks.
        self._acks = threading.Condition()
        self._unacked: set[int] = set()  # QoS ≥ 1 message ids not yet acknowledged
        self._early: set[int] = set()  # acknowledged before publish() recorded them
        self._qos0: set[int] = set()  # QoS 0 ids, whose on_publish must not count as early
        version = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}.get(protocol)
        if version is None:
            raise TransportError(f"MQTT protocol {protocol!r} unsupported; use '3.1.1' or '5'")
        # A persistent session (clean_session=False) makes the broker queue QoS 1 messages for
        # this client while it is disconnected: the aggregator uses one so updates sent during
        # a short outage are not lost.
        session = {"clean_session": clean_session} if version == paho.MQTTv311 else {}
        self._version, self._clean_start = version, clean_session
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, **session
        )
        self.max_backoff_s = max_backoff_s
        self._client.reconnect_delay_set(min_delay=1, max_delay=int(max_backoff_s))
        self._client.max_inflight_messages_set(64)
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.scheme == "mqtts":
            self._client.tls_set(ca_certs=ca_certs, certfile=certfile, keyfile=keyfile)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_unmatched
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def refused(self) -> str | None:
        """Why the broker refused this client (credentials, authorization), or None: retrying
        will not help."""
        return self._refused

    # --- lifecycle --------------------------------------------------------------------------

    def connect(self, will: Will | None = None) -> None:
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        v5 = {}
        if self._version == self._paho.MQTTv5 and not self._clean_start:
            # MQTT 5 has no clean-session flag: a session lives as long as its expiry interval
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = _SESSION_EXPIRY_S
            v5 = {"clean_start": False, "properties": properties}
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive, **v5)
        self._client.loop_start()
        deadline = None if self.connect_timeout is None else time.monotonic() + self.connect_timeout
        while not self._connected.wait(0.2):
            if self._closing:
                self._stop()
                raise TransportError(f"closed while connecting to {self.broker}")
            if self._refused:
                self._stop()
                raise TransportError(self._refused)
            if deadline is not None and time.monotonic() > deadline:
                self._stop()
                raise TransportError(
                    f"broker {self.broker} unreachable after {self.connect_timeout:.0f} s "
                    f"({self._attempts} attempts): is the broker running and the URL right?"
                )

    def close(self) -> None:
        self._closing = True
        try:
            if self._connected.is_set():  # (a client that never got through has nothing to wait for)
                self.flush(timeout=10.0)
        except TransportError as exc:
            log.warning("%s: closing with unsent messages: %s", self.client_id, exc)
        self._client.disconnect()
        self._stop()

    def _stop(self) -> None:
        self._client.loop_stop()
        self._connected.clear()

    # --- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._attempts += 1
            if reason_code.value in (0x04, 0x05, 0x86, 0x87):  # bad credentials / not authorized
                self._refused = f"broker {self.broker} refused {self.client_id}: {reason_code}"
                client.disconnect()
            else:
                log.warning("broker %s refused connection: %s; retrying", self.broker, reason_code)
            return
        if self._attempts:
            log.info("connected to %s after %d failed attempts", self.broker, self._attempts)
        self._attempts = 0
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, (qos, _) in subs:
            client.subscribe(topic_filter, qos=qos)
        self._connected.set()
        if self._ever_connected:
            for callback in list(self._reconnect_callbacks):
                try:
                    callback(bool(flags.session_present))
                except Exception:  # a client's bug must not kill paho's network thread
                    log.exception("reconnect callback failed")
        self._ever_connected = True

    def _on_connect_fail(self, client, userdata) -> None:
        self._attempts += 1
        delay = min(2 ** (self._attempts - 1), self.max_backoff_s)
        log.warning(
            "broker %s unreachable (attempt %d); retrying in about %d s",
            self.broker, self._attempts, delay,
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            self._connected.clear()
            if reason_code.is_failure or reason_code.value != 0:
                log.warning("lost connection to %s (%s); reconnecting", self.broker, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._acks.notify_all()
            elif mid in self._qos0:
                self._qos0.discard(mid)
            else:
                self._early.add(mid)  # publish() has not recorded it yet

    def _on_unmatched(self, client, userdata, message) -> None:
        if self.retained_only and not message.retain:
            return
        log.debug("message on %s matched no handler (yet)", message.topic)
        with self._lock:
            # (subscribe() may have registered one since paho looked: then it is not early)
            late = next((qos_handler for f, qos_handler in self._subs.items() if topic_matches(f, message.topic)), None)
            if late is None:
                self._early_messages.append((message.topic, message.payload))
                self._early_bytes += len(message.payload)
                while self._early_messages and self._early_bytes > _EARLY_BYTES:  # oldest out first
                    self._early_bytes -= len(self._early_messages.popleft()[1])
        if late is not None:
            self.stats.received(len(message.payload))
            try:
                late[1](message.topic, message.payload)
            except Exception:
                log.exception("handler for %s failed", message.topic)

    # --- messaging --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (self._paho.MQTT_ERR_SUCCESS, self._paho.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {self._paho.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: paho keeps QoS ≥ 1 messages and sends them after reconnecting.
        with self._acks:
            if info.mid in self._early:
                self._early.discard(info.mid)  # acknowledged (or, QoS 0, written) already
            elif qos > 0:
                self._unacked.add(info.mid)
            else:
                self._qos0.add(info.mid)
        self.stats.sent(len(payload))

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        def on_message(client, userdata, message) -> None:
            if self.retained_only and not message.retain:
                return
            self.stats.received(len(message.payload))
            try:
                handler(message.topic, message.payload)
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", message.topic)

        with self._lock:
            self._subs[topic_filter] = (qos, handler)
        # (paho matches messages against the filter without its "$share/{group}/")
        self._client.message_callback_add(shared(topic_filter)[1], on_message)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)
        # what the session delivered before this handler existed
        with self._lock:
            early = [m for m in self._early_messages if topic_matches(topic_filter, m[0])]
            if early:
                self._early_messages = deque(m for m in self._early_messages if not topic_matches(topic_filter, m[0]))
                self._early_bytes -= sum(len(m[1]) for m in early)
        for item in early:
            self.stats.received(len(item[1]))
            try:
                handler(*item)
            except Exception:
                log.exception("handler for %s failed", item[0])

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subs.pop(topic_filter, None)
        if known is None:
            return
        self._client.message_callback_remove(shared(topic_filter)[1])
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def flush(self, timeout: float = 30.0) -> None:
        # Acknowledgements are tracked through on_publish: paho's own wait_for_publish() and
        # is_published() raise for a message published while disconnected, which it still
        # holds and sends after reconnecting.
        with self._acks:
            if not self._acks.wait_for(lambda: not self._unacked, timeout):
                raise TransportError(
                    f"{len(self._unacked)} message(s) not yet acknowledged by {self.broker} after "
                    f"{timeout:.0f} s; paho keeps them and resends after reconnecting"
                )
