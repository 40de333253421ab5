"""Ed25519 signatures, both ways: who sent an update, or a task or global adapter, and that
nobody changed it on the way.

The broker's ACL stops a device from publishing on another device's topics, but the broker,
a bridge, or a stolen broker password sit between device and aggregator. A signature made
with a key only the device holds lets the aggregator trust a result whatever the path.

What is signed: ``DOMAIN ‖ topic ‖ 0 ‖ nonce ‖ SHA-256(payload)``. The topic binds the
message to its fleet, kind and device (no replay on another topic); the nonce makes every
message distinct (replays within a round are refused, and a device resending an
unacknowledged update resends the same bytes, so the aggregator can count it once). Hashing
the payload first keeps signing cost flat in its size.

The downlink is signed the same way with the fleet key, which only the aggregator holds
(``FleetSigner``): ``DOWNLINK_DOMAIN ‖ topic ‖ 0 ‖ issued ‖ nonce ‖ SHA-256(payload)``, with
``issued`` (8 bytes, big-endian) a number larger than that of anything the aggregator signed
before. A device holding the fleet's public key (``FleetKey``) accepts a task, global adapter,
receipt, refusal or artifact offer only signed by it, and only newer than what it holds for that
topic (``edgetune.downlink``): a forged, altered or replayed one is refused. A retained message
in chunks is signed once, whole, for the topic without the chunk index.

Key files (``edgetune-aggregator provision`` writes them): a device's private key is PEM
PKCS#8 (``signing.key``); the aggregator's ``device_keys.json`` is
``{"format": 1, "fleet": NAME, "keys": {device_id: base64(raw 32-byte public key) | [...]}}``;
the fleet key is PEM PKCS#8 (``aggregator/fleet.key``), its public half PEM
SubjectPublicKeyInfo (``fleet.pub``, in every device's folder).
``cryptography`` is imported only when keys are used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .messages import Signed
from .names import check_name
from .topics import AGGREGATOR_ID

DOMAIN = b"edgetune-signed-v1\x00"
#: what the aggregator's signatures cover starts with this: never valid as a device's
DOWNLINK_DOMAIN = b"edgetune-downlink-v1\x00"
KEYS_FORMAT = 1
NONCE_BYTES = 16


def signed_bytes(topic: str, nonce: bytes, payload: bytes) -> bytes:
    """The bytes a signature covers."""
    return DOMAIN + topic.encode() + b"\x00" + nonce + hashlib.sha256(payload).digest()


def downlink_bytes(topic: str, issued: int, nonce: bytes, payload: bytes) -> bytes:
    """The bytes the aggregator's signature covers."""
    return (DOWNLINK_DOMAIN + topic.encode() + b"\x00" + issued.to_bytes(8, "big") + nonce
            + hashlib.sha256(payload).digest())


def key_id(raw_public_key: bytes) -> str:
    """A short name of a public key: devices may hold several while keys are rotated."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


class Signer:
    """A device's private key; signs what the device publishes."""

    def __init__(self, device_id: str, private_key):
        from cryptography.hazmat.primitives import serialization

        self.device_id = check_name(device_id, "device id")
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(raw)
        self.public_key = raw
        secret = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())
        #: a client-id suffix only this key's holder can know: Mosquitto lets any client that
        #: logs in take over a connected client id, so a guessable id invites knocking a device off
        self.client_tag = hashlib.sha256(b"edgetune-client-id\x00" + secret).hexdigest()[:12]

    @classmethod
    def generate(cls, device_id: str) -> Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(device_id, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, device_id: str, path: str | Path) -> Signer:
        """Read a PEM (PKCS#8) Ed25519 private key; errors say which file and what is wrong."""
        return cls(device_id, _load_key(path, "signing key"))

    def sign(self, topic: str, payload: bytes, nonce: bytes | None = None) -> Signed:
        nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
        signature = self._key.sign(signed_bytes(topic, nonce, payload))
        return Signed(self.device_id, self.key_id, nonce, bytes(payload), signature)


@dataclass
class KeyRing:
    """The fleet's device public keys, as the aggregator holds them."""

    fleet: str
    #: device id -> {key id -> Ed25519PublicKey}
    keys: dict[str, dict]

    @classmethod
    def from_raw(cls, fleet: str, raw: dict[str, list[bytes]]) -> KeyRing:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys = {}
        for device, blobs in raw.items():
            check_name(device, "device id")
            keys[device] = {key_id(b): Ed25519PublicKey.from_public_bytes(b) for b in blobs}
        return cls(fleet, keys)

    @classmethod
    def load(cls, path: str | Path, fleet: str) -> KeyRing:
        """Read ``device_keys.json``; refuses a file made for another fleet."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the device keys {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != KEYS_FORMAT or not isinstance(data.get("keys"), dict):
            raise ValueError(f"{path} is not a device key file (format {KEYS_FORMAT}: "
                             '{"format": 1, "fleet": ..., "keys": {device: base64 key}})')
        if data.get("fleet") != fleet:
            raise ValueError(f"{path} holds the keys of fleet {data.get('fleet')!r}, not {fleet!r}")
        raw: dict[str, list[bytes]] = {}
        for device, value in data["keys"].items():
            values = value if isinstance(value, list) else [value]
            try:
                raw[device] = [base64.b64decode(v, validate=True) for v in values]
            except (ValueError, TypeError):
                raise ValueError(f"{path}: the key of {device!r} is not base64") from None
            if any(len(b) != 32 for b in raw[device]):
                raise ValueError(f"{path}: the key of {device!r} is not a 32-byte Ed25519 public key")
        return cls.from_raw(fleet, raw)

    def verify(self, topic: str, signed: Signed) -> str | None:
        """Why ``signed`` is not trustworthy as a message on ``topic`` (None if it is): the
        counted reasons ``unknown_key`` and ``bad_signature``."""
        from cryptography.exceptions import InvalidSignature

        key = self.keys.get(signed.device_id, {}).get(signed.key_id)
        if key is None:
            return "unknown_key"
        try:
            key.verify(signed.signature, signed_bytes(topic, signed.nonce, signed.payload))
        except InvalidSignature:
            return "bad_signature"
        return None


def _load_key(path: str | Path, what: str, public: bool = False):
    """An Ed25519 key from a PEM file (PKCS#8 private, or SubjectPublicKeyInfo public); errors
    say which file and what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    kind = "a PEM public key" if public else "an unencrypted PEM private key"
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_public_key(data) if public
               else serialization.load_pem_private_key(data, password=None))
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not {kind} ({exc})") from None
    if not isinstance(key, Ed25519PublicKey if public else Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 {'public ' if public else ''}key")
    return key


def _raw_public(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


#: numbers put on record ahead of use: a restart counts on from the record, whatever the clock
RESERVE_US = 600_000_000
#: how far ahead of its clock a number a device holds may move the aggregator's (one day)
MAX_AHEAD_US = 86_400_000_000


class FleetSigner:
    """The fleet key, as the aggregator holds it: signs what it publishes, each message with
    an ``issued`` number above every earlier one: the wall clock in microseconds, or one more
    than the last if that is not larger, and never below ``floor``.

    ``reserve(n)`` (the state dir's ``downlink.json``) records a number before any above the
    last record is used, ten minutes of clock ahead, so a restart on a clock that went back
    still counts up; ``raise_floor`` counts on from what a device holds (a daemon on a new host
    whose clock is behind the old one's)."""

    def __init__(self, private_key, floor: int = 0, now: Callable[[], int] = time.time_ns,
                 reserve: Callable[[int], None] | None = None):
        self._key = private_key
        self.public_key = _raw_public(private_key)
        self.key_id = key_id(self.public_key)
        self.device_id = AGGREGATOR_ID
        self._now = now
        self._last = self._reserved = floor
        self._reserve = reserve
        self._lock = threading.Lock()  # (receipts are signed on the round loop, tasks too: one counter)

    @classmethod
    def generate(cls, floor: int = 0) -> FleetSigner:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate(), floor)

    @classmethod
    def load(cls, path: str | Path, floor: int = 0, reserve: Callable[[int], None] | None = None) -> FleetSigner:
        """Read the fleet's PEM (PKCS#8) Ed25519 private key; errors say which file and why."""
        return cls(_load_key(path, "fleet key"), floor, reserve=reserve)

    @property
    def last_issued(self) -> int:
        return self._last

    def raise_floor(self, issued: int) -> bool:
        """Count on from ``issued`` (a number a device holds) if it is above the last one used
        and at most a day ahead of the clock; True if it moved the count."""
        with self._lock:
            if not self._last < issued <= self._now() // 1000 + MAX_AHEAD_US:
                return False
            self._last = issued
            return True

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, topic: str, payload: bytes, nonce: bytes | None = None) -> Signed:
        nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
        with self._lock:
            issued = max(self._last + 1, self._now() // 1000)
            if self._reserve is not None and issued > self._reserved:
                self._reserved = issued + RESERVE_US
                self._reserve(self._reserved)  # (on record before it is used)
            self._last = issued
        signature = self._key.sign(downlink_bytes(topic, issued, nonce, payload))
        return Signed(AGGREGATOR_ID, self.key_id, nonce, bytes(payload), signature, issued)


class FleetKey:
    """The fleet's public key, as devices hold it (``fleet.pub``): checks the aggregator's
    signatures."""

    def __init__(self, raw_public_key: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._key = Ed25519PublicKey.from_public_bytes(raw_public_key)
        self.key_id = key_id(raw_public_key)

    @classmethod
    def load(cls, path: str | Path) -> FleetKey:
        """Read a PEM public key (``fleet.pub``); errors say which file and what is wrong."""
        from cryptography.hazmat.primitives import serialization

        key = _load_key(path, "fleet key", public=True)
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def verify(self, topic: str, signed: Signed) -> str | None:
        """Why ``signed`` is not the aggregator's message for ``topic`` (None if it is): the
        counted reasons ``sender_mismatch``, ``unknown_key`` and ``bad_signature``."""
        from cryptography.exceptions import InvalidSignature

        if signed.device_id != AGGREGATOR_ID:
            return "sender_mismatch"
        if signed.key_id != self.key_id:
            return "unknown_key"
        try:
            self._key.verify(signed.signature, downlink_bytes(topic, signed.issued, signed.nonce, signed.payload))
        except InvalidSignature:
            return "bad_signature"
        return None


def unwrap(message, versions: tuple[int, ...] | None = None):
    """The message inside a ``Signed`` (anything else as is), **without** verifying it: for
    bystanders (monitors, tests) that trust the broker, and for what was verified before it was
    written down (``versions``: the wire versions to read, as ``decode_message``)."""
    from .codec import PEER_VERSIONS, decode_message

    versions = versions or PEER_VERSIONS
    return decode_message(message.payload, versions) if isinstance(message, Signed) else message


def write_key_file(path: str | Path, fleet: str, keys: dict[str, bytes]) -> None:
    """``device_keys.json`` for raw public keys (tests and provisioning)."""
    from ..atomic import atomic_write_json

    atomic_write_json(Path(path), {"format": KEYS_FORMAT, "fleet": fleet,
                                   "keys": {d: base64.b64encode(k).decode() for d, k in sorted(keys.items())}})
