"""Aggregator workers behind an MQTT 5 shared subscription, over Mosquitto: the same updates
give the same global with two workers as with one aggregator process (to 1e-6; not bit for
bit: the shares' sums are added in another order), for fedit, hetlora and svd; and a worker
SIGKILLed after it journaled its share loses nothing and counts nothing twice."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgetune.transport import open_transport
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.worker import Worker, WorkerConfig

from helpers.fleet import SPEC, start_aggregator
from helpers.journal import has
from helpers.manual import SHAPES, manuals
from helpers.waiting import wait_for

pytestmark = pytest.mark.slow
_REPO = Path(__file__).resolve().parents[2]
DEVICES = [f"dev-{i}" for i in range(6)]
ROUNDS = 2


def _config(tmp_path, fleet: str, strategy: str, workers: bool) -> AggregatorConfig:
    return AggregatorConfig(fleet=fleet, state_dir=tmp_path / "state", rounds=ROUNDS, min_devices=len(DEVICES),
                            round_timeout_s=120, join_timeout_s=60, adapter=SPEC, planning=False,
                            evaluate_final=False, model_from_first_hello=True, strategy=strategy,
                            workers=workers, merge_timeout_s=60)


def _start_worker(url: str, fleet: str, name: str, state_dir) -> tuple[Worker, threading.Thread]:
    transport = open_transport(url, client_id=f"{fleet}-{name}", connect_timeout=10, protocol="5")
    worker = Worker(WorkerConfig(fleet, name, state_dir, group=f"g-{fleet}"), transport)
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    assert worker.ready.wait(30)
    return worker, thread


def _run(url: str, tmp_path, strategy: str, workers: int) -> tuple[dict, list[dict], list[Worker]]:
    """Every device sends its simulated delta for each round; returns the final global."""
    fleet = f"wk-{uuid.uuid4().hex[:6]}"
    aggregator, thread = start_aggregator(url, _config(tmp_path, fleet, strategy, workers > 0))
    started = [_start_worker(url, fleet, f"w{i}", tmp_path / f"w{i}") for i in range(workers)]
    devices = manuals(url, fleet, aggregator, *DEVICES)
    try:
        for number in range(1, ROUNDS + 1):
            assert wait_for(lambda: aggregator.task is not None and aggregator.task.round == number, 60)
            for device in devices:
                device.send(device.update(number, version=number - 1))
        thread.join(timeout=120)
        assert not thread.is_alive()
        return (aggregator.store.load_global(ROUNDS).tensors, aggregator.store.rounds(), [w for w, _ in started])
    finally:
        aggregator.stop()
        for worker, worker_thread in started:
            worker.stop()
            worker_thread.join(timeout=10)
        for device in devices:
            device.close()


@pytest.mark.parametrize("strategy", ["fedit", "hetlora", "svd"])
def test_two_workers_give_the_global_of_one_aggregator(mosquitto_url, tmp_path, strategy):
    one, one_rounds, _ = _run(mosquitto_url, tmp_path / "one", strategy, 0)
    two, two_rounds, workers = _run(mosquitto_url, tmp_path / "two", strategy, 2)
    assert all(w.counts["journaled"] > 0 for w in workers)  # (the shared subscription dealt both a share)
    assert sum(w.counts["journaled"] for w in workers) == len(DEVICES) * ROUNDS
    for record in two_rounds:
        assert record["status"] == "aggregated" and sorted(d["device_id"] for d in record["devices"]) == DEVICES
    assert one.keys() == two.keys()
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-6, atol=1e-6 * float(np.abs(value).max()), err_msg=name)


def _worker_process(url: str, fleet: str, name: str, state_dir) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")])}
    return subprocess.Popen([sys.executable, "-m", "edgetune_aggregator.cli", "worker", "--broker", url, "--fleet", fleet,
                             "--id", name, "--state-dir", str(state_dir), "--group", f"g-{fleet}"],
                            env=env, stdin=subprocess.DEVNULL)


def test_a_worker_killed_mid_round_loses_nothing_and_counts_nothing_twice(mosquitto_url, tmp_path):
    fleet = f"kill-{uuid.uuid4().hex[:6]}"
    config = dataclasses.replace(_config(tmp_path, fleet, "fedit", True), rounds=1)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    workers = {name: _worker_process(mosquitto_url, fleet, name, tmp_path / name) for name in ("w0", "w1")}
    devices = manuals(mosquitto_url, fleet, aggregator, *DEVICES)
    try:
        time.sleep(2.0)  # (the workers subscribed: a shared subscription deals only to present members)
        for device in devices:
            device.send(device.update(1))
        # SIGKILL w0 as soon as it journaled an update: before, after or while it reports it
        assert wait_for(lambda: any(has(tmp_path / "w0", 1, d) for d in DEVICES), 30)
        workers["w0"].send_signal(signal.SIGKILL)
        workers["w0"].wait(timeout=10)
        held = [d for d in DEVICES if has(tmp_path / "w0", 1, d)]
        time.sleep(1.0)
        workers["w0"] = _worker_process(mosquitto_url, fleet, "w0", tmp_path / "w0")  # back on its journal
        # What the broker had handed w0 but it had not journaled died with it (as a daemon's inbox
        # would): the devices resend what no receipt answered, as a device's outbox does.
        deadline = time.monotonic() + 120
        while thread.is_alive() and time.monotonic() < deadline:
            time.sleep(2.0)
            for device in devices:
                if not device.receipts and thread.is_alive():
                    device.send(device.update(1))
        thread.join(timeout=10)
        assert not thread.is_alive()
        record = aggregator.store.rounds()[0]
        assert record["status"] == "aggregated", record.get("note")
        assert sorted(d["device_id"] for d in record["devices"]) == sorted(DEVICES)  # each once
        assert held  # (what the killed worker held was merged: the global has every device's delta)
        v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
        for name in SHAPES:  # fedit, equal samples: the plain mean of the six deltas
            expected = np.mean([device.update(1).delta[name] for device in devices], axis=0)
            np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + expected, rtol=1e-5, atol=1e-6)
        for device in devices:  # one update accepted (its receipt may come again: the restarted worker reports
            # it again); a resend of what was accepted meanwhile is refused (a duplicate, or the round closed)
            assert len({r.nonce for r in device.receipts if r.accepted}) == 1, (device.id, device.receipts)
    finally:
        aggregator.stop()
        for process in workers.values():
            process.kill()
            process.wait(timeout=10)
        for device in devices:
            device.close()


def test_a_worker_gone_at_the_close_fails_the_round_with_the_reason_and_merges_nothing(mosquitto_url, tmp_path):
    """The close adds the shares up one by one in worker-id order; a holder whose share does
    not come within ``merge_timeout_s`` fails the round (nothing published, the global stays),
    naming the workers, even after the shares before it were added."""
    fleet = f"gone-{uuid.uuid4().hex[:6]}"
    config = dataclasses.replace(_config(tmp_path, fleet, "svd", True), rounds=1, merge_timeout_s=3)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    workers = {name: _worker_process(mosquitto_url, fleet, name, tmp_path / name) for name in ("w0", "w1")}
    devices = manuals(mosquitto_url, fleet, aggregator, *DEVICES)
    try:
        time.sleep(2.0)  # (the workers subscribed: a shared subscription deals only to present members)
        first, last = devices[:-1], devices[-1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(d.receipts for d in first):
            for device in first:  # (resent until answered: the broker may deal to a worker still joining)
                if not device.receipts:
                    device.send(device.update(1))
            time.sleep(1.0)
        held = {name: [d for d in DEVICES if has(tmp_path / name, 1, d)] for name in workers}
        if not held["w1"]:
            pytest.skip("the shared subscription dealt every update to one worker")
        workers["w1"].send_signal(signal.SIGKILL)  # (the last in id order: w0's share is added first)
        workers["w1"].wait(timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not aggregator.store.rounds():
            if not last.receipts:  # (resent until answered, as a device's outbox does)
                last.send(last.update(1))
            time.sleep(1.0)
        record = aggregator.store.rounds()[0]
        assert record["status"] == "failed", record
        assert "did not all send their share" in record["note"] and "w1" in record["note"], record["note"]
        assert aggregator.fleet.state.global_version == 0
    finally:
        aggregator.stop()
        thread.join(timeout=10)
        for process in workers.values():
            process.kill()
            process.wait(timeout=10)
        for device in devices:
            device.close()


def test_serve_with_workers_runs_a_fleet_end_to_end(mosquitto_url, tmp_path):
    """The user's path: ``edgetune-aggregator serve --workers 2`` starts its two workers, and a
    fleet of light devices trains through them to the end (rounds, the final evaluation); their
    updates, over their packet limit, go whole (``RoundTask.whole_updates``), not in chunks."""
    from edgetune.simulate import TINY, LightDevice
    from edgetune.wire.manifest_file import write_manifest

    from edgetune.wire.signing import FleetSigner

    fleet = f"cli-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "tiny-manifest.json"
    write_manifest(manifest, TINY)
    (tmp_path / "fleet.key").write_bytes(FleetSigner.generate().private_pem())  # (workers get its public half)
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")])}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "edgetune_aggregator.cli", "serve", "--broker", mosquitto_url, "--fleet", fleet,
         "--state-dir", str(state), "--rounds", "2", "--min-devices", "4", "--no-planning", "--round-timeout", "120",
         "--join-timeout", "120", "--rank", "4", "--alpha", "8", "--connect-timeout", "30",
         "--model-manifest", str(manifest), "--workers", "2", "--fleet-key", str(tmp_path / "fleet.key")], env=env,
        stdin=subprocess.DEVNULL)
    devices = []
    try:
        time.sleep(3.0)  # (the workers subscribed: a shared subscription deals only to present members)
        # (a packet limit that would chunk their updates: the task tells them to send them whole,
        # since Mosquitto deals a shared subscription's messages one by one, chunks to both workers)
        devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-d{i}", connect_timeout=10), fleet,
                               f"dev-{i}", TINY, resend_after_s=30.0, max_packet=2100).start() for i in range(4)]
        assert daemon.wait(timeout=180) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for device in devices:
            device.stop()
    rounds = [r for r in json.loads((state / "rounds.json").read_text()) if r["kind"] == "train"]
    assert [r["status"] for r in rounds] == ["aggregated", "aggregated"]
    for record in rounds:
        assert sorted(d["device_id"] for d in record["devices"]) == [f"dev-{i}" for i in range(4)]
    assert sorted(p.name for p in (state / "workers").iterdir()) == ["fleet.pub", "w0", "w1"]  # (their journals)


def test_the_pool_starts_a_crashed_worker_again_and_not_a_stopped_one(mosquitto_url, tmp_path, monkeypatch):
    """``serve --workers``' supervisor: a worker SIGKILLed is started again on its state dir
    (and connects to the broker again); one that exits 0 stays stopped; ``stop()`` ends all."""
    from edgetune_aggregator.pool import WorkerPool

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")]))
    fleet = f"pool-{uuid.uuid4().hex[:6]}"
    pool = WorkerPool(2, ["--broker", mosquitto_url, "--fleet", fleet, "--group", f"g-{fleet}"], tmp_path / "state",
                      check_every_s=0.2)
    log = tmp_path / "mosquitto.log"  # (the fixture's broker logs each client that connects)

    def connections(name: str) -> int:
        return log.read_text(errors="replace").count(f"edgetune-worker-{fleet}-{name}")

    pool.start()
    try:
        assert wait_for(lambda: connections("w0") >= 1 and connections("w1") >= 1, 60)
        first = pool.processes[0]
        first.send_signal(signal.SIGKILL)
        assert wait_for(lambda: pool.restarts == 1 and pool.processes[0] is not first, 10)
        assert wait_for(lambda: connections("w0") >= 2, 60)  # the new one reached the broker
        assert pool.processes[0].poll() is None and (tmp_path / "state" / "workers" / "w0").is_dir()
        pool.processes[1].terminate()  # (a worker stopped on purpose exits 0 after SIGTERM)
        assert pool.processes[1].wait(30) == 0
        time.sleep(1.0)
        assert pool.restarts == 1
    finally:
        pool.stop()
    assert all(process.poll() is not None for process in pool.processes)


def test_a_worker_with_the_fleet_key_takes_only_the_daemons_signed_announcements(tmp_path):
    """Unsigned, signed by another key, or older than one taken: refused and counted; the
    daemon's own (the same retained one again included) is taken."""
    from edgetune.simulate import TINY
    from edgetune.transport.channel import Channel
    from edgetune.wire import Topics
    from edgetune.wire.signing import FleetSigner
    from edgetune.wire.workers import WorkerRound
    from edgetune_aggregator.pool import write_fleet_pub

    fleet = f"sig-{uuid.uuid4().hex[:6]}"
    (tmp_path / "fleet.key").write_bytes(FleetSigner.generate().private_pem())
    daemon_key = FleetSigner.load(tmp_path / "fleet.key")
    pub = write_fleet_pub(tmp_path / "fleet.key", tmp_path / "state")
    url = f"memory://{fleet}"
    worker = Worker(WorkerConfig(fleet, "w0", tmp_path / "w0", group=f"g-{fleet}", fleet_key=pub),
                    open_transport(url, client_id="w0"))
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    assert worker.ready.wait(30)
    topics = Topics(fleet)
    sender = open_transport(url, client_id="sender")
    sender.connect()

    def announce(number: int, signer) -> bytes:
        payload = Channel(sender, topics.sender_of, signer=signer).prepare(
            topics.workers_round, WorkerRound(number, "run-1", {str(number): number - 1}, TINY, SPEC))[0]
        sender.publish(topics.workers_round, payload, retain=True)
        return payload

    announce(1, None)
    announce(1, FleetSigner.generate())
    assert wait_for(lambda: worker.channel.drops["unsigned"] == 1 and worker.channel.drops["unknown_key"] == 1)
    assert worker.round is None
    old = announce(2, daemon_key)
    announce(3, daemon_key)
    assert wait_for(lambda: worker.round is not None and worker.round.round == 3)
    sender.publish(topics.workers_round, old, retain=True)  # genuine, but older than round 3's
    assert wait_for(lambda: worker.channel.drops["replayed"] == 1) and worker.round.round == 3
    worker.stop()
    thread.join(30)
