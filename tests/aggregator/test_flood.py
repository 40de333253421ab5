"""A flood on the update topics against ``edgetune-aggregator serve`` with its default flags
(an open fleet, pinned to the default model), over Mosquitto: the daemon's peak RSS stays
under the ceiling docs/security.md documents, and it still runs the round afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from edgetune.transport import open_transport
from edgetune.wire import Capabilities, Hello, Presence, Topics, Update, encode_message, split_payload
from edgetune.wire import TrainMetrics
from edgetune_aggregator.fleet_model import default_manifest

from helpers.waiting import wait_for

_REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
INBOX, REASSEMBLY = 16 * MiB, 32 * MiB  # the defaults (AggregatorConfig.inbox_bytes, reassembly_bytes)
#: docs/security.md: peak RSS ≤ RSS with the round open + inbox + reassembly + this
SLACK = 96 * MiB


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_a_flood_on_the_update_topics_stays_under_the_documented_rss_ceiling(mosquitto_url, tmp_path):
    fleet = f"flood-{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO / "sdk"), str(_REPO / "aggregator")])}
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "edgetune_aggregator.cli", "serve", "--broker", mosquitto_url,
                               "--fleet", fleet, "--state-dir", str(tmp_path / "state"), "--rounds", "1",
                               "--round-timeout", "120", "--connect-timeout", "30", "--no-planning"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    flooders = [open_transport(mosquitto_url, client_id=f"flood-{i}-{uuid.uuid4().hex[:4]}", connect_timeout=10)
                for i in range(4)]
    try:
        for t in flooders:
            t.connect()
        # 100 devices say hello (anyone may, in an open fleet): what they send next gets decoded
        model = default_manifest()
        fakes = [f"fake-{i:03d}" for i in range(100)]
        for device in fakes:
            flooders[0].publish(topics.hello(device), encode_message(Hello(device, "x", model, Capabilities(), 10)),
                                retain=True)
            flooders[0].publish(topics.presence(device), encode_message(Presence(device, True)), retain=True)
        flooders[0].flush()
        assert wait_for(lambda: (tmp_path / "state" / "state.json").exists(), 60), (tmp_path / "daemon.log").read_text()
        time.sleep(2.0)
        opened = _status(daemon.pid, "VmRSS")

        rng = np.random.default_rng(0)
        blob = rng.bytes(3 * MiB // 2)  # a transfer within the update limit (~1.85 MB)
        update = Update(fakes[0], 1, 0, 10, {"x": np.zeros(250_000, np.float32)}, TrainMetrics(1.0, 0, 0.0, 1.0, 1.0),
                        "not-this-run")
        whole = encode_message(update)  # ~1 MB, decodes, then refused (wrong run)
        for i in range(3):  # three waves of everything at once
            for n, device in enumerate(fakes):
                t = flooders[n % len(flooders)]
                topic = topics.update(device)
                for k in range(4):  # the first chunk of 4 transfers each, never finished
                    first = split_payload(rng.bytes(8) + blob, 1 * MiB)[0]
                    t.publish(topic, first)
                t.publish(topic, whole)
                t.publish(topic, b"\x92" + blob[: MiB])  # not msgpack of anything
                t.publish(topics.update(f"stranger-{i}-{n}"), whole)  # never said hello
            for t in flooders:
                t.flush()
        time.sleep(5.0)  # what the broker still queues drains
        peak = _status(daemon.pid, "VmHWM")
        ceiling = opened + INBOX + REASSEMBLY + SLACK
        print(f"RSS with the round open {opened / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, "
              f"ceiling {ceiling / MiB:.0f} MiB")
        assert peak <= ceiling, (opened / MiB, peak / MiB)
        assert daemon.poll() is None  # still serving
    finally:
        for t in flooders:
            t.close()
        daemon.terminate()
        daemon.wait(30)
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert "unknown_device" in text
    drops = [line for line in text.splitlines() if "dropped message from" in line]
    assert len(drops) <= 4 * 50, len(drops)  # counted, not written out one by one: ≤ 50 a reason a minute
