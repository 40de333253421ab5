"""Splitting payloads over the packet limit, and putting them back together.

EMQX's default maximum packet is 1 MiB and a LoRA delta of a small model is already ~2 MB, so
anything bigger than ``max_packet`` travels as :class:`Chunk` messages. QoS 1 may deliver a chunk
twice and nothing orders chunks across a reconnect, so the reassembler accepts any order, ignores
duplicates, bounds the memory held by unfinished transfers, and checks the SHA-256 of the result.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .codec import decode_message, encode_message
from .errors import WireError
from .messages import Chunk
from .specs import DEFAULT_MAX_PACKET

#: Room left in each packet for the MQTT fixed header, topic name and the chunk's own fields;
#: also what the reassembler charges per held chunk, so empty chunks are not free.
CHUNK_OVERHEAD = 1024


def split_payload(payload: bytes, max_packet: int = DEFAULT_MAX_PACKET) -> list[bytes]:
    """``[payload]`` if it fits in one packet, else the encoded chunks that carry it."""
    if max_packet <= 2 * CHUNK_OVERHEAD:
        raise ValueError(f"max_packet must be > {2 * CHUNK_OVERHEAD} bytes, got {max_packet}")
    if len(payload) + CHUNK_OVERHEAD <= max_packet:
        return [payload]
    return chunk_payload(payload, max_packet)


def chunk_payload(payload: bytes, max_packet: int = DEFAULT_MAX_PACKET) -> list[bytes]:
    """Always chunk (even a small payload): used for retained per-index topics."""
    step = max_packet - CHUNK_OVERHEAD
    view = memoryview(payload)
    digest = hashlib.sha256(view).hexdigest()
    count = max(1, -(-len(payload) // step))
    return [
        encode_message(Chunk(digest, i, count, len(payload), bytes(view[i * step:(i + 1) * step])))
        for i in range(count)
    ]


@dataclass
class _Pending:
    count: int
    size: int
    #: indices of the chunks written into ``buffer``
    parts: set[int] = field(default_factory=set)
    received: int = 0  # what is charged against the bound: data + CHUNK_OVERHEAD per chunk
    data_bytes: int = 0  # the chunks' data: never more than the size the transfer claims
    started: float = field(default_factory=time.monotonic)
    #: the whole payload, each chunk copied into its place as it comes (no join at the end);
    #: allocated with the first chunk and charged whole against the reassembler's bound then
    buffer: bytearray = field(default_factory=bytearray)
    #: the data of every chunk but the last (chunk_payload's step), once one of them came
    step: int | None = None
    #: the last chunk's length, if it came before the step was known
    last: int | None = None

    def place(self, index: int, data: bytes) -> None:
        """Copy a chunk into its place; raises ``WireError`` if it cannot be part of the whole."""
        if index < self.count - 1:
            if self.step is None:
                self.step = len(data)
                # every chunk but the last carries ``step`` bytes, the last the rest (1..step)
                if not 0 < self.size - (self.count - 1) * self.step <= self.step or (
                        self.last is not None and self.last != self.size - (self.count - 1) * self.step):
                    raise WireError("bad_chunk", f"chunks of {self.step} bytes cannot make {self.size} in {self.count}")
            elif len(data) != self.step:
                raise WireError("bad_chunk", "chunks of one transfer differ in length")
            offset = index * self.step
        else:
            if self.step is not None and len(data) != self.size - (self.count - 1) * self.step:
                raise WireError("bad_chunk", "the last chunk does not end the transfer")
            self.last = len(data)
            offset = self.size - len(data)
        if not self.buffer:
            self.buffer = bytearray(self.size)
        self.buffer[offset:offset + len(data)] = data


class Reassembler:
    """Collects chunks per (sender, transfer) and yields whole payloads once.

    Unfinished transfers are bounded three ways, oldest evicted first, so neither a sender that
    vanished mid-transfer nor a flood of cheap chunks can pin memory or CPU: total bytes held
    (each chunk charged its data plus ``CHUNK_OVERHEAD``), unfinished transfers per sender,
    and age. A finished transfer's id is remembered for ``remember_s`` so the chunks QoS 1
    redelivers right after do not start it again; a whole transfer sent again later (a device
    resending a result whose receipt it never got) is reassembled again, so the receiver can
    answer it (idempotently: it knows the result by its nonce).
    """

    def __init__(
        self,
        max_pending_bytes: int = 256 << 20,
        max_transfer_bytes: int = 512 << 20,
        max_pending_per_sender: int = 4,
        ttl_s: float = 600.0,
        remember: int = 1024,
        remember_s: float = 2.0,
    ):
        self.max_pending_bytes = max_pending_bytes
        self.max_transfer_bytes = max_transfer_bytes
        self.max_pending_per_sender = max_pending_per_sender
        self.ttl_s = ttl_s
        self._pending: OrderedDict[tuple[str, str, str], _Pending] = OrderedDict()
        self._per_sender: dict[str, OrderedDict[tuple[str, str], None]] = {}  # sender -> its unfinished (stream, transfer)s, oldest first
        self._done: OrderedDict[tuple[str, str, str], float] = OrderedDict()  # -> when it finished
        self._remember = remember
        self.remember_s = remember_s
        self.pending_bytes = 0  # running total: summing on every chunk would be quadratic
        self.evicted = 0

    def feed(self, sender: str, chunk: Chunk, max_size: int | None = None, stream: str = "",
             check_digest: bool = True) -> bytes | bytearray | None:
        """Add one chunk; returns the whole payload when this chunk completes it.
        ``check_digest=False``: the caller checks the whole's SHA-256 (``chunk.transfer``)
        itself, off this thread (the aggregator's network thread only puts pieces together).

        ``max_size``: the most bytes a payload on this chunk's topic may have (the receiver
        knows it, e.g. from the round's adapter layout); a transfer claiming more is refused
        before anything is held for it. ``stream``: the topic the message is on (without a
        chunk index): the same payload on two topics is two messages (a served version and the
        training global can be the same bytes), never one's redelivery."""
        key = (sender, stream, chunk.transfer)
        finished = self._done.get(key)
        if finished is not None:
            if time.monotonic() - finished < self.remember_s:
                return None  # redelivery of a transfer that just finished
            del self._done[key]  # sent again on purpose: reassemble it again
        if max_size is not None and chunk.size > max_size:
            raise WireError("oversize", f"a payload of {chunk.size} bytes where at most {max_size} fit")
        if (
            not (0 <= chunk.index < chunk.count)
            or chunk.size > self.max_transfer_bytes
            or chunk.count > -(-chunk.size // CHUNK_OVERHEAD) + 1  # every chunk but the last carries > 1 KiB
            or len(chunk.data) > chunk.size
        ):
            raise WireError(
                "bad_chunk",
                f"chunk {chunk.index}/{chunk.count} with {len(chunk.data)} of {chunk.size} bytes is out of range",
            )
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(chunk.count, chunk.size)
            self._per_sender.setdefault(sender, OrderedDict())[(stream, chunk.transfer)] = None
        elif (pending.count, pending.size) != (chunk.count, chunk.size):
            self._discard(key)
            raise WireError("bad_chunk", "chunks of one transfer disagree on count or size")
        if chunk.index in pending.parts:
            return None  # duplicate (QoS 1 redelivery)
        if pending.data_bytes + len(chunk.data) > pending.size:
            self._discard(key)
            raise WireError("bad_chunk", f"chunks carry more than the {pending.size} bytes their transfer claims")
        try:
            pending.place(chunk.index, chunk.data)
        except WireError:
            self._discard(key)
            raise
        pending.data_bytes += len(chunk.data)
        charge = CHUNK_OVERHEAD + (pending.size if not pending.parts else 0)  # (the buffer, whole, with the first)
        pending.parts.add(chunk.index)
        pending.received += charge
        self.pending_bytes += charge
        if len(pending.parts) < pending.count:
            self._evict(sender)
            return None
        self._discard(key)
        payload = pending.buffer
        if pending.data_bytes != pending.size or (check_digest and not digest_matches(payload, chunk.transfer)):
            raise WireError("digest_mismatch", "reassembled payload does not match its SHA-256")
        self._done[key] = time.monotonic()
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
        return payload

    def _discard(self, key: tuple[str, str, str]) -> None:
        pending = self._pending.pop(key)
        self.pending_bytes -= pending.received
        mine = self._per_sender[key[0]]
        del mine[key[1:]]
        if not mine:
            del self._per_sender[key[0]]

    def _evict(self, sender: str) -> None:
        mine = self._per_sender.get(sender)
        if mine is not None and len(mine) > self.max_pending_per_sender:
            self._discard((sender, *next(iter(mine))))
            self.evicted += 1
        now = time.monotonic()
        while self._pending:
            key, oldest = next(iter(self._pending.items()))
            if now - oldest.started > self.ttl_s or self.pending_bytes > self.max_pending_bytes:
                self._discard(key)
                self.evicted += 1
            else:
                break


def digest_matches(payload: bytes | bytearray, transfer: str) -> bool:
    """Whether a reassembled payload is the one its chunks named (their transfer id)."""
    return hashlib.sha256(payload).hexdigest() == transfer


def decode_frame(reassembler: Reassembler, sender: str, frame: bytes, max_size: int | None = None):
    """Decode one MQTT payload: a message, or None while a chunked one is incomplete.
    ``max_size`` bounds the whole payload, chunked or not (checked before reassembly)."""
    return decode_frame_payload(reassembler, sender, frame, max_size)[0]


def decode_frame_payload(reassembler: Reassembler, sender: str, frame: bytes,
                         max_size: int | None = None, stream: str = "") -> tuple[object | None, bytes]:
    """``decode_frame`` and the whole payload the message was decoded from, as received (the
    frame, or the reassembled chunks): what a receiver that keeps the message writes down
    instead of encoding it again (the aggregator's journal)."""
    if max_size is not None and len(frame) > max_size + CHUNK_OVERHEAD:
        raise WireError("oversize", f"a payload of {len(frame)} bytes where at most {max_size} fit")
    message = decode_message(frame)
    if not isinstance(message, Chunk):
        return message, bytes(frame)
    payload = reassembler.feed(sender, message, max_size, stream)
    if payload is None:
        return None, b""
    inner = decode_message(payload)
    if isinstance(inner, Chunk):
        raise WireError("bad_chunk", "a chunked payload may not itself be a chunk")
    return inner, payload
