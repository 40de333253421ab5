"""Group commit: results that arrive together are journaled with one fsync, and none is
acknowledged before it is durable. Checked where it matters, over Mosquitto: at the instant the
daemon publishes a receipt that accepts a result, that result must already be readable from
the journal on disk; and a commit that fails acknowledges nothing, so the devices' resends are
taken once and nothing is counted twice."""

from __future__ import annotations

import uuid

import numpy as np

from edgetune.wire import Receipt
from edgetune_aggregator.daemon import AggregatorConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.journal import has
from helpers.manual import SHAPES, manuals
from helpers.waiting import wait_for

DEVICES = [f"dev-{i}" for i in range(12)]


def _config(tmp_path, fleet: str, **settings) -> AggregatorConfig:
    return AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=len(DEVICES),
                            round_timeout_s=120, join_timeout_s=60, adapter=SPEC, planning=False,
                            evaluate_final=False, model_from_first_hello=True, **settings)


def _watch_receipts(aggregator, state_dir) -> list[str]:
    """Every accepted receipt is checked against the journal on disk as it is sent; returns the
    list of violations (results acknowledged before they were durable)."""
    violations: list[str] = []
    send = aggregator.channel.send

    def checked(topic, message, qos=1):
        if isinstance(message, Receipt) and message.accepted and not has(state_dir, message.round, message.device_id):
            violations.append(f"{message.device_id} acknowledged for round {message.round} before it was journaled")
        return send(topic, message, qos)

    aggregator.channel.send = checked
    return violations


def test_updates_that_arrive_together_are_journaled_with_one_commit_before_any_receipt(mosquitto_url, tmp_path):
    fleet = f"commit-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(mosquitto_url, _config(tmp_path, fleet))
    violations = _watch_receipts(aggregator, tmp_path / "state")
    devices = manuals(mosquitto_url, fleet, aggregator, *DEVICES)
    # Hold the loop in its first commit until the rest have arrived: they are then one batch.
    commit, held = aggregator.journal.commit, []

    def slow_commit():
        if not held:
            held.append(True)
            assert wait_for(lambda: len(aggregator.inbox) + aggregator.journal.staged >= len(DEVICES), 30)
        return commit()

    aggregator.journal.commit = slow_commit
    try:
        for device in devices:
            device.send(device.update(1))
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert not violations
        for device in devices:
            assert [r.accepted for r in device.receipts] == [True], device.id
        record = aggregator.store.rounds()[0]
        assert record["status"] == "aggregated" and sorted(d["device_id"] for d in record["devices"]) == sorted(DEVICES)
        # (the first batch, then all the others together: not one fsync per update)
        assert aggregator.journal.commits <= 2, aggregator.journal.commits
    finally:
        aggregator.stop()
        for device in devices:
            device.close()


def test_a_failed_commit_acknowledges_nothing_and_the_resends_count_once(mosquitto_url, tmp_path):
    fleet = f"fail-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(mosquitto_url, _config(tmp_path, fleet))
    violations = _watch_receipts(aggregator, tmp_path / "state")
    devices = manuals(mosquitto_url, fleet, aggregator, *DEVICES)
    commit, failed = aggregator.journal.commit, []

    def failing_commit():
        if not failed and aggregator.journal.staged:
            failed.append([name for results in aggregator.journal._staged.results.values() for name, _ in results])
            aggregator.journal._staged.results.clear()  # (what a failed write leaves: nothing)
            raise OSError(28, "No space left on device")
        return commit()

    aggregator.journal.commit = failing_commit
    try:
        first = devices[:4]
        for device in first:
            device.send(device.update(1))
        assert wait_for(lambda: aggregator.drops["internal_error"] >= 1, 30)
        lost = failed[0]
        assert wait_for(lambda: sum(len(d.receipts) for d in first) == len(first) - len(lost), 10)
        assert not any(device.receipts for device in devices if device.id in lost)  # nothing of it acknowledged
        for device in devices:  # the unacknowledged resend; the others send for the first time
            if not device.receipts:
                device.send(device.update(1))
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert not violations and not aggregator.health.storage_degraded
        assert aggregator.drops["internal_error"] == len(lost)
        for device in devices:
            assert [r.accepted for r in device.receipts] == [True], device.id
        record = aggregator.store.rounds()[0]
        assert sorted(d["device_id"] for d in record["devices"]) == sorted(DEVICES)  # each once
        v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
        for name in SHAPES:  # fedit, equal samples: the plain mean of the twelve deltas
            expected = np.mean([device.update(1).delta[name] for device in devices], axis=0)
            np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + expected, rtol=1e-5, atol=1e-6)
    finally:
        aggregator.stop()
        for device in devices:
            device.close()

