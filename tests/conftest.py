"""Shared fixtures: real MQTT brokers on loopback, started per test and torn down after it.

Every MQTT test runs against a local broker it owns, never a public service. ``broker_url``
runs a test twice, against Mosquitto (what production uses) and against edgetune's embedded
amqtt broker (what a laptop without Mosquitto uses), so both stay interchangeable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
# Devices measure themselves and keep the profile in their state dir (~/.local/state/edgetune by
# default): the suite's devices, and the processes it starts, keep theirs in a folder of its own.
os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="edgetune-test-state-"))
# Let the suite run from a plain checkout as well as from an editable install.
if importlib.util.find_spec("edgetune") is None:
    sys.path[:0] = [str(_REPO / "sdk"), str(_REPO / "aggregator")]

_HOST = "127.0.0.1"
_BROKER_READY_TIMEOUT_S = 10.0
_MOSQUITTO_START_ATTEMPTS = 3  # a free port can be taken between probing and binding


def _free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        return int(probe.getsockname()[1])


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed; install it with: apt-get install -y mosquitto")
    return found


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once ``port`` accepts TCP connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((_HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _start_mosquitto(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start Mosquitto on ``port`` (default: a free loopback port); its log goes to
    ``workdir/mosquitto.log``."""
    binary = _mosquitto_binary()
    config_path, log_path = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    fixed = port
    for _ in range(_MOSQUITTO_START_ATTEMPTS):
        port = fixed or _free_port()
        config_path.write_text(
            f"listener {port} {_HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
        )
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [binary, "-c", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if _wait_for_port(port, process, _BROKER_READY_TIMEOUT_S):
            return process, port
        _stop_process(process)
    pytest.fail(
        f"mosquitto did not accept connections within {_BROKER_READY_TIMEOUT_S:.0f} s; "
        f"its log ({log_path}):\n{log_path.read_text(errors='replace')}"
    )


@pytest.fixture
def mosquitto_url(tmp_path: Path) -> Iterator[str]:
    """``mqtt://127.0.0.1:PORT`` of a fresh Mosquitto (anonymous, no persistence)."""
    process, port = _start_mosquitto(tmp_path)
    try:
        yield f"mqtt://{_HOST}:{port}"
    finally:
        _stop_process(process)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator:
    """``start(port=None) -> (url, stop)``: Mosquitto processes a test starts and stops itself
    (broker outages, restarts on the same port). All are stopped at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int | None = None):
        process, port = _start_mosquitto(tmp_path, port)
        processes.append(process)
        return f"mqtt://{_HOST}:{port}", lambda: _stop_process(process)

    yield start
    for process in processes:
        _stop_process(process)


def free_port() -> int:
    return _free_port()


@pytest.fixture
def embedded_broker_url() -> Iterator[str]:
    """``mqtt://127.0.0.1:PORT`` of a fresh in-process amqtt broker."""
    from edgetune.transport.embedded_broker import EmbeddedBroker

    with EmbeddedBroker(host=_HOST) as broker:
        yield broker.url


_BROKER_FIXTURES = {"mosquitto": "mosquitto_url", "embedded": "embedded_broker_url"}


@pytest.fixture(params=list(_BROKER_FIXTURES))
def broker_url(request: pytest.FixtureRequest) -> str:
    """The URL of each broker in turn, so a test using it runs once per broker."""
    return str(request.getfixturevalue(_BROKER_FIXTURES[request.param]))
