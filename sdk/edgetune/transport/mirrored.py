"""One client of a clustered broker whose nodes each keep their own index of retained messages.

The fleet protocol leans on retained messages: a device that connects (or reconnects) reads the
round's task, the global adapter and the serving notice from the broker, and a restarted daemon
reads the devices' hellos. A cluster that shares retained messages between its nodes (EMQX)
needs nothing more than one connection. ejabberd's ``mod_mqtt`` does not: its store of retained
messages is cluster-wide (a replicated Mnesia table, or SQL), but each node answers a
subscription from its own in-memory index of topic names, which learns a name only when a
retained message is published *through that node* (or when the node restarts and rebuilds it).
A task published through node 1 is therefore invisible to a device subscribing on node 2.

``MirroredTransport`` is the daemon's answer: one primary connection that does everything, plus
one connection to each other node that

- publishes every *retained* message again (so each node's index knows every topic name; its
  content is the same in the shared store), and
- subscribes to the same filters but passes on only what that node delivers from its retained
  store (``MqttTransport(retained_only=True)``): the live messages already reach the primary
  through the cluster's routing, while a device's retained hello published through node 2 is
  only delivered, after a daemon restart, by node 2.

The cost: a subscriber receives a live retained message once per node it was published through.
The protocol takes duplicates (QoS 1 delivers at least once): devices and the daemon drop what
they already have. Shared subscriptions (``$share/…``) stay on the primary: they are not
retained and a mirror would double a group's members.

A node that is down must not stop the daemon (surviving one is what a cluster is for): only
the primary's connection is required. A mirror connects in the background and keeps trying;
what is published through it meanwhile waits in its client (QoS 1) and goes out once the node
is back, where it also rebuilds its index from the shared store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .base import Handler, Transport, TransportError, TransportStats, Will, shared

log = logging.getLogger(__name__)

#: how long ``connect`` waits for the other nodes before going on without them
MIRROR_GRACE_S = 10.0
#: between attempts at a node that stays unreachable
MIRROR_RETRY_S = 5.0


class MirroredTransport(Transport):
    """``primary`` for everything; each of ``mirrors`` (connections to the cluster's other nodes,
    opened with ``retained_only=True``) for retained publishes and retained deliveries."""

    def __init__(self, primary: Transport, mirrors: Sequence[Transport]):
        if not mirrors:
            raise ValueError("MirroredTransport needs at least one mirror: use the primary alone")
        self.primary = primary
        self.mirrors = tuple(mirrors)
        self.stats: TransportStats = primary.stats
        self._closed = threading.Event()
        self._connecting: list[threading.Thread] = []

    def connect(self, will: Will | None = None, grace_s: float = MIRROR_GRACE_S) -> None:
        # The last will rides the primary only: the broker that notices the death publishes it,
        # into the shared store, under a name every node learned from the mirrored "online".
        self.primary.connect(will)
        self._connecting = [threading.Thread(target=self._connect_mirror, args=(mirror,), daemon=True,
                                             name=f"edgetune-mirror-{i}") for i, mirror in enumerate(self.mirrors)]
        for thread in self._connecting:
            thread.start()
        for thread in self._connecting:  # (usually through by then; if not, it goes on trying)
            thread.join(grace_s)

    def _connect_mirror(self, mirror: Transport) -> None:
        while not self._closed.is_set():
            try:
                mirror.connect()
                return
            except TransportError as exc:
                if self._closed.is_set():
                    return
                if getattr(mirror, "refused", None):  # (credentials: trying again will not help)
                    log.error("cluster node refused the daemon, retained messages will not reach its "
                              "subscribers: %s", exc)
                    return
                log.warning("cluster node unreachable (%s); retained messages go through it once it is "
                            "back (retrying every %.0f s)", exc, MIRROR_RETRY_S)
            self._closed.wait(MIRROR_RETRY_S)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.primary.publish(topic, payload, qos, retain)
        if retain:
            for mirror in self.mirrors:
                mirror.publish(topic, payload, qos, retain)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self.primary.subscribe(topic_filter, handler, qos)
        if shared(topic_filter)[0] is None:
            for mirror in self.mirrors:
                mirror.subscribe(topic_filter, handler, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.primary.unsubscribe(topic_filter)
        if shared(topic_filter)[0] is None:
            for mirror in self.mirrors:
                mirror.unsubscribe(topic_filter)

    def flush(self, timeout: float = 30.0) -> None:
        """What went through the primary is acknowledged (or this raises); a node that is down
        holds nothing up: its client sends the rest once it is back."""
        self.primary.flush(timeout)
        for mirror in self.mirrors:
            if mirror.connected:
                try:
                    mirror.flush(timeout)
                except TransportError as exc:
                    log.warning("cluster node: %s", exc)

    def close(self) -> None:
        self._closed.set()
        try:
            for mirror in self.mirrors:
                mirror.close()
        finally:
            self.primary.close()
        for thread in self._connecting:
            thread.join(5.0)

    @property
    def connected(self) -> bool:
        """The primary reachable: the daemon serves (a node that is down is logged, and its
        devices are down with it)."""
        return self.primary.connected

    @property
    def nodes_connected(self) -> list[bool]:
        """Each other node's connection, in ``mirrors`` order."""
        return [mirror.connected for mirror in self.mirrors]

    def on_reconnect(self, callback: Callable[[bool], None]) -> None:
        # A node that restarted lost nothing of the shared store, but republishing what the
        # daemon retains after any reconnection is cheap and needs no broker-specific rule.
        self.primary.on_reconnect(callback)
        for mirror in self.mirrors:
            mirror.on_reconnect(callback)
