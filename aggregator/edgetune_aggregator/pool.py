"""``serve --workers K``: the worker processes a daemon starts beside itself, and restarts.

Each is ``edgetune-aggregator worker`` with its own state dir (``{state}/workers/w{i}``), so
a worker that dies (a crash, the OOM killer, SIGKILL) is started again on its journal: it
reports what it holds once more and answers the round's merge (worker.py). Workers on other
hosts run the same command under their own supervisor (docs/deploy.md) and the daemon is told
with ``--workers-elsewhere``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def write_fleet_pub(fleet_key: Path, state_dir: Path) -> Path:
    """The public half of the daemon's fleet key, where its workers read it
    (``{state}/workers/fleet.pub``), written atomically."""
    from edgetune.atomic import atomic_write_bytes
    from edgetune.wire.signing import FleetSigner

    path = Path(state_dir) / "workers" / "fleet.pub"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, FleetSigner.load(fleet_key).public_pem())
    return path


class WorkerPool:
    def __init__(self, count: int, argv: list[str], state_dir: Path, check_every_s: float = 1.0):
        """``argv``: the ``worker`` command's common flags (broker, fleet, keys, TLS); each
        worker adds its id and state dir."""
        self.commands = [[sys.executable, "-m", "edgetune_aggregator.cli", "worker", *argv, "--id", f"w{i}",
                          "--state-dir", str(Path(state_dir) / "workers" / f"w{i}")] for i in range(count)]
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.restarts = 0
        self._stop = threading.Event()
        self._every = check_every_s
        self._thread = threading.Thread(target=self._watch, name="edgetune-workers", daemon=True)

    def start(self) -> None:
        for index in range(len(self.commands)):
            self._start(index)
        self._thread.start()

    def _start(self, index: int) -> None:
        self.processes[index] = subprocess.Popen(self.commands[index], stdin=subprocess.DEVNULL)
        log.info("started aggregator worker w%d (pid %d)", index, self.processes[index].pid)

    def _watch(self) -> None:
        while not self._stop.wait(self._every):
            for index, process in enumerate(self.processes):
                # (exit status 0: stopped on purpose; anything else, a signal included: a crash)
                if process is not None and process.poll() not in (None, 0) and not self._stop.is_set():
                    log.warning("aggregator worker w%d exited with %s: starting it again on its journal", index,
                                process.returncode)
                    self.restarts += 1
                    self._start(index)

    def stop(self) -> None:
        self._stop.set()
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes:
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
