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

Group commit: the results the round loop took in together (one drain of its inbox) are
``stage``d, then ``commit`` writes them as one segment file with one fsync (and one of the
folder) before any of their receipts is sent. Nothing is acknowledged that is not durable, and a
burst of N updates costs a few fsyncs instead of 2N.

Layout (inside the state dir)::

    journal/r000007/_round.msgpack        {"round", "kind", "opened_at", "task": <payload>}
    journal/r000007/s000003.seg           one commit: results as they arrived (signed or not)
    journal/r000007/dev-a.msgpack         one result per file (journals written before 0.4)

A segment is ``ETJ1`` and then, per result, its name's length (2 bytes, big-endian), the name
(a device id, ``{device}@r{round}`` for a late update for that round), the payload's length (8
bytes) and the payload. A later segment's result supersedes an earlier one of the same name.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from edgetune.atomic import atomic_write_bytes
from edgetune.wire import check_name

log = logging.getLogger(__name__)

#: (device ids start with a letter or digit, so no device's result can take this name)
_META = "_round.msgpack"
_MAGIC = b"ETJ1"
_NAME = struct.Struct(">H")
_SIZE = struct.Struct(">Q")


@dataclass(frozen=True)
class JournalRecord:
    """Where one journaled result's bytes are: a whole file, or a slice of a segment."""

    path: Path
    offset: int = 0
    #: bytes from ``offset`` (-1: to the end of the file)
    length: int = -1

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length) if self.length >= 0 else f.read()
        if self.length >= 0 and len(data) != self.length:
            raise RuntimeError(f"{self.path} is truncated: move the journal folder aside to restart the round")
        return data


@dataclass
class _Staged:
    #: round number -> [(name, payload)] in the order staged
    results: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.results)


@dataclass(frozen=True)
class OpenRound:
    number: int
    kind: str
    #: wall-clock time the round opened (its deadline counts from here, across restarts)
    opened_at: float
    #: the task as published (republished unchanged on restart)
    task: bytes
    #: device id (``{device}@r{round}`` for a late update) -> where its accepted result is
    #: (``read_bytes()``; read one at a time: memory stays flat)
    results: dict[str, JournalRecord]


class RoundJournal:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "journal"
        self.root.mkdir(parents=True, exist_ok=True)
        self._staged = _Staged()
        #: fsyncs of segments so far (the tests and benchmarks count commits by it)
        self.commits = 0
        #: round -> the index its next segment takes. Listed from the folder once per round and
        #: process, then counted: listing it at every commit cost O(segments), 4.3 ms a commit
        #: at 1,000 segments on the sandbox, most of a round loop's per-update time at N = 1,000
        self._next_segment: dict[int, int] = {}

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
        """Persist one accepted result now (``stage`` and ``commit``)."""
        self.stage(number, device_id, payload, late_from)
        self.commit()

    def stage(self, number: int, device_id: str, payload: bytes, late_from: int | None = None) -> None:
        """Hold one accepted result for the next ``commit``. A late update (trained for round
        ``late_from``) is ``{device}@r{late_from}``: a device may also send the open round's own
        ('@' is in no device id). Nobody may hear of it before the commit returns."""
        check_name(device_id, "device id")
        if not payload:
            raise ValueError(f"no payload to journal for {device_id}'s result in round {number}")
        self._staged.results.setdefault(number, []).append((result_name(device_id, late_from), payload))

    @property
    def staged(self) -> int:
        """Results staged and not yet committed."""
        return sum(map(len, self._staged.results.values()))

    @property
    def staged_bytes(self) -> int:
        """Payload bytes staged and not yet committed (held in memory until the commit)."""
        return sum(len(payload) for results in self._staged.results.values() for _, payload in results)

    def commit(self) -> int:
        """Write what was staged, one segment per round, each fsynced with its folder before this
        returns; the number of results made durable. On an error nothing staged is kept (a
        segment is renamed into place whole or not at all): the devices resend, unacknowledged."""
        staged, self._staged = self._staged, _Staged()
        count = 0
        for number, results in staged.results.items():
            directory = self._dir(number)
            index = self._next_segment.get(number)
            if index is None:
                index = max((int(p.stem[1:]) for p in directory.glob("s*.seg")), default=0) + 1
            with open(tmp := directory / f".s{index:06d}.tmp", "wb") as f:
                f.write(_MAGIC)
                for name, payload in results:
                    encoded = name.encode()
                    f.write(_NAME.pack(len(encoded)) + encoded + _SIZE.pack(len(payload)))
                    f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / f"s{index:06d}.seg")
            self._next_segment[number] = index + 1
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self.commits += 1
            count += len(results)
        return count

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
        results = {p.stem: JournalRecord(p) for p in sorted(directory.glob("*.msgpack")) if p.name != _META}
        for segment in sorted(directory.glob("s*.seg")):
            results.update(_index(segment))
        return OpenRound(number, kind, opened_at, task, results)

    def discard_before(self, number: int) -> None:
        """Remove the journals of rounds before ``number`` (a worker's: closed for good)."""
        for directory in self.root.glob("r*"):
            if directory.name[1:].isdigit() and int(directory.name[1:]) < number:
                shutil.rmtree(directory, ignore_errors=True)
                self._next_segment.pop(int(directory.name[1:]), None)

    def discard(self, keep: int | None = None) -> None:
        """Remove the journals of closed rounds (``keep``: a round number to leave)."""
        for directory in self.root.glob("r*"):
            if keep is None or directory.name != f"r{keep:06d}":
                shutil.rmtree(directory, ignore_errors=True)
        self._next_segment = {n: i for n, i in self._next_segment.items() if n == keep}


def _index(segment: Path) -> dict[str, JournalRecord]:
    """Name -> record of each result in a segment (reads the headers only)."""
    out = {}
    size = segment.stat().st_size
    with open(segment, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise RuntimeError(f"{segment} is no journal segment; move the journal folder aside to restart the round")
        position = len(_MAGIC)
        try:
            while position < size:
                (length,) = _NAME.unpack(f.read(_NAME.size))
                name = f.read(length).decode()
                (payload,) = _SIZE.unpack(f.read(_SIZE.size))
                position += _NAME.size + length + _SIZE.size
                if position + payload > size:
                    raise ValueError("a result runs past the end")
                out[name] = JournalRecord(segment, position, payload)
                position += payload
                f.seek(position)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:  # renamed whole, so only tampering gets here
            raise RuntimeError(f"{segment} is damaged ({exc}); move the journal folder aside to restart the round") from None
    return out


def result_name(device_id: str, late_from: int | None = None) -> str:
    return device_id if late_from is None else f"{device_id}@r{late_from}"


def parse_name(name: str) -> tuple[str, int | None]:
    """``(device, round it was trained for)`` of a result's name (round None: the journal's own)."""
    device, _, late = name.partition("@r")
    return device, int(late) if late else None
