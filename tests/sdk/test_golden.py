"""The golden messages committed in tests/golden/: wire v2 decodes to the values make.py built
them from and encodes to the same bytes again (the wire format does not drift unnoticed); the
signed one verifies with the fleet key and no longer once altered; wire v1 from peers is refused
naming the upgrade, and a v1 record of our own (a state dir of edgetune 0.1) is still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetune.wire import (FILE_VERSIONS, GlobalAdapter, Hello, Refusal, RoundTask, Signed, Update, WireError,
                           decode_message, encode_message)
from edgetune.wire.quantize import quantize_tensors
from edgetune.wire.signing import FleetKey

from golden.make import ISSUED, SHAPES, SIGNED_TOPIC, fleet_signer, messages, tensors

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
V2 = sorted(p.name[3:-8] for p in GOLDEN.glob("v2-*.msgpack"))
V1 = sorted(p.name[3:-8] for p in GOLDEN.glob("v1-*.msgpack"))


def _golden(version: str, name: str) -> bytes:
    return (GOLDEN / f"{version}-{name}.msgpack").read_bytes()


def test_every_golden_message_is_there():
    assert set(V2) == set(messages("v2")) and set(V1) == {"hello", "update", "task", "global"}


@pytest.mark.parametrize("name", V2)
def test_v2_golden_messages_encode_to_the_same_bytes(name):
    assert encode_message(messages("v2")[name]) == _golden("v2", name)


@pytest.mark.parametrize("name", ["hello", "update", "update-fp16", "update-int8", "task"])
def test_what_edgetune_0_2_wrote_reads_as_the_same_message(name):
    """0.3 added optional fields (a hello's labels, a device's scores of the version it serves, a
    task's whole_updates): bytes an 0.2 peer wrote (``v2.0-*``) decode to the message the 0.3
    golden decodes to."""
    old, new = decode_message(_golden("v2.0", name)), decode_message(_golden("v2", name))
    if name != "update-int8":  # (an int8 tensor decodes to float32: its re-encoding differs)
        assert encode_message(old) == encode_message(new)
    else:
        assert old.metrics == new.metrics and all(np.array_equal(old.delta[n], new.delta[n]) for n in new.delta)


def test_v2_golden_messages_decode_to_what_they_were_made_of():
    delta = tensors(SHAPES, 1)
    update = decode_message(_golden("v2", "update"))
    assert isinstance(update, Update) and (update.round, update.base_version, update.num_samples) == (3, 2, 40)
    assert update.run_id == "run-golden" and update.metrics.train_tokens == 1024
    for name, value in delta.items():
        np.testing.assert_array_equal(update.delta[name], value)
    fp16, int8 = decode_message(_golden("v2", "update-fp16")), decode_message(_golden("v2", "update-int8"))
    expected16, expected8 = quantize_tensors(delta, "fp16"), quantize_tensors(delta, "int8")
    for name in delta:
        assert fp16.delta[name].dtype == np.float16 and int8.delta[name].dtype == np.float32
        np.testing.assert_array_equal(fp16.delta[name], expected16[name])
        np.testing.assert_array_equal(int8.delta[name], expected8[name].to_float32())
    glob = decode_message(_golden("v2", "global"))
    assert isinstance(glob, GlobalAdapter) and glob.adapter.rank == 2 and set(glob.merged) == {
        "layers.0.q_proj.merged_A", "layers.0.q_proj.merged_B"}
    for name, value in tensors(SHAPES, 2).items():
        np.testing.assert_array_equal(glob.tensors[name], value)
    hello = decode_message(_golden("v2", "hello"))
    assert isinstance(hello, Hello) and hello.capabilities.wire == (2,) and hello.capabilities.merged_delta
    assert hello.capabilities.precisions == ("fp32", "fp16", "int8") and not hello.capabilities.verifies_downlink
    task = decode_message(_golden("v2", "task"))
    assert isinstance(task, RoundTask) and task.delta_precision == "int8" and task.error_feedback
    refusal = decode_message(_golden("v2", "refusal"))
    assert isinstance(refusal, Refusal) and refusal.reason == "unsupported_precision" and "edgetune" in refusal.upgrade


def test_the_signed_golden_verifies_with_the_fleet_key_and_fails_altered(tmp_path):
    (tmp_path / "fleet.pub").write_bytes(fleet_signer().public_pem())
    key = FleetKey.load(tmp_path / "fleet.pub")
    signed = decode_message(_golden("v2", "global-signed"))
    assert isinstance(signed, Signed) and signed.device_id == "aggregator" and signed.issued == ISSUED
    assert key.verify(SIGNED_TOPIC, signed) is None
    inner = decode_message(signed.payload)
    assert isinstance(inner, GlobalAdapter) and inner.version == 2
    altered = bytearray(signed.payload)
    altered[-1] ^= 1
    forged = Signed(signed.device_id, signed.key_id, signed.nonce, bytes(altered), signed.signature, signed.issued)
    assert key.verify(SIGNED_TOPIC, forged) == "bad_signature"
    later = Signed(signed.device_id, signed.key_id, signed.nonce, signed.payload, signed.signature, signed.issued + 1)
    assert key.verify(SIGNED_TOPIC, later) == "bad_signature"  # (issued is covered: no replay made to look new)
    assert key.verify(SIGNED_TOPIC + "/0", signed) == "bad_signature"


@pytest.mark.parametrize("name", V1)
def test_v1_from_a_peer_is_refused_naming_the_upgrade(name):
    with pytest.raises(WireError) as caught:
        decode_message(_golden("v1", name))
    assert caught.value.reason == "schema_version"
    assert caught.value.detail == ("wire v1 (edgetune 0.1); this side speaks v2: upgrade the sender to "
                                   "edgetune ≥ 0.2")


def test_v1_records_of_our_own_are_still_read():
    """A state dir written by edgetune 0.1: its global adapters, journaled updates and hellos
    (the daemon itself has the device say hello again: a v1 hello lacks its capabilities)."""
    glob = decode_message(_golden("v1", "global"), FILE_VERSIONS)
    assert isinstance(glob, GlobalAdapter)
    for name, value in tensors(SHAPES, 2).items():
        np.testing.assert_array_equal(glob.tensors[name], value)
    update = decode_message(_golden("v1", "update"), FILE_VERSIONS)
    for name, value in tensors(SHAPES, 1).items():
        np.testing.assert_array_equal(update.delta[name], value)
    hello = decode_message(_golden("v1", "hello"), FILE_VERSIONS)  # (what 'edgetune report' shows of it)
    assert isinstance(hello, Hello) and hello.device_id == "dev-1" and hello.sdk_version == "golden"
