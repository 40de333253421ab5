"""Command lines run as a user runs them: a fresh Python process from the repository root, its
output captured for the test to read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: ``python TORCH_FREE ARGS`` runs the command line (or a script) with torch and its kin hidden
TORCH_FREE = Path(__file__).resolve().parent / "torch_free.py"


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` (``-m edgetune …``, a script and its arguments) in the repository root,
    with this interpreter; stdout and stderr as text."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
