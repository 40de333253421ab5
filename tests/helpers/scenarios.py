"""Whole fleet scenarios that more than one test runs, on different brokers."""

from __future__ import annotations

from edgetune.device import Device

from .fleet import Observer, fleet_config, join_device, start_aggregator
from .merges import check_rounds


def late_joiner(tmp_path, fleet: str, url: str, late_url: str | None = None, cluster_nodes: tuple[str, ...] = ()) -> None:
    """dev-1 leaves after round 1; dev-2 connects (to ``late_url``, default ``url``) only then,
    and round 2 cannot close without it, so it must have read global v1 and the round-2 task
    the daemon (on ``url``, with ``cluster_nodes``) left retained on the broker."""
    late: list[Device] = []
    devices: list[Device] = []

    def after_round(record) -> None:
        if record.round == 1:
            devices[1].stop()  # its presence goes offline before round 2 opens
            late.append(join_device(late_url or url, fleet, 2))

    observer = Observer(url, fleet)
    config = fleet_config(tmp_path, fleet, min_devices=2, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config, cluster_nodes=cluster_nodes, on_round=after_round)
    devices.extend(join_device(url, fleet, i) for i in range(2))
    thread.join(timeout=240)
    assert not thread.is_alive()
    assert late and late[0].rounds_done == [2]
    # (the daemon is done once it has published; the device leaves once the final adapter is in)
    assert late[0].finished.wait(60) and late[0].current_adapter.version == 2
    round2 = {u.device_id: u for u in observer.updates[2]}
    assert set(round2) == {"dev-0", "dev-2"} and round2["dev-2"].base_version == 1
    check_rounds(aggregator.store, observer, rounds=2, devices=2)
    for device in devices + late:
        device.stop()
    observer.close()
