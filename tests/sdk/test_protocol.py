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
