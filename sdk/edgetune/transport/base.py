"""The transport interface: publish bytes to a topic, subscribe to a filter, last will.

Strategies and device loops talk to this interface only, so every round can run in-memory in
milliseconds and the same code runs over a real broker.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

Handler = Callable[[str, bytes], None]


class TransportError(RuntimeError):
    """The broker cannot be used (bad URL, unreachable, refused); the message says what to do."""


@dataclass(frozen=True)
class Will:
    """Published by the broker if this client vanishes without saying goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://host[:port]``, ``mqtts://host[:port]`` (TLS) or ``memory://name`` (in-process)."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        hint = "expected mqtt://HOST:PORT, mqtts://HOST:PORT or memory://NAME"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise TransportError(f"broker URL {url!r} is invalid ({exc}); {hint}") from None
        if parts.scheme not in {"mqtt", "mqtts", "memory"}:
            raise TransportError(f"broker URL {url!r} has scheme {parts.scheme!r}; {hint}")
        if not parts.hostname:
            raise TransportError(f"broker URL {url!r} names no host; {hint}")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise TransportError(f"broker URL {url!r} has a path or query; {hint}")
        default = {"mqtt": 1883, "mqtts": 8883, "memory": 0}[parts.scheme]
        # (percent-escapes decoded: ejabberd's MQTT users are user@host, written user%40host)
        username, password = (unquote(v) if v is not None else None for v in (parts.username, parts.password))
        return cls(parts.scheme, parts.hostname, port or default, username, password)

    def __str__(self) -> str:
        if self.scheme == "memory":
            return f"memory://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"


class TransportStats:
    """Payload bytes and messages each way; thread-safe (callbacks run on network threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0

    def sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n
            self.messages_sent += 1

    def received(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n
            self.messages_received += 1

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes_sent, self.bytes_received


class Transport(ABC):
    """Bytes in, bytes out. Handlers run on the transport's own thread: keep them short
    (decode and enqueue) and never call back into ``publish`` from them while blocking."""

    stats: TransportStats

    @abstractmethod
    def connect(self, will: Will | None = None) -> None:
        """Connect (retrying as configured); raise :class:`TransportError` if it cannot."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue one message. QoS 1 is delivered at least once."""

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for each message matching the filter (also for
        retained ones), surviving reconnects."""

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop the handler of ``topic_filter`` (a device that no longer needs a version's
        retained chunks). Transports that cannot leave the subscription in place."""
        raise NotImplementedError(f"{type(self).__name__} cannot unsubscribe")

    @abstractmethod
    def flush(self, timeout: float = 30.0) -> None:
        """Block until what was published at QoS ≥ 1 has left (or raise on timeout)."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly: the last will is *not* published."""

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable now (health checks); in-memory: always."""
        return True

    def on_reconnect(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(session_present)`` on the transport's thread after every
        reconnection. A broker restarted without persistence forgets retained messages and
        sessions (``session_present`` False): clients republish what others must see. An
        in-memory transport never reconnects."""
        self._reconnect_callbacks = [*getattr(self, "_reconnect_callbacks", []), callback]

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared(topic_filter: str) -> tuple[str | None, str]:
    """``(group, filter)`` of an MQTT 5 shared subscription ``$share/{group}/{filter}`` (the
    broker hands each message to one member of the group); ``(None, topic_filter)`` otherwise."""
    if topic_filter.startswith("$share/"):
        _, group, rest = topic_filter.split("/", 2)
        return group, rest
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` (one level) and ``#`` (the rest); a shared subscription
    matches what its filter matches."""
    topic_filter = shared(topic_filter)[1]
    filter_parts = topic_filter.split("/")
    topic_parts = topic.split("/")
    for i, part in enumerate(filter_parts):
        if part == "#":
            return True
        if i >= len(topic_parts) or (part != "+" and part != topic_parts[i]):
            return False
    return len(filter_parts) == len(topic_parts)


def open_transport(url: str | BrokerUrl, client_id: str, cluster_nodes: Sequence[str | BrokerUrl] = (),
                   **options) -> Transport:
    """The transport for a broker URL (not yet connected). ``cluster_nodes``: the other nodes of
    a clustered broker whose nodes each index their own retained messages (ejabberd): retained
    messages are published, and read, through each of them as well (``mirrored.py``)."""
    broker = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
    if broker.scheme == "memory":
        if cluster_nodes:
            raise TransportError("cluster nodes are MQTT brokers; memory:// has none")
        from .memory import MemoryTransport

        return MemoryTransport.named(broker.host, client_id)
    from .mqtt import MqttTransport

    primary = MqttTransport(broker, client_id, **options)
    if not cluster_nodes:
        return primary
    from .mirrored import MirroredTransport

    nodes = [node if isinstance(node, BrokerUrl) else BrokerUrl.parse(node) for node in cluster_nodes]
    if any(node.scheme == "memory" for node in nodes) or broker in nodes:
        raise TransportError(f"cluster nodes must be the broker's other MQTT nodes, not {broker} itself or memory://")
    # (clean sessions: a mirror's subscriptions only ever read retained messages)
    mirror_options = {**options, "clean_session": True, "retained_only": True}
    return MirroredTransport(primary, [MqttTransport(node, f"{client_id}-node{i + 2}", **mirror_options)
                                       for i, node in enumerate(nodes)])
