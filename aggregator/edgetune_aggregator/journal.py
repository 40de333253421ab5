"""The open round on disk: its task and every result accepted so far, each written before the
device hears that it was accepted.

A daemon killed at any instant restarts into the same round: it republishes the same task,
re-reads the accepted results, and keeps collecting. A result is a file named by its device,
so a result redelivered after the restart is recognised and never counted twice, and the
round is merged from these files in device order at its close, so a round interrupted any
number of times merges exactly what an uninterrupted one with the same results would.

A train round that fails (too few results by its deadline) merges nothing, so its accepted
results are carried into the next train round (same global version), where a device's own
new result supersedes its carried one: an accepted result is never lost, and counts once.

Layout (inside the state dir)::

    journal/r000007/_round.msgpack        {"round", "kind", "opened_at", "task": <payload>}
    journal/r000007/dev-a.msgpack         the accepted result as it arrived (signed or not)
    journal/r000007/dev-b@r6.msgpack      a late update for round 6 folded into round 7 (staleness)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack

from edgetune.atomic import atomic_write_bytes
from edgetune.wire import check_name

log = logging.getLogger(__name__)

#: (device ids start with a letter or digit, so no device's result can take this name)
_META = "_round.msgpack"


@dataclass(frozen=True)
class OpenRound:
    number: int
    kind: str
    #: wall-clock time the round opened (its deadline counts from here, across restarts)
    opened_at: float
    #: the task as published (republished unchanged on restart)
    task: bytes
    #: device id (``{device}@r{round}`` for a late update) -> the file of its accepted result
    #: (read one at a time: memory stays flat)
    results: dict[str, Path]


class RoundJournal:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "journal"
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, number: int) -> Path:
        return self.root / f"r{number:06d}"

    def open(self, number: int, kind: str, task: bytes, opened_at: float) -> None:
        """Start the round's journal (other rounds' are left for ``discard``: a failed round's
        results are carried into the next one first, see the daemon's ``_carry_over``)."""
        directory = self._dir(number)
        directory.mkdir(exist_ok=True)
        meta = {"round": number, "kind": kind, "opened_at": opened_at, "task": task}
        atomic_write_bytes(directory / _META, msgpack.packb(meta, use_bin_type=True))

    def record(self, number: int, device_id: str, payload: bytes, late_from: int | None = None) -> None:
        """Persist one accepted result (atomic, fsynced) before anyone is told. A late update
        (trained for round ``late_from``) is ``{device}@r{late_from}``: a device may also
        send the open round's own ('@' is in no device id)."""
        check_name(device_id, "device id")
        if not payload:
            raise ValueError(f"no payload to journal for {device_id}'s result in round {number}")
        atomic_write_bytes(self._dir(number) / f"{result_name(device_id, late_from)}.msgpack", payload)

    def has(self, number: int, name: str) -> bool:
        """Whether round ``number`` holds the result called ``name`` (see ``result_name``)."""
        return (self._dir(number) / f"{name}.msgpack").exists()

    def numbers(self) -> list[int]:
        """The rounds that have a journal (with its metadata), oldest first."""
        return sorted(int(p.name[1:]) for p in self.root.glob("r*") if (p / _META).exists())

    def load(self, number: int) -> OpenRound | None:
        """Round ``number``'s journal, or None (a round whose journal has no metadata never
        went out: the metadata is written before the task is published)."""
        directory = self._dir(number)
        if not (directory / _META).exists():
            return None
        try:
            meta = msgpack.unpackb((directory / _META).read_bytes(), raw=False)
            kind, opened_at, task = meta["kind"], float(meta["opened_at"]), bytes(meta["task"])
        except Exception as exc:  # written atomically, so only tampering gets here
            raise RuntimeError(f"{directory / _META} is damaged ({exc}); move the journal folder aside to "
                               "restart the round") from None
        results = {p.stem: p for p in sorted(directory.glob("*.msgpack")) if p.name != _META}
        return OpenRound(number, kind, opened_at, task, results)

    def discard(self, keep: int | None = None) -> None:
        """Remove the journals of closed rounds (``keep``: a round number to leave)."""
        for directory in self.root.glob("r*"):
            if keep is None or directory.name != f"r{keep:06d}":
                shutil.rmtree(directory, ignore_errors=True)


def result_name(device_id: str, late_from: int | None = None) -> str:
    return device_id if late_from is None else f"{device_id}@r{late_from}"


def parse_name(name: str) -> tuple[str, int | None]:
    """``(device, round it was trained for)`` of a result's name (round None: the journal's own)."""
    device, _, late = name.partition("@r")
    return device, int(late) if late else None
