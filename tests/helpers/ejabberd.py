"""A real 2-node ejabberd cluster on loopback, for the clustered-broker tests.

ejabberd (Debian's ``ejabberd`` package, ``mod_mqtt``) is the cluster-capable MQTT broker the
package registries here ship (EMQX is in none; RabbitMQ's MQTT plugin speaks 3.1.1 only and keeps
retained messages per node). Each node gets its own config, spool (Mnesia) and log folder; the
second joins the first with ``ejabberdctl join_cluster``, and one user is registered (ejabberd's
MQTT clients log in as ``user@host``). ``ejabberdctl`` runs the nodes as the ``ejabberd`` user, so
the folders live under a world-traversable temporary folder, not pytest's 0700 ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .brokers import HOST, free_port

USER, PASSWORD, DOMAIN = "edgetune", "cluster-secret", "localhost"
START_TIMEOUT_S = 60


def _config(port: int, node_dir: Path) -> str:
    # max_payload_size: ejabberd's listeners take any size by default; bounded like a real site.
    # session_expiry: the daemon's persistent session survives its restarts, as on Mosquitto.
    return f"""hosts: [{DOMAIN}]
loglevel: info
log_rotate_count: 0
listen:
  - port: {port}
    ip: "{HOST}"
    module: mod_mqtt
    backlog: 1000
    max_payload_size: 16777216
auth_method: internal
access_rules:
  local: {{allow: all}}
api_permissions:
  "console commands":
    from: [ejabberd_ctl]
    who: all
    what: "*"
modules:
  mod_mqtt:
    max_queue: 100000
    session_expiry: 1 hour
"""


@dataclass
class EjabberdCluster:
    """Two running, joined ejabberd nodes. ``urls``: one MQTT URL (with credentials) per node."""

    root: Path
    nodes: list[str]
    ports: list[int]

    @property
    def urls(self) -> list[str]:
        return [f"mqtt://{USER}%40{DOMAIN}:{PASSWORD}@{HOST}:{port}" for port in self.ports]

    def ctl(self, index: int, *command: str, check: bool = True) -> str:
        """``ejabberdctl`` against node ``index``; its output."""
        node_dir = self.root / f"n{index}"
        done = subprocess.run(
            [_ejabberdctl(), "--node", self.nodes[index], "--ctl-config", str(node_dir / "ctl.cfg"),
             "--config", str(node_dir / "ejabberd.yml"), "--spool", str(node_dir / "spool"),
             "--logs", str(node_dir / "logs"), *command],
            capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if check and done.returncode != 0:
            raise RuntimeError(f"ejabberdctl {' '.join(command)} on {self.nodes[index]} failed "
                               f"({done.returncode}): {done.stdout}{done.stderr}\n{self.logs(index)}")
        return done.stdout

    def logs(self, index: int) -> str:
        path = self.root / f"n{index}" / "logs" / "ejabberd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        for index in range(len(self.nodes)):
            self.ctl(index, "stop", check=False)
        for index in range(len(self.nodes)):
            pid_file = self.root / f"n{index}" / "ejabberd.pid"
            deadline = time.monotonic() + 20
            while pid_file.exists() and time.monotonic() < deadline:
                try:
                    os.kill(int(pid_file.read_text().strip() or 0), 0)
                except (ProcessLookupError, ValueError):
                    break
                time.sleep(0.2)
        for node in self.nodes:  # (what a stop left running)
            subprocess.run(["pkill", "-f", f"name {node}"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_listening(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, f"no ejabberd node listens on {port}"
            time.sleep(0.2)


def _ejabberdctl() -> str:
    found = shutil.which("ejabberdctl") or ("/usr/sbin/ejabberdctl" if Path("/usr/sbin/ejabberdctl").exists() else None)
    if found is None:
        pytest.fail("ejabberd is not installed; install it with: apt-get install -y ejabberd")
    return found


def start_ejabberd_cluster() -> EjabberdCluster:
    """Start two nodes on free loopback ports, join them, register the test user."""
    _ejabberdctl()
    if os.geteuid() != 0:
        pytest.skip("ejabberdctl starts nodes as the 'ejabberd' user, which needs root")
    root = Path(tempfile.mkdtemp(prefix="edgetune-ejabberd-"))
    root.chmod(0o755)
    tag = f"et{os.getpid()}x{free_port()}"
    cluster = EjabberdCluster(root, [f"{tag}a@{DOMAIN}", f"{tag}b@{DOMAIN}"], [free_port(), free_port()])
    for index, port in enumerate(cluster.ports):
        node_dir = root / f"n{index}"
        (node_dir / "spool").mkdir(parents=True)
        (node_dir / "logs").mkdir()
        (node_dir / "ctl.cfg").write_text(
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n'
            f"EJABBERD_PID_PATH={node_dir / 'ejabberd.pid'}\n"
            f"EJABBERD_CONFIG_PATH={node_dir / 'ejabberd.yml'}\n")
        (node_dir / "ejabberd.yml").write_text(_config(port, node_dir))
    shutil.chown(root, "ejabberd", "ejabberd")
    for path in root.rglob("*"):
        shutil.chown(path, "ejabberd", "ejabberd")
    try:
        for index in range(2):
            cluster.ctl(index, "start")
            cluster.ctl(index, "started")
        cluster.ctl(1, "join_cluster", cluster.nodes[0])
        deadline = time.monotonic() + START_TIMEOUT_S
        while cluster.nodes[1] not in cluster.ctl(0, "list_cluster"):
            assert time.monotonic() < deadline, f"{cluster.nodes[1]} never joined:\n{cluster.logs(1)}"
            time.sleep(0.5)
        cluster.ctl(0, "register", USER, DOMAIN, PASSWORD)
        for port in cluster.ports:  # (joining restarts the second node)
            _wait_listening(port, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster
