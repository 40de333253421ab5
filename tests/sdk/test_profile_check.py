"""Profiles outside what hardware can be are named field by field (planning/profile_check.py)."""

from __future__ import annotations

import math

import pytest

from edgetune.planning.profile_check import profile_problem
from edgetune.wire import DeviceProfile

GOOD = DeviceProfile("pi5", 4 << 30, {"float32": 20.0, "bfloat16": 8.0}, 4, ("int8",), 50.0, "measured", 100.0)


def _with(**changes) -> DeviceProfile:
    fields = {**GOOD.__dict__, **changes}
    return DeviceProfile(**fields)


def test_real_device_classes_pass():
    from pathlib import Path

    from edgetune.profiling import load_profile

    assert profile_problem(GOOD) is None
    files = sorted((Path(__file__).resolve().parents[2] / "profiles").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert profile_problem(load_profile(path)) is None, path


@pytest.mark.parametrize("changes,field", [
    ({"uplink_mbps": math.nan}, "uplink_mbps is nan"),
    ({"downlink_mbps": math.inf}, "downlink_mbps is inf"),
    ({"gflops": {"float32": math.nan}}, "gflops[float32] is nan"),
    ({"gflops": {"float32": 1e-300}}, "gflops[float32] is 1e-300"),
    ({"gflops": {"float32": 1e30}}, "outside"),
    ({"gflops": {"float32": 1.0, "int4": 3.0}}, "unknown dtype 'int4'"),
    ({"memory_bytes": 10**18}, "memory_bytes is 1e+18 bytes, outside"),
    ({"memory_bytes": math.nan}, "memory_bytes is nan"),
    ({"cores": 10**6}, "cores is 1e+06"),
    ({"name": "x" * 1000}, "name is longer"),
])
def test_each_impossible_field_is_named_briefly(changes, field):
    why = profile_problem(_with(**changes))
    assert why is not None and field in why, why
    assert len(why) < 200
