"""The simulated network: each device's access link, and the events that move bytes in virtual time.

A device's transport is wrapped in a :class:`SimTransport`. What the device publishes leaves
its uplink at the device's own time plus the bytes' transmission time (one message after
another: the link is a FIFO), and only then reaches the broker; what the broker delivers to it
waits for its downlink the same way. The broker itself (in-memory, or a real MQTT broker with
``--broker``) and the aggregator's link take no virtual time: the aggregator sits in a data
centre. ``Network`` counts messages in flight so the simulator knows when everything that was
sent has arrived.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..transport.base import Handler, Transport, TransportError, TransportStats, Will, topic_matches
from .clock import SimTime, SimulatedDeviceClock

log = logging.getLogger(__name__)
#: real seconds without any delivery after which expected deliveries are taken as lost
_LOST_AFTER_S = 30.0


@dataclass(order=True)
class Event:
    time: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class Scheduler:
    """Actions at virtual times, in order (ties in the order they were scheduled)."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, Event(when, next(self._seq), action))

    def next_time(self) -> float:
        with self._lock:
            return self._heap[0].time if self._heap else float("inf")

    def due(self, now: float) -> list[Callable[[], None]]:
        """Remove and return the actions due at or before ``now``."""
        out = []
        with self._lock:
            while self._heap and self._heap[0].time <= now:
                out.append(heapq.heappop(self._heap).action)
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


class Link:
    """A device's access link: bits per second each way, one message at a time each way."""

    def __init__(self, uplink_mbps: float | None, downlink_mbps: float | None):
        self.up_bps = (uplink_mbps or 0.0) * 1e6
        self.down_bps = ((downlink_mbps or uplink_mbps) or 0.0) * 1e6
        self._up_free = self._down_free = 0.0
        self.up_seconds = self.down_seconds = 0.0  # time spent sending / receiving

    def upload(self, start: float, size: int) -> float:
        """When a message of ``size`` bytes handed to the link at ``start`` has left it."""
        seconds = size * 8 / self.up_bps if self.up_bps else 0.0
        self._up_free = max(start, self._up_free) + seconds
        self.up_seconds += seconds
        return self._up_free

    def download(self, start: float, size: int) -> float:
        seconds = size * 8 / self.down_bps if self.down_bps else 0.0
        self._down_free = max(start, self._down_free) + seconds
        self.down_seconds += seconds
        return self._down_free


class Network:
    """Who subscribed to what, and how many deliveries are still on their way."""

    def __init__(self, scheduler: Scheduler, time_: SimTime, settle_s: float = 0.0):
        self.scheduler = scheduler
        self.time = time_
        #: a real broker delivers on its own threads: quiet this long (real s) before advancing
        self.settle_s = settle_s
        self._filters: list[tuple[int, str]] = []  # (owner, filter): who subscribed to what
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_delivery = time.monotonic()  # (or publish: the last activity)

    def subscribed(self, owner: object, topic_filter: str) -> None:
        with self._lock:
            self._filters.append((id(owner), topic_filter))

    def unsubscribed(self, owner: object, topic_filter: str) -> None:
        with self._lock:
            self._filters = [(o, f) for o, f in self._filters if (o, f) != (id(owner), topic_filter)]

    def left(self, owner: object) -> None:
        """``owner`` disconnected: nothing is delivered to it any more."""
        with self._lock:
            self._filters = [(o, f) for o, f in self._filters if o != id(owner)]

    def _matching(self, topic: str) -> int:
        return sum(1 for _, f in self._filters if topic_matches(f, topic))

    def publishing(self, topic: str) -> None:
        """A message is about to reach the broker: count the deliveries it will make."""
        with self._lock:
            self._in_flight += self._matching(topic)
            self._last_delivery = time.monotonic()

    def cancel(self, topic: str) -> None:
        """A counted message never reached the broker."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - self._matching(topic))

    def delivered(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._last_delivery = time.monotonic()

    @property
    def quiet(self) -> bool:
        """Everything published has been delivered (and, over a real broker, nothing arrived
        for ``settle_s``: retained messages arrive without a publish to count)."""
        with self._lock:
            quiet_for = time.monotonic() - self._last_delivery
            if self._in_flight and quiet_for > _LOST_AFTER_S:
                # (a real broker dropped a delivery: QoS 0, a subscriber gone): do not wait for ever
                log.warning("%d expected deliveries never came in %.0f s; going on without them", self._in_flight,
                            quiet_for)
                self._in_flight = 0
            return self._in_flight == 0 and quiet_for >= self.settle_s


class _Wrapped(Transport):
    """A transport around another one, leaving the network (``Network.left``) when it closes."""

    def __init__(self, inner: Transport, network: Network):
        self.inner, self.network = inner, network

    def connect(self, will: Will | None = None) -> None:
        self.inner.connect(will)

    def flush(self, timeout: float = 30.0) -> None:
        self.inner.flush(timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        self.network.unsubscribed(self, topic_filter)
        self.inner.unsubscribe(topic_filter)

    def close(self) -> None:
        self.network.left(self)
        self.inner.close()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def on_reconnect(self, callback) -> None:
        self.inner.on_reconnect(callback)


class CountingTransport(_Wrapped):
    """The aggregator's transport in the simulator: no delay, deliveries counted."""

    def __init__(self, inner: Transport, network: Network):
        super().__init__(inner, network)
        self.stats = inner.stats

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.network.publishing(topic)
        self.inner.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self.network.subscribed(self, topic_filter)

        def counted(topic: str, payload: bytes) -> None:
            try:
                handler(topic, payload)
            finally:
                self.network.delivered()

        self.inner.subscribe(topic_filter, counted, qos=qos)


class SimTransport(_Wrapped):
    """A device's transport behind its simulated access link (see the module docstring)."""

    def __init__(self, inner: Transport, network: Network, clock: SimulatedDeviceClock, link: Link):
        super().__init__(inner, network)
        self.clock, self.link = clock, link
        self.stats = TransportStats()
        #: (topic, bytes, handed to the link at, left it at, the device's round) of everything sent
        self.sent: list[tuple[str, int, float, float, int | None]] = []
        #: the round the device is in (for the trace)
        self.round_of: Callable[[], int | None] = lambda: None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        payload = bytes(payload)
        self.stats.sent(len(payload))
        start = self.clock.now()
        arrives = self.link.upload(start, len(payload))
        self.sent.append((topic, len(payload), start, arrives, self.round_of()))

        def release() -> None:
            self.network.publishing(topic)
            try:
                self.inner.publish(topic, payload, qos=qos, retain=retain)
            except TransportError as exc:  # (the device closed before its last bytes left the link)
                self.network.cancel(topic)
                log.debug("%s: not delivered: %s", topic, exc)

        self.network.scheduler.at(arrives, release)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self.network.subscribed(self, topic_filter)

        def arriving(topic: str, payload: bytes) -> None:
            try:
                arrives = self.link.download(self.network.time.monotonic(), len(payload))

                def deliver() -> None:
                    self.stats.received(len(payload))
                    handler(topic, payload)

                self.network.scheduler.at(arrives, deliver)
            finally:
                self.network.delivered()

        self.inner.subscribe(topic_filter, arriving, qos=qos)

    def flush(self, timeout: float = 30.0) -> None:
        return None  # (what was published leaves the link at its own virtual time)


__all__ = ["CountingTransport", "Event", "Link", "Network", "Scheduler", "SimTransport"]
