"""Who may speak, and how much: signatures and payload sizes of device messages, checked
before the round logic sees them. The intake's verify and decode stage (``open_payload``) runs
on the receiver's threads (``receiver.py``), off the network thread and the round loop.

With the fleet's keys (``device_keys.json``) every message that shapes the fleet (hello,
results, personalization reports, error reports) must arrive signed by its device; presence
and progress may be unsigned (the broker's ACL already pins them to their device; they
change no adapter, and presence counts only for devices whose hello was accepted). A signature is verified before its payload is decoded, so a forger cannot
even reach the decoder with a large payload.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgetune.wire import MUST_BE_SIGNED, Chunk, Limit, ModelManifest, Signed, Topics, Update, WireError, decode_message
from edgetune.wire.chunks import digest_matches
from edgetune.wire.codec import envelope_kind

from .validation import Refusal, measure_delta

#: a hello's limit until the fleet's model is pinned (then ``hello_limit(model)``)
_UNPINNED_HELLO = 8 << 20
#: an update's limit until the fleet's adapter layout is known
_UNKNOWN_LAYOUT = 1 << 20


def hello_limit(model: ModelManifest) -> int:
    """Bytes a hello for ``model`` can need: its manifest (smaller in msgpack than in JSON),
    twice over for slack, plus the profile, capabilities and a signature's envelope."""
    return 2 * len(json.dumps(asdict(model))) + (64 << 10)


@dataclass(frozen=True)
class Opened:
    message: object
    #: the signature's nonce (b"" for an unsigned message)
    nonce: bytes = b""
    signed: Signed | None = None
    #: the payload as received (signed or not): what the round journal writes down
    payload: bytes = b""
    #: an update's ``measure_delta`` (its norm, and a refusal if a value is not finite), done
    #: here on an intake thread: the one pass over its values, off the round loop
    measured: tuple[float, Refusal | None] | None = None


class Intake:
    def __init__(self, topics: Topics, device_keys: Path | None = None):
        self.topics = topics
        self.keyring = None
        if device_keys is not None:
            from edgetune.wire.signing import KeyRing

            self.keyring = KeyRing.load(device_keys, topics.fleet)
        #: the most bytes an update or a starting adapter may have (set once the layout is known)
        self.result_limit: int = _UNKNOWN_LAYOUT
        #: the most bytes a hello may have (tightened once the fleet's model is pinned)
        self.hello_limit: int = _UNPINNED_HELLO
        #: ``(sender, topic, reason, detail, payload)`` of a payload that did not decode
        self.on_undecodable = None

    @property
    def signed(self) -> bool:
        """The fleet has device keys: what shapes the fleet counts only signed by its device."""
        return self.keyring is not None

    def limit_of(self, topic: str) -> int | None:
        """The payload limit of a device topic (None for the aggregator's own): the kind's
        (``kinds.py``), or the fleet's for results and hellos."""
        kind = self.topics.device_kind(topic)
        if kind is None:
            return None
        limit = kind.max_bytes
        if limit is Limit.RESULT:
            return self.result_limit
        if limit is Limit.HELLO:
            return self.hello_limit
        return limit

    def open_payload(self, topic: str, payload: bytes | bytearray, transfer: str | None = None) -> Opened | Refusal:
        """A whole payload as received (``transfer``: the SHA-256 its chunks named, None if it
        came in one piece), checked, decoded and verified: the message to act on, or why not.
        ``on_undecodable`` hears of a payload that does not decode (a hello in another wire version)."""
        # A signed payload whose signature is checked below needs no second SHA-256 pass: pieces
        # put together wrongly fail that check (or decoding) just as surely, and the journal keeps
        # only what verified. Unsigned, the transfer's digest is all there is.
        verified_later = self.keyring is not None and envelope_kind(payload) == "signed"
        if transfer is not None and not verified_later and not digest_matches(payload, transfer):
            return Refusal("digest_mismatch", "reassembled payload does not match its SHA-256")
        try:
            message = decode_message(payload)
        except WireError as exc:
            if self.on_undecodable is not None:
                sender = self.topics.device_of(topic) or topic
                self.on_undecodable(sender, topic, exc.reason, exc.detail, payload)
            return Refusal(exc.reason, exc.detail)
        if isinstance(message, Chunk):
            return Refusal("bad_chunk", "a chunked payload may not itself be a chunk" if transfer else
                           "a chunk where a whole message was expected")
        return self.open(topic, message, payload)

    def open(self, topic: str, message: object, payload: bytes) -> Opened | Refusal:
        """The message to act on (unwrapped and verified if signed), or why it is refused;
        ``payload`` is what it was decoded from, kept with it for the journal."""
        opened = self._open(topic, message, payload)
        if isinstance(opened, Refusal):
            return opened
        kind = self.topics.device_kind(topic)
        if kind is None or type(opened.message) is not kind.message:
            level = topic[len(self.topics.base) + 1:].split("/", 1)[0]
            return Refusal("unexpected_kind", f"{type(opened.message).__name__} on a {level[:32]!r} topic")
        if isinstance(opened.message, Update):
            return replace(opened, measured=_measured(opened.message))
        return opened

    def _open(self, topic: str, message: object, payload: bytes) -> Opened | Refusal:
        if not isinstance(message, Signed):
            if self.keyring is not None and isinstance(message, MUST_BE_SIGNED):
                return Refusal("unsigned", f"{type(message).__name__} without a signature")
            return Opened(message, payload=payload)
        sender = self.topics.device_of(topic)
        if sender is None or message.device_id != sender:
            return Refusal("sender_mismatch", f"signed by {message.device_id!r} on {topic}")
        if self.keyring is not None:
            why = self.keyring.verify(topic, message)
            if why == "unknown_key":
                return Refusal(why, f"no key {message.key_id} for device {sender} in the fleet's device keys")
            if why:
                return Refusal(why, "the signature does not match the message")
        try:
            inner = decode_message(message.payload)
        except WireError as exc:
            return Refusal(exc.reason, exc.detail)
        if isinstance(inner, (Signed, Chunk)):
            return Refusal("bad_payload", f"a signed {type(inner).__name__} is not a device message")
        return Opened(inner, message.nonce, message, payload)


def _measured(update: Update) -> tuple[float, Refusal | None] | None:
    """The update's norm and finite check, or None where its values are not plain tensors
    (the round loop then refuses it by its layout before anything reads them)."""
    try:
        return measure_delta(update.delta)
    except (TypeError, ValueError, AttributeError):
        return None
