"""The settings-file loader (``edgetune.config_file``) and ``edgetune device run|personalize
--config``: types checked by the dataclasses' hints, errors naming the file and the field,
unknown keys warned about, flags over the file over the defaults."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgetune.cli import build_parser, device_settings
from edgetune.config_file import SettingsFile, default_of, flags_given
from edgetune.personalize import PersonalizeSettings
from edgetune.run_config import DeviceRunSettings
from edgetune.wire import AdapterSpec, LoraSpec, PromptSpec

REPO = Path(__file__).resolve().parents[2]
MOMENTUM = {"plain": 0.0, "heavy": 0.5}


@dataclass(frozen=True)
class Step:
    steps: int = 10
    rate: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")


@dataclass(frozen=True)
class Optimizer:
    """``momentum`` None: derived from ``name`` (as the server optimizer's is)."""

    name: str = "plain"
    lr: float = 1.0
    momentum: float | None = None

    def __post_init__(self) -> None:
        if self.momentum is None:
            object.__setattr__(self, "momentum", MOMENTUM[self.name])


@dataclass(frozen=True)
class Settings:
    name: str
    out: Path | None = None
    step: Step = field(default_factory=Step)
    optimizer: Optimizer = Optimizer("heavy")
    tags: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)
    ids: frozenset[str] | None = None
    on: bool = True
    limit: float | None = 2.0
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    adapter: AdapterSpec = field(default_factory=LoraSpec)


def load(tmp_path: Path, text: str, flags: dict | None = None) -> Settings:
    path = tmp_path / "f.toml"
    path.write_text(text)
    source = SettingsFile(path)
    source.override(flags or {})
    return source.build(Settings)


def test_every_kind_of_field_is_read_from_its_toml_form(tmp_path):
    got = load(tmp_path, """
name = "x"
out = "sub/out"
tags = ["a", "b"]
pair = [3, 4]
ids = ["d1", "d2", "d1"]
on = false
limit = "none"
[step]
steps = 3
rate = 1          # an integer is a fine float
[sizes]
"layers.0.q" = [4, 8]
[adapter]
kind = "prompt"
num_virtual_tokens = 5
""")
    assert got == Settings(name="x", out=tmp_path / "sub" / "out", step=Step(3, 1.0), tags=("a", "b"), pair=(3, 4.0),
                           ids=frozenset({"d1", "d2"}), on=False, limit=None, sizes={"layers.0.q": (4, 8)},
                           adapter=PromptSpec(5))
    assert type(got.step.rate) is float and type(got.pair[1]) is float
    assert load(tmp_path, 'name = "x"\nout = "~/o"\n').out == Path.home() / "o"
    assert load(tmp_path, 'name = "x"\nout = "/abs"\n').out == Path("/abs")


def test_leaving_everything_out_gives_the_defaults(tmp_path):
    assert load(tmp_path, 'name = "x"\n') == Settings(name="x")


def test_a_union_table_without_kind_is_of_the_defaults_kind(tmp_path):
    assert load(tmp_path, 'name = "x"\n[adapter]\nrank = 4\n').adapter == LoraSpec(rank=4)


def test_a_table_overlays_the_fields_default_and_derived_fields_derive_again(tmp_path):
    assert load(tmp_path, 'name = "x"\n[optimizer]\nlr = 0.5\n').optimizer == Optimizer("heavy", 0.5, 0.5)
    assert load(tmp_path, 'name = "x"\n[optimizer]\nname = "plain"\n').optimizer == Optimizer("plain", 1.0, 0.0)
    assert load(tmp_path, 'name = "x"\n[optimizer]\nmomentum = 0.9\n').optimizer == Optimizer("heavy", 1.0, 0.9)


@pytest.mark.parametrize("text, message", [
    ('name = 3', "name must be a string, got 3"),
    ('name = "x"\non = 1', "on must be true or false, got 1"),
    ('name = "x"\n[step]\nsteps = "ten"', "step.steps must be an integer, got 'ten'"),
    ('name = "x"\n[step]\nsteps = true', "step.steps must be an integer, got True"),
    ('name = "x"\n[step]\nrate = "fast"', "step.rate must be a number, got 'fast'"),
    ('name = "x"\nstep = 3', "step must be a table, got 3"),
    ('name = "x"\ntags = "a"', "tags must be an array, got 'a'"),
    ('name = "x"\ntags = ["a", 2]', "tags[1] must be a string, got 2"),
    ('name = "x"\npair = [1]', "pair must have 2 items, got 1"),
    ('name = "x"\nout = 5', "out must be a path (a string), got 5"),
    ('name = "x"\n[sizes]\nq = [1, "b"]', "sizes.q[1] must be an integer, got 'b'"),
    ('name = "x"\n[adapter]\nkind = "ia3"', "adapter.kind must be one of 'lora', 'prompt', got 'ia3'"),
    ('name = "x"\n[step]\nsteps = 0', "[step]: steps must be ≥ 1, got 0"),
    ('name = "x"\n[adapter]\nrank = 0', "[adapter]: LoraSpec.rank must be in 1..1024, got 0"),
    ('on = true', "name is required"),
])
def test_a_wrong_value_is_an_error_naming_the_file_and_the_field(tmp_path, text, message):
    with pytest.raises(ValueError) as error:
        load(tmp_path, text)
    assert str(error.value) == f"{tmp_path / 'f.toml'}: {message}"


def test_unreadable_and_malformed_files_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"missing.toml: cannot read the config file"):
        SettingsFile(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ValueError, match=r"bad.toml: not valid TOML"):
        SettingsFile(tmp_path / "bad.toml")


def test_unknown_keys_are_warned_about_and_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="edgetune.config_file"):
        got = load(tmp_path, 'name = "x"\nfoo = 1\n[step]\nsteps = 2\nwarmup = 3\n')
    assert got == Settings(name="x", step=Step(2))
    path = tmp_path / "f.toml"
    assert [r.getMessage() for r in caplog.records] == [
        f"unknown key 'foo' in {path} (from a newer edgetune?): ignored",
        f"unknown key 'warmup' in [step] of {path} (from a newer edgetune?): ignored"]


def test_flags_override_the_file(tmp_path):
    got = load(tmp_path, 'name = "x"\n[step]\nsteps = 3\nrate = 0.5\n', {"step.steps": 7, "limit": None, "out": Path("rel")})
    assert (got.step, got.limit, got.out) == (Step(7, 0.5), None, Path("rel"))  # a flag's path: as given
    with pytest.raises(ValueError, match=r"f.toml: \[step\]: steps must be ≥ 1, got 0"):
        load(tmp_path, 'name = "x"\n', {"step.steps": 0})
    source = SettingsFile()  # no file: flags alone, and the dataclass's own message
    source.override({"name": "y", "step.steps": 0})
    with pytest.raises(ValueError) as error:
        source.build(Settings)
    assert str(error.value) == "[step]: steps must be ≥ 1, got 0"


def test_flags_given_keeps_only_what_the_user_gave():
    args = argparse.Namespace(steps=None, no_plan=True, names="a, b,", rate=0.0)
    flags = (("steps", "step.steps", None), ("no_plan", "plan", lambda v: not v),
             ("names", "tags", lambda v: tuple(t.strip() for t in v.split(",") if t.strip())),
             ("rate", "step.rate", None), ("absent", "x", None))
    assert flags_given(args, flags) == {"plan": False, "tags": ("a", "b"), "step.rate": 0.0}


def test_default_of_reads_nested_defaults():
    assert default_of(Settings, "step.steps") == 10
    assert default_of(Settings, "optimizer.momentum") == 0.5
    with pytest.raises(KeyError):
        default_of(Settings, "name")


# --- edgetune device run / personalize --config ------------------------------------------------

REQUIRED = ["--broker", "memory://x", "--fleet", "f", "--device-id", "d", "--data", "d.txt"]


def device(command: str, *argv: str) -> DeviceRunSettings:
    return device_settings(build_parser().parse_args(["device", command, *argv]))


def _parser(command: str):
    device_parser = build_parser()._subparsers._group_actions[0].choices["device"]
    return device_parser._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize("command", ["run", "personalize"])
def test_device_flags_have_no_defaults_of_their_own(command):
    defaults = {a.dest: a.default for a in _parser(command)._actions if a.dest != "help"}
    assert defaults and all(v is None for v in defaults.values()), defaults
    assert device(command, *REQUIRED) == DeviceRunSettings("memory://x", "f", "d", Path("d.txt"))
    assert device(command, *REQUIRED).personalize == PersonalizeSettings()  # its defaults, once


DEVICE_FILE = """
broker = "mqtt://b:1"
fleet = "f"
device_id = "line-1"
data = "/data/line-1.jsonl"
model = "tiny-llama"
threads = 2
trainer = "torch"
heldout_fraction = 0.2
validation_fraction = 0.05
connect_timeout_s = 30
fetch_timeout_s = 20
plan = false
state_dir = "/state"
uplink_mbps = 5
tls_ca = "/tls/ca.crt"
log_level = "DEBUG"
global_wait_s = 5
personal_out = "/out"
[personalize]
learning_rate = 1e-3
steps = 5
optimizer = "sgd"
l2_to_global = 1
alphas = [0, 0.5, 1]
seq_len = 32
"""
DEVICE_FLAGS = ["--broker", "mqtt://b:1", "--fleet", "f", "--device-id", "line-1", "--data", "/data/line-1.jsonl",
                "--model", "tiny-llama", "--threads", "2", "--trainer", "torch", "--heldout", "0.2", "--validation",
                "0.05", "--connect-timeout", "30", "--fetch-timeout", "20", "--no-plan", "--state-dir", "/state",
                "--uplink-mbps", "5", "--ca", "/tls/ca.crt", "--log-level", "DEBUG", "--wait", "5", "--out", "/out",
                "--lr", "1e-3", "--steps", "5", "--optimizer", "sgd", "--l2-to-global", "1", "--alphas", "0,0.5,1",
                "--seq-len", "32"]


def test_a_device_file_gives_the_same_settings_as_the_equivalent_flags(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(DEVICE_FILE)
    from_file = device("personalize", "--config", str(path))
    assert from_file == device("personalize", *DEVICE_FLAGS)
    assert from_file.plan is False and from_file.tls == {"ca_certs": "/tls/ca.crt"}
    assert from_file.personalize == PersonalizeSettings(learning_rate=1e-3, steps=5, optimizer="sgd", l2_to_global=1.0,
                                                        alphas=(0.0, 0.5, 1.0), seq_len=32)


def test_device_flags_override_the_file(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text(DEVICE_FILE)
    got = device("personalize", "--config", str(path), "--device-id", "line-9", "--steps", "9", "--trainer", "auto")
    assert (got.device_id, got.personalize.steps, got.trainer, got.threads) == ("line-9", 9, "auto", 2)
    assert device("run", "--config", str(path), "--stay").stay is True


@pytest.mark.parametrize("text, message", [
    ('trainer = "tf"', "device.toml: trainer 'tf' is not one of torch, ort, auto"),
    ('threads = "many"', "device.toml: threads must be an integer, got 'many'"),
    ("plan = 0", "device.toml: plan must be true or false, got 0"),
    ("[personalize]\nlearning_rate = 0", "device.toml: [personalize]: learning_rate must be > 0, got 0.0"),
    ('[personalize]\noptimizer = "adam"', "device.toml: [personalize]: optimizer 'adam' is not one of adamw, sgd"),
])
def test_a_wrong_device_setting_names_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "device.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        device("run", *REQUIRED, "--config", str(path))
    assert str(error.value) == str(tmp_path / message)


def test_device_required_settings_come_from_either_place(tmp_path):
    with pytest.raises(ValueError) as error:
        device("run", "--fleet", "f")
    assert str(error.value) == ("--broker, --device-id and --data are required: give them as flags, or in the "
                                "--config file (broker, device_id, data)")
    path = tmp_path / "device.toml"
    path.write_text('broker = "memory://x"\nfleet = "f"\ndevice_id = "d"\ndata = "d.txt"\n')
    assert device("run", "--config", str(path)).data == tmp_path / "d.txt"  # relative to the file


def test_the_device_example_parses_without_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        got = device("personalize", "--config", str(REPO / "docs" / "config" / "device.toml"))
    assert not caplog.records, caplog.text
    assert (got.fleet, got.device_id, got.threads, got.personalize.l2_to_global) == ("plant-7", "line-1", 4, 1.0)


def test_device_cli_errors_from_a_file_are_one_line(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('broker = "memory://x"\nfleet = "f"\ndevice_id = "d"\ndata = "d.txt"\nheldout_fraction = "a tenth"\n')
    result = subprocess.run([sys.executable, "-m", "edgetune", "device", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"edgetune: error: {path}: heldout_fraction must be a number, got 'a tenth'"
