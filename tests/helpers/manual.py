"""Devices a test drives by hand, and small in-memory fleets to drive them against.

The security, attack, fault and metrics tests need devices that send exactly what the test
says (forged, stale, oversize, replayed, or honest updates with known values) rather than
train; a ``Manual`` device does only that. Their updates are ``simulated_delta``s, so a test
can compute the expected global adapter itself.
"""

from __future__ import annotations

import uuid

from edgetune.adapters.registry import adapter_shapes
from edgetune.simulate import TINY, simulated_delta
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import Capabilities, Hello, Receipt, Topics, TrainMetrics, Update
from edgetune.wire.signing import Signer
from edgetune_aggregator.daemon import AggregatorConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.waiting import wait_for

#: the tensor shapes of ``SPEC`` on the simulator's tiny model, what a ``Manual`` device sends
SHAPES = adapter_shapes(SPEC, TINY)


class Manual:
    """A device the test drives by hand: it signs (or not) whatever the test makes it send,
    and records the receipts the aggregator answers with."""

    def __init__(self, url: str, fleet: str, signer: Signer, model=TINY):
        self.topics = Topics(fleet)
        self.id = signer.device_id
        self.transport = open_transport(url, client_id=f"manual-{uuid.uuid4().hex[:6]}", connect_timeout=10)
        self.transport.connect()
        self.channel = Channel(self.transport, self.topics.sender_of, signer=signer)
        self.receipts: list[Receipt] = []
        self.run_id = ""  # the fleet run its updates are for (set once the daemon has one)
        self.channel.subscribe(self.topics.receipt(self.id), lambda t, m: self.receipts.append(m))
        self.shapes = adapter_shapes(SPEC, model)
        hello = Hello(self.id, "test", model, Capabilities(), 10)
        self.transport.publish(self.topics.hello(self.id), self.channel.prepare(self.topics.hello(self.id), hello)[0],
                               retain=True)

    def update(self, round_number: int, delta=None, version: int = 0, samples: int = 10) -> Update:
        """An update for ``round_number``; by default its delta is ``simulated_delta``'s, which
        the test can compute again to check the merge."""
        delta = simulated_delta(self.shapes, self.id, round_number) if delta is None else delta
        return Update(self.id, round_number, version, samples, delta, TrainMetrics(1.0, 0, 0.0, 1.0, 1.0), self.run_id)

    def send(self, message) -> None:
        """Sign it (if the device has a signer), publish it on its update topic, wait until it has left."""
        self.channel.send(self.topics.update(self.id), message)
        self.transport.flush()

    def close(self) -> None:
        self.transport.close()


def memory_fleet(tmp_path, name: str, **settings):
    """``(url, fleet, aggregator, thread)``: a daemon on an in-memory broker with small defaults
    (one round, one device, no planning, no final evaluation; ``settings`` override them)."""
    fleet = f"{name}-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1, round_timeout_s=30,
                  join_timeout_s=30, adapter=SPEC, planning=False, evaluate_final=False) | settings
    if "model" not in fields:  # (these fleets' tiny models are not the default one pinned by default)
        fields.setdefault("model_from_first_hello", True)
    aggregator, thread = start_aggregator(url, AggregatorConfig(**fields))
    return url, fleet, aggregator, thread


def manuals(url: str, fleet: str, aggregator, *names: str) -> list[Manual]:
    """Hand-driven devices that send for the daemon's current run (once it has one)."""
    devices = [Manual(url, fleet, Signer.generate(name)) for name in names]
    assert wait_for(lambda: aggregator.state is not None and aggregator.task is not None)
    for device in devices:
        device.run_id = aggregator.state.run_id
    return devices
