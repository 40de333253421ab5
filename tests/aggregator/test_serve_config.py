"""``edgetune-aggregator serve --config FLEET.toml``: the file's keys are AggregatorConfig's
fields (and ``[serve]``, ServeSettings'), flags override it, and the defaults are the
dataclasses' alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgetune.wire import LoraSpec, PromptSpec, TrainSettings
from edgetune_aggregator.cli import build_parser, settings_from_args
from edgetune_aggregator.config import AggregatorConfig
from edgetune_aggregator.canary import RolloutSettings
from edgetune_aggregator.gate import GateSettings
from edgetune_aggregator.influence import InfluenceBounds
from edgetune_aggregator.serve_settings import ServeSettings
from edgetune_aggregator.strategies import DEFAULT_SERVER_OPTIMIZER, ServerOptimizerConfig
from edgetune_aggregator.validation import UpdateLimits

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["--broker", "mqtt://h:1", "--fleet", "f", "--state-dir", "s"]


def settings(*argv: str, config: Path | None = None):
    return settings_from_args(build_parser().parse_args(["serve", *argv, *(["--config", str(config)] if config else [])]))


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_and_no_flags_gives_the_dataclasses_defaults():
    """argparse defines no default: every serve flag's is None, and what is not given is the
    dataclass's own."""
    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    defaults = {a.dest: a.default for a in serve._actions if a.dest != "help"}
    assert defaults and all(value is None for value in defaults.values()), defaults
    config, process = settings(*REQUIRED)
    assert config == AggregatorConfig(fleet="f", state_dir=Path("s"))
    assert process == ServeSettings(broker="mqtt://h:1")
    assert config.server_optimizer == DEFAULT_SERVER_OPTIMIZER


FILE = """
fleet = "plant-7"
state_dir = "/var/lib/edgetune"
rounds = 3
min_devices = 2
round_timeout_s = 90
join_timeout_s = 30.5
seed = 5
planning = false
plan = "uniform"
strategy = "fedit"
layout_candidates = ["q_proj", "v_proj"]
linger_s = "none"
max_global_change = "none"
base_model = "tiny"
robust = "trimmed_mean"
trim = 0.2
quorum = 0.5
max_staleness = 2
model_from_first_hello = true

[adapter]
rank = 4
alpha = 8
target_modules = ["q_proj", "k_proj"]

[train]
local_steps = 3
batch_size = 2
seq_len = 32
learning_rate = 0.01
seed = 5
optimizer = "sgd"
eval_blocks = 2

[server_optimizer]
name = "fedadam"
lr = 0.01

[importance]
batches = 3

[limits]
max_norm = 4.0
norm_action = "reject"

[influence]
sample_ratio = "none"
norm_ratio = 2.0

[serve]
broker = "mqtt://broker:1883"
cluster_nodes = ["mqtt://node-2:1883", "mqtt://node-3:1883"]
connect_timeout_s = 30
metrics_port = 0
log_level = "DEBUG"
"""
FLAGS = ["--broker", "mqtt://broker:1883", "--fleet", "plant-7", "--state-dir", "/var/lib/edgetune", "--rounds", "3",
         "--min-devices", "2", "--round-timeout", "90", "--join-timeout", "30.5", "--seed", "5", "--no-planning",
         "--plan", "uniform", "--strategy", "fedit", "--candidates", "q_proj,v_proj", "--linger", "-1",
         "--max-global-change", "0", "--base-model", "tiny", "--robust", "trimmed_mean", "--trim", "0.2",
         "--quorum", "0.5", "--max-staleness", "2", "--model-from-first-hello", "--rank", "4", "--alpha", "8",
         "--targets", "q_proj,k_proj", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "0.01",
         "--client-optimizer", "sgd", "--eval-blocks", "2", "--server-optimizer", "fedadam", "--server-lr", "0.01",
         "--calibration-batches", "3", "--max-update-norm", "4", "--norm-action", "reject",
         "--max-sample-ratio", "0", "--max-norm-ratio", "2", "--connect-timeout", "30", "--metrics-port", "0",
         "--cluster-node", "mqtt://node-2:1883", "--cluster-node", "mqtt://node-3:1883",
         "--log-level", "DEBUG"]


def test_a_file_gives_the_same_settings_as_the_equivalent_flags(tmp_path):
    from_file = settings(config=write(tmp_path, FILE))
    assert from_file == settings(*FLAGS)
    config, process = from_file
    # the mappings that are not one to one
    assert config.adapter == LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj"))
    assert (config.planning, config.linger_s, config.max_global_change) == (False, None, None)
    assert config.influence == InfluenceBounds(sample_ratio=None, norm_ratio=2.0)
    assert config.server_optimizer == ServerOptimizerConfig("fedadam", lr=0.01, momentum=0.9)  # β per optimizer
    assert (config.seed, config.train.seed) == (5, 5)
    assert config.limits == UpdateLimits(max_norm=4.0, norm_action="reject")
    assert process == ServeSettings(broker="mqtt://broker:1883", connect_timeout_s=30.0, metrics_port=0,
                                    log_level="DEBUG", cluster_nodes=("mqtt://node-2:1883", "mqtt://node-3:1883"))


def test_a_soft_prompt_from_the_file_or_the_flags(tmp_path):
    path = write(tmp_path, '[adapter]\nkind = "prompt"\nnum_virtual_tokens = 7\ninit = "random"\n')
    expected = PromptSpec(7, "random")
    assert settings(*REQUIRED, config=path)[0].adapter == expected
    assert settings(*REQUIRED, "--adapter", "prompt", "--prompt-tokens", "7", "--prompt-init", "random")[0].adapter == expected
    assert settings(*REQUIRED, "--adapter", "prompt")[0].adapter == PromptSpec()


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, 'min_devices = 3\nrounds = 4\n[adapter]\nrank = 4\n[server_optimizer]\nname = "fedadam"\n'
                 '[serve]\nbroker = "mqtt://from-file:1"\nlog_level = "DEBUG"\n')
    config, process = settings("--fleet", "f", "--state-dir", "s", "--min-devices", "2", "--server-optimizer", "fedavg",
                               "--log-level", "WARNING", config=path)
    assert (config.min_devices, config.rounds, config.adapter.rank) == (2, 4, 4)  # the flag, the file, the file
    assert config.server_optimizer == ServerOptimizerConfig("fedavg", momentum=0.0)  # β re-derived for fedavg
    assert (process.broker, process.log_level) == ("mqtt://from-file:1", "WARNING")


def test_a_table_overlays_the_fields_default(tmp_path):
    """[server_optimizer] with only lr keeps the daemon's FedAvgM, not the class's FedAvg."""
    config, _ = settings(*REQUIRED, config=write(tmp_path, "[server_optimizer]\nlr = 0.5\n"))
    assert config.server_optimizer == ServerOptimizerConfig("fedavgm", lr=0.5, momentum=0.5)


def test_the_adapter_flag_replaces_a_file_table_of_the_other_kind(tmp_path, caplog):
    path = write(tmp_path, "[adapter]\nrank = 4\ntarget_modules = [\"q_proj\"]\n")
    with caplog.at_level(logging.WARNING):
        config, _ = settings(*REQUIRED, "--adapter", "prompt", "--prompt-tokens", "5", config=path)
    assert config.adapter == PromptSpec(5)
    assert not caplog.records  # the file's LoRA keys are not "unknown": the flag chose another adapter
    with caplog.at_level(logging.WARNING):
        config, _ = settings(*REQUIRED, "--adapter", "prompt", "--rank", "4")
    assert config.adapter == PromptSpec()  # as before: --rank means nothing to a soft prompt
    assert "--rank: lora adapter settings, ignored for a prompt adapter" in caplog.text


@pytest.mark.parametrize("text, message", [
    ('min_devices = "three"', "fleet.toml: min_devices must be an integer, got 'three'"),
    ("evaluate_final = 1", "fleet.toml: evaluate_final must be true or false, got 1"),
    ("[train]\nlocal_steps = 2.5", "fleet.toml: train.local_steps must be an integer, got 2.5"),
    ('[adapter]\ntarget_modules = "q_proj"', "fleet.toml: adapter.target_modules must be an array, got 'q_proj'"),
    ('[adapter]\nkind = "ia3"', "fleet.toml: adapter.kind must be one of 'lora', 'prompt', got 'ia3'"),
    ('train = 3', "fleet.toml: train must be a table, got 3"),
    ('strategy = "best"', "fleet.toml: strategy 'best' is not one of auto, fedit"),
    ('[train]\noptimizer = "adam"', "fleet.toml: [train]: TrainSettings.optimizer 'adam' is not one of adamw, sgd"),
    ('[limits]\nnorm_action = "drop"', "fleet.toml: [limits]: norm_action 'drop' is not one of clip, reject"),
    ('[serve]\nlog_level = "LOUD"', "fleet.toml: [serve]: log_level 'LOUD' is not one of DEBUG, INFO"),
    ("min_devices = 0", "fleet.toml: min_devices must be ≥ 1, got 0"),
    ('strategy = "svd"\nrobust = "median"', "fleet.toml: robust aggregation combines deltas coordinate-wise"),
])
def test_a_wrong_value_names_the_file_and_the_field(tmp_path, text, message):
    with pytest.raises(ValueError) as error:
        settings(*REQUIRED, config=write(tmp_path, text))
    assert str(error.value).startswith(str(tmp_path / message)), str(error.value)


def test_a_failed_check_from_flags_alone_keeps_the_dataclasss_message():
    with pytest.raises(ValueError) as error:
        settings(*REQUIRED, "--min-devices", "0")
    assert str(error.value) == "min_devices must be ≥ 1, got 0"


def test_an_unknown_key_is_warned_about_and_ignored(tmp_path, caplog):
    path = write(tmp_path, "shiny = true\nrounds = 2\n[train]\nwarmup_steps = 5\nlocal_steps = 3\n[serve]\nbroker = \"b\"\nmtu = 9000\n")
    with caplog.at_level(logging.WARNING):
        config, process = settings("--fleet", "f", "--state-dir", "s", config=path)
    assert config == AggregatorConfig(fleet="f", state_dir=Path("s"), rounds=2, train=TrainSettings(local_steps=3))
    assert process == ServeSettings(broker="b")
    for expected in (f"unknown key 'shiny' in {path} (from a newer edgetune?): ignored",
                     f"unknown key 'warmup_steps' in [train] of {path} (from a newer edgetune?): ignored",
                     f"unknown key 'mtu' in [serve] of {path} (from a newer edgetune?): ignored"):
        assert expected in caplog.text


def test_broker_fleet_and_state_dir_are_required_from_either_place(tmp_path):
    with pytest.raises(ValueError) as error:
        settings("--fleet", "f")
    assert str(error.value) == ("--broker and --state-dir are required: give them as flags, or in the --config file "
                                "([serve] broker, state_dir)")
    path = write(tmp_path, 'fleet = "f"\nstate_dir = "state"\n[serve]\nbroker = "mqtt://b:1"\n')
    config, process = settings(config=path)
    assert (config.fleet, config.state_dir, process.broker) == ("f", tmp_path / "state", "mqtt://b:1")


def test_file_paths_are_relative_to_the_file_and_the_manifest_is_read(tmp_path):
    from edgetune.wire.manifest_file import write_manifest
    from edgetune_aggregator.fleet_model import default_manifest

    (tmp_path / "conf").mkdir()
    write_manifest(tmp_path / "conf" / "model.json", default_manifest())
    path = write(tmp_path / "conf", 'admit = ["line-1", "line-2"]\ndevice_keys = "keys.json"\n'
                 '[serve]\nmodel_manifest = "model.json"\n')
    config, _ = settings(*REQUIRED, config=path)
    assert config.device_keys == tmp_path / "conf" / "keys.json"
    assert config.admit == frozenset({"line-1", "line-2"})
    assert config.model == default_manifest()
    assert settings(*REQUIRED, "--state-dir", "rel", config=path)[0].state_dir == Path("rel")  # a flag's: as given


def test_the_example_file_parses_without_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        config, process = settings(config=REPO / "docs" / "config" / "aggregator.toml")
    assert not caplog.records, caplog.text
    assert (config.fleet, config.rounds, config.min_devices, config.adapter.rank) == ("plant-7", 10, 3, 8)
    assert process.broker.startswith("mqtt://") and process.metrics_port == 9100


def _doc_tables() -> dict[str, dict[str, str]]:
    """docs/configuration.md's key tables: {dataclass named in the heading: {key: default cell}}."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        if line.startswith("#"):
            named = re.findall(r"\(`(\w+)`", line)
            current = tables.setdefault(named[0], {}) if named else None
        elif current is not None and (row := re.match(r"\| `(\w+)` \|([^|]*)\|", line)):
            current[row[1]] = row[2].strip()
    return tables


def test_the_configuration_doc_lists_every_key_with_its_default():
    """Every field of every settings dataclass has a row, and a default in backticks is the
    dataclass's (read back as TOML)."""
    import tomllib

    from edgetune.personalize import PersonalizeSettings
    from edgetune.policy import PolicySettings
    from edgetune.run_config import DeviceRunSettings
    from edgetune.wire import ImportanceSettings
    from edgetune_aggregator.strategies import ServerOptimizerConfig

    defaults = AggregatorConfig(fleet="f", state_dir=Path("s"))
    owners = {AggregatorConfig: None, LoraSpec: defaults.adapter, PromptSpec: PromptSpec(), TrainSettings: defaults.train,
              ServerOptimizerConfig: defaults.server_optimizer, ImportanceSettings: defaults.importance,
              UpdateLimits: defaults.limits, InfluenceBounds: defaults.influence, ServeSettings: None,
              GateSettings: defaults.gate, RolloutSettings: defaults.rollout, PolicySettings: PolicySettings(),
              DeviceRunSettings: None, PersonalizeSettings: PersonalizeSettings()}
    tables = _doc_tables()
    checked = 0
    for cls, instance in owners.items():
        rows = tables.get(cls.__name__, {})
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in rows and not (cls is PromptSpec and f.name == "kind")]
        assert not missing, f"docs/configuration.md: no row for {cls.__name__}'s {missing}"
        for f in dataclasses.fields(cls):
            cell = rows.get(f.name)
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            assert (cell == "required") == (not has_default), (cls.__name__, f.name, cell)
            if cell is None or not (cell.startswith("`") and cell.endswith("`")):
                continue
            value = getattr(instance, f.name) if instance is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            written = tomllib.loads(f"v = {cell.strip('`')}")["v"]
            expected = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
            assert (None if written == "none" else written) == expected, (cls.__name__, f.name, cell, value)
            checked += 1
    assert checked > 80


def test_cli_errors_from_a_file_are_one_line(tmp_path):
    path = write(tmp_path, 'fleet = "f"\nstate_dir = "s"\nround_timeout_s = "long"\n[serve]\nbroker = "mqtt://b:1"\n')
    result = subprocess.run([sys.executable, "-m", "edgetune_aggregator", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"edgetune-aggregator: error: {path}: round_timeout_s must be a number, got 'long'"


@pytest.mark.slow
def test_serve_and_device_run_from_config_files_finish_a_round_over_mosquitto(mosquitto_url, tmp_path):
    """The real commands, each with a --config file (and one flag over it), over Mosquitto."""
    from edgetune.data import write_demo_data

    fleet = f"conf-{uuid.uuid4().hex[:6]}"
    (tmp_path / "data").mkdir()
    write_demo_data(tmp_path / "data", 1, n_records=40)
    (data,) = sorted((tmp_path / "data").iterdir())
    aggregator_toml = write(tmp_path, f"""
fleet = "{fleet}"
state_dir = "state"                 # relative: next to this file
rounds = 1
evaluate_final = false
round_timeout_s = 120
join_timeout_s = 120
planning = false
model_from_first_hello = true
from_a_newer_version = 1
[adapter]
rank = 2
target_modules = ["q_proj"]
[train]
local_steps = 2
batch_size = 2
seq_len = 32
eval_blocks = 1
[serve]
broker = "mqtt://127.0.0.1:1"       # unreachable: the --broker flag overrides it
connect_timeout_s = 30
""", "aggregator.toml")
    device_toml = write(tmp_path, f"""
broker = "{mosquitto_url}"
fleet = "{fleet}"
device_id = "line-1"
data = "data/{data.name}"
model = "tiny-llama"
threads = 1
plan = false
connect_timeout_s = 30
state_dir = "device-state"
log_file = "device.log"
""", "device.toml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "aggregator")])}
    daemon_log, device_out = tmp_path / "daemon.out", tmp_path / "device.out"
    with daemon_log.open("wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "edgetune_aggregator", "serve", "--config",
                                   str(aggregator_toml), "--broker", mosquitto_url], stdout=out,
                                  stderr=subprocess.STDOUT, env=env)
    with device_out.open("wb") as out:
        device = subprocess.Popen([sys.executable, "-m", "edgetune", "device", "run", "--config", str(device_toml)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:  # until both finish, or one of them fails
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and None in (daemon.poll(), device.poll()):
            if daemon.poll() or device.poll():
                break
            time.sleep(0.2)
    finally:
        for process in (daemon, device):
            if process.poll() is None:
                process.kill()
                process.wait()
    daemon_output = daemon_log.read_text()
    device_log = (tmp_path / "device.log").read_text() if (tmp_path / "device.log").exists() else ""
    assert (daemon.returncode, device.returncode) == (0, 0), (f"daemon:\n{daemon_output}\ndevice:\n"
                                                               f"{device_out.read_text()}{device_log}")
    assert "unknown key 'from_a_newer_version'" in daemon_output
    rounds = json.loads((tmp_path / "state" / "rounds.json").read_text())
    assert [(r["kind"], r["status"]) for r in rounds] == [("train", "aggregated")]
    assert [d["device_id"] for d in rounds[0]["devices"]] == ["line-1"]
    assert "line-1" in device_log  # it logged where its file said
