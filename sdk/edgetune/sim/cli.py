"""``edgetune simulate --fleet FLEET.yaml``: run a simulated fleet and say what happened.

Prints each device's class and plan before the first round, a line per round (who answered,
who missed the deadline or sat out, in simulated seconds), and the report's path at the end.
Details (every device's and the daemon's log) go to ``OUT/logs/simulate.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run_simulate(args: argparse.Namespace) -> int:
    from ..logfile import log_details_to_file
    from .fleet import load_fleet
    from .runner import Simulation

    spec = load_fleet(args.fleet)
    changes = {k: v for k, v in (("rounds", args.rounds), ("seed", args.seed), ("model", args.model)) if v is not None}
    spec = dataclasses.replace(spec, **changes)
    out: Path = args.out.resolve()
    if (out / "state").exists():
        raise ValueError(f"{out} holds an earlier simulation: remove it or pass --out elsewhere")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_details_to_file(out / "logs" / "simulate.log")
    print(f"edgetune simulate: fleet {spec.name}, {len(spec.devices)} devices of "
          f"{len({d.profile.name for d in spec.devices})} classes, {spec.rounds} rounds of {spec.deadline_s:.0f} s "
          f"(simulated){' over ' + args.broker if args.broker else ''}; output in {out}")
    for device in spec.devices:
        p = device.profile
        print(f"  {device.device_id:<14} {p.name:<28} {p.memory_bytes / 2**30:5.1f} GiB "
              f"{p.gflops.get('float32', 0):6.0f} GFLOP/s  uplink {p.uplink_mbps or 0:g} Mbit/s  data {device.data}")
    started = time.monotonic()
    simulation = Simulation(spec, out, broker=args.broker, threads=args.threads, plan=not args.no_plan)
    result = simulation.run()
    for record in result.rounds:
        print(format_round(record))
    print(f"simulated {result.duration_s:,.0f} s of fleet time in {time.monotonic() - started:,.0f} s; "
          f"state dir {result.state_dir}")
    if not args.no_report:
        from ..report import write_report

        print(f"report: {write_report(result.state_dir, out / 'report')}")
    return 0


def format_round(record: dict) -> str:
    """One line per round, and the plans where they changed: what the simulated fleet did."""
    answered = {d["device_id"] for d in record["devices"]}
    missed = sorted(set(record.get("asked", [])) - answered - set(record.get("declined", {})))
    parts = [f"round {record['round']} ({record['kind']}) {record['status']} after {record['duration_s']:.1f} s: "
             f"{len(answered)} of {len(record.get('asked', []))} asked answered"]
    if missed:
        parts.append(f"missed: {', '.join(missed)}")
    if record.get("declined"):
        parts.append("gave up: " + ", ".join(f"{d} ({why.split(':', 1)[0]})" for d, why in sorted(record["declined"].items())))
    if record.get("excluded"):
        parts.append("sat out: " + ", ".join(sorted(record["excluded"])))
    line = "; ".join(parts)
    if record.get("global_ppl") is not None:
        line += f"; held-out ppl of global v{record['base_version']}: {record['global_ppl']:.2f}"
    return line


__all__ = ["format_round", "run_simulate"]
