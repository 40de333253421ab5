"""Ed25519 signatures on device messages, and the outbox that resends a result until its receipt."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization

from edgetune.outbox import Outbox
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import Presence, Receipt, Signed, Topics, decode_message, encode_message
from edgetune.wire.signing import KeyRing, Signer, signed_bytes, write_key_file

TOPIC = "edgetune/v1/f/update/dev-0"


def test_a_signature_binds_topic_nonce_and_payload():
    signer = Signer.generate("dev-0")
    ring = KeyRing.from_raw("f", {"dev-0": [signer.public_key]})
    signed = signer.sign(TOPIC, b"payload")
    assert len(signed.nonce) == 16 and len(signed.signature) == 64 and signed.key_id == signer.key_id
    assert ring.verify(TOPIC, signed) is None
    assert ring.verify(TOPIC.replace("dev-0", "dev-1"), signed) == "bad_signature"  # another topic
    assert ring.verify(TOPIC, Signed("dev-0", signed.key_id, signed.nonce, b"payload!", signed.signature)) == "bad_signature"
    assert ring.verify(TOPIC, Signed("dev-0", signed.key_id, b"\0" * 16, b"payload", signed.signature)) == "bad_signature"
    other = Signer.generate("dev-0")
    assert ring.verify(TOPIC, other.sign(TOPIC, b"payload")) == "unknown_key"
    assert ring.verify(TOPIC, Signer.generate("dev-9").sign(TOPIC, b"payload")) == "unknown_key"
    # what is signed is independent of the payload's size beyond its hash
    assert len(signed_bytes(TOPIC, signed.nonce, b"x" * 10_000_000)) == len(signed_bytes(TOPIC, signed.nonce, b""))
    assert signer.sign(TOPIC, b"payload").nonce != signed.nonce
    # it travels as a wire message like any other
    assert decode_message(encode_message(signed)) == signed


def test_key_files_round_trip_and_bad_ones_say_why(tmp_path):
    signer = Signer.generate("dev-0")
    pem = signer._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    (tmp_path / "signing.key").write_bytes(pem)
    loaded = Signer.load("dev-0", tmp_path / "signing.key")
    assert loaded.public_key == signer.public_key and loaded.client_tag == signer.client_tag
    assert Signer.generate("dev-0").client_tag != signer.client_tag
    write_key_file(tmp_path / "keys.json", "f", {"dev-0": signer.public_key})
    ring = KeyRing.load(tmp_path / "keys.json", "f")
    assert ring.verify(TOPIC, loaded.sign(TOPIC, b"x")) is None
    with pytest.raises(ValueError, match="fleet 'f', not 'g'"):
        KeyRing.load(tmp_path / "keys.json", "g")
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "fleet": "f", "keys": {"dev-0": "!!"}}))
    with pytest.raises(ValueError, match="not base64"):
        KeyRing.load(tmp_path / "bad.json", "f")
    short = base64.b64encode(b"x" * 31).decode()
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "fleet": "f", "keys": {"dev-0": short}}))
    with pytest.raises(ValueError, match="32-byte"):
        KeyRing.load(tmp_path / "bad.json", "f")
    with pytest.raises(ValueError, match="cannot read"):
        KeyRing.load(tmp_path / "missing.json", "f")
    with pytest.raises(ValueError, match="cannot read"):
        Signer.load("dev-0", tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(ValueError, match="PEM"):
        Signer.load("dev-0", tmp_path / "junk.key")


def test_the_outbox_resends_the_same_bytes_until_a_receipt_arrives():
    topics = Topics("ob")
    device = open_transport("memory://outbox", client_id="dev")
    device.connect()
    seen: list[bytes] = []
    listener = open_transport("memory://outbox", client_id="agg")
    listener.connect()
    listener.subscribe(topics.update("dev-0"), lambda t, p: seen.append(p))
    signer = Signer.generate("dev-0")
    outbox = Outbox(Channel(device, topics.sender_of, signer=signer), resend_after_s=0.05)
    outbox.send(topics.update("dev-0"), 3, Presence("dev-0", True))
    assert outbox.resend(3) == 0  # not due yet
    time.sleep(0.06)
    assert outbox.resend(3) == 1
    assert outbox.resend(3, everything=True) == 1
    assert len(seen) == 3 and len(set(seen)) == 1  # the same signed bytes, the same nonce
    nonce = decode_message(seen[0]).nonce
    outbox.on_receipt(Receipt("dev-0", 3, b"\1" * 16, True))  # not for this message
    assert outbox.pending() == [3]
    outbox.on_receipt(Receipt("dev-0", 3, nonce, False, "not_finite"))
    assert outbox.pending() == [] and outbox.receipts[-1].reason == "not_finite"
    outbox.send(topics.update("dev-0"), 4, Presence("dev-0", True))
    assert outbox.resend(5, everything=True) == 0 and outbox.pending() == []  # round 4 is over: forgotten
