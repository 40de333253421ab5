"""Fault injection on a real Mosquitto: the aggregator SIGKILLed at random moments, the broker
killed and restarted mid-round, 30 % of the devices missing from every round. The fleet must
finish without an operator, count nothing twice, and (after kills) end with exactly the global
adapter an undisturbed run produces from the same updates."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgetune.simulate import TINY, LightDevice, simulated_delta
from edgetune.transport import open_transport
from edgetune.wire.signing import Signer, write_key_file
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.store import StateStore

from helpers.journal import has
from helpers.brokers import start_mosquitto, stop_process
from helpers.fleet import SPEC, start_aggregator
from helpers.manual import SHAPES, Manual
from helpers.waiting import wait_for

pytestmark = pytest.mark.slow
_REPO = Path(__file__).resolve().parents[2]
ROUNDS = 8
DEVICES = [f"dev-{i}" for i in range(4)]


def _tiny_manifest(state_dir: Path) -> Path:
    """The devices' model as ``edgetune manifest`` writes it: the daemon is pinned to it."""
    from edgetune.wire.manifest_file import write_manifest

    path = state_dir.parent / "tiny-manifest.json"
    write_manifest(path, TINY)
    return path


def _daemon(url: str, fleet: str, state_dir: Path, keys: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")])}
    command = [sys.executable, "-m", "edgetune_aggregator.cli", "serve", "--broker", url, "--fleet", fleet,
               "--state-dir", str(state_dir), "--rounds", str(ROUNDS), "--min-devices", str(len(DEVICES)),
               "--no-planning", "--round-timeout", "120", "--join-timeout", "120", "--rank", "4", "--alpha", "8",
               "--device-keys", str(keys), "--connect-timeout", "30", "--model-manifest", str(_tiny_manifest(state_dir))]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def _run_fleet(url: str, tmp: Path, name: str, kill_after: list[float]) -> tuple[dict, list[dict], int, float]:
    """Run a 4-device fleet to the end, SIGKILLing the daemon ``kill_after[i]`` seconds after
    its i-th start; returns the final global tensors, the round log and the kills done."""
    fleet = f"{name}-{uuid.uuid4().hex[:6]}"
    signers = {d: Signer.generate(d) for d in DEVICES}
    keys = tmp / f"{name}-keys.json"
    write_key_file(keys, fleet, {d: s.public_key for d, s in signers.items()})
    state, log = tmp / f"{name}-state", tmp / f"{name}.log"
    devices = [LightDevice(open_transport(url, client_id=f"{fleet}-{d}", connect_timeout=10, clean_session=False),
                           fleet, d, TINY, signer=signers[d], resend_after_s=1.0, think_s=0.3).start() for d in DEVICES]
    daemon, kills, started = _daemon(url, fleet, state, keys, log), 0, time.monotonic()
    try:
        for delay in kill_after:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and daemon.poll() is None:
                time.sleep(0.01)
            if daemon.poll() is not None:
                break  # finished before this kill
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(timeout=10)
            kills += 1
            daemon = _daemon(url, fleet, state, keys, log)
        assert daemon.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for device in devices:
            device.stop()
    store = StateStore(state)
    final = json.loads((state / "state.json").read_text())
    assert final["global_version"] == ROUNDS, log.read_text()[-3000:]
    return store.load_global(ROUNDS).tensors, store.rounds(), kills, time.monotonic() - started


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict:
    """One fault-free run (its own broker): the reference every killed run must match."""
    tmp = tmp_path_factory.mktemp("reference")
    process, port = start_mosquitto(tmp)
    try:
        tensors, rounds, _, seconds = _run_fleet(f"mqtt://127.0.0.1:{port}", tmp, "ref", [])
    finally:
        stop_process(process)
    return {"tensors": tensors, "rounds": rounds, "seconds": seconds}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkilled_aggregator_ends_with_the_undisturbed_global_adapter(mosquitto_url, tmp_path, seed, undisturbed):
    rng = random.Random(seed)
    # after each (re)start, anywhere in an undisturbed run's span: mid-import, mid-round, mid-close…
    # (the first within half of it, so every seed kills at least once)
    span = undisturbed["seconds"]
    kill_after = [rng.uniform(0.1, 0.5 * span)] + [rng.uniform(0.1, span) for _ in range(4)]
    tensors, rounds, kills, _ = _run_fleet(mosquitto_url, tmp_path, f"kill{seed}", kill_after)
    assert kills >= 1
    assert tensors.keys() == undisturbed["tensors"].keys()
    for name, value in undisturbed["tensors"].items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=f"{name} after {kills} kill(s), seed {seed}")
    trained = [r for r in rounds if r["kind"] == "train" and r["status"] == "aggregated"]
    assert len(trained) == ROUNDS
    for record in trained:  # every device counted once per round
        assert sorted(d["device_id"] for d in record["devices"]) == DEVICES


def test_a_broker_restart_mid_round_is_survived_without_an_operator(mosquitto_factory, tmp_path):
    url, stop = mosquitto_factory()
    port = int(url.rsplit(":", 1)[1])
    fleet = f"brk-{uuid.uuid4().hex[:8]}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=3, min_devices=3, round_timeout_s=120,
                              join_timeout_s=60, adapter=SPEC, planning=False, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config)
    devices = [LightDevice(open_transport(url, client_id=f"{fleet}-{d}", connect_timeout=10, clean_session=False),
                           fleet, d, TINY, resend_after_s=1.0).start() for d in ("dev-0", "dev-1")]
    manual = Manual(url, fleet, Signer.generate("dev-2"))
    manual.channel.signer = None  # (this fleet checks no keys)
    journal = tmp_path / "state" / "journal"
    assert wait_for(lambda: has(tmp_path / "state", 1, "dev-0"))
    manual.send(manual.update(1))
    assert wait_for(lambda: has(tmp_path / "state", 2, "dev-0", "dev-1"))
    stop()  # round 2 is open, two of three updates in: the broker dies (no persistence: it forgets everything)
    time.sleep(1.5)
    mosquitto_factory(port)
    # the daemon republishes its task and global adapter, devices their hellos; dev-2 goes on
    assert wait_for(lambda: manual.transport.connected, 30)
    # (resent until answered, as a device does: the daemon may not have subscribed again yet)
    update = manual.update(2, version=1)
    assert any(manual.send(update) or wait_for(lambda: any(r.round == 2 for r in manual.receipts), 5)
               for _ in range(12))
    assert wait_for(lambda: (journal / "r000003").exists(), 60)
    manual.send(manual.update(3, version=2))
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [(r["round"], r["status"]) for r in aggregator.store.rounds()] == [(n, "aggregated") for n in (1, 2, 3)]
    for record in aggregator.store.rounds():
        assert sorted(d["device_id"] for d in record["devices"]) == ["dev-0", "dev-1", "dev-2"]
    for device in devices:
        device.stop()
    manual.close()


def test_rounds_complete_when_30_percent_of_devices_drop_each_round(mosquitto_url, tmp_path):
    fleet = f"drop-{uuid.uuid4().hex[:8]}"
    names = [f"dev-{i}" for i in range(10)]

    def dropped(round_number: int) -> set[str]:
        return set(random.Random(round_number).sample(names, 3))

    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=3, min_devices=5, quorum=1.0,
                              round_timeout_s=4.0, join_timeout_s=60, adapter=SPEC, planning=False,
                              evaluate_final=False)
    devices = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d,
                           TINY, skip=lambda r, d=d: d in dropped(r)).start() for d in names]
    assert wait_for(lambda: True)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    thread.join(timeout=120)
    assert not thread.is_alive()
    rounds = aggregator.store.rounds()
    assert [r["status"] for r in rounds] == ["aggregated"] * 3
    for record in rounds:  # closed at the deadline with the 7 that answered, and only those
        assert sorted(d["device_id"] for d in record["devices"]) == sorted(set(names) - dropped(record["round"]))
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    answered = sorted(set(names) - dropped(1))
    for name in SHAPES:
        mean = np.mean([simulated_delta(SHAPES, d, 1)[name] for d in answered], axis=0)
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + mean, rtol=1e-5, atol=1e-7)
    for device in devices:
        device.stop()


_DEVICE_SCRIPT = """
import sys, time
from edgetune.simulate import TINY, LightDevice
from edgetune.transport import open_transport
url, fleet, device, think = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
transport = open_transport(url, client_id=f"{fleet}-{device}", connect_timeout=10, clean_session=False)
d = LightDevice(transport, fleet, device, TINY, think_s=think, resend_after_s=1.0).start()
print("joined", flush=True)
d.finished.wait(120)
d.stop()
"""


def test_a_device_killed_while_training_rejoins_and_the_round_counts_it_once(mosquitto_url, tmp_path):
    fleet = f"dk-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")])}

    def device_process(think: float) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", _DEVICE_SCRIPT, mosquitto_url, fleet, "dev-1", str(think)],
                                   stdout=subprocess.PIPE, env=env)
        assert process.stdout.readline().strip() == b"joined"
        return process

    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=2, round_timeout_s=120,
                              join_timeout_s=60, adapter=SPEC, planning=False, evaluate_final=False)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    other = LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-dev-0", connect_timeout=10), fleet, "dev-0",
                        TINY).start()
    slow = device_process(think=600.0)  # "trains" round 1 for ever
    assert wait_for(lambda: has(tmp_path / "state", 1, "dev-0"))
    slow.kill()  # SIGKILL mid-training: its last will says it is offline
    slow.wait(timeout=10)
    assert not has(tmp_path / "state", 1, "dev-1")
    back = device_process(think=0.0)  # the same device starts again and finds round 1 still open
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert back.wait(timeout=30) == 0
    for record in aggregator.store.rounds():
        assert record["status"] == "aggregated"
        assert sorted(d["device_id"] for d in record["devices"]) == ["dev-0", "dev-1"]
    other.stop()


def test_updates_queued_while_the_daemon_was_down_are_taken_at_once(mosquitto_url, tmp_path):
    """The broker holds them in the daemon's persistent session and delivers them right after
    it reconnects, before any retained hello: the daemon must already know the devices and
    the layout's size limit (a SmolLM2-sized update is over the 1 MiB default)."""
    from edgetune.simulate import SMOLLM2_135M

    fleet = f"queued-{uuid.uuid4().hex[:8]}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=2, round_timeout_s=120,
                              join_timeout_s=60, adapter=SPEC, planning=False, evaluate_final=False)

    def daemon():
        transport = open_transport(mosquitto_url, client_id=f"agg-{fleet}", connect_timeout=10, clean_session=False)
        from edgetune_aggregator.daemon import Aggregator

        aggregator = Aggregator(config, transport)
        thread = threading.Thread(target=aggregator.serve, daemon=True)
        thread.start()
        return aggregator, thread

    aggregator, thread = daemon()
    first, second = (Manual(mosquitto_url, fleet, Signer.generate(d), SMOLLM2_135M) for d in ("dev-0", "dev-1"))
    assert wait_for(lambda: aggregator.task is not None and aggregator.task.round == 1)
    run_id = aggregator.state.run_id
    first.run_id = second.run_id = run_id
    first.send(first.update(1))
    assert wait_for(lambda: any(r.accepted for r in first.receipts))
    aggregator.stop()
    thread.join(timeout=30)
    second.send(second.update(1))  # the daemon is away: the broker keeps it for its session
    aggregator, thread = daemon()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not aggregator.drops, dict(aggregator.drops)  # neither unknown_device nor oversize
    record = aggregator.store.rounds()[0]
    assert record["status"] == "aggregated" and sorted(d["device_id"] for d in record["devices"]) == ["dev-0", "dev-1"]
    first.close()
    second.close()
