"""``Intake.open_payload``: a reassembled payload is checked once. A signed one is trusted to its
signature (no second SHA-256 pass over the transfer), an unsigned one to its transfer digest;
either way a byte changed in transit is refused, never opened."""

from __future__ import annotations

import hashlib

from edgetune.simulate import simulated_delta
from edgetune.transport.channel import seal
from edgetune.wire import Topics, TrainMetrics, Update
from edgetune.wire.signing import Signer, write_key_file
from edgetune_aggregator.intake import Intake, Opened
from edgetune_aggregator.validation import Refusal

from helpers.manual import SHAPES

TOPICS = Topics("intake-test")


def _payload(signer=None) -> bytes:
    update = Update("dev-1", 1, 0, 10, simulated_delta(SHAPES, "dev-1", 1), TrainMetrics(1.0, 1, 1.0, 1.0, 1.0),
                    "run-1")
    return seal(TOPICS.update("dev-1"), update, signer)[0]


def _altered(payload: bytes) -> bytes:
    changed = bytearray(payload)
    changed[len(changed) // 2] ^= 0x01  # (inside the delta's bytes)
    return bytes(changed)


def test_a_signed_payload_is_checked_by_its_signature_an_unsigned_one_by_its_transfer_digest(tmp_path):
    signer = Signer.generate("dev-1")
    write_key_file(tmp_path / "keys.json", TOPICS.fleet, {"dev-1": signer.public_key})
    signed_fleet, open_fleet = Intake(TOPICS, tmp_path / "keys.json"), Intake(TOPICS)
    topic = TOPICS.update("dev-1")

    signed = _payload(signer)
    transfer = hashlib.sha256(signed).hexdigest()
    opened = signed_fleet.open_payload(topic, signed, transfer)
    assert isinstance(opened, Opened) and opened.message.device_id == "dev-1"
    refused = signed_fleet.open_payload(topic, _altered(signed), transfer)
    assert isinstance(refused, Refusal) and refused.reason == "bad_signature", refused

    plain = _payload()
    transfer = hashlib.sha256(plain).hexdigest()
    assert isinstance(open_fleet.open_payload(topic, plain, transfer), Opened)
    refused = open_fleet.open_payload(topic, _altered(plain), transfer)
    assert isinstance(refused, Refusal) and refused.reason == "digest_mismatch", refused
    # a signed payload in a fleet without device keys is not verified: the digest still counts
    refused = open_fleet.open_payload(topic, _altered(signed), hashlib.sha256(signed).hexdigest())
    assert isinstance(refused, Refusal) and refused.reason == "digest_mismatch", refused


def test_one_pass_over_an_updates_values_gives_its_norm_and_finds_nan_or_infinity():
    import math

    import numpy as np
    from edgetune.adapters.tensors import dense_norm
    from edgetune_aggregator.validation import check_layout, measure_delta

    delta = simulated_delta(SHAPES, "dev-1", 1)
    shapes = {name: value.shape for name, value in delta.items()}
    assert measure_delta(delta) == (dense_norm(delta), None)
    for bad in (np.nan, np.inf, -np.inf):
        broken = dict(delta)
        name = sorted(broken)[-1]
        broken[name] = broken[name].copy()
        broken[name].flat[3] = bad
        assert check_layout(broken, shapes, values=False) is None  # (the values are measure's)
        assert check_layout(broken, shapes).reason == "not_finite"
        norm, refusal = measure_delta(broken)
        assert not math.isfinite(norm) and refusal.reason == "not_finite" and name in refusal.detail


def test_an_update_is_measured_on_the_intake_thread_and_the_round_takes_that_measure():
    """``Opened.measured``: the norm and finite check of an update's delta, done where it was
    decoded; the train handler uses it instead of reading the values again."""
    import math

    import numpy as np
    from types import SimpleNamespace

    from edgetune_aggregator.tasks.train import TrainHandler
    from edgetune_aggregator.validation import UpdateLimits, measure_delta

    intake, topic = Intake(TOPICS), TOPICS.update("dev-1")
    plain = _payload()
    opened = intake.open_payload(topic, plain, hashlib.sha256(plain).hexdigest())
    assert opened.measured == measure_delta(opened.message.delta)

    update = opened.message
    broken = dict(update.delta)
    name = sorted(broken)[0]
    broken[name] = broken[name].copy()
    broken[name].flat[0] = np.nan
    bad = seal(topic, Update("dev-1", 1, 0, 10, broken, update.metrics, "run-1"), None)[0]
    opened_bad = intake.open_payload(topic, bad, hashlib.sha256(bad).hexdigest())
    norm, refusal = opened_bad.measured
    assert not math.isfinite(norm) and refusal.reason == "not_finite" and name in refusal.detail

    handler = TrainHandler.__new__(TrainHandler)  # (measure needs only the limits)
    handler.config = SimpleNamespace(limits=UpdateLimits())
    assert handler.measure(update, measured=(123.0, None)) == (123.0, None)  # (taken, not recomputed)
    assert handler.measure(update)[0] == opened.measured[0]
    assert handler.measure(opened_bad.message, measured=opened_bad.measured)[1].reason == "not_finite"

    from edgetune.wire import Presence

    presence = intake.open_payload(TOPICS.presence("dev-1"), seal(TOPICS.presence("dev-1"), Presence("dev-1", True),
                                                                  None)[0])
    assert isinstance(presence, Opened) and presence.measured is None  # (only updates carry a delta)
