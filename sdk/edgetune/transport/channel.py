"""Messages over a transport: encode, chunk, publish; receive, reassemble, validate, dispatch.

Both the device loop and the aggregator daemon use this, so bad input is handled in one place:
a payload that does not decode is logged with its sender and reason, counted in
:attr:`Channel.drops`, and dropped. Nothing raises into the transport's thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..logsafe import DropLog, shown
from ..wire import DEFAULT_MAX_PACKET, Reassembler, WireError, chunk_payload
from ..wire.chunks import CHUNK_OVERHEAD, decode_frame_payload
from ..wire.codec import decode_message, envelope_kind
from ..wire import encode_message, split_payload
from .base import Transport

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, Any], None]


def seal(topic: str, message: Any, signer=None) -> tuple[bytes, bytes]:
    """``(payload, nonce)``: the encoded message, signed for ``topic`` by ``signer`` (an
    ``edgetune.wire.signing.Signer``) if given (nonce b"" if not): the bytes a device publishes."""
    payload = encode_message(message)
    if signer is None:
        return payload, b""
    signed = signer.sign(topic, payload)
    return encode_message(signed), signed.nonce


class Channel:
    """``sender_of(topic)`` names who sent a message on ``topic`` (for logs, counters and
    keeping one sender's chunks apart from another's)."""

    def __init__(
        self,
        transport: Transport,
        sender_of: Callable[[str], str | None],
        max_packet: int = DEFAULT_MAX_PACKET,
        signer=None,
        limit_of: Callable[[str], int | None] | None = None,
    ):
        self.transport = transport
        self.sender_of = sender_of
        self.max_packet = max_packet
        #: an ``edgetune.wire.signing.Signer``: everything sent is wrapped in a ``Signed``
        self.signer = signer
        #: the most payload bytes a message on a topic may have (None: no limit), checked
        #: before a chunked payload is reassembled
        self.limit_of = limit_of
        #: ``admit(sender, topic)``: (reason, detail) of refusing a payload before it is decoded
        #: or held (None: go on). The aggregator refuses senders that never said hello here, so a flood
        #: from made-up devices costs neither reassembly memory nor decoding.
        self.admit: Callable[[str, str], tuple[str, str] | None] | None = None
        #: ``(topic, message) -> (message, reason, detail)``: what a decoded message stands for
        #: (a device's ``DownlinkGuard``: the aggregator's signed message, verified), or None
        #: with why it is dropped
        self.opener: Callable[[str, Any], tuple[Any, str, str]] | None = None
        #: called with each drop's reason (the aggregator's metrics)
        self.on_drop: Callable[[str], None] | None = None
        #: ``(sender, topic, reason, detail, payload)`` of a payload that did not decode, after it
        #: is dropped (the aggregator answers a hello in a wire version it does not read)
        self.on_undecodable: Callable[[str, str, str, str, bytes], None] | None = None
        self.drops: Counter[str] = Counter()
        #: which drops reach the log (a flood of them is counted, not written out line by line)
        self.drop_log = DropLog()
        #: payload bytes received per sender (whole MQTT payloads, valid or not)
        self.bytes_from: Counter[str] = Counter()
        #: holds unfinished chunked transfers (bounded in bytes, per sender and in age)
        self.reassembler = Reassembler()
        #: ``topic -> stream``: the message a chunk on ``topic`` belongs to (a retained message's
        #: chunk topics without their index: ``Topics.message_topic``); the same bytes on two
        #: streams are two messages. None: one stream per sender.
        self.stream_of: Callable[[str], str | None] | None = None
        #: payload bytes of the last ``send_retained`` (what each subscriber downloads)
        self.last_retained_bytes = 0
        self._lock = threading.Lock()  # the reassembler is fed from the network thread(s)

    def prepare(self, topic: str, message: Any) -> tuple[bytes, bytes]:
        """``(payload, nonce)``: what ``send`` publishes (``seal``). A device keeps it to resend
        the same bytes, same nonce, until the aggregator acknowledges them."""
        return seal(topic, message, self.signer)

    def send(self, topic: str, message: Any, qos: int = 1) -> int:
        """Publish a message, in chunks on the same topic if it is over the packet limit.
        Returns the bytes published."""
        return self.send_payload(topic, self.prepare(topic, message)[0], qos)

    def send_payload(self, topic: str, payload: bytes, qos: int = 1, whole: bool = False) -> int:
        """Publish a prepared payload (see ``prepare``); ``whole``: as one message, however big
        (``RoundTask.whole_updates``), up to the broker's own packet limit."""
        frames = [payload] if whole else split_payload(payload, self.max_packet)
        for frame in frames:
            self.transport.publish(topic, frame, qos=qos)
        return sum(map(len, frames))

    def send_retained(self, prefix: str, message: Any, previous_count: int = 0) -> int:
        """Publish retained as chunks on ``{prefix}/0 … {prefix}/{n-1}``; returns n. Signed
        (with a signer) once, whole, for ``prefix``.

        Retained state is per topic, so each chunk needs its own; chunk topics left over from
        a previous, longer message are cleared so late joiners never see stale pieces.
        """
        frames = chunk_payload(self.prepare(prefix, message)[0], self.max_packet)
        self.last_retained_bytes = sum(map(len, frames))
        for index, frame in enumerate(frames):
            self.transport.publish(f"{prefix}/{index}", frame, qos=1, retain=True)
        for index in range(len(frames), previous_count):
            self.transport.publish(f"{prefix}/{index}", b"", qos=1, retain=True)
        return len(frames)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1, raw: bool = False) -> None:
        """``handler(topic, message)`` for each whole, valid message on the filter; ``raw``:
        ``handler(topic, message, payload)``, with the payload it was decoded from, as received."""

        def on_frame(topic: str, payload: bytes) -> None:
            sender = self._admitted(topic, payload)
            if sender is None:
                return
            try:
                limit = self.limit_of(topic) if self.limit_of else None
                with self._lock:
                    stream = (self.stream_of(topic) or topic) if self.stream_of else ""
                    message, whole = decode_frame_payload(self.reassembler, sender, payload, limit, stream)
                if message is not None and self.opener is not None:
                    message, reason, detail = self.opener(topic, message)
                    if message is None:
                        self.drop(sender, topic, reason, detail)
                        return
            except WireError as exc:
                self.drop(sender, topic, exc.reason, exc.detail)
                if self.on_undecodable is not None:
                    self.on_undecodable(sender, topic, exc.reason, exc.detail, payload)
                return
            except Exception as exc:  # a decoder bug must not reach the transport's thread
                log.exception("decoding a message from %s failed unexpectedly", sender)
                self.drop(sender, topic, "bad_payload", f"{type(exc).__name__}: {exc}")
                return
            if message is not None:
                if raw:
                    handler(topic, message, whole)
                else:
                    handler(topic, message)

        self.transport.subscribe(topic_filter, on_frame, qos=qos)

    def subscribe_whole(self, topic_filter: str, handler: Callable[[str, bytes | bytearray, str | None], None],
                        qos: int = 1) -> None:
        """``handler(topic, payload, transfer)`` for each whole payload on the filter, not decoded:
        chunks are put together here (on the transport's thread) and nothing else is done, so
        the receiver decodes and verifies elsewhere (the aggregator's intake stages). ``transfer``
        is the SHA-256 the chunks named, for the receiver to check (None: it came in one piece)."""

        def on_frame(topic: str, frame: bytes) -> None:
            sender = self._admitted(topic, frame)
            if sender is None:
                return
            limit = self.limit_of(topic) if self.limit_of else None
            if limit is not None and len(frame) > limit + CHUNK_OVERHEAD:
                self.drop(sender, topic, "oversize", f"a payload of {len(frame)} bytes where at most {limit} fit")
                return
            if envelope_kind(frame) != "chunk":  # (whatever else it is, the receiver's decoder says)
                handler(topic, frame, None)
                return
            try:
                chunk = decode_message(frame)
                with self._lock:
                    stream = (self.stream_of(topic) or topic) if self.stream_of else ""
                    payload = self.reassembler.feed(sender, chunk, limit, stream, check_digest=False)
            except WireError as exc:
                self.drop(sender, topic, exc.reason, exc.detail)
                return
            except Exception as exc:  # a decoder bug must not reach the transport's thread
                log.exception("reassembling a message from %s failed unexpectedly", sender)
                self.drop(sender, topic, "bad_payload", f"{type(exc).__name__}: {exc}")
                return
            if payload is not None:
                handler(topic, payload, chunk.transfer)

        self.transport.subscribe(topic_filter, on_frame, qos=qos)

    def _admitted(self, topic: str, frame: bytes) -> str | None:
        """The sender of a frame to go on with (counted), or None: a cleared retained topic, or
        a sender ``admit`` refuses (dropped)."""
        if not frame:
            return None  # a cleared retained topic
        sender = self.sender_of(topic) or topic
        refused = self.admit(sender, topic) if self.admit is not None else None
        if refused is not None:
            self.drop(sender, topic, *refused)
            return None
        self.bytes_from[sender] += len(frame)
        return sender

    def unsubscribe(self, topic_filter: str) -> bool:
        """Stop delivering ``topic_filter``; False where the transport cannot (it stays)."""
        try:
            self.transport.unsubscribe(topic_filter)
        except NotImplementedError:
            return False
        return True

    def drop(self, sender: str, topic: str, reason: str, detail: str) -> None:
        """Log and count a message we refuse; used for wire errors and for semantic checks."""
        with self._lock:
            self.drops[reason] += 1
        if self.on_drop is not None:
            self.on_drop(reason)
        admit, suppressed = self.drop_log.admit(sender, reason)
        if admit:
            log.warning("dropped message from %s on %s: %s (%s)%s", shown(sender, 64), shown(topic, 200), shown(reason, 64),
                        shown(detail, 300), f"; {suppressed} more like it not logged" if suppressed else "")
