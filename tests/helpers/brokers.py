"""Mosquitto processes on loopback, for the fixtures in ``conftest.py`` and for tests that stop,
restart or configure a broker themselves (fault injection, a provisioned TLS broker)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"
BROKER_READY_TIMEOUT_S = 10.0
MOSQUITTO_START_ATTEMPTS = 3  # a free port can be taken between probing and binding


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def mosquitto_binary() -> str:
    """The installed ``mosquitto``; the test fails saying how to install it where there is none."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed; install it with: apt-get install -y mosquitto")
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once ``port`` accepts TCP connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it does not exit within 5 s; a process already gone is left alone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def start_mosquitto(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start Mosquitto on ``port`` (default: a free loopback port); its log goes to
    ``workdir/mosquitto.log``."""
    binary = mosquitto_binary()
    config_path, log_path = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    fixed = port
    for _ in range(MOSQUITTO_START_ATTEMPTS):
        port = fixed or free_port()
        config_path.write_text(
            f"listener {port} {HOST}\n"
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
        if wait_for_port(port, process, BROKER_READY_TIMEOUT_S):
            return process, port
        stop_process(process)
    pytest.fail(
        f"mosquitto did not accept connections within {BROKER_READY_TIMEOUT_S:.0f} s; "
        f"its log ({log_path}):\n{log_path.read_text(errors='replace')}"
    )


def start_provisioned_broker(out: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run the mosquitto.conf ``edgetune-aggregator provision`` wrote into ``out``, changed only
    where a test must: its own free port on loopback, and (as root) ``user root``, because
    Mosquitto would otherwise switch to the user 'mosquitto', who cannot enter pytest's 0700
    temporary folders."""
    text = (out / "broker" / "mosquitto.conf").read_text()
    assert "\nuser mosquitto\n" in text
    if os.geteuid() == 0:
        text = text.replace("\nuser mosquitto\n", "\nuser root\n")
    port_line = next(line for line in text.splitlines() if line.startswith("listener "))
    log_path = workdir / "mosquitto.log"
    for _ in range(MOSQUITTO_START_ATTEMPTS):
        port = free_port()
        config = workdir / "mosquitto-test.conf"
        config.write_text(text.replace(port_line, f"listener {port} {HOST}"))
        with log_path.open("wb") as log_file:
            process = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait_for_port(port, process, BROKER_READY_TIMEOUT_S):
            return process, port
        stop_process(process)
    pytest.fail(f"mosquitto did not start; its log:\n{log_path.read_text(errors='replace')}")
