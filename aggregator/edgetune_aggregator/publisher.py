"""What the daemon keeps on the broker for devices: its presence (with a last will), the task
and the global adapter (retained, so a device that connects late reads them), and the offer
of ONNX Runtime artifacts. After a reconnection it publishes them all again: a broker restarted
without persistence lost them, and devices need them to go on. It also tells a device it will
not serve why (``refuse``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from edgetune.transport import Transport, TransportError, Will
from edgetune.transport.channel import Channel
from edgetune.wire import (AGGREGATOR_ID, DEVICE_KINDS, GlobalAdapter, Presence, Refusal, RoundTask, Serving, Topics,
                           encode_message)
from edgetune.wire.quantize import quantize_tensors

from .fleet import Fleet

log = logging.getLogger("edgetune_aggregator.daemon")

#: a device is told a refusal of one reason at most once in this many seconds (a device that
#: keeps reconnecting, or a flood of hellos in its name, gets no more answers than that)
REFUSAL_INTERVAL_S = 10.0
_MAX_REFUSED = 10_000


class Publisher:
    def __init__(self, transport: Transport, channel: Channel, topics: Topics, fleet: Fleet, artifacts=None,
                 precision: str = "fp32"):
        self.transport = transport
        #: what the global adapter travels as (the state dir keeps it exact: devices start from
        #: this, the next version is computed from the exact one, so the error does not add up)
        self.precision = precision
        self.channel = channel
        self.topics = topics
        self.fleet = fleet
        #: an ``ArtifactServer`` for devices without PyTorch, or None
        self.artifacts = artifacts
        #: the task published now (retained)
        self.task: RoundTask | None = None
        #: payload bytes of the published global adapter (what each device downloads)
        self.global_bytes = 0
        #: what the fleet serves: the notice and the versions it names (``serving.py``)
        self.serving: tuple[Serving | None, dict[int, GlobalAdapter]] = (None, {})
        self._served_here: dict[int, bool] = {}  # versions this process put on the broker
        self._refused: dict[tuple[str, str], float] = {}  # (device, reason) -> when told

    #: device kinds other processes take in (``{"update"}`` with workers: worker.py)
    taken_elsewhere: frozenset[str] = frozenset()

    def connect(self, receive: Callable[[str, bytes, str | None], None], on_reconnect: Callable[[bool], None]) -> None:
        """Subscribe ``receive`` to every device kind the aggregator reads, connect with a last
        will, clear what an earlier run left retained, and say the aggregator is online."""
        will = Will(self.topics.aggregator_status, encode_message(Presence(AGGREGATOR_ID, False)))
        self.transport.on_reconnect(on_reconnect)
        # Handlers before the connection: what the persistent session queued while the daemon
        # was away arrives right after it, and goes through the bounded inbox like the rest.
        for kind in DEVICE_KINDS:
            if kind.aggregator_reads and kind.name not in self.taken_elsewhere:
                self.channel.subscribe_whole(kind.pattern(self.topics.base), receive, qos=kind.qos)
        self.transport.connect(will=will)
        # A retained task left by an earlier run (e.g. "finished") must not steer devices
        # that connect before this run publishes its own.
        self.transport.publish(self.topics.task, b"", retain=True)
        # (likewise what an earlier run served: this run's state says what it serves, if anything;
        # and what it told its workers: they must not take a round or a merge of another run)
        self.transport.publish(self.topics.serving, b"", retain=True)
        for topic in (self.topics.workers_round, self.topics.workers_merge):
            self.transport.publish(topic, b"", retain=True)
        if self.artifacts is not None:
            self.artifacts.publish(self.channel, self.topics)
        else:  # an offer retained by an earlier run must not send devices to a daemon without one
            self.transport.publish(self.topics.artifact_offer("ort") + "/0", b"", retain=True)
        self.presence(True)

    def presence(self, online: bool) -> None:
        self.transport.publish(self.topics.aggregator_status, encode_message(Presence(AGGREGATOR_ID, online)),
                               retain=True)

    def publish_task(self, task: RoundTask) -> None:
        # Not flushed: waiting for the broker's acknowledgement here could wait on a network
        # thread that waits for room in the inbox (paho resends it after a reconnection).
        self.task = task
        self.transport.publish(self.topics.task, self.channel.prepare(self.topics.task, task)[0], retain=True)

    def publish_global(self) -> None:
        """Publish the current adapter (retained). The state naming it is on disk already, so
        a crash here republishes the same version on restart."""
        state = self.fleet.state
        count = self.channel.send_retained(self.topics.global_adapter, self._downlink(), state.global_chunks)
        self.global_bytes = self.channel.last_retained_bytes
        if count != state.global_chunks:
            self.fleet.update(save=True, global_chunks=count)

    def republish(self, session_present: bool) -> None:
        """After a reconnection: a broker restarted without persistence lost the retained
        task, global adapter and status, which devices need to go on; publishing them again
        is harmless when it kept them."""
        log.info("reconnected to the broker (%s); republishing the task and global adapter",
                 "session kept" if session_present else "session lost")
        self.presence(True)
        self.publish_again()

    def publish_again(self) -> None:
        """The task, the global adapter and the artifact offer again (signed afresh, with a fleet key)."""
        if self.task is not None:
            self.transport.publish(self.topics.task, self.channel.prepare(self.topics.task, self.task)[0], retain=True)
        if self.fleet.global_adapter is not None and self.fleet.state is not None:
            self.channel.send_retained(self.topics.global_adapter, self._downlink(), self.fleet.state.global_chunks)
        if self.artifacts is not None:
            self.artifacts.publish(self.channel, self.topics)
        if self.serving[0] is not None:
            self.publish_serving(*self.serving, again=True)

    def publish_serving(self, notice: Serving | None, adapters: dict[int, GlobalAdapter], again: bool = False) -> None:
        """The versions devices serve, whole and in float32 (``served/{version}``: a device
        checks their digest), then the notice naming them; the chunk topics of versions no
        longer named are cleared. Retained, so a device that connects later serves the same.
        A version's bytes never change: one on the broker already is sent again only ``again``
        (after a reconnection, or on a new host: the broker may have lost it)."""
        self.serving = (notice, adapters)
        state = self.fleet.state
        chunks = dict(state.served_chunks)
        for version, adapter in sorted(adapters.items()):
            if str(version) in chunks and not again and self._served_here.get(version):
                continue
            chunks[str(version)] = self.channel.send_retained(self.topics.served(version), adapter,
                                                              chunks.get(str(version), 0))
            self._served_here[version] = True
        for key in [k for k in chunks if int(k) not in adapters]:
            self._served_here.pop(int(key), None)
            for index in range(chunks.pop(key)):
                self.transport.publish(f"{self.topics.served(int(key))}/{index}", b"", retain=True)
        if chunks != state.served_chunks:
            self.fleet.update(save=True, served_chunks=chunks)
        if notice is not None:
            self.transport.publish(self.topics.serving, self.channel.prepare(self.topics.serving, notice)[0],
                                   retain=True)

    def _downlink(self) -> GlobalAdapter:
        """The global adapter as it travels (``precision``)."""
        adapter = self.fleet.global_adapter
        if self.precision == "fp32":
            return adapter
        return dataclasses.replace(adapter, tensors=quantize_tensors(adapter.tensors, self.precision),
                                   merged=quantize_tensors(adapter.merged, self.precision))

    def refuse(self, refusal: Refusal) -> None:
        """Tell one device why it is not served (not retained: its next hello is answered again)."""
        key, now = (refusal.device_id, refusal.reason), time.monotonic()  # (not the detail: the sender writes it)
        if now - self._refused.get(key, -REFUSAL_INTERVAL_S) < REFUSAL_INTERVAL_S:
            return
        if len(self._refused) >= _MAX_REFUSED:
            self._refused.clear()
        self._refused[key] = now
        try:
            self.channel.send(self.topics.refusal(refusal.device_id), refusal)
        except TransportError as exc:  # (it hears it on its next hello)
            log.warning("could not tell %s why it is refused: %s", refusal.device_id, exc)

    def close(self) -> None:
        """Withdraw the artifact offer, say the aggregator is offline, disconnect."""
        if self.artifacts is not None:
            self.artifacts.withdraw(self.channel, self.topics)
        self.presence(False)
        self.transport.close()
