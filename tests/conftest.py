"""Shared fixtures: real MQTT brokers on loopback, started per test and torn down after it.

Every MQTT test runs against a local broker it owns, never a public service. ``broker_url``
runs a test twice, against Mosquitto (what production uses) and against edgetune's embedded
amqtt broker (what a laptop without Mosquitto uses), so both stay interchangeable.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared helpers' failed asserts show their values, as the tests' own do.
pytest.register_assert_rewrite("helpers")

from helpers.brokers import HOST, start_mosquitto, stop_process  # noqa: E402  (after the registration)

_REPO = Path(__file__).resolve().parent.parent
# Devices measure themselves and keep the profile in their state dir (~/.local/state/edgetune by
# default): the suite's devices, and the processes it starts, keep theirs in a folder of its own.
os.environ.setdefault("XDG_STATE_HOME", tempfile.mkdtemp(prefix="edgetune-test-state-"))
# Let the suite run from a plain checkout as well as from an editable install.
if importlib.util.find_spec("edgetune") is None:
    sys.path[:0] = [str(_REPO / "sdk"), str(_REPO / "aggregator")]


@pytest.fixture
def mosquitto_url(tmp_path: Path) -> Iterator[str]:
    """``mqtt://127.0.0.1:PORT`` of a fresh Mosquitto (anonymous, no persistence)."""
    process, port = start_mosquitto(tmp_path)
    try:
        yield f"mqtt://{HOST}:{port}"
    finally:
        stop_process(process)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator:
    """``start(port=None) -> (url, stop)``: Mosquitto processes a test starts and stops itself
    (broker outages, restarts on the same port). All are stopped at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int | None = None):
        process, port = start_mosquitto(tmp_path, port)
        processes.append(process)
        return f"mqtt://{HOST}:{port}", lambda: stop_process(process)

    yield start
    for process in processes:
        stop_process(process)


@pytest.fixture
def embedded_broker_url() -> Iterator[str]:
    """``mqtt://127.0.0.1:PORT`` of a fresh in-process amqtt broker."""
    from edgetune.transport.embedded_broker import EmbeddedBroker

    with EmbeddedBroker(host=HOST) as broker:
        yield broker.url


_BROKER_FIXTURES = {"mosquitto": "mosquitto_url", "embedded": "embedded_broker_url"}


@pytest.fixture(params=list(_BROKER_FIXTURES))
def broker_url(request: pytest.FixtureRequest) -> str:
    """The URL of each broker in turn, so a test using it runs once per broker."""
    return str(request.getfixturevalue(_BROKER_FIXTURES[request.param]))
