"""A fleet whose deltas travel quantized (``--delta-precision fp16|int8``), over Mosquitto with
real (tiny Llama) devices: updates leave the devices at the fleet's precision and a quarter
(int8) or half (fp16) of float32's bytes, the daemon merges exactly what arrived onto its exact
global, and publishes that global at the same precision within the documented bound.
"""

from __future__ import annotations

import uuid

import msgpack
import numpy as np
import pytest

from edgetune.transport import open_transport
from edgetune.wire import Topics, decode_message
from edgetune.wire.quantize import error_bound, wire_bytes
from edgetune.wire.signing import unwrap

from helpers.fleet import Observer, fleet_config, join_device, start_aggregator
from helpers.merges import expected_fedavg

#: the dtype each precision's update tensors travel in (the packed index's dtype column)
WIRE_DTYPE = {"fp16": "float16", "int8": "int8"}


class Sizes:
    """Raw update payloads as they crossed the broker: their tensors' wire dtypes and sizes."""

    def __init__(self, url: str, fleet: str):
        self.topics = Topics(fleet)
        self.transport = open_transport(url, client_id=f"sizes-{uuid.uuid4().hex[:6]}", connect_timeout=10)
        self.transport.connect()
        self.dtypes: set[str] = set()
        self.data_bytes: list[int] = []
        self.transport.subscribe(self.topics.all_devices("update"), self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        signed = decode_message(payload)  # (devices sign: the update is the signed payload)
        envelope = msgpack.unpackb(signed.payload)
        _, dtypes, _, _, _ = envelope["body"]["delta"]
        self.dtypes.update(dtypes)
        self.data_bytes.append(len(envelope["data"]))

    def close(self) -> None:
        self.transport.close()


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_quantized_fleet_over_mosquitto(mosquitto_url, tmp_path, precision):
    fleet = f"quant-{precision}-{uuid.uuid4().hex[:6]}"
    observer, sizes = Observer(mosquitto_url, fleet), Sizes(mosquitto_url, fleet)
    config = fleet_config(tmp_path, fleet, min_devices=2, strategy="fedit", delta_precision=precision,
                          evaluate_final=False)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices = [join_device(mosquitto_url, fleet, i) for i in range(2)]
    try:
        thread.join(timeout=240)
        assert not thread.is_alive(), "the aggregator did not finish its rounds"
        store = aggregator.store
        assert sizes.dtypes == {WIRE_DTYPE[precision]} and len(sizes.data_bytes) == 4
        values = sum(t.size for t in store.load_global(1).tensors.values())
        for size in sizes.data_bytes:  # the tensors' bytes (8-byte alignment of each tensor aside)
            assert wire_bytes(values, precision) <= size <= wire_bytes(values, precision) + 8 * 2 * len(
                store.load_global(1).tensors)
        beta = aggregator.config.server_optimizer.momentum
        for r in (1, 2):
            previous, merged = store.load_global(r - 1), store.load_global(r)
            seen = [unwrap(u) for u in observer.updates[r]]
            assert len(seen) == 2 and all(t.dtype == np.float32 or t.dtype == np.float16 for u in seen
                                          for t in u.delta.values())
            for name, value in expected_fedavg(previous, seen).items():
                if r == 2:
                    value = value + beta * (previous.tensors[name].astype(np.float64) - store.load_global(0).tensors[name])
                np.testing.assert_allclose(merged.tensors[name], value, rtol=1e-5, atol=1e-7)
            published = observer.globals[r]
            for name, exact in merged.tensors.items():  # the downlink: within the bound of the exact global
                error = np.abs(published.tensors[name].astype(np.float32) - exact)
                assert np.all(error <= error_bound(exact, precision)), name
            assert any(np.any(published.tensors[n] != merged.tensors[n]) for n in merged.tensors)  # (it is quantized)
        for device in devices:  # what quantization dropped is carried into the next update
            assert device._feedback.residual and all(np.any(r != 0) for r in device._feedback.residual.values())
    finally:
        for device in devices:
            device.stop()
        observer.close()
        sizes.close()
