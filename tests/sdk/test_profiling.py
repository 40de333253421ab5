"""Device profiles: cgroup/meminfo parsing, size parsing, YAML files, the shipped profiles,
and one real (short) measurement."""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.profiling import ProfileError, dump_profile, load_profile, load_profiles, parse_size, save_profile
from edgetune.profiling.cli import add_profile_parser, run_profile
from edgetune.profiling.files import format_size, profile_from_dict
from edgetune.profiling.measure import (
    cgroup_headroom,
    measure_gflops,
    measure_profile,
    mem_available,
    parse_cgroup_limit,
    parse_cgroup_usage,
    parse_memory_stat,
    parse_meminfo,
    parse_proc_cgroup,
    read_cgroup_headroom,
    time_square_matmul,
    usable_memory,
)
from edgetune.wire import DeviceProfile

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
GiB = 2**30

MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        20000000 kB
MemAvailable:   24210884 kB
Buffers:          100000 kB
Cached:          1000000 kB
HugePages_Total:       0
"""


# --- parsers --------------------------------------------------------------------------------


def test_meminfo_is_parsed_in_bytes():
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 24684084 * 1024
    assert info["HugePages_Total"] == 0  # no unit: a count, not kB
    assert mem_available(info) == 24210884 * 1024


def test_meminfo_without_memavailable_falls_back_to_free_plus_cache():
    old_kernel = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 30 kB\n"
    assert mem_available(parse_meminfo(old_kernel)) == 150 * 1024
    with pytest.raises(ValueError, match="MemAvailable"):
        mem_available(parse_meminfo("MemTotal: 1000 kB\n"))


@pytest.mark.parametrize("text, expected", [
    ("max\n", None),                                 # v2: no limit
    ("9223372036854771712\n", None),                 # v1: PAGE_COUNTER_MAX pages of 4 KiB
    ("9223372036854775807", None),                   # v1 on other page sizes / LONG_MAX
    ("4294967296\n", 4 * GiB),                       # a real limit
    ("536870912", 512 * 2**20),
])
def test_cgroup_limit(text, expected):
    assert parse_cgroup_limit(text) == expected


def test_cgroup_garbage_is_a_clear_error():
    with pytest.raises(ValueError, match="neither 'max' nor a number"):
        parse_cgroup_limit("lots")
    with pytest.raises(ValueError, match="not a number"):
        parse_cgroup_usage("")
    assert parse_cgroup_usage("1048576\n") == 2**20


def test_proc_cgroup_v1_v2_and_hybrid():
    v2 = parse_proc_cgroup("0::/system.slice/docker-abc.scope\n")
    assert v2.v2 == "/system.slice/docker-abc.scope" and v2.v1_memory is None
    v1 = parse_proc_cgroup("12:cpu,cpuacct:/x\n4:memory:/process_api/817613\n0::/\n")
    assert v1.v1_memory == "/process_api/817613" and v1.v2 == "/"
    assert parse_proc_cgroup("5:cpuset,memory:/k8s/pod1\n").v1_memory == "/k8s/pod1"


def test_memory_stat():
    stats = parse_memory_stat("anon 100\nfile 5000\ninactive_file 4000\nbogus line here\n")
    assert stats == {"anon": 100, "file": 5000, "inactive_file": 4000}


# --- usable memory --------------------------------------------------------------------------


def test_usable_memory_without_a_limit_is_memavailable():
    assert usable_memory(8 * GiB, None, 123) == 8 * GiB


def test_usable_memory_is_the_smaller_of_host_and_cgroup_headroom():
    # container limited to 4 GiB, 1 GiB used: 3 GiB left although the host has 8 free
    assert usable_memory(8 * GiB, 4 * GiB, 1 * GiB) == 3 * GiB
    # host nearly full: MemAvailable binds even inside a generous cgroup
    assert usable_memory(1 * GiB, 16 * GiB, 1 * GiB) == 1 * GiB


def test_inactive_page_cache_does_not_count_as_used():
    assert usable_memory(8 * GiB, 4 * GiB, 3 * GiB, cgroup_reclaimable=2 * GiB) == 3 * GiB
    assert cgroup_headroom(4 * GiB, 5 * GiB) == 0  # over the limit: nothing, not negative
    assert cgroup_headroom(None, 5 * GiB) is None


def _write(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_cgroup_v2_tree_tightest_ancestor_wins(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "kubepods", {"memory.max": str(2 * GiB), "memory.current": str(GiB // 2),
                               "memory.stat": "inactive_file 0\n"})
    _write(root / "kubepods" / "pod1", {"memory.max": "max", "memory.current": str(GiB // 4)})
    assert read_cgroup_headroom("0::/kubepods/pod1\n", root) == 2 * GiB - GiB // 2


def test_cgroup_v1_with_sentinel_and_real_limit(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "memory", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "999"})
    _write(root / "memory" / "docker" / "c1", {"memory.limit_in_bytes": str(GiB),
                                               "memory.usage_in_bytes": str(GiB // 2),
                                               "memory.stat": "total_inactive_file 268435456\n"})
    assert read_cgroup_headroom("4:memory:/docker/c1\n", root) == GiB - (GiB // 2 - 2**28)
    # only the host's sentinel: no limit
    assert read_cgroup_headroom("4:memory:/\n", root) is None


def test_cgroup_path_not_mounted_uses_the_mount_root(tmp_path):
    # without a cgroup namespace /proc/self/cgroup names a host path the container lacks
    root = tmp_path / "cgroup"
    _write(root, {"memory.max": str(GiB), "memory.current": "0"})
    assert read_cgroup_headroom("0::/host/path/we/cannot/see\n", root) == GiB


# --- sizes and YAML files -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("7.5 GiB", 7.5 * GiB), ("512 MiB", 512 * 2**20), ("8 GB", 8 * 10**9), ("8GB", 8 * 10**9),
    ("0.3 GB", 300_000_000), ("1 tib", 2**40), (8589934592, 8 * GiB), ("1024", 1024), ("100 B", 100),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "8 GX", "-1 GiB", "0 GiB", True, None, 1.5, "GiB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("size", [6 * GiB, int(7.5 * GiB), int(2.25 * GiB), 23373 * 2**20, 12345])
def test_format_size_round_trips_exactly(size):
    assert parse_size(format_size(size)) == size


def _profile(**changes) -> DeviceProfile:
    fields = dict(name="pi5", memory_bytes=6 * GiB, gflops={"float32": 60.0, "bfloat16": 12.5}, cores=4,
                  quantization=("int8", "nf4"), uplink_mbps=20.0, source="test fixture")
    fields.update(changes)
    return DeviceProfile(**fields)


def test_yaml_round_trip(tmp_path):
    profile = _profile()
    path = tmp_path / "sub" / "pi5.yaml"
    save_profile(profile, path)
    assert "memory: 6 GiB" in path.read_text()
    assert load_profile(path) == profile
    assert load_profile(path).quantization == ("int8", "nf4")
    assert [p.name for p in load_profiles([tmp_path / "sub"])] == ["pi5"]


def test_optional_fields_default(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("name: tiny\nmemory: 536870912\ngflops: {float32: 1e1}\n")
    profile = load_profile(path)
    assert (profile.memory_bytes, profile.gflops, profile.cores, profile.quantization, profile.uplink_mbps) == \
        (512 * 2**20, {"float32": 10.0}, 1, (), None)


@pytest.mark.parametrize("body, field, allowed", [
    ("memory: 6 GiB\ngflops: {float32: 1}\n", "'name'", None),
    ("name: x\ngflops: {float32: 1}\n", "'memory'", None),
    ("name: x\nmemory: lots\ngflops: {float32: 1}\n", "'memory'", "GiB"),
    ("name: x\nmemory: 1 GiB\ngflops: {fp32: 1}\n", "'gflops'", "float32, bfloat16"),
    ("name: x\nmemory: 1 GiB\ngflops: {float32: -3}\n", "gflops.float32", "> 0"),
    ("name: x\nmemory: 1 GiB\ngflops: 60\n", "'gflops'", "float32"),
    ("name: x\nmemory: 1 GiB\ngflops: {float32: 1}\nquantization: [int4]\n", "'quantization'", "bfloat16, int8, nf4"),
    ("name: x\nmemory: 1 GiB\ngflops: {float32: 1}\ncores: 0\n", "'cores'", "≥ 1"),
    ("name: x\nmemory: 1 GiB\ngflops: {float32: 1}\nuplink_mbps: fast\n", "'uplink_mbps'", "number"),
])
def test_errors_name_the_file_and_the_field(tmp_path, body, field, allowed):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert str(path) in message and field in message
    if allowed:
        assert allowed in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="missing.yaml: cannot read"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ProfileError, match="list.yaml: expected a mapping"):
        load_profile(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="broken.yaml: not valid YAML"):
        load_profile(tmp_path / "broken.yaml")
    assert isinstance(ProfileError("x"), ValueError)


def test_unknown_key_is_a_warning_not_an_error(tmp_path, caplog):
    path = tmp_path / "newer.yaml"
    path.write_text("name: x\nmemory: 1 GiB\ngflops: {float32: 1}\nnpu_tops: 6\n")
    with caplog.at_level(logging.WARNING, logger="edgetune.profiling.files"):
        profile = load_profile(path)
    assert profile.name == "x"
    assert any("npu_tops" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


# --- the shipped profiles -------------------------------------------------------------------


SHIPPED = sorted(PROFILES.glob("*.yaml"))


def test_the_device_classes_are_there():
    names = {p.stem for p in SHIPPED}
    assert {"raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "intel-n100-16gb", "raspberry-pi-4-4gb-gateway",
            "xeon-d-8core-32gb", "this-machine"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profile_loads_and_is_sane(path, caplog):
    with caplog.at_level(logging.WARNING):
        profile = load_profile(path)
    assert not caplog.records, "shipped profiles use only known keys"
    assert profile.name == path.stem
    assert 0 < profile.memory_bytes < 2**40
    assert profile.gflops and all(v > 0 for v in profile.gflops.values())
    assert profile.source.strip()
    if path.stem != "this-machine":
        assert profile.uplink_mbps and profile.uplink_mbps > 0


# --- measuring ------------------------------------------------------------------------------


def test_importing_profiling_does_not_import_torch_or_yaml():
    code = "import sys, edgetune.profiling; print(sorted({'torch', 'yaml', 'bitsandbytes'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_measure_profile_returns_positive_numbers():
    profile = measure_profile(name="test-box", uplink_mbps=12.5, seconds=0.5)
    assert profile.name == "test-box" and profile.uplink_mbps == 12.5
    assert profile.memory_bytes > 0 and profile.memory_bytes % 2**20 == 0
    assert profile.gflops["float32"] > 0
    assert profile.cores >= 1
    assert set(profile.quantization) <= {"bfloat16", "int8", "nf4"}
    assert profile.source.startswith("measured ") and "edgetune profile" in profile.source


def test_slow_matmul_shrinks_the_matrix_but_not_below_the_floor():
    import time

    timing = time_square_matmul(lambda n: (lambda: time.sleep(0.04 * n / 1024)), budget_s=0.1)
    assert timing.n == 256 and timing.iterations >= 1 and timing.seconds >= 0.1
    assert timing.gflops == pytest.approx(2 * 256**3 * timing.iterations / timing.seconds / 1e9)


def test_numpy_fallback_measures_float32_only():
    gflops = measure_gflops(0.2, has_torch=False, bf16=False)
    assert list(gflops) == ["float32"] and gflops["float32"] > 0


def test_cli_prints_yaml_and_table(monkeypatch):
    import edgetune.profiling.measure as measure

    monkeypatch.setattr(measure, "measure_profile", lambda name, uplink_mbps, seconds: _profile(name=name or "h"))
    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    assert run_profile(parser.parse_args(["profile", "--name", "box"]), out, err) == 0
    assert profile_from_dict(__import__("yaml").safe_load(out.getvalue())).name == "box"
    assert "float32 matmul" in err.getvalue() and "60.0 GFLOP/s" in err.getvalue()
    assert run_profile(parser.parse_args(["profile", "--seconds", "0"]), out, err) == 2


def test_cli_writes_out_file(tmp_path, monkeypatch):
    import edgetune.profiling.measure as measure

    monkeypatch.setattr(measure, "measure_profile", lambda name, uplink_mbps, seconds: _profile())
    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    target = tmp_path / "me.yaml"
    assert run_profile(parser.parse_args(["profile", "--out", str(target)]), out, io.StringIO()) == 0
    assert load_profile(target) == _profile() and f"wrote {target}" in out.getvalue()
    dump_profile(_profile())  # also usable without a file
