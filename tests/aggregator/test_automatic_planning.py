"""Planning is the default: ``edgetune device run`` without ``--profile`` measures the machine
on its first start, sends the profile in its hello and trains the plan it gets (a real device
process, real Mosquitto); ``--no-plan`` keeps the uniform behaviour. And the daemon stops
waiting for a device that reports giving its round up."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from edgetune.data import write_demo_data
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import DeviceProfile, ErrorReport, LoraSpec, RoundTask, TaskKind, Topics, TrainSettings
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig

from helpers.fleet import fleet_config, join_device, start_aggregator

ROOT = Path(__file__).resolve().parents[2]


def device_run(url: str, fleet: str, device_id: str, data: Path, state: Path, log: Path, *extra: str):
    return subprocess.run([sys.executable, "-m", "edgetune", "device", "run", "--broker", url, "--fleet", fleet,
                           "--device-id", device_id, "--data", str(data), "--model", "tiny-llama", "--threads", "1",
                           "--state-dir", str(state), "--log-file", str(log), "--connect-timeout", "30", *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def serve_one_round(url: str, tmp_path: Path, fleet: str) -> tuple[Aggregator, threading.Thread]:
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / f"state-{fleet}", rounds=1, min_devices=1,
                              round_timeout_s=120, join_timeout_s=600, evaluate_final=False,
                              adapter=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
                              train=TrainSettings(local_steps=2, batch_size=2, seq_len=32, eval_blocks=2))
    aggregator = Aggregator(config, open_transport(url, client_id=f"agg-{fleet}", connect_timeout=10))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    assert aggregator.ready.wait(30)
    return aggregator, thread


@pytest.mark.slow
def test_device_run_measures_itself_sends_the_profile_and_trains_its_plan(mosquitto_url, tmp_path):
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=40)
    state, log = tmp_path / "device-state", tmp_path / "device.log"
    fleet = f"auto-{uuid.uuid4().hex[:6]}"
    aggregator, thread = serve_one_round(mosquitto_url, tmp_path, fleet)
    result = device_run(mosquitto_url, fleet, "line-1", data, state, log)
    thread.join(120)
    assert result.returncode == 0, result.stderr + log.read_text()
    profile = aggregator.devices["line-1"].profile
    assert profile is not None and profile.source.startswith("measured ")  # measured here, not a file
    assert profile.gflops["float32"] > 0 and profile.memory_bytes > 0
    (train,) = [r for r in aggregator.store.rounds() if r["kind"] == "train"]
    plan = train["plans"]["line-1"]
    assert plan["predicted_peak_bytes"] > 0 and plan["local_steps"] >= 1
    text = log.read_text()
    assert "measuring this machine (first start)" in text
    assert f"the planner's plan: rank {plan['rank']}, {plan['quantization']} base, batch {plan['batch_size']}" in text
    assert (state / "profile.yaml").is_file() and json.loads((state / "machine.json").read_text())["fingerprint"]

    # the second start takes the cached measurement
    fleet2 = f"auto-{uuid.uuid4().hex[:6]}"
    aggregator2, thread2 = serve_one_round(mosquitto_url, tmp_path, fleet2)
    log2 = tmp_path / "device-2.log"
    result = device_run(mosquitto_url, fleet2, "line-1", data, state, log2)
    thread2.join(120)
    assert result.returncode == 0, result.stderr + log2.read_text()
    assert "(cached measurement)" in log2.read_text() and "measuring this machine" not in log2.read_text()
    assert aggregator2.devices["line-1"].profile.gflops == profile.gflops


@pytest.mark.slow
def test_no_plan_keeps_one_configuration_for_all(mosquitto_url, tmp_path):
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=40)
    fleet = f"noplan-{uuid.uuid4().hex[:6]}"
    aggregator, thread = serve_one_round(mosquitto_url, tmp_path, fleet)
    log = tmp_path / "device.log"
    result = device_run(mosquitto_url, fleet, "line-1", data, tmp_path / "s", log, "--no-plan")
    thread.join(120)
    assert result.returncode == 0, result.stderr + log.read_text()
    assert aggregator.devices["line-1"].profile is None
    (train,) = [r for r in aggregator.store.rounds() if r["kind"] == "train"]
    assert train["plans"] == {} and [d["device_id"] for d in train["devices"]] == ["line-1"]
    assert "the fleet's uniform plan: rank 4, float32 base, batch 2, 2 steps" in log.read_text()
    assert not (tmp_path / "s" / "profile.yaml").exists()  # nothing measured


def test_a_device_that_gives_its_round_up_is_not_waited_for(tmp_path):
    """Two devices asked, quorum 1.0: one reports deadline_missed; the round closes as soon as
    the other answered, not at its (long) deadline, and the record says why."""
    fleet = f"decline-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    config = fleet_config(tmp_path, fleet, rounds=1, min_devices=1, quorum=1.0, round_timeout_s=600,
                          evaluate_final=False, start_devices=2)
    aggregator, thread = start_aggregator(url, config)
    quitter = join_device(url, fleet, 1, start=False)  # connected, says hello, does not train
    topics = Topics(fleet)
    tasks = []
    watcher = open_transport(url, client_id="watcher")
    watcher.connect()
    Channel(watcher, topics.sender_of).subscribe(topics.task, lambda t, m: tasks.append(m))
    worker = join_device(url, fleet, 0, start=False)
    deadline = __import__("time").monotonic() + 60
    while not any(isinstance(t, RoundTask) and t.kind is TaskKind.TRAIN for t in tasks):
        assert __import__("time").monotonic() < deadline
        __import__("time").sleep(0.05)
    task = next(t for t in tasks if t.kind is TaskKind.TRAIN)
    quitter.channel.send(topics.error("dev-1"), ErrorReport("dev-1", task.round, "deadline_missed", "too slow"))
    worker.start()
    thread.join(120)
    assert not thread.is_alive()
    (record,) = [r for r in aggregator.store.rounds() if r["kind"] == "train"]
    assert [d["device_id"] for d in record["devices"]] == ["dev-0"]
    assert record["declined"] == {"dev-1": "deadline_missed: too slow"}
    assert record["asked"] == ["dev-0", "dev-1"] and record["duration_s"] < 120
    worker.stop()
    quitter.close()
    watcher.close()


def test_profiles_travel_in_the_hello_with_their_new_fields():
    from edgetune.wire import Capabilities, Hello, decode_message, encode_message
    from edgetune.simulate import TINY

    profile = DeviceProfile("pi", 2 << 30, {"float32": 16.0}, 4, ("int8",), 5.0, "a class", downlink_mbps=50.0)
    hello = Hello("d", "0.1.0", TINY, Capabilities(), 10, profile)
    assert decode_message(encode_message(hello)).profile == profile


@pytest.mark.parametrize("fields, strategy", [
    ({}, "hetlora"),  # planning: mixed ranks, the FedPipe sweep's best (docs/benchmarks.md)
    ({"planning": False}, "fedit"),  # one rank for all: plain FedAvg
    ({"robust": "median"}, "fedit"),  # coordinate-wise combination needs plain factors
    ({"train": TrainSettings(algorithm="fedsgd")}, "fedit"),  # gradients are averaged
], ids=["planning", "no-plan", "robust", "fedsgd"])
def test_strategy_auto_follows_the_benchmark_and_what_the_fleet_needs(tmp_path, fields, strategy):
    config = AggregatorConfig(model_from_first_hello=True, fleet="f", state_dir=tmp_path, adapter=LoraSpec(rank=8), **fields)
    assert config.strategy == "auto" and config.strategy_name == strategy
