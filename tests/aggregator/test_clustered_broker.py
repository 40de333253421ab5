"""The fleet on a real 2-node ejabberd cluster: devices on both nodes, the daemon on one.

ejabberd shares retained messages between its nodes' stores but each node indexes only the
topic names published through it (``edgetune/transport/mirrored.py``); the first test pins that
behaviour down, the others show the daemon's mirrored connection carrying whole federations,
and a late device on the other node reading the retained task and global adapter.
"""

from __future__ import annotations

import uuid

import pytest
from edgetune.transport import open_transport

from helpers.ejabberd import start_ejabberd_cluster
from helpers.fleet import Observer, fleet_config, join_device, start_aggregator
from helpers.merges import check_rounds
from helpers.scenarios import late_joiner
from helpers.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    started = start_ejabberd_cluster()
    try:
        yield started
    finally:
        started.stop()


def _client(url: str, name: str, **options):
    transport = open_transport(url, client_id=f"{name}-{uuid.uuid4().hex[:6]}", connect_timeout=10, **options)
    transport.connect()
    return transport


def _collect(transport, topic_filter: str) -> list[bytes]:
    got: list[bytes] = []
    transport.subscribe(topic_filter, lambda topic, payload: got.append(payload))
    return got


def test_a_retained_message_reaches_the_other_node_only_through_a_mirrored_client(cluster):
    node_a, node_b = cluster.urls
    base = f"edgetune/v1/c-{uuid.uuid4().hex[:6]}"
    plain = _client(node_a, "plain")
    plain.publish(f"{base}/plain", b"through a only", retain=True)
    plain.flush()
    on_a, on_b = _client(node_a, "reader-a"), _client(node_b, "reader-b")
    seen_a, seen_b = _collect(on_a, f"{base}/plain"), _collect(on_b, f"{base}/plain")
    assert wait_for(lambda: seen_a, 10) and seen_a == [b"through a only"]
    # the broker's own behaviour, why the daemon mirrors: node b never learned the topic's name
    assert not wait_for(lambda: seen_b, 2)

    live_b = _collect(on_b, f"{base}/task")  # subscribed before: sees the live publishes
    mirrored = _client(node_a, "daemon", cluster_nodes=(node_b,))
    mirrored.publish(f"{base}/task", b"round 1", retain=True)
    mirrored.publish(f"{base}/update", b"not retained")  # the primary's only
    mirrored.flush()
    late_b = _client(node_b, "late-b")
    seen_late = _collect(late_b, f"{base}/task")
    assert wait_for(lambda: seen_late, 10) and seen_late == [b"round 1"]
    # live, a retained message comes once per node it went through (duplicates, as QoS 1 allows)
    assert wait_for(lambda: len(live_b) == 2, 10) and live_b == [b"round 1"] * 2

    # a later retained value is published through node a alone: b serves it from the shared store
    plain.publish(f"{base}/task", b"round 2", retain=True)
    plain.flush()
    later_b = _client(node_b, "later-b")
    seen_later = _collect(later_b, f"{base}/task")
    assert wait_for(lambda: seen_later, 10) and seen_later == [b"round 2"]

    # reading: a retained hello published through node b reaches the mirrored client (its mirror
    # on b delivers it), and a live message reaches it once, not once per node
    device_b = _client(node_b, "device-b")
    device_b.publish(f"{base}/hello/dev-b", b"hello", retain=True)
    device_b.flush()
    hellos = _collect(mirrored, f"{base}/hello/+")
    assert wait_for(lambda: hellos, 10) and hellos == [b"hello"]
    device_b.publish(f"{base}/hello/dev-b", b"hello again", retain=True)
    device_b.flush()
    assert wait_for(lambda: len(hellos) == 2, 10)
    assert not wait_for(lambda: len(hellos) > 2, 1.5) and hellos == [b"hello", b"hello again"]
    for client in (plain, on_a, on_b, mirrored, late_b, later_b, device_b):
        client.close()


def test_federation_over_a_clustered_broker(cluster, tmp_path):
    """Three devices, two on node b; the daemon on node a, mirroring to b. The globals recomputed
    from what an observer on node b saw match the daemon's, every round counts each device once."""
    node_a, node_b = cluster.urls
    fleet = f"clu-{uuid.uuid4().hex[:8]}"
    observer = Observer(node_b, fleet)
    aggregator, thread = start_aggregator(node_a, fleet_config(tmp_path, fleet), cluster_nodes=(node_b,))
    devices = [join_device(node_a if i == 0 else node_b, fleet, i) for i in range(3)]
    thread.join(timeout=240)
    assert not thread.is_alive(), "the aggregator did not finish its rounds"
    for device in devices:
        assert device.finished.wait(30)
        device.stop()
    check_rounds(aggregator.store, observer, rounds=2, devices=3)
    assert {d.config.device_id: d.rounds_done for d in devices} == {f"dev-{i}": [1, 2] for i in range(3)}
    assert all(d.current_adapter.version == 2 for d in devices)
    assert not aggregator.drops
    observer.close()


def test_a_device_joining_the_other_node_late_reads_the_retained_task_and_global(cluster, tmp_path):
    """dev-1 leaves after round 1; dev-2 connects to node b only then, and round 2 cannot close
    without it: it must read global v1 and the round-2 task, published through node a, on b."""
    node_a, node_b = cluster.urls
    late_joiner(tmp_path, f"clulate-{uuid.uuid4().hex[:8]}", node_a, late_url=node_b, cluster_nodes=(node_b,))


def test_serve_with_a_cluster_node_and_a_device_on_that_node(cluster, tmp_path):
    """The commands a user runs: ``serve --broker A --cluster-node B`` and ``edgetune device run``
    against node B, one round."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from edgetune.data import write_demo_data

    repo = Path(__file__).resolve().parents[2]
    node_a, node_b = cluster.urls
    fleet = f"clucli-{uuid.uuid4().hex[:6]}"
    write_demo_data(tmp_path, 1, n_records=40)
    (data,) = sorted(tmp_path.glob("*.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "sdk"), str(repo / "aggregator")])}
    serve = [sys.executable, "-m", "edgetune_aggregator", "serve", "--broker", node_a, "--cluster-node", node_b,
             "--fleet", fleet, "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--min-devices", "1",
             "--no-planning", "--model-from-first-hello", "--rank", "2", "--targets", "q_proj", "--steps", "2",
             "--batch-size", "2", "--seq-len", "32", "--eval-blocks", "1", "--round-timeout", "120",
             "--join-timeout", "120", "--connect-timeout", "30"]
    device = [sys.executable, "-m", "edgetune", "device", "run", "--broker", node_b, "--fleet", fleet,
              "--device-id", "line-b", "--data", str(data), "--model", "tiny-llama", "--threads", "1",
              "--no-plan", "--connect-timeout", "30", "--state-dir", str(tmp_path / "device-state")]
    outputs = [tmp_path / "daemon.out", tmp_path / "device.out"]
    processes = []
    for command, output in zip((serve, device), outputs):
        with output.open("wb") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            if any(p.poll() for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = "\n".join(f"{o.name}:\n{o.read_text()}" for o in outputs)
    assert [p.returncode for p in processes] == [0, 0], logs
    rounds = json.loads((tmp_path / "state" / "rounds.json").read_text())
    assert [(r["round"], r["status"]) for r in rounds if r["kind"] == "train"] == [(1, "aggregated")], logs
    assert [d["device_id"] for d in rounds[0]["devices"]] == ["line-b"]
