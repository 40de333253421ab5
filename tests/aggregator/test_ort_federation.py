"""A fleet of one PyTorch device and one ONNX Runtime device over Mosquitto.

The ONNX Runtime device runs the real command line in a subprocess in which torch,
transformers and PEFT cannot be imported (``tests/helpers/torch_free.py``); it downloads the artifacts
``build_artifacts`` made for the tiny Llama from the aggregator (``--ort-artifacts``), in
chunks over the broker, and trains them. The test recomputes each global adapter from the
updates seen on the broker (``check_rounds``), so both devices' updates were merged as
equals, and checks that the two kinds of update look the same on the wire.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training")

from edgetune.data import generate_device_texts  # noqa: E402
from edgetune.ort.build import build_artifacts  # noqa: E402
from edgetune.wire import Update  # noqa: E402

from helpers.fleet import SPEC, Observer, fleet_config, join_device, start_aggregator  # noqa: E402
from helpers.commands import TORCH_FREE  # noqa: E402
from helpers.merges import check_rounds  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def start_torch_free_device(url: str, fleet: str, device_id: str, data: Path, artifacts: Path, log: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "aggregator")])}
    command = [sys.executable, str(TORCH_FREE), "device", "run", "--broker", url,
               "--fleet", fleet, "--device-id", device_id, "--data", str(data), "--trainer", "auto",
               "--artifacts", str(artifacts), "--threads", "1", "--heldout", "0.25", "--connect-timeout", "30",
               "--log-file", str(log)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_mixed_fleet(url: str, config, data: Path, artifacts: Path, observer: Observer, tmp_path: Path):
    """The daemon, the torch-free device ``ort-1`` (a subprocess) and the torch device ``dev-0``,
    until the fleet finishes: (aggregator, torch device, process, the process's output)."""
    aggregator, thread = start_aggregator(url, config)
    process = start_torch_free_device(url, config.fleet, "ort-1", data, artifacts, tmp_path / "ort-1.log")
    try:
        torch_device = join_device(url, config.fleet, 0)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the aggregator did not finish its rounds"
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        observer.close()
    return aggregator, torch_device, process, output


@pytest.mark.slow
def test_torch_and_torch_free_devices_federate_over_mosquitto(mosquitto_url, tmp_path):
    fleet = f"ort-{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path / "artifacts"
    build_artifacts("tiny-llama", artifacts, rank=SPEC.rank, alpha=SPEC.alpha, targets=SPEC.target_modules)
    data = tmp_path / "ort-device.txt"
    data.write_text("\n".join(generate_device_texts(1, 40)) + "\n")

    observer = Observer(mosquitto_url, fleet)
    # svd: after round 1 the global has more components than a device trains, so in round 2
    # both devices must also apply a frozen merged delta
    # a small packet limit makes the download take many chunks
    config = fleet_config(tmp_path, fleet, min_devices=2, strategy="svd", ort_artifacts=artifacts,
                          max_packet=64 * 1024)
    downloaded = tmp_path / "device" / "artifacts"  # absent: the device asks the aggregator
    aggregator, torch_device, process, output = run_mixed_fleet(mosquitto_url, config, data, downloaded, observer,
                                                                tmp_path)
    device_log = (tmp_path / "ort-1.log").read_text()
    assert process.returncode == 0, output + device_log
    assert "LOADED-FORBIDDEN:\n" in output, output  # torch and transformers were never imported
    assert "onnxruntime" in device_log and "downloaded ONNX Runtime artifacts" in device_log
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(p.name for p in artifacts.iterdir())
    assert all((downloaded / p.name).read_bytes() == p.read_bytes() for p in artifacts.iterdir())
    assert aggregator.artifacts.requests > sum(p.stat().st_size for p in artifacts.iterdir()) // (64 * 1024)

    hello = aggregator.devices["ort-1"]
    assert hello.capabilities.backends == ("ort",) and hello.capabilities.max_rank == SPEC.rank
    assert aggregator.devices["dev-0"].capabilities.backends == ("torch",)
    check_rounds(aggregator.store, observer, rounds=2, devices=2, strategy="svd")
    assert observer.globals[1].merged, "round 2 started from a global with a frozen merged delta"
    for round_number in (1, 2):
        updates = {u.device_id: u for u in observer.updates[round_number]}
        torch_update, ort_update = updates["dev-0"], updates["ort-1"]
        assert type(torch_update) is type(ort_update) is Update
        assert {n: (a.dtype, a.shape) for n, a in torch_update.delta.items()} == \
               {n: (a.dtype, a.shape) for n, a in ort_update.delta.items()}
        assert all(np.isfinite(a).all() and np.abs(a).max() > 0 for a in ort_update.delta.values())
        assert ort_update.metrics.train_tokens > 0 and ort_update.metrics.local_ppl > 1
    assert not aggregator.drops
    torch_device.stop()


@pytest.mark.slow
def test_a_torch_free_device_trains_a_soft_prompt_with_a_torch_device(mosquitto_url, tmp_path):
    """``build-ort --prompt-tokens``: both devices compute the same starting prompt (the ONNX
    Runtime one from its checkpoint), and their prompt updates are averaged as equals."""
    from edgetune.adapters.prompt import PROMPT
    from edgetune.wire import PromptSpec, TrainSettings

    spec = PromptSpec(num_virtual_tokens=4, init="text", init_text="Note:")
    fleet = f"ort-prompt-{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path / "artifacts"
    build_artifacts("tiny-llama", artifacts, prompt_tokens=spec.num_virtual_tokens)
    data = tmp_path / "ort-device.txt"
    data.write_text("\n".join(generate_device_texts(1, 40)) + "\n")
    observer = Observer(mosquitto_url, fleet)
    config = fleet_config(tmp_path, fleet, min_devices=2, adapter=spec, ort_artifacts=artifacts,
                          train=TrainSettings(local_steps=2, batch_size=2, seq_len=32, learning_rate=3e-2))
    aggregator, torch_device, process, output = run_mixed_fleet(mosquitto_url, config, data,
                                                                tmp_path / "device" / "artifacts", observer, tmp_path)
    assert process.returncode == 0, output + (tmp_path / "ort-1.log").read_text()
    assert "LOADED-FORBIDDEN:\n" in output, output
    assert aggregator.devices["ort-1"].capabilities.adapters == ("prompt",)
    rounds = aggregator.store.rounds()
    assert rounds[0]["kind"] == "initialize" and len(rounds[0]["devices"]) == 2  # the two starts agreed
    for r in (1, 2):
        updates = {u.device_id: u for u in observer.updates[r + 1]}
        assert set(updates) == {"dev-0", "ort-1"}
        previous, merged = aggregator.store.load_global(r - 1), aggregator.store.load_global(r)
        total = sum(u.num_samples for u in updates.values())
        expected = previous.tensors[PROMPT] + sum(u.num_samples / total * u.delta[PROMPT] for u in updates.values())
        if r >= 2:  # the default FedAvgM adds β × the previous round's step
            beta = config.server_optimizer.momentum
            expected = expected + beta * (previous.tensors[PROMPT].astype(np.float64)
                                          - aggregator.store.load_global(r - 2).tensors[PROMPT])
        np.testing.assert_allclose(merged.tensors[PROMPT], expected, rtol=1e-5, atol=1e-7)
        assert np.abs(updates["ort-1"].delta[PROMPT]).max() > 0
    assert not aggregator.drops
    torch_device.stop()
