"""What a daemon's round journal holds, read as the daemon reads it (journal.py)."""

from __future__ import annotations

from pathlib import Path

from edgetune_aggregator.journal import RoundJournal


def journaled(state_dir: Path, number: int, name: str) -> bytes | None:
    """The payload journaled as ``name`` (a device id) in round ``number``, or None."""
    root = Path(state_dir) / "journal"
    if not (root / f"r{number:06d}").exists():
        return None
    try:
        opened = RoundJournal.__new__(RoundJournal)
        opened.root = root  # (read only: no folder is made, nothing is written)
        record = opened.load(number)
    except (OSError, RuntimeError):  # (a segment being renamed into place as we look)
        return None
    if record is None or name not in record.results:
        return None
    return record.results[name].read_bytes()


def has(state_dir: Path, number: int, *names: str) -> bool:
    """Whether round ``number``'s journal holds every one of ``names``."""
    return all(journaled(state_dir, number, name) is not None for name in names)
