"""The personalization–robustness benchmark as measured for ``docs/benchmarks.md``.

This runs ``edgetune bench personalization`` (``sdk/edgetune/bench/personalization.py``) with
the settings the published numbers used, writes ``benchmarks/results/personalization.json``
and ``docs/images/personalization.png``, and replaces the section in ``docs/benchmarks.md``.
It needs the Debian ``fortunes`` package and takes about an hour on 2 cores.

    .venv/bin/python benchmarks/personalization.py [extra options for edgetune bench personalization]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edgetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: the run behind docs/benchmarks.md: 3 devices (computers, science, people), SmolLM2-135M, a
#: 20-token soft prompt, 4 FedAvg rounds of 25 steps, then the sweep
SETTINGS = ["--threads", "2", "--rounds", "4", "--fed-steps", "25", "--fed-lr", "3e-3", "--adamw-lrs", "1e-3,1e-2",
            "--sgd-lrs", "0.3,3", "--steps", "10,30", "--l2", "0,30", "--eval-blocks", "8"]

if __name__ == "__main__":
    out = ROOT / "bench-out" / "personalization"
    code = main(["bench", "personalization", *SETTINGS, *sys.argv[1:], "--out", str(out),
                 "--docs", str(ROOT / "docs" / "benchmarks.md"), "--png-link", "images/personalization.png"])
    if code == 0:
        (ROOT / "docs" / "images").mkdir(exist_ok=True)
        shutil.copy(out / "personalization.png", ROOT / "docs" / "images" / "personalization.png")
        shutil.copy(out / "personalization.json", ROOT / "benchmarks" / "results" / "personalization.json")
    sys.exit(code)
