"""Federations where devices train different configurations: planned ranks, back-off."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest

from edgetune.wire import DevicePlan, DeviceProfile
from edgetune_aggregator.daemon import Aggregator

from helpers.fleet import Observer, fleet_config, join_device, start_aggregator, workload
from helpers.merges import check_rounds


class FixedPlans(Aggregator):
    """The daemon with its planner replaced by fixed plans (the planner has its own tests)."""

    plans: dict[str, DevicePlan] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tasks.plan = lambda kind, only=None: (dict(self.plans), {})


def _start_fixed(url, config, plans):
    import threading

    from edgetune.transport import open_transport

    aggregator = FixedPlans(config, open_transport(url, client_id=f"agg-{config.fleet}"))
    aggregator.plans = plans
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    return aggregator, thread


def run_mixed_ranks(url: str, fleet: str, tmp_path, strategy: str) -> None:
    """Three devices planned at ranks 1, 2 and 4 of a rank-4 fleet: each sends a delta of its own
    rank, and each round's global adapter is what the strategy's rule gives (recomputed densely
    in the test, independently of the strategy code)."""
    plans = {"dev-0": DevicePlan(1, batch_size=2, local_steps=2), "dev-1": DevicePlan(2, batch_size=2, local_steps=2),
             "dev-2": DevicePlan(4, batch_size=1, local_steps=3)}
    observer = Observer(url, fleet)
    config = fleet_config(tmp_path, fleet, rounds=2, evaluate_final=False, strategy=strategy)
    aggregator, thread = _start_fixed(url, config, plans)
    devices = [join_device(url, fleet, i) for i in range(3)]
    try:
        thread.join(timeout=120)
        assert not thread.is_alive()
        for r in (1, 2):
            updates = {u.device_id: u for u in observer.updates[r]}
            ranks = {d: u.delta["model.layers.0.self_attn.q_proj.lora_A"].shape[0] for d, u in updates.items()}
            assert ranks == {"dev-0": 1, "dev-1": 2, "dev-2": 4}
        check_rounds(aggregator.store, observer, rounds=2, devices=3, strategy=strategy)
        if strategy == "stack":  # the whole update lives in the frozen delta; devices restart fresh
            assert aggregator.store.load_global(2).merged
            assert not np.any(aggregator.store.load_global(2).tensors["model.layers.0.self_attn.q_proj.lora_B"])
        assert all(d.finished.wait(30) for d in devices)  # (v2 is published before the finished task)
        assert all(d.current_adapter.version == 2 for d in devices)
        assert not aggregator.drops
    finally:
        for device in devices:
            device.stop()
        observer.close()


@pytest.mark.parametrize("strategy", ["fedit", "hetlora", "stack", "svd"])
def test_mixed_rank_fleet_in_memory(tmp_path, strategy):
    fleet = f"ranks-{strategy}-{uuid.uuid4().hex[:6]}"
    run_mixed_ranks(f"memory://{fleet}", fleet, tmp_path, strategy)


@pytest.mark.parametrize("strategy", ["fedit", "hetlora", "stack", "svd"])
def test_mixed_rank_fleet_over_mosquitto(mosquitto_url, tmp_path, strategy):
    fleet = f"mq-{strategy}-{uuid.uuid4().hex[:6]}"
    run_mixed_ranks(mosquitto_url, fleet, tmp_path, strategy)


def test_the_daemon_plans_from_device_profiles(tmp_path, caplog):
    fleet = f"plan-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.INFO, logger="edgetune_aggregator.daemon")
    roomy = DeviceProfile("roomy", 8 << 30, {"float32": 50.0}, 2, ())
    starved = DeviceProfile("starved", 1 << 20, {"float32": 50.0}, 1, ())  # 1 MiB: nothing fits
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=2,
                                                                evaluate_final=False, round_timeout_s=30))
    tasks = Observer(url, fleet)
    from edgetune.device import Device, DeviceConfig
    from edgetune.transport import open_transport

    devices = []
    for i, profile in enumerate([roomy, roomy, starved]):
        config = DeviceConfig(fleet, f"dev-{i}", profile=profile)
        device = Device(config, open_transport(url, client_id=f"{fleet}-{i}"), workload(i))
        device.connect()
        devices.append(device.start())
    thread.join(timeout=120)
    assert not thread.is_alive()
    task = [t for t in tasks.tasks if t.round == 1][-1]  # (re-published as devices joined)
    assert set(task.plans) == {"dev-0", "dev-1"} and "MiB" in task.excluded["dev-2"]
    assert all(p.rank <= 4 for p in task.plans.values())
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and {d["device_id"] for d in record["devices"]} == {"dev-0", "dev-1"}
    assert devices[2].rounds_done == []
    assert "planner leaves dev-2 out" in caplog.text
    for device in devices:
        device.stop()
    tasks.close()


def test_out_of_memory_backs_off_reports_and_finishes_the_round(tmp_path, caplog, monkeypatch):
    """A fake memory limit below the planned batch: the device halves its batch until it fits."""
    fleet = f"oom-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.WARNING)
    plans = {"dev-0": DevicePlan(4, batch_size=8, local_steps=2)}
    aggregator, thread = _start_fixed(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                        evaluate_final=False), plans)
    device = join_device(url, fleet, 0, start=False)
    trainer_class = type(device.workload.trainer(fleet_config(tmp_path, fleet).adapter))
    real_train = trainer_class.train
    batches_tried = []

    def limited_train(self, batches, settings, on_step=None):
        batches_tried.append(settings.batch_size)
        if settings.batch_size > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_train(self, batches, settings, on_step)

    monkeypatch.setattr(trainer_class, "train", limited_train)
    observer = Observer(url, fleet)
    device.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert batches_tried == [8, 4, 2]
    assert aggregator.state.global_version == 1 and device.rounds_done == [1]
    reports = [r.getMessage() for r in caplog.records if "oom_backoff" in r.getMessage()]
    assert len(reports) == 2 and "batch 8 → 4" in reports[0] and "batch 4 → 2" in reports[1]
    # the update is still rank 4: batch was enough to give up
    assert observer.updates[1][0].delta["model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 4
    device.stop()
    observer.close()


def test_a_device_over_its_memory_budget_backs_off_to_the_end_and_reports(tmp_path, caplog):
    """A profile whose budget is below what the process already holds: every rung fails the
    resident-memory check, the device reports out_of_memory, skips the round, keeps serving."""
    from edgetune.device import Device, DeviceConfig
    from edgetune.transport import open_transport

    fleet = f"budget-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.WARNING)
    plans = {"dev-0": DevicePlan(2, batch_size=2, local_steps=1)}
    aggregator, thread = _start_fixed(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1, round_timeout_s=5,
                                                        evaluate_final=False), plans)
    tight = DeviceProfile("tight", 16 << 20, {"float32": 10.0}, 1, ())  # 16 MiB: less than Python itself
    device = Device(DeviceConfig(fleet, "dev-0", profile=tight), open_transport(url, client_id="d0"), workload(0))
    device.connect()
    device.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    messages = [r.getMessage() for r in caplog.records]
    backoffs = [m for m in messages if "oom_backoff" in m and "reports" in m]
    # batch 2 → 1, checkpointing on, rank 2 → 1; then nothing is left (no quantization supported)
    assert len(backoffs) == 3 and any("out_of_memory" in m and "reports" in m for m in messages)
    (record,) = aggregator.store.rounds()
    assert record["status"] == "failed" and device.rounds_done == []
    device.stop()
