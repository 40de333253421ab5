"""An in-process broker: exact MQTT semantics that matter to us (retained messages, wildcards,
last will) without sockets, so whole federations run in unit tests in milliseconds."""

from __future__ import annotations

import logging
import threading

from .base import Handler, Transport, TransportError, TransportStats, Will, shared, topic_matches

log = logging.getLogger(__name__)


class MemoryBroker:
    """Delivers synchronously on the publisher's thread; handlers must only enqueue."""

    _named: dict[str, MemoryBroker] = {}
    _named_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._retained: dict[str, bytes] = {}
        self._subs: list[tuple[str, str, Handler]] = []  # (client id, filter, handler)
        self._wills: dict[str, Will] = {}
        self._turns: dict[tuple[str, str], int] = {}  # shared subscription -> deliveries so far

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The process-wide broker called ``name`` (``memory://name``), created on first use."""
        with cls._named_lock:
            return cls._named.setdefault(name, cls())

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)  # MQTT: empty retained payload clears
            targets, groups = [], {}
            for _, f, h in self._subs:
                if topic_matches(f, topic):
                    group, plain = shared(f)
                    if group is None:
                        targets.append(h)
                    else:
                        groups.setdefault((group, plain), []).append(h)
            for key, members in groups.items():  # one member of each group, in turn
                turn = self._turns.get(key, 0)
                self._turns[key] = turn + 1
                targets.append(members[turn % len(members)])
        for handler in targets:
            handler(topic, payload)

    def subscribe(self, client_id: str, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._subs.append((client_id, topic_filter, handler))
            retained = [(t, p) for t, p in self._retained.items()
                        if topic_matches(topic_filter, t) and shared(topic_filter)[0] is None]
        for topic, payload in retained:
            handler(topic, payload)

    def unsubscribe(self, client_id: str, topic_filter: str) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s[:2] != (client_id, topic_filter)]

    def attach(self, client_id: str, will: Will | None) -> None:
        with self._lock:
            if will is not None:
                self._wills[client_id] = will

    def detach(self, client_id: str, abnormal: bool) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s[0] != client_id]
            will = self._wills.pop(client_id, None)
        if abnormal and will is not None:
            self.publish(will.topic, will.payload, will.retain)


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, client_id: str):
        self.broker = broker
        self.client_id = client_id
        self.stats = TransportStats()
        self._connected = False

    @classmethod
    def named(cls, name: str, client_id: str) -> MemoryTransport:
        return cls(MemoryBroker.named(name), client_id)

    def connect(self, will: Will | None = None) -> None:
        self.broker.attach(self.client_id, will)
        self._connected = True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if not self._connected:
            raise TransportError(f"{self.client_id}: publish before connect")
        self.stats.sent(len(payload))
        self.broker.publish(topic, bytes(payload), retain)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        def counted(topic: str, payload: bytes) -> None:
            self.stats.received(len(payload))
            handler(topic, payload)

        self.broker.subscribe(self.client_id, topic_filter, counted)

    def unsubscribe(self, topic_filter: str) -> None:
        self.broker.unsubscribe(self.client_id, topic_filter)

    def flush(self, timeout: float = 30.0) -> None:
        return None  # delivery is synchronous

    def close(self) -> None:
        if self._connected:
            self._connected = False
            self.broker.detach(self.client_id, abnormal=False)

    def crash(self) -> None:
        """Vanish without a goodbye, as a powered-off device does: the will is published."""
        self._connected = False
        self.broker.detach(self.client_id, abnormal=True)
