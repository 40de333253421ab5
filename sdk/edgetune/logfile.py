"""Logging for the long-running commands (``edgetune demo``, ``edgetune simulate``): details to a
file, the console kept for progress bars, tables and warnings."""

from __future__ import annotations

import logging
from pathlib import Path


def log_details_to_file(path: Path) -> None:
    """Details go to the log file; the console keeps the progress, tables and warnings (the
    demo's and the simulator's way of logging)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    logging.getLogger("transformers").setLevel(logging.ERROR)
