"""Names and numbers every config and wire dataclass checks: fleet and device names become MQTT
topic levels, and a NaN must never pass for a positive number. Standard library only, so the
adapter kinds' specs (``edgetune.adapters.*.spec``) can use it without importing the wire."""

from __future__ import annotations

import math
import re

__all__ = ["check_name", "check_positive"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """Fleet and device names become MQTT topic levels: no wildcards, no slashes."""
    if not isinstance(value, str) or not _NAME.match(value):
        shown = repr(value[:40]) + ("…" if len(value) > 40 else "") if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{what} {shown} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


#: the most labels a device may carry (each key and value is a name: ``check_name``)
MAX_LABELS = 16


def check_labels(labels: dict[str, str]) -> None:
    """A device's labels (``site = "plant-3"``): at most ``MAX_LABELS``, keys and values names."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        check_name(key, "label")
        check_name(value, f"label {key}'s value")


def check_positive(value: float, what: str, allow_zero: bool = False) -> None:
    """``value`` > 0 (or ≥ 0), finite: written so that NaN fails, every comparison with it being False."""
    if not math.isfinite(value) or not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{what} must be {'≥ 0' if allow_zero else '> 0'}, got {value}")
