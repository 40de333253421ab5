"""Device profiles as YAML files people write and read (schema: ``profiles/README.md``).

Memory is written the way people think of it (``memory: 7.5 GiB``); a plain number of bytes
is accepted too. A key this version does not know is warned about, not fatal, so a profile
written by a newer edgetune still loads; a missing or malformed field is a
:class:`ProfileError` naming the file, the field and what is allowed.
"""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..wire import DeviceProfile

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("bfloat16", "int8", "nf4")
KEYS = ("name", "memory", "gflops", "cores", "quantization", "uplink_mbps", "downlink_mbps", "source")
REQUIRED = ("name", "memory", "gflops")

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)?\s*$")
_SIZE_HELP = "a size such as '7.5 GiB', '512 MiB', '8 GB' or a whole number of bytes"


class ProfileError(ValueError):
    """A profile file is missing, unreadable or has a field we cannot use."""


def parse_size(value: object) -> int:
    """Bytes from an int or a string with a unit (KB/MB/GB/TB are 1000ⁿ, KiB/MiB/GiB/TiB 1024ⁿ)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_SIZE_HELP}, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        number, unit = match.groups()
        scale = _UNITS.get((unit or "b").lower())
        if scale is None:
            raise ValueError(f"unknown unit {unit!r} in {value!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
        size = int(Decimal(number) * scale)  # exact: "0.3 GB" is 300000000, not 299999999
    else:
        raise ValueError(f"expected {_SIZE_HELP}, got {value!r}")
    if size <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return size


def format_size(size: int) -> str | int:
    """The shortest exact spelling: '7.5 GiB' when that is exact to 2 decimals, else MiB, else bytes."""
    if (size * 100) % 2**30 == 0:
        hundredths = size * 100 // 2**30
        return f"{hundredths // 100}.{hundredths % 100:02d}".rstrip("0").rstrip(".") + " GiB"
    if size % 2**20 == 0:
        return f"{size // 2**20} MiB"
    return size


def _number(value: object, field: str) -> float:
    # PyYAML reads "1e3" (YAML 1.1: no dot) as a string; accept any numeric spelling
    if isinstance(value, bool):
        raise ValueError(f"'{field}' must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"'{field}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"'{field}' must be a number > 0, got {value!r}")
    return number


def _gflops(value: object) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"'gflops' must map dtypes ({', '.join(DTYPES)}) to GFLOP/s, e.g. {{float32: 60}}; got {value!r}")
    result = {}
    for dtype, number in value.items():
        if dtype not in DTYPES:
            raise ValueError(f"'gflops' has unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        result[dtype] = _number(number, f"gflops.{dtype}")
    return result


def _quantization(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(q, str) for q in value):
        raise ValueError(f"'quantization' must be a list such as [bfloat16, int8, nf4], got {value!r}")
    unknown = sorted(set(value) - set(QUANTIZATIONS))
    if unknown:
        raise ValueError(f"'quantization' has unknown {unknown}; allowed: {', '.join(QUANTIZATIONS)}")
    return tuple(value)


def _cores(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'cores' must be a whole number ≥ 1, got {value!r}")
    return value


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{field}' must be non-empty text, got {value!r}")
    return value


def profile_from_dict(data: object, where: str = "profile") -> DeviceProfile:
    """Validate a parsed YAML document; every error message starts with ``where``."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: expected a mapping of {', '.join(KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in KEYS:
            log.warning("%s: ignoring unknown key %r (known: %s)", where, key, ", ".join(KEYS))
    missing = [key for key in REQUIRED if data.get(key) is None]
    if missing:
        raise ProfileError(f"{where}: missing required field(s) {', '.join(repr(k) for k in missing)}")
    try:
        try:
            memory = parse_size(data["memory"])
        except ValueError as exc:
            raise ValueError(f"'memory': {exc}") from None
        uplink, downlink = data.get("uplink_mbps"), data.get("downlink_mbps")
        return DeviceProfile(
            name=_text(data["name"], "name"),
            memory_bytes=memory,
            gflops=_gflops(data["gflops"]),
            cores=_cores(data.get("cores", 1)),
            quantization=_quantization(data.get("quantization")),
            uplink_mbps=None if uplink is None else _number(uplink, "uplink_mbps"),
            downlink_mbps=None if downlink is None else _number(downlink, "downlink_mbps"),
            source=_text(data["source"], "source") if data.get("source") is not None else "",
        )
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "memory": format_size(profile.memory_bytes),
        "gflops": dict(profile.gflops),
        "cores": profile.cores,
        "quantization": list(profile.quantization),
        "uplink_mbps": profile.uplink_mbps,
        **({"downlink_mbps": profile.downlink_mbps} if profile.downlink_mbps is not None else {}),
        "source": profile.source,
    }


def dump_profile(profile: DeviceProfile) -> str:
    import yaml

    body = yaml.safe_dump(profile_to_dict(profile), sort_keys=False, allow_unicode=True)
    return "# edgetune device profile (schema: profiles/README.md)\n" + body


def load_profile(path: str | Path) -> DeviceProfile:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    return profile_from_dict(data, str(path))


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    """Write atomically: a planner reading the file sees the old profile or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dump_profile(profile).encode("utf-8"))


def load_profiles(paths: Iterable[str | Path]) -> list[DeviceProfile]:
    """Profiles from files, and from every ``*.yaml``/``*.yml`` in a folder, in name order."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            files.append(entry)
    return [load_profile(f) for f in files]
