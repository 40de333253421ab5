"""Smoke tests of firmware_examples/: each example's files checked by the tool that reads them
(systemd, the device's own settings loader) and run against Mosquitto and an aggregator where
it is an application. (The minimal and torch-free apps run in tests/sdk/test_demo_and_app.py.)"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import threading
import tomllib
import uuid
from pathlib import Path

import pytest

from edgetune.config_file import SettingsFile
from edgetune.data import write_demo_data
from edgetune.policy import policy_from_settings
from edgetune.run_config import DeviceRunSettings
from edgetune.transport import open_transport
from edgetune.wire import LoraSpec, TrainSettings
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig

from helpers.commands import REPO, run_python

EXAMPLES = REPO / "firmware_examples"
GATEWAY = EXAMPLES / "gateway_service"


def test_every_example_has_a_readme_naming_its_smoke_test():
    for example in sorted(p for p in EXAMPLES.iterdir() if p.is_dir()):
        readme = (example / "README.md").read_text()
        assert "Smoke test" in readme and "tests/" in readme, example.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_service_unit_passes_systemd_analyze(tmp_path):
    unit = (GATEWAY / "edgetune-device.service").read_text()
    assert "ExecStart=/opt/edgetune/venv/bin/edgetune device run --config /etc/edgetune/device.toml --stay" in unit
    # (verify checks that ExecStart's program exists: the repository's own edgetune stands in)
    edgetune = REPO / ".venv" / "bin" / "edgetune"
    if not edgetune.exists():
        pytest.skip("no .venv/bin/edgetune to stand in for the installed one")
    (tmp_path / "edgetune-device.service").write_text(unit.replace("/opt/edgetune/venv/bin/edgetune", str(edgetune)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "edgetune-device.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_gateway_config_is_what_the_device_reads():
    settings = SettingsFile(GATEWAY / "device.toml").build(DeviceRunSettings)
    assert settings.fleet_key == Path("/etc/edgetune/fleet.pub") and settings.labels == {"site": "plant-7", "class": "pi4"}
    assert (settings.policy.window, settings.policy.idle_cpu, settings.policy.mains_only) == ("22:00-06:00", 0.5, True)
    assert policy_from_settings(settings.policy) is not None
    # the log the service writes is the one logrotate rotates, in the directory systemd makes
    rotated = re.search(r"^(/\S+)\s*\{", (GATEWAY / "logrotate.conf").read_text(), re.M)[1]
    assert Path(rotated).parent == settings.log_file.parent == Path("/var/log/edgetune")
    assert "LogsDirectory=edgetune" in (GATEWAY / "edgetune-device.service").read_text()
    assert "copytruncate" in (GATEWAY / "logrotate.conf").read_text()


def _fleet(mosquitto_url: str, tmp_path: Path) -> tuple[str, Aggregator, threading.Thread]:
    fleet = f"fw-{uuid.uuid4().hex[:6]}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=1,
                              min_devices=1, round_timeout_s=120, join_timeout_s=120,
                              adapter=LoraSpec(rank=2, target_modules=("q_proj",)),
                              train=TrainSettings(local_steps=2, batch_size=2, seq_len=32))
    aggregator = Aggregator(config, open_transport(mosquitto_url, client_id=f"agg-{fleet}", connect_timeout=10))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    assert aggregator.ready.wait(30)
    return fleet, aggregator, thread


def test_the_gateway_config_runs_a_round_over_mosquitto(mosquitto_url, tmp_path):
    """``edgetune device run --config`` on a copy of device.toml: broker, files and TLS swapped
    for this test's, the policy (a window around now, idle CPU, mains) kept."""
    fleet, aggregator, thread = _fleet(mosquitto_url, tmp_path)
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=40)
    raw = tomllib.loads((GATEWAY / "device.toml").read_text())
    now = dt.datetime.now()
    window = f"{(now - dt.timedelta(hours=1)):%H:%M}-{(now + dt.timedelta(hours=1)):%H:%M}"
    lines = [f'broker = "{mosquitto_url}"', f'fleet = "{fleet}"', f'device_id = "{raw["device_id"]}"',
             f'data = "{data}"', 'model = "tiny-llama"', f'state_dir = "{tmp_path / "device-state"}"',
             f'log_file = "{tmp_path / "device.log"}"', "plan = false", "", "[labels]",
             *(f'{k} = "{v}"' for k, v in raw["labels"].items()), "", "[policy]", f'window = "{window}"',
             *(f"{k} = {str(v).lower()}" for k, v in raw["policy"].items() if k != "window")]
    config = tmp_path / "device.toml"
    config.write_text("\n".join(lines) + "\n")
    result = run_python("-m", "edgetune", "device", "run", "--config", str(config), timeout=300)
    thread.join(timeout=60)
    log = (tmp_path / "device.log").read_text()
    assert result.returncode == 0, result.stderr + log[-3000:]
    assert aggregator.finished.is_set() and aggregator.state.global_version == 1
    assert aggregator.devices[raw["device_id"]].labels == raw["labels"]
    assert "sent its train answer for round 1" in log


def test_the_inference_app_answers_with_its_own_adapter_over_mosquitto(mosquitto_url, tmp_path):
    app = EXAMPLES / "inference_app" / "app.py"
    assert len(app.read_text().splitlines()) < 40
    fleet, aggregator, thread = _fleet(mosquitto_url, tmp_path)
    (data,) = write_demo_data(tmp_path / "data", 1, n_records=60)
    result = subprocess.run([_python(), str(app), mosquitto_url, fleet, "line-3", str(data), "tiny-llama"],
                            input="The conveyor on line 3\nA second question\n", capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    thread.join(timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [line for line in result.stdout.splitlines() if "->" in line]
    assert len(answers) == 2 and all(line.startswith(("[personal]", "[global]")) for line in answers)
    # what it served is what personalization decided: the personal adapter unless it did worse
    served_personal = "does worse than global" not in result.stderr
    assert all(line.startswith("[personal]" if served_personal else "[global]") for line in answers)


def test_the_torch_free_image_installs_the_ort_trainer_and_no_torch():
    folder = EXAMPLES / "torch_free_app"
    requirements = [line.split("#")[0].strip() for line in (folder / "requirements.txt").read_text().splitlines()]
    requirements = [r for r in requirements if r]
    assert requirements == ["edgetune[ort]==0.3.0"]
    import edgetune

    assert requirements[0].endswith(edgetune.__version__)  # (the image pins the SDK this repository is)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert not any(re.match(r"(torch|transformers|peft)\b", d) for d in pyproject["project"]["optional-dependencies"]["ort"])
    dockerfile = (folder / "Dockerfile").read_text()
    copied = re.search(r"^COPY requirements.txt (.+) \./$", dockerfile, re.M)[1].split()
    assert all((folder / name).is_file() for name in copied)
    assert 'ENTRYPOINT ["python", "app.py"]' in dockerfile and "find_spec('torch') is None" in dockerfile


def _python() -> str:
    import sys

    return sys.executable
