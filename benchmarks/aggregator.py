"""Aggregator ingest over Mosquitto: updates/s and peak memory of the daemon against N devices.

N simulated light devices (no model: random SmolLM2-135M-sized LoRA r=8 q,v deltas, 460,800
float32 values, 1.84 MB, two chunks at the 1 MiB packet limit) speak the real protocol to an
``edgetune-aggregator serve`` subprocess through a local Mosquitto: signed hellos and presence
(retained), then, once the daemon publishes the train task, every device's signed ``Update`` at
once, the worst case of a fleet that finishes together. The devices are played by a few paho
connections (``--connections``), not one client per device: 500 paho clients would be 1,000
threads on a 2-core box.

Measured for each N:

- **aggregator updates/s**: N ÷ (first update published → the N-th accepted ``Receipt``
  received). A receipt is sent only after the update is checked and journaled (fsync), so this is
  the rate at which the daemon takes updates in for good.
- **ceiling updates/s**: the same updates (signed, chunked the same way, QoS 1; a placeholder run
  id), from the same publishing connections, through the same broker, to a bare paho subscriber
  in its own process: N ÷ (first publish → last whole update received). The "raw paho"
  ceiling of issue 19's targets.
- **tuned ceiling updates/s**: the same, the subscriber with glibc's allocator set for megabyte
  buffers (``tune_allocator``): on this sandbox a bare paho subscriber spends most of its CPU
  mapping fresh megabyte buffers (2.4 ms per 1 MiB message, 0.5 ms tuned), so the raw ceiling
  understates what the broker delivers. (The daemon is not tuned so: docs/benchmarks.md.)
- **peak RSS** of the daemon (``VmHWM``, the kernel's high-water mark), and its RSS sampled
  every 0.05 s: the growth after the round opens is what the round's traffic costs in memory.
- **aggregation s**: the round's merge, from the daemon's ``rounds.json``.

After the train round the daemon runs its final evaluation round; the devices answer it with
signed ``EvalReport``s so the daemon finishes and exits normally. ``--profile N`` adds one run
with the daemon in-process and timers around the steps an update goes through (signature,
decoding, checks, journal, receipt; the chunks' reassembly on paho's thread) and reports the
milliseconds per update of each. Usage::

    python benchmarks/aggregator.py [--devices 10,100,500] [--connections 4] [--unsigned] \\
        [--profile 100] [--out benchmarks/results/aggregator.json] [--markdown | --render]

On 2 cores the default run takes about a minute and a half; the machine should be otherwise
idle (the load average at the start is recorded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "aggregator.json"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- aggregator:begin -->", "<!-- aggregator:end -->"
#: the section a run with workers writes (``--workers``): the single-process one stays
WORKERS_BEGIN, WORKERS_END = "<!-- aggregator-workers:begin -->", "<!-- aggregator-workers:end -->"
MOSQUITTO = "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
FLEET = "bench"
CEILING_TOPIC = "bench/ceiling"
#: the provisioned broker's queue (``edgetune-aggregator provision`` writes 10000); no TLS, ACL or
#: persistence here, so the figures are the broker's best case
BROKER_CONFIG = ("allow_anonymous true", "persistence false", "max_queued_messages 10000")
#: the roadmap's target, and the thresholds the verdicts apply to it
TARGET = "the aggregator ingests updates as fast as the broker delivers them, memory independent of fleet size"
RATE_RATIO_MET = 0.9
#: one process against the ceiling at the largest N (issue 19): fedit/hetlora, and the exact strategies
SINGLE_TARGETS = {"linear": 0.6, "exact": 0.3}
RSS_GROWTH_MET = 1.25

log = logging.getLogger("aggregator-bench")


# --- the broker ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Broker:
    """A Mosquitto of our own on a free loopback port (its log in ``workdir/mosquitto.log``)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {HOST}\n" + "\n".join(BROKER_CONFIG) + "\nlog_dest stderr\n")
        self.log_path = workdir / "mosquitto.log"
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def dropped_lines(self) -> list[str]:
        """Mosquitto logs when it drops messages for a client whose queue is full."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if "dropped" in line.lower()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def mosquitto_version() -> str:
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].replace("mosquitto version ", "") if out else "unknown"


# --- the simulated fleet ------------------------------------------------------------------------


@dataclass
class Fleet:
    """N devices: their keys, signed hellos and deltas, made before anything is timed.

    An update names the fleet's run (``RoundTask.run_id``, drawn when the daemon starts), so it
    is encoded and signed once the task is out, before the first one is published: the daemon
    idles meanwhile, and on a real fleet every device does that work on its own hardware."""

    devices: list[str]
    signers: dict  # device -> Signer (empty: unsigned)
    hellos: dict[str, bytes]
    deltas: dict[str, dict]

    def first(self, n: int) -> Fleet:
        devices = self.devices[:n]
        return Fleet(devices, {d: self.signers[d] for d in devices if d in self.signers},
                     {d: self.hellos[d] for d in devices}, {d: self.deltas[d] for d in devices})

    def without_keys(self) -> Fleet:
        return Fleet(self.devices, {}, {d: _hello(d, None) for d in self.devices}, self.deltas)

    def updates(self, round_number: int = 1, base_version: int = 0, run_id: str = "0" * 12,
                max_packet: int | None = None) -> dict[str, list[bytes]]:
        """Each device's update as the MQTT payloads it publishes (chunks of ≤ ``max_packet``,
        1 MiB by default); the defaults make updates of the real size for the ceiling (run ids
        have 12 characters)."""
        from edgetune.wire import (
            DEFAULT_MAX_PACKET,
            TrainMetrics,
            Update,
            split_payload,
        )

        topics, metrics = _topics(), TrainMetrics(1.0, 0, 0.0, 1.0, 1.0)
        return {d: split_payload(_seal(self.signers.get(d), topics.update(d),
                                       Update(d, round_number, base_version, 10, self.deltas[d], metrics, run_id)),
                                 max_packet or DEFAULT_MAX_PACKET)
                for d in self.devices}


def _seal(signer, topic: str, message) -> bytes:
    """The payload a device publishes: the message, signed for ``topic`` if it has a key (the
    device's own ``Channel.prepare``; its outbox publishes these bytes, split as below)."""
    from edgetune.transport.channel import seal

    return seal(topic, message, signer)[0]


def _hello(device: str, signer) -> bytes:
    from edgetune import __version__
    from edgetune.wire import Capabilities, Hello
    from edgetune_aggregator.fleet_model import default_manifest

    # the real default model's manifest: the daemon's default pin (fleet_model.py)
    return _seal(signer, _topics().hello(device), Hello(device, __version__, default_manifest(), Capabilities(),
                                                        num_samples=10))


def make_fleet(n: int) -> Fleet:
    """N signed devices with their random round-1 deltas (``simulated_delta``, seeded by device)."""
    from edgetune.adapters.registry import adapter_shapes
    from edgetune.simulate import simulated_delta
    from edgetune.wire import LoraSpec
    from edgetune.wire.signing import Signer
    from edgetune_aggregator.fleet_model import default_manifest

    shapes = adapter_shapes(LoraSpec(rank=8, target_modules=("q_proj", "v_proj")), default_manifest())
    devices = [f"dev-{i:04d}" for i in range(n)]
    signers = {d: Signer.generate(d) for d in devices}
    return Fleet(devices, signers, {d: _hello(d, signers[d]) for d in devices},
                 {d: simulated_delta(shapes, d, 1) for d in devices})


def _topics():
    from edgetune.wire import Topics

    return Topics(FLEET)


# --- MQTT clients of the harness ----------------------------------------------------------------


def _client(client_id: str, port: int):
    """A connected paho client with its network thread running."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                         clean_session=True)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props: connected.set()
    client.connect(HOST, port, keepalive=120)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{client_id} could not connect to the broker on port {port}")
    return client


def _subscribe(client, topic_filter: str) -> None:
    done = threading.Event()
    client.on_subscribe = lambda c, u, mid, codes, props: done.set()
    client.subscribe(topic_filter, qos=1)
    if not done.wait(10):
        raise RuntimeError(f"no SUBACK for {topic_filter}")


class Publishers:
    """``connections`` paho clients that speak for all the devices (device i uses client i mod k);
    counts the broker's acknowledgements (PUBACK: the broker has the message)."""

    def __init__(self, port: int, connections: int, name: str):
        self.clients = [_client(f"{name}-{k}", port) for k in range(connections)]
        self._lock = threading.Condition()
        self.expected = self.acked = 0
        self.all_acked_at = 0.0
        for client in self.clients:
            client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self.acked += 1
            if self.acked == self.expected:
                self.all_acked_at = time.monotonic()
                self._lock.notify_all()

    def publish(self, items: list[tuple[str, list[bytes]]], retain: bool = False) -> float:
        """Publish every (topic, frames) in order, each device's frames on its connection;
        returns the time the first went out."""
        with self._lock:
            self.expected += sum(len(frames) for _, frames in items)
        started = time.monotonic()
        for i, (topic, frames) in enumerate(items):
            client = self.clients[i % len(self.clients)]
            for frame in frames:
                client.publish(topic, frame, qos=1, retain=retain)
        return started

    def wait_acked(self, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.acked >= self.expected, timeout)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


class Listener:
    """Reads what the daemon tells the devices: tasks, and every device's receipts."""

    def __init__(self, port: int):
        from edgetune.wire import decode_message

        self._decode = decode_message
        self.topics = _topics()
        self.tasks: queue.Queue = queue.Queue()
        self.receipts: list[tuple[float, object]] = []
        self._lock = threading.Condition()
        self.client = _client("bench-listener", port)
        self.client.on_message = self._on_message
        _subscribe(self.client, self.topics.task)
        _subscribe(self.client, self.topics.receipt("+"))

    def _on_message(self, client, userdata, message) -> None:
        now = time.monotonic()
        if not message.payload:
            return  # a cleared retained task
        try:
            decoded = self._decode(message.payload)
        except Exception:  # (paho's thread must survive) the run then times out and says so
            log.exception("undecodable message on %s", message.topic)
            return
        if message.topic == self.topics.task:
            self.tasks.put((now, decoded))
            return
        with self._lock:
            self.receipts.append((now, decoded))
            self._lock.notify_all()

    def next_task(self, kind: str, timeout: float, alive=None):
        """The next task of ``kind``; raises if none comes in time, or ``alive()`` turns False
        (the daemon died: its log says why)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} task within {timeout:.0f} s")
            try:
                at, task = self.tasks.get(timeout=min(left, 0.5))
            except queue.Empty:  # (only now: a daemon that finished may have exited already)
                if alive is not None and not alive():
                    raise RuntimeError(f"the daemon exited while waiting for a {kind} task: see its daemon.log")
                continue
            if task.kind.value == kind:
                return at, task

    def wait_receipts(self, round_number: int, count: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.of_round(round_number)) >= count, timeout)

    def of_round(self, round_number: int) -> list[tuple[float, object]]:
        return [(t, r) for t, r in self.receipts if r.round == round_number]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _status_kib(pid: int | str, field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status in KiB (None once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), None)


class RssSampler(threading.Thread):
    """VmRSS of a process every ``interval`` seconds, as (monotonic time, KiB), and its VmHWM,
    the kernel's high-water mark of RSS, whose last reading is the peak.

    Not ``ru_maxrss``: Linux carries the maximum over ``exec``, so a child forked from this
    process (which holds every update, ~1 GB at N = 500) would report this process's RSS."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.peak_kib = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss, hwm = _status_kib(self.pid, "VmRSS"), _status_kib(self.pid, "VmHWM")
            if rss is None or hwm is None:  # exited (a zombie has no memory lines)
                return
            self.samples.append((time.monotonic(), rss))
            self.peak_kib = max(self.peak_kib, hwm)
            self.stopped.wait(self.interval)

    def max_between(self, start: float, end: float) -> int:
        return max((kib for t, kib in self.samples if start <= t <= end), default=0)

    def at(self, moment: float) -> int:
        """The last sample at or before ``moment``."""
        before = [kib for t, kib in self.samples if t <= moment]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)


def _wait_child(process: subprocess.Popen, timeout: float):
    """Reap ``process`` with ``wait4`` (exit code, and its rusage for the CPU time); SIGTERM,
    then SIGKILL, if it does not exit in time."""
    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            log.warning("pid %d did not exit in time; sending %s", process.pid, sig.name)
            process.send_signal(sig)
            deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, usage
            time.sleep(0.05)
    raise RuntimeError(f"pid {process.pid} survived SIGKILL")


# --- the ceiling: a bare paho subscriber --------------------------------------------------------


def tune_allocator() -> bool:
    """glibc's mmap threshold fixed at its most (32 MiB) and 64 MiB of freed memory kept before
    trimming: every megabyte buffer then comes from the heap and is reused. Without it glibc
    maps (and the kernel faults in) a fresh region for each buffer of ≥ 128 KiB–32 MiB, and
    paho makes several per 1 MiB packet. False where there is no glibc ``mallopt``."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(-3, 32 << 20) == 1 and mallopt(-1, 64 << 20) == 1  # (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)


def sink(port: int, count: int, frames: int, timeout: float, tuned: bool = False) -> None:
    """(Run in its own process.) Receive ``count`` updates of ``frames`` frames on the ceiling
    topics; print one JSON line with when the first and the last whole update arrived.
    ``tuned``: with glibc's allocator set for megabyte messages (``tune_allocator``)."""
    if tuned and not tune_allocator():
        raise SystemExit("the tuned ceiling needs glibc's mallopt")
    lock, done = threading.Lock(), threading.Event()
    per_topic: dict[str, int] = {}
    times: list[float] = []
    received = [0]

    def on_message(client, userdata, message) -> None:
        now = time.monotonic()
        with lock:
            received[0] += len(message.payload)
            seen = per_topic[message.topic] = per_topic.get(message.topic, 0) + 1
            if seen == frames:
                times.append(now)
                if len(times) == count:
                    done.set()

    client = _client(f"bench-sink-{os.getpid()}", port)
    client.on_message = on_message
    _subscribe(client, CEILING_TOPIC + "/+")
    print("ready", flush=True)
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"whole": len(times), "first": min(times, default=0.0), "last": max(times, default=0.0),
                      "bytes": received[0], "peak_rss_kib": _status_kib("self", "VmHWM")}), flush=True)


def measure_ceiling(port: int, updates: dict[str, list[bytes]], connections: int, timeout: float,
                    tuned: bool = False) -> dict:
    n, frames = len(updates), len(next(iter(updates.values())))
    process = subprocess.Popen([sys.executable, __file__, "--sink", str(port), str(n), str(frames), str(timeout)]
                               + (["tuned"] if tuned else []), stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the ceiling's subscriber did not start")
    publishers = Publishers(port, connections, "bench-ceiling")
    try:
        started = publishers.publish([(f"{CEILING_TOPIC}/{d}", frames) for d, frames in updates.items()])
        publishers.wait_acked(timeout)
        acked_s = publishers.all_acked_at - started
        line = process.stdout.readline()
        _wait_child(process, 30)
    finally:
        publishers.close()
    got = json.loads(line)
    if got["whole"] != n:
        raise RuntimeError(f"the ceiling's subscriber received {got['whole']} of {n} updates")
    seconds = got["last"] - started
    return {"seconds": seconds, "updates_per_s": n / seconds, "mb_per_s": got["bytes"] / seconds / 1e6,
            "publish_acked_s": acked_s, "subscriber_peak_rss_mib": got["peak_rss_kib"] / 1024}


# --- the aggregator -----------------------------------------------------------------------------


def daemon_argv(port: int, n: int, state: Path, keys: Path | None, timeout: float, strategy: str = "fedit",
                workers: int = 0) -> list[str]:
    argv = ["serve", "--broker", f"mqtt://{HOST}:{port}", "--fleet", FLEET, "--state-dir", str(state),
            "--min-devices", str(n), "--rounds", "1", "--no-planning", "--round-timeout", str(timeout),
            "--join-timeout", str(timeout), "--connect-timeout", "30", "--strategy", strategy]
    argv += ["--workers", str(workers)] if workers else []
    return argv + (["--device-keys", str(keys)] if keys else [])


def _write_keys(fleet: Fleet, path: Path) -> Path | None:
    if not fleet.signers:
        return None
    from edgetune.wire.signing import write_key_file

    write_key_file(path, FLEET, {d: s.public_key for d, s in fleet.signers.items()})
    return path


def _announce(port: int, fleet: Fleet, connections: int) -> None:
    """Every device's retained presence and hello, acknowledged by the broker before the daemon starts."""
    from edgetune.wire import Presence, encode_message

    topics = _topics()
    publishers = Publishers(port, connections, "bench-hello")
    items = []
    for device in fleet.devices:
        items.append((topics.presence(device), [encode_message(Presence(device, True))]))
        items.append((topics.hello(device), [fleet.hellos[device]]))
    publishers.publish(items, retain=True)
    if not publishers.wait_acked(60):
        raise RuntimeError("the broker did not acknowledge the hellos")
    publishers.close()


def _eval_reports(fleet: Fleet, task) -> list[tuple[str, list[bytes]]]:
    from edgetune.wire import EvalMetrics, EvalReport

    topics = _topics()
    return [(topics.eval(d), [_seal(fleet.signers.get(d), topics.eval(d),
                                    EvalReport(d, task.round, task.global_version, 10, EvalMetrics(1.0, 1)))])
            for d in fleet.devices]


def measure_aggregator(port: int, fleet: Fleet, connections: int, workdir: Path, timeout: float,
                       profile_to: Path | None = None, strategy: str = "fedit", workers: int = 0,
                       max_packet: int | None = None) -> dict:
    """One fleet, one train round, through the daemon; see the module docstring for what is timed."""
    n, topics = len(fleet.devices), _topics()
    state = workdir / "state"
    keys = _write_keys(fleet, workdir / "device_keys.json")
    listener = Listener(port)
    _announce(port, fleet, connections)
    publishers = Publishers(port, connections, "bench-devices")
    argv = daemon_argv(port, n, state, keys, timeout, strategy, workers)
    if profile_to is None:
        command = [sys.executable, "-m", "edgetune_aggregator", *argv]
    else:
        command = [sys.executable, __file__, "--profile-daemon", str(profile_to), "--", *argv]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # docs/benchmarks.md, strategies: a small shared box
    log_path = workdir / "daemon.log"
    with log_path.open("wb") as out:
        launched = time.monotonic()
        daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    sampler = RssSampler(daemon.pid)
    sampler.start()
    try:
        opened, task = listener.next_task("train", timeout, lambda: daemon.poll() is None)
        if workers:  # (the workers' shared subscription is subscribed by now: the task goes out after it)
            time.sleep(2.0)
        updates = fleet.updates(task.round, task.global_version, task.run_id, max_packet)
        update_bytes = sum(map(len, next(iter(updates.values()))))
        started = publishers.publish([(topics.update(d), frames) for d, frames in updates.items()])
        del updates  # (paho holds the frames until the broker acknowledges them)
        if not listener.wait_receipts(task.round, n, timeout):
            raise RuntimeError(f"only {len(listener.of_round(task.round))} of {n} receipts within {timeout:.0f} s; "
                               f"daemon log: {log_path}")
        receipts = listener.of_round(task.round)
        refused = Counter(r.reason for _, r in receipts if not r.accepted)
        if refused:  # a benchmark of refusals would be meaningless: the harness is out of date
            raise RuntimeError(f"the daemon refused updates: {dict(refused)}; daemon log: {log_path}")
        last = max(t for t, _ in receipts)
        acked_s = publishers.all_acked_at - started if publishers.all_acked_at else None
        evaluating, evaluate = listener.next_task("evaluate", timeout, lambda: daemon.poll() is None)
        publishers.publish(_eval_reports(fleet, evaluate))
        listener.next_task("finished", timeout, lambda: daemon.poll() is None)
        code, usage = _wait_child(daemon, 60)
        exited = time.monotonic()
    finally:
        sampler.stopped.set()
        publishers.close()
        listener.close()
        if daemon.returncode is None:
            daemon.kill()
            _wait_child(daemon, 10)
    if code != 0:
        raise RuntimeError(f"the daemon exited with {code}; its log: {log_path}")
    rounds = json.loads((state / "rounds.json").read_text())
    train = next(r for r in rounds if r["kind"] == "train")
    seconds = last - started
    at_open = sampler.at(opened)
    return {
        "strategy": strategy,
        "workers": workers,
        "updates_per_s": n / seconds,
        # through the merge: the next task goes out once the round's global is stored and published
        "round_updates_per_s": n / (evaluating - started),
        "round_s": evaluating - started,
        "mb_per_s": n * update_bytes / seconds / 1e6,
        "update_bytes": update_bytes,
        "seconds": seconds,
        "first_receipt_s": min(t for t, _ in receipts) - started,
        "receipt_times": sorted(round(t - started, 4) for t, _ in receipts),
        "publish_acked_s": acked_s,
        "join_s": opened - launched,
        "accepted": len(receipts),
        "aggregation_s": train["aggregation_s"],
        "train_round_s": train["duration_s"],
        "status": train["status"],
        "dropped": train["dropped"],
        "daemon_wall_s": exited - launched,
        "daemon_cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": sampler.peak_kib / 1024,
        "rss_at_open_mib": at_open / 1024,
        # sampled, so a spike shorter than the interval can be missed (VmHWM above cannot)
        "sampled_peak_rss_mib": {"joining": sampler.max_between(launched, opened) / 1024,
                                 "ingest": sampler.max_between(opened, last) / 1024,
                                 "merge": sampler.max_between(last, evaluating) / 1024,
                                 "evaluate": sampler.max_between(evaluating, exited) / 1024},
        "rss_timeline": [[round(t - started, 2), kib // 1024] for t, kib in sampler.samples[::2]],
    }


# --- profiling the round loop -------------------------------------------------------------------


class StageTimes:
    """Wall time spent in wrapped functions, per label, while ``active``: a few timers around
    the daemon's steps cost far less than a tracing profiler, which doubled the round loop's time.
    Steps on several threads (the intake's) add up their threads' times."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active = False
        self._lock = threading.Lock()

    def wrap(self, label: str, function):
        def timed(*args, **kwargs):
            if not self.active:
                return function(*args, **kwargs)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                with self._lock:
                    self.seconds[label] = self.seconds.get(label, 0.0) + spent
                    self.calls[label] = self.calls.get(label, 0) + 1
        return timed


def profile_daemon(out: Path, argv: list[str]) -> None:
    """(Run in its own process.) The daemon as ``edgetune-aggregator serve`` runs it, with
    timers on the steps each update goes through, from the train round's start to its close
    (the merge is not included: ``rounds.json`` has it). Writes the times as JSON to ``out``."""
    import edgetune.transport.channel
    import edgetune_aggregator.intake
    import edgetune_aggregator.receiver
    import edgetune_aggregator.tasks.train
    from edgetune.transport import open_transport
    from edgetune.wire import TaskKind
    from edgetune_aggregator.cli import build_parser, settings_from_args
    from edgetune_aggregator.daemon import Aggregator

    times = StageTimes()
    # module globals the daemon and the channel look up at call time
    for module, name in ((edgetune.transport.channel, "envelope_kind"), (edgetune.transport.channel, "decode_message"),
                         (edgetune_aggregator.intake, "digest_matches"), (edgetune_aggregator.intake, "decode_message"),
                         (edgetune_aggregator.tasks.train, "check_layout"),
                         (edgetune_aggregator.intake, "measure_delta"), (os, "fsync")):
        setattr(module, name, times.wrap(name, getattr(module, name)))
    received = edgetune_aggregator.receiver.Received
    received.result = times.wrap("intake_wait", received.result)

    class Timed(Aggregator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.inbox.get = times.wrap("inbox_wait", self.inbox.get)
            self.intake.open_payload = times.wrap("open_payload", self.intake.open_payload)
            self.intake.keyring.verify = times.wrap("verify", self.intake.keyring.verify)
            self.channel.reassembler.feed = times.wrap("reassemble", self.channel.reassembler.feed)
            self.journal.stage = times.wrap("journal_stage", self.journal.stage)
            self.journal.commit = times.wrap("journal_commit", self.journal.commit)
            self._receive = times.wrap("_receive", self._receive)
            self.runner.receive = self.startup.receive = self._receive
            self.desk._receipt = times.wrap("_receipt", self.desk._receipt)
            run, train = self.runner.run, self.desk.handlers[TaskKind.TRAIN]
            close = train.close

            def timed_run(number, kind):
                times.active = kind is TaskKind.TRAIN
                return run(number, kind)

            def timed_close(ctx, enough):  # (the merge is not timed: rounds.json has it)
                if times.active:
                    times.active = False
                    out.write_text(json.dumps({"seconds": times.seconds, "calls": times.calls,
                                               "commits": self.journal.commits}))
                return close(ctx, enough)

            self.runner.run, train.close = timed_run, timed_close

    config, settings = settings_from_args(build_parser().parse_args(argv))
    if config.device_keys is None:
        raise SystemExit("--profile times the signature check: run it with device keys")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transport = open_transport(settings.broker, client_id=f"edgetune-aggregator-{config.fleet}",
                               connect_timeout=settings.connect_timeout_s, clean_session=False)
    aggregator = Timed(config, transport)
    signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
    aggregator.serve()


def summarize_profile(path: Path, n: int) -> dict:
    """Milliseconds per update of each step, by the thread it runs on (the round loop's steps
    add up to its total; the intake's run on its own threads, beside it)."""
    measured = json.loads(path.read_text())
    s = measured["seconds"]
    loop = s["_receive"] - s.get("inbox_wait", 0.0) - s.get("intake_wait", 0.0)
    steps = [
        ("check the layout (names, shapes, dtypes)", s["check_layout"]),
        ("journal: stage the payload as received", s["journal_stage"]),
        ("journal: commit (one segment, fsync file and folder, per batch)", s["journal_commit"]),
        ("send the receipt", s["_receipt"]),
    ]
    steps.append(("the rest (routing, round checks, logging, bookkeeping)", loop - sum(seconds for _, seconds in steps)))
    steps.insert(3, ("… of which os.fsync", s["fsync"]))
    commits = measured.get("commits") or 1
    rows = [{"what": "round loop: one update's work (waits excluded)", "ms_per_update": loop / n * 1e3}]
    rows += [{"what": f"… {what}", "ms_per_update": seconds / n * 1e3} for what, seconds in steps]
    rows.append({"what": "round loop: waiting for the intake threads", "ms_per_update": s.get("intake_wait", 0.0) / n * 1e3})
    opened = s["open_payload"]
    rows.append({"what": "intake threads: verify, decode, measure (on 2 threads)", "ms_per_update": opened / n * 1e3})
    rows.append({"what": "… SHA-256 of the reassembled transfer", "ms_per_update": s.get("digest_matches", 0.0) / n * 1e3})
    rows.append({"what": "… verify the signature (SHA-256 + Ed25519)", "ms_per_update": s["verify"] / n * 1e3})
    rows.append({"what": "… decode the signed payload into an Update", "ms_per_update": s.get("decode_message", 0.0) / n * 1e3})
    rows.append({"what": "… finite values and the norm: one pass over the values",
                 "ms_per_update": s.get("measure_delta", 0.0) / n * 1e3})
    rows.append({"what": "paho's network thread: read the chunk envelopes, reassemble",
                 "ms_per_update": (s.get("reassemble", 0.0) + s.get("envelope_kind", 0.0)) / n * 1e3})
    return {"n": n, "rows": rows, "measured": measured, "updates_per_commit": n / commits}


# --- output -------------------------------------------------------------------------------------


def _growth_kib(run: dict) -> float:
    """RSS the daemon gained after the round opened, per device."""
    return (run["peak_rss_mib"] - run["rss_at_open_mib"]) * 1024 / run["n"]


def verdicts(runs: list[dict], update_bytes: int) -> list[str]:
    """One line per half of the target, computed from the numbers, and what explains them."""
    reference = runs[0].get("strategy", "fedit")
    signed = sorted((r for r in runs if r["signed"] and r.get("strategy", "fedit") == reference and not r.get("workers")),
                    key=lambda r: r["n"])
    low, high = min(r["ratio"] for r in signed), max(r["ratio"] for r in signed)
    per_n = ", ".join(f"N = {r['n']}: {r['ratio']:.0%}" for r in signed)
    first, last = signed[0], signed[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"]
    times, half = last["receipt_times"], last["n"] // 2
    first_half, second_half = half / times[half - 1], (last["n"] - half) / (times[-1] - times[half - 1])
    lines = [
        (f"- **As fast as the broker delivers** (met if the aggregator's rate is at least {RATE_RATIO_MET:.0%} of "
         f"the ceiling at every N): **{'met' if low >= RATE_RATIO_MET else 'not met'}**, {low:.0%}–{high:.0%} "
         f"of the broker's rate ({per_n})."),
        (f"- **Memory independent of fleet size** (met if the peak RSS at N = {last['n']} is at most "
         f"{RSS_GROWTH_MET:.2f}× that at N = {first['n']}): **{'met' if growth <= RSS_GROWTH_MET else 'not met'}**, "
         f"{first['peak_rss_mib']:,.0f} MiB → {last['peak_rss_mib']:,.0f} MiB ({growth:.2f}×). At N = {last['n']} "
         f"the daemon gained {_growth_kib(last):,.0f} KiB per device after the round opened (an update is "
         f"{update_bytes / 1024:,.0f} KiB on the wire); the bare subscriber of the ceiling run peaked at "
         f"{max(c['subscriber_peak_rss_mib'] for c in last['ceiling_runs']):,.0f} MiB."),
        *([f"- **Memory per extra device** between the two largest fleets (N = {signed[-2]['n']} → {last['n']}): "
           f"{(last['peak_rss_mib'] - signed[-2]['peak_rss_mib']) * 1024 / (last['n'] - signed[-2]['n']):,.1f} KiB "
           f"of peak RSS per device ({signed[-2]['peak_rss_mib']:,.0f} → {last['peak_rss_mib']:,.0f} MiB): what the "
           f"fleet's size still costs once the daemon's buffers are full."] if len(signed) > 2 else []),
        (f"- **Why, at N = {last['n']}:** in the time the broker took to deliver all {last['n']} updates to the bare "
         f"subscriber ({last['ceiling_s']:.1f} s), the daemon acknowledged {last['acknowledged_at_ceiling']}; the "
         f"other {last['n'] - last['acknowledged_at_ceiling']} waited at the broker or in the daemon's inbox "
         f"(bounded: a full inbox stops the network thread reading, so the broker holds the rest). Receipts are "
         f"written by that same network thread, so they too wait while it waits for room, and come in a burst "
         f"once the stream ends. Its RSS went from {last['rss_at_open_mib']:,.0f} MiB at the round's opening to "
         f"{last['sampled_peak_rss_mib']['ingest']:,.0f} MiB during the ingest, and back to "
         f"{last['sampled_peak_rss_mib']['merge']:,.0f} MiB at most during the merge. It acknowledged the first "
         f"half of the updates at {first_half:,.0f}/s, while they were still streaming in, and the second half at "
         f"{second_half:,.0f}/s."),
    ]
    largest = max(r["n"] for r in runs)
    for strategies, target in ((("fedit", "hetlora"), SINGLE_TARGETS["linear"]), (("svd", "stack"), SINGLE_TARGETS["exact"])):
        at = [r for r in runs if r["signed"] and r["n"] == largest and r.get("strategy", "fedit") in strategies
              and not r.get("workers")]
        if not at:
            continue
        parts = [f"{r['strategy']} {r['ratio']:.2f}× ingesting, {r['round_ratio']:.2f}× through the merge" for r in at]
        met_ingest = all(r["ratio"] >= target for r in at)
        met_round = all(r["round_ratio"] >= target for r in at)
        lines.append(f"- **{' and '.join(strategies)} at ≥ {target}× the ceiling at N = {largest:,}** (issue 19): "
                     f"ingest **{'met' if met_ingest else 'not met'}**, through the merge "
                     f"**{'met' if met_round else 'not met'}** ({'; '.join(parts)}).")
    for r in sorted((r for r in runs if r.get("workers")), key=lambda r: (r["n"], r["strategy"], r["workers"])):
        alone = next((a for a in runs if a["n"] == r["n"] and a.get("strategy") == r["strategy"] and a["signed"]
                      and not a.get("workers")), None)
        if alone is not None:
            lines.append(f"- **{r['workers']} worker(s), {r['strategy']}, N = {r['n']:,}**: {r['ratio']:.2f}× the ceiling "
                         f"ingesting ({r['updates_per_s'] / alone['updates_per_s']:.2f}× the daemon alone), "
                         f"{r['round_ratio']:.2f}× through the merge "
                         f"({r['round_updates_per_s'] / alone['round_updates_per_s']:.2f}× the daemon alone).")
    return lines


def _tuned(run: dict, key: str, spec: str) -> str:
    return "" if run.get(key) is None else format(run[key], spec)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    workers = any(r.get("workers") for r in result["runs"])
    begin, end = (WORKERS_BEGIN, WORKERS_END) if workers else (BEGIN, END)
    lines = [
        begin, "## Aggregator workers over Mosquitto" if workers else "## Aggregator ingest over Mosquitto", "",
        (f"`python benchmarks/aggregator.py {' '.join(result['argv'])}` (results in "
         f"`{result.get('out', 'benchmarks/results/aggregator.json')}`; {result['wall_s']:.0f} s wall, making the devices "
         "included)."), "",
        (f"N simulated devices (no model) send random SmolLM2-135M LoRA r=8 q,v deltas ({s['parameters']:,} float32 "
         f"values: {s['update_bytes'] / 1e6:.2f} MB and {s['frames_per_update']} MQTT message(s) per signed update) through "
         f"Mosquitto {m['mosquitto']} ({', '.join(BROKER_CONFIG[1:])}; loopback, no TLS or ACL) to "
         f"`edgetune-aggregator serve` ({', '.join(s.get('strategies', ['fedit']))}; one train round, Ed25519 device "
         f"keys; the updates that arrive together are journaled with one fsync before any of their receipts). {s['connections']} paho connections play the devices: signed hellos "
         "(retained) first, then every update at once when the train task appears. **Aggregator**: N ÷ (first "
         "update published → N-th accepted receipt received). **Ceiling**: the same updates (with a placeholder "
         "run id), chunked the same way, from the same connections through the same broker to a bare paho "
         "subscriber process, N ÷ (first publish → last whole "
         f"update received), median of {s['ceiling_repeats']} runs. **Tuned ceiling**: the same, the subscriber "
         "with glibc's mmap threshold fixed at 32 MiB (`tune_allocator`; without it a bare paho subscriber spends "
         "most of its CPU mapping and faulting in fresh megabyte buffers), alternating with the raw runs. "
         "**Through the merge**: N ÷ (first update "
         "published → the next task, which goes out once the merged global is stored and published). Peak RSS is the daemon's `VmHWM` (the "
         "kernel's high-water mark); growth per device is (peak − RSS when the round opened) ÷ N. Aggregation "
         "is the merge at the round's close (`rounds.json`)."), "",
        *([("With workers, `serve --workers K` starts K worker processes beside the daemon, on the same 2 cores as "
            "the broker and the publishers; every update travels in one piece (`--max-packet`), as Mosquitto's "
            "shared subscription needs (docs/deploy.md), the ceiling's too; peak RSS is the daemon's alone."), ""]
          if workers else []),
        (f"Latest run ({result['date']}; {m['cores']} cores, Python {m['python']}, paho-mqtt {m['paho']}, "
         f"load average {m['load_average_at_start'][0]:.2f} at the start):"), "",
        ("| N | strategy | aggregator updates/s | ceiling updates/s (raw paho) | aggregator ÷ ceiling "
         "| through the merge, updates/s | ÷ ceiling | tuned ceiling updates/s | aggregator ÷ tuned ceiling "
         "| aggregator peak RSS | growth per device | aggregation | MB ingested |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        label = f"{r['n']:,}" + ("" if r["signed"] else " (unsigned)")
        round_rate, round_ratio = r.get("round_updates_per_s"), r.get("round_ratio")
        strategy = r.get("strategy", "fedit") + (f", {r['workers']} worker(s)" if r.get("workers") else "")
        lines.append(f"| {label} | {strategy} | {r['updates_per_s']:,.1f} "
                     f"| {r['ceiling_updates_per_s']:,.1f} | {r['ratio']:.2f} "
                     f"| {'' if round_rate is None else f'{round_rate:,.1f}'} "
                     f"| {'' if round_ratio is None else f'{round_ratio:.2f}'} "
                     f"| {_tuned(r, 'tuned_ceiling_updates_per_s', ',.1f')} | {_tuned(r, 'tuned_ratio', '.2f')} "
                     f"| {r['peak_rss_mib']:,.0f} MiB | {_growth_kib(r):,.0f} KiB | {r['aggregation_s']:.1f} s "
                     f"| {r['n'] * s['update_bytes'] / 1e6:,.0f} |")
    lines += ["", f"Against the roadmap's target, \"{TARGET}\":", "", *verdicts(result["runs"], s["update_bytes"])]
    if result.get("profile"):
        p = result["profile"]
        loop = p["rows"][0]["ms_per_update"]
        lines += ["", (f"Where an update's time goes (a separate run, N = {p['n']}, signed, "
                       f"{p['updates_per_s']:.1f} updates/s: the daemon in-process with timers around its steps; "
                       "wall time, so waiting for the GIL counts):"), "",
                  "| step | ms per update |", "|---|---:|"]
        lines += [f"| {row['what']} | {row['ms_per_update']:.1f} |" for row in p["rows"]]
        lines += ["", (f"One thread does the round loop's work, {loop:.1f} ms per update here: on its own it caps "
                       f"the daemon at about {1e3 / loop:,.0f} updates/s on this machine.")]
    lines += ["", f"Raw numbers, RSS timelines and the machine: `{result.get('out', 'benchmarks/results/aggregator.json')}`.",
              end]
    return "\n".join(lines) + "\n"


def write_docs(section: str, docs: Path) -> None:
    """Replace this benchmark's marked section of ``docs`` (append it if absent), atomically."""
    from edgetune.bench.sections import replace_section

    workers = section.startswith(WORKERS_BEGIN)
    replace_section(docs, section, *((WORKERS_BEGIN, WORKERS_END) if workers else (BEGIN, END)))


# --- main ---------------------------------------------------------------------------------------


def machine() -> dict:
    """What the figures were measured on; the load average says whether it was otherwise idle."""
    import paho.mqtt

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform(),
            "mosquitto": mosquitto_version(), "paho": paho.mqtt.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": os.getloadavg()}


def run_size(n: int, fleet: Fleet, ceiling_updates: dict, args, workdir: Path) -> list[dict]:
    """Ceiling and aggregator runs for one N, on one fresh broker."""
    out = []
    broker = Broker(workdir)
    try:
        ceilings, tuned_ceilings = [], []
        for repeat in range(args.ceiling_repeats):  # (raw paho, and with the allocator tuned)
            ceilings.append(measure_ceiling(broker.port, ceiling_updates, args.connections, args.timeout))
            tuned_ceilings.append(measure_ceiling(broker.port, ceiling_updates, args.connections, args.timeout,
                                                  tuned=True))
            log.info("N=%d ceiling %d: %.1f updates/s (allocator tuned: %.1f)", n, repeat + 1,
                     ceilings[-1]["updates_per_s"], tuned_ceilings[-1]["updates_per_s"])
        ceiling = statistics.median(c["updates_per_s"] for c in ceilings)
        tuned_ceiling = statistics.median(c["updates_per_s"] for c in tuned_ceilings)
        arms = [("signed", fleet, strategy, k) for strategy in args.strategies for k in args.workers]
        arms += [("unsigned", fleet.without_keys(), args.strategies[0], 0)] if args.unsigned else []
        for config, devices, strategy, k in arms:
            directory = workdir / f"{config}-{strategy}-{k}-{n}"
            directory.mkdir()
            result = measure_aggregator(broker.port, devices, args.connections, directory, args.timeout,
                                        strategy=strategy, workers=k, max_packet=args.max_packet)
            ceiling_s = n / ceiling
            result |= {"n": n, "signed": config == "signed", "ceiling_updates_per_s": ceiling, "ceiling_s": ceiling_s,
                       "ratio": result["updates_per_s"] / ceiling, "round_ratio": result["round_updates_per_s"] / ceiling,
                       "ceiling_runs": ceilings, "tuned_ceiling_updates_per_s": tuned_ceiling,
                       "tuned_ratio": result["updates_per_s"] / tuned_ceiling, "tuned_ceiling_runs": tuned_ceilings,
                       "acknowledged_at_ceiling": sum(t <= ceiling_s for t in result["receipt_times"]),
                       "broker_dropped": broker.dropped_lines()}
            log.info("N=%d %s %s, %d workers: %.1f updates/s (%.0f%% of the ceiling), %.1f through the merge (%.0f%%), "
                     "peak RSS %.0f MiB, aggregation %.1f s", n, config, strategy, k, result["updates_per_s"],
                     100 * result["ratio"], result["round_updates_per_s"], 100 * result["round_ratio"],
                     result["peak_rss_mib"], result["aggregation_s"])
            out.append(result)
    finally:
        broker.stop()
    return out


def run_profile(n: int, fleet: Fleet, args, workdir: Path) -> dict:
    broker = Broker(workdir)
    try:
        path = workdir / "stages.json"
        result = measure_aggregator(broker.port, fleet, args.connections, workdir, args.timeout, profile_to=path)
    finally:
        broker.stop()
    return summarize_profile(path, n) | {"updates_per_s": result["updates_per_s"],
                                         "aggregation_s": result["aggregation_s"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sink":
        port, count, frames, timeout = sys.argv[2:6]
        return sink(int(port), int(count), int(frames), float(timeout), tuned=sys.argv[6:7] == ["tuned"])
    if len(sys.argv) > 1 and sys.argv[1] == "--profile-daemon":
        return profile_daemon(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,100,500", help="fleet sizes N, comma-separated")
    parser.add_argument("--connections", type=int, default=4, help="paho connections that play the devices")
    parser.add_argument("--ceiling-repeats", type=int, default=3)
    parser.add_argument("--unsigned", action="store_true", help="also run each N without device keys (first strategy)")
    parser.add_argument("--strategies", type=lambda v: [x for x in v.split(",") if x], default=["fedit"],
                        help="merge strategies to run at each N, comma-separated (the first is the reference)")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",") if x], default=[0],
                        help="worker processes beside the daemon (serve --workers K) to run at each N, comma-separated "
                             "(0: the daemon alone)")
    parser.add_argument("--max-packet", type=int, default=None,
                        help="the devices' packet limit (default 1 MiB: two chunks per update). Mosquitto deals a "
                             "shared subscription's messages one by one, so runs with workers need updates in one piece")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also time the daemon's steps per update (in-process, timers) with N devices")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any phase may take")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--markdown", action="store_true", help=f"write the section into {DOCS.relative_to(ROOT)}")
    parser.add_argument("--render", action="store_true", help="measure nothing: write the section from --out")
    args = parser.parse_args()
    if args.render:
        return write_docs(markdown(json.loads(args.out.read_text())), DOCS)
    sizes = sorted(int(x) for x in args.devices.split(",") if x.strip())
    if not sizes or sizes[0] < 1 or args.connections < 1 or args.ceiling_repeats < 1:
        parser.error("--devices needs sizes ≥ 1; --connections and --ceiling-repeats must be ≥ 1")
    if not Path(MOSQUITTO).exists():
        parser.error(f"{MOSQUITTO} is missing: apt-get install -y mosquitto")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    wall = time.monotonic()
    if os.getloadavg()[0] > 0.5:
        log.warning("load average %.2f: other work on this machine will distort the figures", os.getloadavg()[0])
    largest = max(sizes + [args.profile])
    log.info("making %d devices: keys, hellos, deltas; their updates for the ceiling", largest)
    fleet = make_fleet(largest)
    if any(args.workers) and (args.max_packet or 0) < 4 << 20:
        parser.error("--workers needs --max-packet 4194304 or more: Mosquitto deals a shared subscription's messages "
                     "one by one, so the chunks of one update would reach different workers (docs/deploy.md)")
    ceiling_updates = fleet.first(max(sizes)).updates(max_packet=args.max_packet)
    frames = next(iter(ceiling_updates.values()))
    update_bytes = sum(map(len, frames))
    log.info("ready in %.0f s: %d bytes in %d frames per update", time.monotonic() - wall, update_bytes, len(frames))
    result = {"date": date.today().isoformat(), "argv": sys.argv[1:], "machine": machine(),
              "out": str(args.out.resolve().relative_to(ROOT)) if args.out.resolve().is_relative_to(ROOT) else str(args.out),
              "settings": {"devices": sizes, "connections": args.connections, "ceiling_repeats": args.ceiling_repeats,
                           "parameters": sum(a.size for a in fleet.deltas[fleet.devices[0]].values()),
                           "update_bytes": update_bytes, "frames_per_update": len(frames),
                           "broker_config": list(BROKER_CONFIG), "daemon_env": {"OPENBLAS_NUM_THREADS": "1"},
                           "strategies": args.strategies, "workers": args.workers, "max_packet": args.max_packet,
                           "target": TARGET, "rate_ratio_met": RATE_RATIO_MET, "rss_growth_met": RSS_GROWTH_MET},
              "runs": []}
    root = Path(tempfile.mkdtemp(prefix="edgetune-aggbench-"))
    try:
        for n in sizes:
            workdir = root / f"n{n}"
            workdir.mkdir()
            mine = dict(list(ceiling_updates.items())[:n])
            result["runs"] += run_size(n, fleet.first(n), mine, args, workdir)
        if args.profile:
            workdir = root / "profile"
            workdir.mkdir()
            result["profile"] = run_profile(args.profile, fleet.first(args.profile), args, workdir)
    except BaseException:
        log.error("stopped; the daemon's and broker's logs are kept in %s", root)
        raise
    shutil.rmtree(root, ignore_errors=True)
    result["wall_s"] = time.monotonic() - wall
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    section = markdown(result)
    if args.markdown:
        write_docs(section, DOCS)
    print(section)
    log.info("wrote %s%s; %.0f s in all", args.out, f" and {DOCS.relative_to(ROOT)}" if args.markdown else "",
             result["wall_s"])


if __name__ == "__main__":
    main()
