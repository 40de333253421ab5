"""The operator's commands on a fleet's versions (docs/operations.md)::

    edgetune-aggregator versions --state-dir DIR [--json]
    edgetune-aggregator promote VERSION --state-dir DIR [--reason TEXT]
    edgetune-aggregator rollback VERSION --state-dir DIR [--reason TEXT]

``versions`` reads the state dir; ``promote`` and ``rollback`` check the version exists and ask
the daemon through the state dir (``control.py``), which applies them within a second, or when
it next starts. They never write the fleet's state themselves: one process does that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from . import control


def add_parsers(commands) -> None:
    versions = commands.add_parser("versions", help="list the fleet's global adapter versions")
    versions.add_argument("--state-dir", type=Path, required=True, help="the daemon's state dir")
    versions.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    for action, what in (("promote", "serve VERSION on every device (training goes on from the newest)"),
                         ("rollback", "serve VERSION again and restart training from it")):
        parser = commands.add_parser(action, help=what)
        parser.add_argument("version", help="a version number (v7 or 7)")
        parser.add_argument("--state-dir", type=Path, required=True, help="the daemon's state dir")
        parser.add_argument("--reason", default="", help="why, for the round log and versions.json")
        if action == "promote":
            parser.add_argument("--force", action="store_true", help="serve it even if the validation gate "
                                "refused it")


def run(args: argparse.Namespace) -> int:
    from .versions import VersionLog

    state_dir: Path = args.state_dir
    if not (state_dir / "state.json").exists():
        print(f"edgetune-aggregator: error: {state_dir} holds no fleet (no state.json)", file=sys.stderr)
        return 2
    log = VersionLog(state_dir)
    state = json.loads((state_dir / "state.json").read_text())
    if args.command == "versions":
        return _list(log, state, state_dir, args.json)
    try:
        version = int(str(args.version).removeprefix("v"))
    except ValueError:
        print(f"edgetune-aggregator: error: {args.version!r} is not a version number", file=sys.stderr)
        return 2
    if log.get(version) is None:
        known = [r.version for r in log.all()]
        print(f"edgetune-aggregator: error: the fleet has no version {version} (it has "
              f"{', '.join(f'v{v}' for v in known[-10:]) or 'none'}; see `edgetune-aggregator versions`)",
              file=sys.stderr)
        return 2
    gate = log.get(version).gate
    if args.command == "promote" and gate and gate.get("passed") is False and not args.force:
        print(f"edgetune-aggregator: error: the validation gate refused v{version}: {gate.get('reason')} "
              "(--force serves it anyway)", file=sys.stderr)
        return 2
    request = control.submit(state_dir, args.command, version, args.reason, getattr(args, "force", False))
    print(f"asked the daemon to {args.command} v{version} (request {request.id}); it applies it within a second "
          "if it runs, else when it starts. `edgetune-aggregator versions` shows what the fleet serves.")
    return 0


def _list(log, state: dict, state_dir: Path, as_json: bool) -> int:
    serving, training = state.get("serving_version"), state.get("global_version")
    candidate = state.get("candidate_version")
    from .serving import read_reports, serving_counts

    counts = serving_counts(read_reports(state_dir))
    pending = [r for _, r in control.pending(state_dir) if not isinstance(r, str)]
    if as_json:
        print(json.dumps({"serving": serving, "training": training, "candidate": candidate,
                          "pending": [asdict(r) for r in pending],
                          "versions": [{**asdict(r), "served_by": counts.get(r.version, 0)} for r in log.all()]},
                         indent=2))
        return 0
    rows = [("version", "parent", "round", "made by", "devices", "ppl", "served by", "created", "digest", "")]
    for r in log.all():
        flags = [name for name, v in (("serving", serving), ("training", training), ("candidate", candidate))
                 if v == r.version]
        ppl = r.metrics.get("ppl")
        rows.append((f"v{r.version}", "" if r.parent is None else f"v{r.parent}", str(r.round), r.strategy,
                     str(len(r.contributors)), "" if ppl is None else f"{ppl:.3f}", str(counts.get(r.version, 0)),
                     time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created)), r.digest[:12],
                     " ".join(flags) + (f"  {r.note}" if r.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    for r in pending:
        print(f"pending: {r.action} v{r.version} (request {r.id})")
    return 0
