"""The device protocol (``edgetune.protocol``) around a worker: whatever goes wrong while a task
is computed or its answer sent becomes an error report to the aggregator, never an exception in
the application around the device, and never a lock left held for the next task."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from edgetune.adapters.lora import init_lora
from edgetune.simulate import TINY, LightDevice
from edgetune.transport import TransportError, open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import ErrorReport, GlobalAdapter, LoraSpec, RoundTask, TaskKind, Topics, encode_message
from edgetune.wire.signing import unwrap
from edgetune.worker import WorkloadWorker

from helpers.waiting import wait_for

SPEC = LoraSpec(rank=2, alpha=4.0)


def _fleet():
    """A memory broker with a retained global v0 and train task for ``TINY``, and a listener for
    the devices' error reports."""
    fleet = f"proto-{uuid.uuid4().hex[:8]}"
    url, topics = f"memory://{fleet}", Topics(fleet)
    aggregator = open_transport(url, client_id="aggregator")
    aggregator.connect()
    channel = Channel(aggregator, topics.sender_of)
    errors: list[ErrorReport] = []
    channel.subscribe(topics.all_devices("error"), lambda topic, message: errors.append(unwrap(message)))
    channel.send_retained(topics.global_adapter, GlobalAdapter(0, 0, TINY.fingerprint, SPEC,
                                                               init_lora(SPEC, TINY.modules, 0)))
    task = RoundTask(1, TaskKind.TRAIN, 0, TINY.fingerprint, SPEC, run_id="run")
    aggregator.publish(topics.task, encode_message(task), retain=True)
    return url, fleet, errors


def test_a_failed_send_becomes_an_error_report_and_the_device_goes_on():
    url, fleet, errors = _fleet()
    device = LightDevice(open_transport(url, client_id="dev-0"), fleet, "dev-0")
    device.connect()

    def broken(*args, **kwargs):
        raise TransportError("the broker refused the payload")

    device.outbox.send = broken
    for _ in range(10):  # (the task and the adapter's chunks: one message a poll)
        assert device.poll(0) is False  # nothing escapes
    assert wait_for(lambda: errors, 5)
    assert errors[0].code == "TransportError" and "refused" in errors[0].message and errors[0].round == 1
    assert device.rounds_done == []
    device.close()


class _FailingClock:
    """A clock whose compute block cannot start (the simulator measures the machine there)."""

    def computing(self, dtype):
        @contextlib.contextmanager
        def block():
            raise RuntimeError("measuring the machine failed")
            yield

        return block()


def test_the_worker_lock_is_released_when_its_compute_block_cannot_start():
    worker = WorkloadWorker(workload=None, device_id="dev-0", clock=_FailingClock())
    task = RoundTask(1, TaskKind.TRAIN, 0, TINY.fingerprint, SPEC)
    with pytest.raises(RuntimeError, match="measuring"):
        with worker.computing(task):
            pass
    assert not worker.lock.locked()  # personalization, or the next round, can have the trainer


@pytest.mark.parametrize("feedback", [True, False])
def test_what_quantizing_dropped_goes_into_the_next_update_only_where_the_task_says(feedback):
    """Through the protocol, as a device sends: with the task's ``error_feedback`` on (fedit,
    hetlora), round 2's int8 update carries round 1's remainder; off (stack, svd: the factors
    restart every round), round 2 starts from nothing. A new run starts afresh either way."""
    import dataclasses

    import numpy as np

    from edgetune.wire import TrainMetrics, Update
    from edgetune.wire.quantize import quantize_tensors

    fleet = f"feedback-{uuid.uuid4().hex[:6]}"
    device = LightDevice(open_transport(f"memory://{fleet}", client_id="d", connect_timeout=5), fleet, "dev-1")
    rng = np.random.default_rng(1)

    def update(round_number):
        return Update("dev-1", round_number, round_number - 1, 10,
                      {"m.lora_A": (rng.standard_normal((4, 64)) * 1e-3).astype(np.float32)},
                      TrainMetrics(1.0, 1, 1.0, 1.0, 1.0), "run")

    def task(round_number, run="run"):
        return RoundTask(round_number, TaskKind.TRAIN, round_number - 1, TINY.fingerprint, SPEC, run_id=run,
                         delta_precision="int8", error_feedback=feedback)

    first = update(1)
    device._compressed(task(1), first)
    left = dict(device._feedback.residual)
    assert np.abs(left["m.lora_A"]).max() > 0
    second = update(2)
    sent = device._compressed(task(2), second).delta["m.lora_A"].to_float32()
    carried = second.delta["m.lora_A"] + (left["m.lora_A"] if feedback else 0.0)
    np.testing.assert_array_equal(sent, quantize_tensors({"m.lora_A": carried}, "int8")["m.lora_A"].to_float32())
    third = update(3)
    fresh = device._compressed(task(3, run="another run"), third).delta["m.lora_A"].to_float32()
    np.testing.assert_array_equal(fresh, quantize_tensors(third.delta, "int8")["m.lora_A"].to_float32())
    # a float32 task with nothing left over sends the update as it is
    device._feedback.residual.clear()
    plain = update(4)
    assert device._compressed(dataclasses.replace(task(4), delta_precision="fp32"), plain) is plain
