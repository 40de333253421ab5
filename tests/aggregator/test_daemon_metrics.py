"""The daemon keeps its Prometheus metrics and /healthz current during a real run."""

from __future__ import annotations

import json
import urllib.request
import uuid

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgetune.simulate import TINY, LightDevice
from edgetune.transport import open_transport
from edgetune.wire.signing import Signer
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.metrics import AggregatorMetrics, HealthServer

from helpers.fleet import SPEC, start_aggregator
from helpers.manual import SHAPES, Manual
from helpers.waiting import wait_for


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_rounds_updates_rejections_bytes_and_devices_are_counted(mosquitto_url, tmp_path):
    fleet = f"met-{uuid.uuid4().hex[:8]}"
    metrics = AggregatorMetrics(fleet)
    server = HealthServer(metrics, port=0, stale_after_s=10)
    port = server.start()
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=2, round_timeout_s=60,
                              join_timeout_s=30, adapter=SPEC, planning=False, evaluate_final=False, linger_s=2.0)
    aggregator, thread = start_aggregator(mosquitto_url, config, metrics=metrics)
    devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-a", connect_timeout=10), fleet, "a",
                           TINY).start()]
    bad = Manual(mosquitto_url, fleet, Signer.generate("b"))
    assert wait_for(lambda: aggregator.state is not None and aggregator.task is not None)
    bad.run_id = aggregator.state.run_id
    bad.send(bad.update(1, {n: np.full(s, np.nan, np.float32) for n, s in SHAPES.items()}))
    bad.send(bad.update(1))
    assert wait_for(lambda: aggregator.state.global_version == 1, 30)
    health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5))
    assert health["status"] == "ok" and health["broker_connected"] and health["devices_connected"] >= 1
    bad.send(bad.update(2, version=1))
    assert wait_for(lambda: aggregator.finished.is_set(), 60)
    samples = _samples(port)
    assert samples[("edgetune_rounds_total", (("kind", "train"), ("status", "aggregated")))] == 2
    assert samples[("edgetune_updates_accepted_total", (("kind", "train"),))] == 4
    assert samples[("edgetune_updates_rejected_total", (("reason", "not_finite"),))] == 1
    assert samples[("edgetune_global_version", ())] == 2
    assert samples[("edgetune_received_bytes_total", ())] > 0 and samples[("edgetune_sent_bytes_total", ())] > 0
    assert samples[("edgetune_devices_known", ())] == 2
    assert samples[("edgetune_round_duration_seconds_count", (("kind", "train"),))] == 2
    thread.join(timeout=30)
    server.close()
    for device in devices:
        device.stop()
    bad.close()
