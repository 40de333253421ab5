"""Real non-IID text for benchmarks: the Debian ``fortunes`` package, one category per device.

``/usr/share/games/fortunes/<category>`` holds plain-text entries separated by lines holding
only ``%`` (44 categories, 2.8 MB). Categories differ in topic and style, so a fleet with one
category per device is non-IID the way real sites are.
"""

from __future__ import annotations

import re
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
#: the largest topical categories (≥ 100 kB of text each), largest first
DEFAULT_CATEGORIES = ("computers", "science", "people", "politics", "work", "men-women")

_OVERSTRIKE = re.compile(r".\x08")  # "_\bx": nroff-style underlining in a few entries


def load_category(category: str, root: Path = FORTUNES) -> list[str]:
    """The entries of one category, stripped, overstrikes removed, empty ones dropped."""
    path = root / category
    if not path.is_file():
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist: this needs the Debian 'fortunes' package "
                                    "(`sudo apt-get install fortunes`)")
        have = sorted(p.name for p in root.iterdir() if "." not in p.name)
        raise FileNotFoundError(f"no fortune category {category!r} in {root}; it has {', '.join(have)}")
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = (_OVERSTRIKE.sub("", entry).strip() for entry in re.split(r"^%$", text, flags=re.MULTILINE))
    return [entry for entry in entries if entry]
