"""Is a device's profile physically possible? Field by field, before the planner sees it.

A profile arrives in a device's hello: measured by the device itself, or written by hand. One
NaN (a throughput, an uplink) used to make planning fail for the whole fleet, and an absurdly
small throughput put a 300-digit step time into a log line. The planner's arithmetic assumes
finite, positive figures within what hardware can be, so a profile outside these bounds
excludes *its* device, with the field and the bound in the reason, and nobody else.

The bounds are wide on purpose: they refuse the impossible, not the unusual (a 1 MiB
microcontroller or a 10 PFLOP/s server would pass; both would be excluded by the planner for
their own, stated reasons).
"""

from __future__ import annotations

import math

from edgetune.wire import DeviceProfile

MIN_MEMORY_BYTES = 1 << 20
MAX_MEMORY_BYTES = 64 << 40
#: GFLOP/s per dtype: a thousandth of a GFLOP/s (a microcontroller) to ten PFLOP/s
MIN_GFLOPS, MAX_GFLOPS = 1e-3, 1e7
MAX_CORES = 4096
#: Mbit/s: one kbit/s (a bad GSM link) to one Tbit/s
MIN_MBPS, MAX_MBPS = 1e-3, 1e6
KNOWN_DTYPES = ("float32", "bfloat16", "float16")
MAX_TEXT = 256


def _number(value: object) -> str:
    """A figure for a reason: short whatever its size."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4g}"
    return repr(value)[:24]


def _within(name: str, value: object, low: float, high: float, unit: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} is {_number(value)}, not a finite number"
    if not low <= value <= high:
        return f"{name} is {_number(value)} {unit}, outside {low:g}..{high:g} {unit}"
    return None


def profile_problem(profile: DeviceProfile) -> str | None:
    """Why this profile cannot be planned with (None if it can)."""
    problems = [
        _within("memory_bytes", profile.memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES, "bytes"),
        _within("cores", profile.cores, 1, MAX_CORES, "cores"),
    ]
    if not profile.gflops:
        problems.append("gflops is empty")
    unknown = sorted(set(profile.gflops) - set(KNOWN_DTYPES))
    if unknown:
        problems.append(f"gflops has unknown dtype {str(unknown[0])[:24]!r} (known: {', '.join(KNOWN_DTYPES)})")
    for dtype in sorted(set(profile.gflops) & set(KNOWN_DTYPES)):
        problems.append(_within(f"gflops[{dtype}]", profile.gflops[dtype], MIN_GFLOPS, MAX_GFLOPS, "GFLOP/s"))
    for name in ("uplink_mbps", "downlink_mbps"):
        value = getattr(profile, name)
        if value is not None:
            problems.append(_within(name, value, MIN_MBPS, MAX_MBPS, "Mbit/s"))
    for name in ("name", "source"):
        if len(getattr(profile, name)) > MAX_TEXT:
            problems.append(f"{name} is longer than {MAX_TEXT} characters")
    problems = [p for p in problems if p]
    return "; ".join(problems[:3]) if problems else None
