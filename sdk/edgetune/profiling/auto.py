"""A device's profile without anyone writing one: measured on its first start, cached beside
its state, measured again when the machine changes.

``edgetune device run`` and ``Device.join`` call :func:`self_profile` unless a profile is given
(``--profile``) or planning is off (``--no-plan``). The slow parts of a measurement (about five
seconds of matmul timing and the bitsandbytes probes) are cached in ``profile.yaml`` beside a
fingerprint of what they depend on (CPU model and count, installed memory, the cgroup's memory
limit, the framework versions, the training threads): a change of any of them, or
``--reprofile``, measures again. Memory is read at every start, because what is free changes
with whatever else the machine runs; it counts this process's own resident memory as usable,
since the cost model's peak includes the process itself.

``emulate`` turns the device into a slower one on the same machine (the demo, a lab): the
profile it announces is the emulated class's figures, capped by what was measured here (a
machine cannot emulate a faster one), and :meth:`SelfProfile.slowdown` is what
``edgetune.clock.ThrottledClock`` stretches its compute by.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..wire import DeviceProfile

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.yaml"
MACHINE_FILE = "machine.json"


@dataclass(frozen=True)
class SelfProfile:
    """What a device measured of this machine, and what it announces (the same, or an
    emulated class's figures capped by the measured ones)."""

    measured: DeviceProfile
    profile: DeviceProfile
    #: the slow measurements came from the cache
    cached: bool = False

    @property
    def emulated(self) -> bool:
        return self.profile is not self.measured

    def slowdown(self, dtype: str) -> float:
        """How many times slower than this machine the announced device computes in ``dtype``
        (1 without emulation). A dtype the class has no figure for runs there at its float32
        speed: it has no fast path for it."""
        if not self.emulated:
            return 1.0
        here = self.measured.gflops.get(dtype) or self.measured.gflops["float32"]
        there = self.profile.gflops.get(dtype) or self.profile.gflops.get("float32") or here
        return max(1.0, here / there)


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from ``/proc/cpuinfo`` (x86 ``model name``; Arm boards' ``Model`` or
    ``Hardware``), or "" when it says none."""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return ""


def machine_fingerprint(threads: int | None = None, proc: Path = Path("/proc")) -> dict[str, str]:
    """What the cached measurements depend on; any change means measuring again."""
    from .measure import cpu_count, parse_meminfo

    def read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def version(distribution: str) -> str:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return ""

    cgroup = ""
    for line in read(proc / "self" / "cgroup").splitlines():  # v2: our own memory.max
        if line.startswith("0::"):
            cgroup = read(Path("/sys/fs/cgroup") / line[3:].strip("/") / "memory.max").strip()
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(read(proc / "cpuinfo")) or platform.processor(),
        "cpus": str(cpu_count()),
        "memory_total": str(parse_meminfo(read(proc / "meminfo")).get("MemTotal", 0)),
        "cgroup_memory_max": cgroup,
        "torch": version("torch"),
        "bitsandbytes": version("bitsandbytes"),
        "threads": str(threads or ""),
    }


def self_profile(state_dir: Path, name: str, *, threads: int | None = None, reprofile: bool = False,
                 emulate: DeviceProfile | None = None, uplink_mbps: float | None = None,
                 downlink_mbps: float | None = None, seconds: float = 2.0) -> SelfProfile:
    """This device's profile: cached measurements if the machine is the one they were made on,
    else a new measurement (saved); memory read now; limited to ``emulate`` if given."""
    from ..backoff import resident_bytes
    from .files import ProfileError, load_profile, save_profile
    from .measure import measure_memory, measure_profile

    state_dir = Path(state_dir)
    fingerprint = machine_fingerprint(threads)
    cached = None if reprofile else _cached(state_dir, fingerprint, load_profile, ProfileError)
    if cached is None:
        why = "--reprofile" if reprofile else ("the machine changed" if (state_dir / MACHINE_FILE).exists()
                                               else "first start")
        log.info("measuring this machine (%s); takes a few seconds", why)
        _set_threads(threads)
        measured = measure_profile(name=name, seconds=seconds)
        save_profile(measured, state_dir / PROFILE_FILE)
        atomic_write_bytes(state_dir / MACHINE_FILE, json.dumps({"fingerprint": fingerprint}, indent=1).encode())
    else:
        measured = cached
    # what is free now, plus what this process holds already (the cost model's peak counts it)
    memory = (measure_memory() + resident_bytes()) // (1 << 20) * (1 << 20)
    measured = dataclasses.replace(measured, name=name, memory_bytes=memory,
                                   uplink_mbps=uplink_mbps if uplink_mbps is not None else measured.uplink_mbps,
                                   downlink_mbps=downlink_mbps if downlink_mbps is not None else measured.downlink_mbps)
    profile = limit_to(measured, emulate) if emulate is not None else measured
    return SelfProfile(measured, profile, cached is not None)


def limit_to(measured: DeviceProfile, target: DeviceProfile) -> DeviceProfile:
    """``target``'s figures, none beyond ``measured``'s: what this machine can pretend to be.
    A dtype or quantization the target lacks is absent (it has no fast path there)."""
    gflops = {dtype: min(value, measured.gflops[dtype]) for dtype, value in target.gflops.items()
              if dtype in measured.gflops}
    if not gflops:
        gflops = {"float32": min(target.gflops.get("float32", measured.gflops["float32"]), measured.gflops["float32"])}

    def smaller(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else min(a, b)

    return DeviceProfile(
        name=target.name,
        memory_bytes=min(measured.memory_bytes, target.memory_bytes),
        gflops=gflops,
        cores=min(measured.cores, target.cores),
        quantization=tuple(q for q in target.quantization if q in measured.quantization),
        uplink_mbps=smaller(target.uplink_mbps, measured.uplink_mbps),
        downlink_mbps=smaller(target.downlink_mbps, measured.downlink_mbps),
        source=f"emulating {target.name} on {measured.source or 'this machine'}",
    )


def default_state_dir(fleet: str, device_id: str) -> Path:
    """``$XDG_STATE_HOME/edgetune/{fleet}/{device_id}`` (``~/.local/state`` by default)."""
    root = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(root) / "edgetune" / fleet / device_id


def _cached(state_dir: Path, fingerprint: dict[str, str], load_profile, error) -> DeviceProfile | None:
    try:
        saved = json.loads((state_dir / MACHINE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        if isinstance(saved, dict) and isinstance(saved.get("fingerprint"), dict):
            changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            log.info("the machine changed since its profile was measured (%s)", ", ".join(changed))
        return None
    try:
        return load_profile(state_dir / PROFILE_FILE)
    except error as exc:
        log.warning("measuring again: %s", exc)
        return None


def _set_threads(threads: int | None) -> None:
    """Time the matmuls on as many threads as training will use."""
    if threads is None:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


__all__ = ["SelfProfile", "default_state_dir", "limit_to", "machine_fingerprint", "self_profile"]
