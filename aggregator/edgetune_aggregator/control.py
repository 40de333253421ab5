"""Operator requests to a daemon through its state dir: ``edgetune-aggregator promote`` and
``rollback`` write one file each under ``control/``, the daemon applies them in order within a
second (or when it next starts) and removes each once applied.

Through the state dir rather than the broker because only the operator of the central server
may change what the fleet serves: the state dir's permissions already say who that is, no
broker credential or ACL entry is needed for it, and a request made while the daemon is down is
applied when it starts. One process writes the fleet's state (the daemon); the commands only
ask. A request is applied at most once in effect: a promotion twice is the same promotion, and
a rollback's new version names the request it came from.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.atomic import atomic_write_json

log = logging.getLogger(__name__)

ACTIONS = ("promote", "rollback")


@dataclass(frozen=True)
class Request:
    action: str
    version: int
    id: str
    requested: float
    reason: str = ""
    #: promote a version the validation gate refused
    force: bool = False

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"version must be an integer ≥ 0, got {self.version!r}")


def _directory(state_dir: Path) -> Path:
    return Path(state_dir) / "control"


def submit(state_dir: Path, action: str, version: int, reason: str = "", force: bool = False) -> Request:
    """Ask the fleet's daemon to ``action`` ``version``; the request as written."""
    request = Request(action, version, uuid.uuid4().hex[:12], time.time(), reason[:200], force)
    directory = _directory(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / f"{time.time_ns():020d}-{request.id}.json", asdict(request))
    return request


def pending(state_dir: Path) -> list[tuple[Path, Request | str]]:
    """The requests waiting, oldest first: ``(file, request)``, or ``(file, why it is not one)``."""
    directory = _directory(state_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            found.append((path, Request(**raw)))
        except (OSError, ValueError, TypeError) as exc:
            found.append((path, f"{type(exc).__name__}: {exc}"))
    return found


def done(path: Path) -> None:
    """The request in ``path`` was applied (or refused, with its reason logged)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
