"""Generated sections of a Markdown file (``docs/benchmarks.md``): each benchmark rewrites its
own part, between its begin and end markers, and leaves the rest as people wrote it."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_bytes


def replace_section(docs: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) in place of the
    marked part of ``docs``, or append it if there is none; atomically."""
    text = docs.read_text() if docs.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_bytes(docs, text.encode())
