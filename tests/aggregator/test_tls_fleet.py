"""A whole fleet through a provisioned broker: TLS with client certificates, the generated ACL,
signed updates. Real devices (tiny Llama, PyTorch training) and the daemon, nothing mocked."""

from __future__ import annotations

import threading
import uuid

import pytest
from test_federation import SPEC, TRAIN, workload
from test_provision import start_broker

from edgetune.device import Device, DeviceConfig
from edgetune.transport import TransportError, open_transport
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
from edgetune_aggregator.provision import ProvisionConfig, provision

pytestmark = pytest.mark.slow


def test_a_signed_fleet_trains_over_tls_through_the_provisioned_broker(tmp_path):
    from conftest import _stop_process

    fleet = f"tls-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "fleet"
    provision(ProvisionConfig(fleet=fleet, out=out, device_ids=("dev-0", "dev-1"), broker_hosts=("127.0.0.1",)))
    broker, port = start_broker(out, tmp_path)
    url = f"mqtts://127.0.0.1:{port}"
    try:
        agg_dir = out / "aggregator"
        config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=2,
                                  round_timeout_s=120, join_timeout_s=60, adapter=SPEC, train=TRAIN,
                                  device_keys=agg_dir / "device_keys.json")
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
            device = Device(DeviceConfig(fleet, f"dev-{index}", signing_key=d / "signing.key"), device_transport,
                            workload(index))
            device.connect()
            devices.append(device.start())
        thread.join(timeout=240)
        assert not thread.is_alive()
        rounds = aggregator.store.rounds()
        assert [(r["kind"], r["status"]) for r in rounds] == [("train", "aggregated")] * 2 + [("evaluate", "evaluated")]
        assert all(sorted(d["device_id"] for d in r["devices"]) == ["dev-0", "dev-1"] for r in rounds)
        assert not aggregator.drops  # every message was signed, in size and on the device's own topics
        assert all(device.outbox.pending() == [] for device in devices)  # every result acknowledged
        for device in devices:
            device.stop()
        # without a certificate of the fleet's CA nobody gets in
        stranger = open_transport(url, client_id="stranger", connect_timeout=3, ca_certs=str(agg_dir / "ca.crt"))
        with pytest.raises(TransportError):
            stranger.connect()
    finally:
        _stop_process(broker)
