"""Whole federations: a daemon and devices with a tiny Llama, in memory and over real brokers.

The test watches the broker itself and recomputes every global adapter from the updates it
saw there, so the daemon's merge is checked against an independent computation.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid

import msgpack
import numpy as np
import pytest
from edgetune.transport import open_transport
from edgetune.wire import SCHEMA_VERSION, RoundTask, TaskKind, Topics, TrainMetrics, Update, encode_message

from helpers.journal import has
from helpers.fleet import Observer, fleet_config, join_device, start_aggregator
from helpers.merges import check_rounds
from helpers.scenarios import late_joiner
from helpers.waiting import wait_for


def run_federation(url: str, tmp_path, fleet: str):
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet))
    devices = [join_device(url, fleet, i) for i in range(3)]
    thread.join(timeout=240)
    assert not thread.is_alive(), "the aggregator did not finish its rounds"
    for device in devices:
        assert device.finished.wait(30)
        device.stop()
    observer.close()
    return aggregator, observer, devices


def test_federation_in_memory(tmp_path):
    fleet = f"mem-{uuid.uuid4().hex[:8]}"
    aggregator, observer, devices = run_federation(f"memory://{fleet}", tmp_path, fleet)
    store = aggregator.store
    check_rounds(store, observer, rounds=2, devices=3)
    log = store.rounds()
    assert [(r["round"], r["kind"], r["status"]) for r in log] == [
        (1, "train", "aggregated"), (2, "train", "aggregated"), (3, "evaluate", "evaluated")]
    assert all(d["global_ppl"] > 1 and d["local_ppl"] > 1 and d["bytes_sent"] > 0 for d in log[0]["devices"])
    assert {d.config.device_id: d.rounds_done for d in devices} == {f"dev-{i}": [1, 2] for i in range(3)}
    assert all(d.current_adapter.version == 2 for d in devices)
    assert (tmp_path / "state" / "adapter" / "adapter_model.safetensors").exists()
    assert not aggregator.drops


@pytest.mark.slow
def test_federation_over_real_brokers(broker_url, tmp_path):
    fleet = f"mqtt-{uuid.uuid4().hex[:8]}"
    aggregator, observer, _ = run_federation(broker_url, tmp_path, fleet)
    check_rounds(aggregator.store, observer, rounds=2, devices=3)
    assert not aggregator.drops


def test_device_joining_late_gets_the_retained_global_adapter(broker_url, tmp_path):
    """dev-1 leaves after round 1; dev-2 connects only then, and round 2 cannot close
    without it, so it must have picked up global v1 and the round-2 task from the broker."""
    late_joiner(tmp_path, f"late-{uuid.uuid4().hex[:8]}", broker_url)


def _bad_update(device_id: str, round_number: int, shapes: dict, **overrides) -> bytes:
    delta = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    fields = dict(device_id=device_id, round=round_number, base_version=0, num_samples=5, delta=delta,
                  metrics=TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
    fields.update(overrides)
    return encode_message(Update(**fields))


def test_bad_input_is_logged_counted_and_dropped(broker_url, tmp_path, caplog):
    fleet = f"bad-{uuid.uuid4().hex[:8]}"
    observer = Observer(broker_url, fleet)
    config = fleet_config(tmp_path, fleet, rounds=1, min_devices=2, evaluate_final=False)
    # devices connect (hello) but only start working once the bad input is in
    devices = [join_device(broker_url, fleet, i, start=False) for i in range(2)]
    caplog.set_level(logging.WARNING, logger="edgetune.transport.channel")
    aggregator, thread = start_aggregator(broker_url, config)
    observer.wait_task(1)
    topics, shapes = Topics(fleet), {n: a.shape for n, a in observer.globals[0].tensors.items()}
    wrong_shape = {n: s for n, s in shapes.items()}
    first = sorted(wrong_shape)[0]
    wrong_shape[first] = (wrong_shape[first][0] + 1, wrong_shape[first][1])
    nan = {n: s for n, s in shapes.items()}
    newer = msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "update", "body": {}})
    injected = [
        ("dev-0", b"\x00garbage\xff"),
        ("dev-0", newer),
        ("dev-0", _bad_update("dev-0", 1, wrong_shape)),
        ("dev-1", _bad_update("dev-1", 7, shapes)),
        ("mallory", _bad_update("mallory", 1, shapes)),
        ("dev-1", _bad_update("dev-0", 1, shapes)),
    ]
    for device_id, payload in injected:
        observer.transport.publish(topics.update(device_id), payload)
    nan_update = Update("dev-1", 1, 0, 5, {n: np.full(s, np.nan, np.float32) for n, s in nan.items()},
                        TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
    observer.transport.publish(topics.update("dev-1"), encode_message(nan_update))
    observer.transport.flush()
    expected = {"bad_msgpack": 1, "schema_version": 1, "wrong_shape": 1, "not_finite": 1, "unknown_round": 1,
                "unknown_device": 1, "sender_mismatch": 1}
    deadline = threading.Event()
    for _ in range(200):
        if dict(aggregator.drops) == expected:
            break
        deadline.wait(0.05)
    assert dict(aggregator.drops) == expected
    # the observer decodes the five well-formed injected updates too: forget them
    for _ in range(200):
        if sum(map(len, observer.updates.values())) == 5:
            break
        deadline.wait(0.05)
    observer.updates.clear()
    for device in devices:
        device.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    # the round completed with the two valid updates, and only with them
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and {d["device_id"] for d in record["devices"]} == {"dev-0", "dev-1"}
    assert record["dropped"] == expected
    check_rounds(aggregator.store, observer, rounds=1, devices=2)
    text = caplog.text
    assert "dropped message from dev-0" in text and "bad_msgpack" in text and "schema_version" in text
    assert "dropped message from mallory" in text and "unknown_device" in text
    for device in devices:
        device.stop()
    observer.close()


def test_last_will_marks_a_vanished_device_offline(tmp_path, caplog):
    fleet = f"will-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.INFO, logger="edgetune_aggregator.daemon")
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, min_devices=2))
    device = join_device(url, fleet, 0, start=False)
    assert wait_for(lambda: "dev-0" in aggregator.online, 30)
    device.transport.crash()  # power cut: no goodbye, the broker publishes the will
    assert wait_for(lambda: "dev-0" not in aggregator.online, 30)
    aggregator.stop()
    thread.join(timeout=10)
    assert "device dev-0 is offline" in caplog.text


def test_daemon_resumes_from_its_state_dir(tmp_path, caplog):
    fleet = f"resume-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.INFO, logger="edgetune_aggregator.daemon")
    config = fleet_config(tmp_path, fleet, rounds=1, min_devices=1, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config)
    first = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and aggregator.state.global_version == 1
    first.stop()
    # a new daemon on the same state dir, asked for 2 rounds, runs round 2 from global v1
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=2, min_devices=1,
                                                                evaluate_final=False))
    second = join_device(url, fleet, 1)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "resuming fleet" in caplog.text
    assert [(u.device_id, u.base_version) for u in observer.updates[2]] == [("dev-1", 1)]
    assert [r["round"] for r in aggregator.store.rounds()] == [1, 2]
    assert aggregator.state.global_version == 2
    second.stop()
    observer.close()


def test_a_hello_with_an_unusable_model_is_dropped_and_the_daemon_keeps_serving(tmp_path):
    from edgetune.wire import Hello, ModelManifest

    fleet = f"hello-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                                evaluate_final=False))
    rogue = open_transport(url, client_id="rogue")
    rogue.connect()
    assert wait_for(lambda: aggregator.transport.stats.messages_sent > 0, 30)  # subscribed (its hello is not retained)
    no_targets = ModelManifest("odd", "f" * 16, {"lm_head": (4, 4)})
    rogue.publish(Topics(fleet).hello("rogue"), encode_message(Hello("rogue", "0", no_targets)))
    assert wait_for(lambda: aggregator.drops.get("bad_model") == 1, 30)
    device = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and aggregator.state.global_version == 1
    device.stop()


@pytest.mark.parametrize("journal", [True, False], ids=["journaled", "no-journal"])
def test_a_round_left_open_by_a_stopped_daemon_continues_on_resume(tmp_path, journal):
    fleet = f"open-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    config = fleet_config(tmp_path, fleet, rounds=2, min_devices=2, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config)
    device = join_device(url, fleet, 0)
    idle = join_device(url, fleet, 1, start=False)  # says hello, never trains
    # round 1 opens but cannot close (one update of two); dev-0 trains it
    assert wait_for(lambda: device.rounds_done == [1], 30)
    assert wait_for(lambda: has(tmp_path / "state", 1, "dev-0"), 30)
    aggregator.stop()
    thread.join(timeout=30)
    if not journal:  # a state dir from before round journals: the round's number is skipped
        shutil.rmtree(tmp_path / "state" / "journal")
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=2, min_devices=1,
                                                                evaluate_final=False))
    thread.join(timeout=60)
    assert not thread.is_alive()
    log = aggregator.store.rounds()
    if journal:  # round 1 continues with the update accepted before the stop, which is not redone
        assert [(r["round"], r["status"]) for r in log] == [(1, "aggregated"), (2, "aggregated")]
        assert device.rounds_done == [1, 2] and observer.updates[2][0].base_version == 1
    else:
        assert [(r["round"], r["status"]) for r in log] == [(1, "failed"), (2, "aggregated")]
        assert device.rounds_done == [1, 2] and observer.updates[2][0].base_version == 0
    assert not list((tmp_path / "state" / "journal").glob("r*"))  # closed rounds leave no journal
    device.stop()
    idle.close()
    observer.close()


def test_a_stale_finished_task_does_not_send_new_devices_home(tmp_path):
    fleet = f"stale-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    leftover = open_transport(url, client_id="leftover")
    leftover.connect()
    leftover.publish(Topics(fleet).task, encode_message(RoundTask(9, TaskKind.FINISHED, 3, "x" * 16)), retain=True)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                                evaluate_final=False))
    assert wait_for(lambda: aggregator.online is not None and aggregator.transport.stats.messages_sent > 0, 30)
    device = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and device.rounds_done == [1]
    device.stop()
