"""``edgetune profile``: measure this machine and write its device profile.

    edgetune profile [--out FILE] [--name NAME] [--uplink-mbps MBPS] [--seconds S]

Without ``--out`` the YAML goes to stdout and the summary table to stderr, so
``edgetune profile > me.yaml`` works; with ``--out`` both the table and the path go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TextIO

from ..wire import DeviceProfile

log = logging.getLogger(__name__)


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``profile`` to the main CLI's subcommands; returns its parser for common options."""
    parser = subparsers.add_parser(
        "profile",
        help="measure this machine's memory, matmul throughput and quantization support",
        description="Measure usable memory (cgroup-aware), sustained matmul GFLOP/s and which "
                    "base quantizations run here, and write a device profile (YAML).",
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the profile here (default: print it)")
    parser.add_argument("--name", help="device or device-class name (default: host name)")
    parser.add_argument("--uplink-mbps", type=float, metavar="MBPS",
                        help="what the site's uplink sustains, Mbit/s (not measured)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="matmul timing per run, split over dtypes (default: 2; use ~120 on "
                             "passively cooled boards to see throttling)")
    return parser


def format_table(profile: DeviceProfile) -> str:
    rows = [("memory for training", f"{profile.memory_bytes / 2**30:.2f} GiB")]
    rows += [(f"{dtype} matmul", f"{value:.1f} GFLOP/s") for dtype, value in profile.gflops.items()]
    rows += [
        ("cores", str(profile.cores)),
        ("quantization", ", ".join(profile.quantization) or "none besides float32"),
        ("uplink", f"{profile.uplink_mbps:g} Mbit/s" if profile.uplink_mbps else "not given (--uplink-mbps)"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [profile.name] + [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines) + "\n"


def run_profile(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Measure, show the table, write or print the YAML. Returns the exit status."""
    from .files import dump_profile, save_profile
    from .measure import measure_profile

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not args.seconds > 0:
        print(f"edgetune: error: --seconds must be > 0, got {args.seconds}", file=stderr)
        return 2
    if args.uplink_mbps is not None and not args.uplink_mbps > 0:
        print(f"edgetune: error: --uplink-mbps must be > 0, got {args.uplink_mbps}", file=stderr)
        return 2
    profile = measure_profile(name=args.name, uplink_mbps=args.uplink_mbps, seconds=args.seconds)
    if args.out is None:
        stderr.write(format_table(profile))
        stdout.write(dump_profile(profile))
        return 0
    try:
        save_profile(profile, args.out)
    except OSError as exc:
        print(f"edgetune: error: cannot write {args.out}: {exc.strerror or exc}", file=stderr)
        return 2
    stdout.write(format_table(profile))
    stdout.write(f"wrote {args.out}\n")
    log.info("profile written to %s", args.out)
    return 0
