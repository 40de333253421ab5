"""The user-facing entry points, run as a user runs them: as processes."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
import torch

from edgetune.data import write_demo_data
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
from edgetune.transport import open_transport
from edgetune.wire import LoraSpec, TrainSettings

from helpers.commands import TORCH_FREE, run_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_end_to_end_writes_a_peft_adapter(tmp_path):
    """Two devices, one of them on ONNX Runtime with artifacts downloaded from the aggregator."""
    out = tmp_path / "demo"
    result = run_python("-m", "edgetune", "demo", "--model", "tiny-llama", "--devices", "2", "--rounds", "2",
                        "--steps", "2", "--ort-devices", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("round 1 (train) aggregated", "round 2 (train) aggregated", "round 3 (evaluate) evaluated",
                     "line-1", "line-2", "ppl global->local", "global adapter (PEFT format)",
                     "1 of them with ONNX Runtime", "plan for round 1",
                     "line-1 joined as raspberry-pi-4-4gb-gateway", "line-2 joined as jetson-orin-nano-8gb"):
        assert expected in result.stdout, expected
    # the plan comes before round 1, one row per device with its class, rank, batch and steps
    table = result.stdout.split("plan for round 1", 1)[1].split("round 1 (train)", 1)[0]
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("line-") and "joined" not in line]
    assert [r[:2] for r in rows] == [["line-1", "raspberry-pi-4-4gb-gateway"], ["line-2", "jetson-orin-nano-8gb"]]
    report = out / "report" / "index.html"
    assert f"report: {report}" in result.stdout and report.is_file()
    for device in ("line-1", "line-2"):  # each measured itself once and kept the profile
        assert (out / "devices" / device / "profile.yaml").is_file()
    ort_log = (out / "logs" / "line-2.log").read_text()
    assert "downloaded ONNX Runtime artifacts" in ort_log and "(onnxruntime)" in ort_log
    rounds = json.loads((out / "state" / "rounds.json").read_text())
    assert [r["status"] for r in rounds] == ["aggregated", "aggregated", "evaluated"]
    assert all(d["bytes_sent"] > 0 and d["bytes_received"] > 0 for d in rounds[0]["devices"])
    # the downlink was signed with the demo's fleet key and verified by both devices (the ONNX
    # Runtime one's artifact offer too): nothing from the aggregator was refused
    from edgetune.wire import decode_message

    for device in ("line-1", "line-2"):
        hello = decode_message((out / "state" / "devices" / f"{device}.msgpack").read_bytes())
        assert hello.capabilities.verifies_downlink
        assert "dropped message from aggregator" not in (out / "logs" / f"{device}.log").read_text()

    # the adapter loads with PEFT on a fresh base and changes the model's output
    from peft import PeftModel

    from edgetune.models import load_model

    base = load_model("tiny-llama").model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(out / "state" / "adapter"))
    after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_demo_with_a_soft_prompt_then_personalization(tmp_path):
    """Both scores every round (each device's robustness set is the other's held-out split),
    then `device personalize` on every device, recorded by the aggregator."""
    out = tmp_path / "demo"
    result = run_python("-m", "edgetune", "demo", "--model", "tiny-llama", "--devices", "2", "--rounds", "1",
                        "--steps", "2", "--adapter", "prompt", "--personalize", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in ("round 1 (initialize) initialized", "round 2 (train) aggregated", "others global->local",
                     "personalization (own held-out ppl", "personal adapters (PEFT format)"):
        assert expected in result.stdout, expected
    entries = json.loads((out / "state" / "personalization.json").read_text())
    assert sorted(e["device_id"] for e in entries) == ["line-1", "line-2"]
    assert all(e["personal_robust_ppl"] > 1 and e["personal_ppl"] > 1 for e in entries)
    for device in ("line-1", "line-2"):
        config = json.loads((out / "personal" / device / "adapter_config.json").read_text())
        assert config["peft_type"] == "PROMPT_TUNING"


def test_demo_refuses_to_overwrite_an_earlier_run(tmp_path):
    (tmp_path / "state").mkdir()
    result = run_python("-m", "edgetune", "demo", "--model", "tiny-llama", "--out", str(tmp_path))
    assert result.returncode == 2 and "earlier demo run" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--broker", "http://x:1"], "scheme 'http'"),
        (["--broker", "mqtt://127.0.0.1:1", "--connect-timeout", "2"], "unreachable"),
        (["--broker", "mqtt://127.0.0.1:1", "--model", "/nonexistent/model.gguf"], "not found"),
        (["--broker", "mqtt://127.0.0.1:1", "--data", "/nonexistent.txt"], "file not found"),
        (["--fleet-key", "/nonexistent/fleet.pub"], "cannot read the fleet key"),
    ],
)
def test_device_cli_errors_are_one_line(tmp_path, args, message):
    data = tmp_path / "d.txt"
    data.write_text("one record\nanother record\nand a third\n")
    base = {"--broker": "memory://x", "--fleet": "f", "--device-id": "d", "--data": str(data), "--model": "tiny-llama"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = [item for pair in base.items() for item in pair]
    result = run_python("-m", "edgetune", "device", "run", *argv, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("edgetune: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_aggregator_cli_errors_are_one_line(tmp_path):
    result = run_python("-m", "edgetune_aggregator", "serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f",
                        "--state-dir", str(tmp_path), "--connect-timeout", "2", timeout=60)
    assert result.returncode == 2 and "unreachable" in result.stderr and "Traceback" not in result.stderr
    result = run_python("-m", "edgetune_aggregator", "serve", "--broker", "mqtt://h", "--fleet", "bad/name",
                        "--state-dir", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "fleet name" in result.stderr
    result = run_python("-m", "edgetune_aggregator", "serve", "--broker", "memory://f", "--fleet", "f",
                        "--state-dir", str(tmp_path), "--fleet-key", str(tmp_path / "none.key"), timeout=60)
    assert result.returncode == 2 and "cannot read the fleet key" in result.stderr and "Traceback" not in result.stderr


def test_minimal_app_joins_a_fleet_over_mosquitto(mosquitto_url, tmp_path):
    app = ROOT / "firmware_examples" / "minimal_app" / "app.py"
    assert len(app.read_text().splitlines()) < 40
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=40)
    fleet = f"app-{uuid.uuid4().hex[:6]}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1,
                              round_timeout_s=120, join_timeout_s=120,
                              adapter=LoraSpec(rank=2, target_modules=("q_proj",)),
                              train=TrainSettings(local_steps=1, batch_size=2, seq_len=32))
    aggregator = Aggregator(config, open_transport(mosquitto_url, client_id="agg", connect_timeout=10))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    result = run_python(str(app), mosquitto_url, fleet, "line-1", str(data), "tiny-llama", timeout=180)
    thread.join(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "line-1: global adapter v1" in result.stdout


@pytest.mark.slow
def test_torch_free_app_downloads_artifacts_and_trains_over_mosquitto(mosquitto_url, tmp_path):
    """``Device.join(trainer="ort")`` in an application whose interpreter cannot import torch:
    it downloads the artifacts the aggregator serves, trains a round and gets the global."""
    pytest.importorskip("onnxruntime.training")
    from edgetune.ort.build import build_artifacts

    app = ROOT / "firmware_examples" / "torch_free_app" / "app.py"
    assert len(app.read_text().splitlines()) < 40
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj",))
    build_artifacts("tiny-llama", tmp_path / "artifacts", rank=spec.rank, alpha=spec.alpha, targets=spec.target_modules)
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=40)
    fleet = f"app-{uuid.uuid4().hex[:6]}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1,
                              round_timeout_s=120, join_timeout_s=120, adapter=spec,
                              train=TrainSettings(local_steps=1, batch_size=2, seq_len=32),
                              ort_artifacts=tmp_path / "artifacts")
    aggregator = Aggregator(config, open_transport(mosquitto_url, client_id="agg", connect_timeout=10))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    result = run_python(str(TORCH_FREE), str(app), mosquitto_url, fleet, "gw-1", str(data),
                        str(tmp_path / "device-artifacts"), timeout=180)
    thread.join(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gw-1: global adapter v1" in result.stdout and "trained with ort" in result.stdout
    assert "LOADED-FORBIDDEN:\n" in result.stdout
    assert (tmp_path / "device-artifacts" / "edgetune-ort.json").is_file()
