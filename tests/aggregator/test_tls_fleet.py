"""A whole fleet through a provisioned broker: TLS with client certificates, the generated ACL,
signed updates. Real devices (tiny Llama, PyTorch training) and the daemon, nothing mocked."""

from __future__ import annotations

import threading
import uuid

import pytest

from edgetune.device import Device, DeviceConfig
from edgetune.transport import TransportError, open_transport
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
from edgetune_aggregator.provision import ProvisionConfig, provision

from helpers.brokers import start_provisioned_broker, stop_process
from helpers.fleet import SPEC, TRAIN, workload
from helpers.manual import SHAPES
from helpers.waiting import wait_for

pytestmark = pytest.mark.slow


def test_a_signed_fleet_trains_over_tls_through_the_provisioned_broker(tmp_path):
    fleet = f"tls-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "fleet"
    provision(ProvisionConfig(fleet=fleet, out=out, device_ids=("dev-0", "dev-1"), broker_hosts=("127.0.0.1",)))
    broker, port = start_provisioned_broker(out, tmp_path)
    url = f"mqtts://127.0.0.1:{port}"
    try:
        agg_dir = out / "aggregator"
        config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=2,
                                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, train=TRAIN,
                                  device_keys=agg_dir / "device_keys.json", fleet_key=agg_dir / "fleet.key")
        transport = open_transport(url, client_id=f"edgetune-aggregator-{fleet}", connect_timeout=10,
                                   clean_session=False, ca_certs=str(agg_dir / "ca.crt"),
                                   certfile=str(agg_dir / "client.crt"), keyfile=str(agg_dir / "client.key"))
        aggregator = Aggregator(config, transport)
        thread = threading.Thread(target=aggregator.serve, daemon=True)
        thread.start()
        devices = []
        for index in range(2):
            d = out / "devices" / f"dev-{index}"
            tls = dict(ca_certs=str(d / "ca.crt"), certfile=str(d / "client.crt"), keyfile=str(d / "client.key"))
            device_transport = open_transport(url, client_id=f"edgetune-{fleet}-dev-{index}", connect_timeout=10,
                                              clean_session=False, **tls)
            device = Device(DeviceConfig(fleet, f"dev-{index}", signing_key=d / "signing.key", fleet_key=d / "fleet.pub",
                                         state_dir=tmp_path / f"dev-{index}"), device_transport, workload(index))
            device.connect()
            devices.append(device.start())
        thread.join(timeout=240)
        assert not thread.is_alive()
        rounds = aggregator.store.rounds()
        assert [(r["kind"], r["status"]) for r in rounds] == [("train", "aggregated")] * 2 + [("evaluate", "evaluated")]
        assert all(sorted(d["device_id"] for d in r["devices"]) == ["dev-0", "dev-1"] for r in rounds)
        assert not aggregator.drops  # every message was signed, in size and on the device's own topics
        assert all(device.outbox.pending() == [] for device in devices)  # every result acknowledged
        # the downlink was signed with the provisioned fleet key, and verified: nothing refused
        assert all(device.downlink.verifies and not device.channel.drops for device in devices)
        assert all(aggregator.members.devices[f"dev-{i}"].capabilities.verifies_downlink for i in range(2))
        for device in devices:
            device.stop()
        # without a certificate of the fleet's CA nobody gets in
        stranger = open_transport(url, client_id="stranger", connect_timeout=3, ca_certs=str(agg_dir / "ca.crt"))
        with pytest.raises(TransportError):
            stranger.connect()
    finally:
        stop_process(broker)


def test_a_provisioned_liar_over_tls_is_refused_and_bounded(tmp_path):
    """The issue's setting: a provisioned TLS/ACL fleet, one legitimate, correctly signed device
    that lies (a hello for another model, an Update on its presence topic, 10,000,000 samples);
    the daemon's defaults (pinned model, one kind per topic, bounded influence) hold."""
    import numpy as np

    from edgetune.simulate import TINY, LightDevice, manifest, simulated_delta
    from edgetune.transport.channel import Channel
    from edgetune.wire import Capabilities, Hello, Topics, Update
    from edgetune.wire import TrainMetrics
    from edgetune.wire.signing import Signer

    fleet = f"tlsliar-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "fleet"
    names = ("dev-0", "dev-1", "dev-2")
    provision(ProvisionConfig(fleet=fleet, out=out, device_ids=names, broker_hosts=("127.0.0.1",)))
    broker, port = start_provisioned_broker(out, tmp_path)
    url = f"mqtts://127.0.0.1:{port}"

    def tls(folder, client_id):
        return open_transport(url, client_id=client_id, connect_timeout=10, ca_certs=str(folder / "ca.crt"),
                              certfile=str(folder / "client.crt"), keyfile=str(folder / "client.key"))

    try:
        agg_dir = out / "aggregator"
        config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=3,
                                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, planning=False,
                                  evaluate_final=False, device_keys=agg_dir / "device_keys.json", model=TINY)
        aggregator = Aggregator(config, tls(agg_dir, f"edgetune-aggregator-{fleet}"))
        thread = threading.Thread(target=aggregator.serve, daemon=True)
        thread.start()
        assert aggregator.ready.wait(30)
        signers = {n: Signer.load(n, out / "devices" / n / "signing.key") for n in names}
        topics = Topics(fleet)
        liar = tls(out / "devices" / "dev-2", f"edgetune-{fleet}-dev-2")
        liar.connect()
        channel = Channel(liar, topics.sender_of, signer=signers["dev-2"])
        channel.send(topics.hello("dev-2"), Hello("dev-2", "x", manifest("another", 4, 64, 32, 128, 256),
                                                  Capabilities(), 10))
        liar.flush()
        assert wait_for(lambda: aggregator.drops["model_mismatch"] == 1, 30), dict(aggregator.drops)
        channel.send(topics.hello("dev-2"), Hello("dev-2", "x", TINY, Capabilities(), 10))
        honest = [LightDevice(tls(out / "devices" / n, f"edgetune-{fleet}-{n}"), fleet, n, TINY,
                              signer=signers[n]).start() for n in names[:2]]
        assert wait_for(lambda: aggregator.task is not None, 60)
        run = aggregator.state.run_id
        update = Update("dev-2", 1, 0, 10_000_000, simulated_delta(SHAPES, "dev-2", 1),
                        TrainMetrics(1.0, 0, 0.0, 1.0, 1.0), run)
        channel.send(topics.presence("dev-2"), update)  # a result where presence goes
        liar.flush()
        assert wait_for(lambda: aggregator.drops["unexpected_kind"] == 1, 30), dict(aggregator.drops)
        channel.send(topics.update("dev-2"), update)
        liar.flush()
        thread.join(timeout=120)
        assert not thread.is_alive()
        (record,) = aggregator.store.rounds()
        devices = {d["device_id"]: d for d in record["devices"]}
        assert record["status"] == "aggregated" and set(devices) == set(names)
        assert devices["dev-2"]["counted_samples"] == 40 and devices["dev-2"]["weight"] == 40 / 60
        v1 = aggregator.store.load_global(1)
        assert all(np.all(np.isfinite(t)) for t in v1.tensors.values())
        for device in honest:
            device.stop()
        liar.close()
    finally:
        stop_process(broker)
