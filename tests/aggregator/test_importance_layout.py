"""The importance-based layout end to end: a calibration round over the in-memory transport with
tiny Llama devices, the daemon's choice of matrices, and training on that layout."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
from edgetune.adapters.lora import lora_shapes, module_names
from edgetune.planning.layout import adapter_cost, combine_scores, select_layout
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import (
    Hello,
    ImportanceReport,
    ImportanceSettings,
    Topics,
    encode_message,
)
from edgetune.wire.signing import unwrap

from helpers.fleet import SPEC, fleet_config, join_device, start_aggregator, workload


class Scores:
    """A bystander that records the importance reports devices publish."""

    def __init__(self, url: str, fleet: str):
        self.topics = Topics(fleet)
        self.transport = open_transport(url, client_id=f"scores-{uuid.uuid4().hex[:6]}", connect_timeout=10)
        self.transport.connect()
        self.reports: list[ImportanceReport] = []
        Channel(self.transport, self.topics.sender_of).subscribe(
            self.topics.all_devices("importance"), lambda _t, m: self.reports.append(unwrap(m)))


def test_calibration_round_chooses_the_layout_devices_then_train(tmp_path):
    fleet = f"imp-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    scores = Scores(url, fleet)
    model = workload(0).manifest
    budget = adapter_cost(model.modules, module_names(lora_shapes(SPEC, model.modules)), SPEC.rank)
    config = fleet_config(tmp_path, fleet, rounds=1, evaluate_final=False, layout="importance",
                          importance=ImportanceSettings(batches=3))
    aggregator, thread = start_aggregator(url, config)
    devices = [join_device(url, fleet, i) for i in range(3)]
    # a hostile reporter: known to the daemon, but its scores are not numbers it can use
    liar = open_transport(url, client_id="liar", connect_timeout=10)
    liar.connect()
    topics = Topics(fleet)
    liar.publish(topics.hello("liar"), encode_message(Hello("liar", "0", model)), retain=True)
    thread.join(timeout=120)
    assert not thread.is_alive()
    for device in devices:
        device.stop()

    log = aggregator.store.rounds()
    assert [(r["round"], r["kind"], r["status"]) for r in log] == [(1, "calibrate", "calibrated"), (2, "train", "aggregated")]
    layout = tuple(log[0]["layout"])
    state = aggregator.store.load_state()
    assert state.layout == "importance" and state.adapter.target_modules == layout

    # the layout is the budgeted selection over the sample-weighted scores the devices sent
    assert sorted(r.device_id for r in scores.reports) == ["dev-0", "dev-1", "dev-2"]
    for report in scores.reports:
        assert len(report.scores) == 7 * 2 and all(math.isfinite(v) and v >= 0 for v in report.scores.values())
    combined = combine_scores([(r.scores, r.num_samples) for r in scores.reports])
    expected = select_layout(combined, {m: model.modules[m] for m in combined}, SPEC.rank, budget)
    assert layout == expected.modules
    assert adapter_cost(model.modules, layout, SPEC.rank) <= budget
    assert {m.rsplit(".", 1)[-1] for m in layout} - {"q_proj", "v_proj"}, "tiny Llama's scores favour only q, v?"

    # the fleet trained on exactly that layout
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    assert module_names(v0.tensors) == sorted(layout) == module_names(v1.tensors)
    assert any(not np.allclose(v0.tensors[n], v1.tensors[n]) for n in v0.tensors)
    assert all(d.rounds_done == [2] for d in devices)
    liar.close()


def test_bad_importance_reports_are_dropped_and_calibration_falls_back(tmp_path):
    """Only a device with unusable scores answers: it is dropped with its reason, the round
    fails, and the fleet trains on the fixed layout instead."""
    fleet = f"bad-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    model = workload(0).manifest
    config = fleet_config(tmp_path, fleet, rounds=1, evaluate_final=False, layout="importance", min_devices=1,
                          round_timeout_s=8)
    aggregator, thread = start_aggregator(url, config)
    topics = Topics(fleet)
    liar = open_transport(url, client_id="liar", connect_timeout=10)
    liar.connect()
    liar.publish(topics.hello("liar"), encode_message(Hello("liar", "0", model)), retain=True)

    def lie(topic, message):  # answer the calibration task with NaN and an unknown matrix
        if getattr(message, "kind", None) is not None and message.kind.value == "calibrate":
            name = next(iter(model.modules))
            for scores in ({name: float("nan")}, {"not.a.layer": 1.0}):
                liar.publish(topics.importance("liar"), encode_message(ImportanceReport("liar", message.round, 5, scores)))

    Channel(liar, topics.sender_of).subscribe(topics.task, lie)
    device = None
    try:
        deadline = time.monotonic() + 30
        while not aggregator.store.rounds() and time.monotonic() < deadline:
            time.sleep(0.1)  # (a device that joined earlier would answer the calibration task)
        assert aggregator.drops["bad_scores"] == 2
        device = join_device(url, fleet, 0)  # trains the fixed layout once calibration gave up
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        if device:
            device.stop()
        liar.close()
    log = aggregator.store.rounds()
    assert (log[0]["kind"], log[0]["status"]) == ("calibrate", "failed")
    state = aggregator.store.load_state()
    assert state.layout == "fixed" and state.adapter.target_modules == SPEC.target_modules
