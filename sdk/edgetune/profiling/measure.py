"""Measure what this machine can afford for training, as a :class:`DeviceProfile`.

Three figures matter to the planner: memory that training may really use (inside a container
that is the cgroup's headroom, not the host's free RAM), sustained dense matmul throughput
(what a LoRA step spends its time on), and which base-weight quantizations actually run here.

The file parsers are pure functions over file contents so they can be tested with fixtures;
the ``read_*``/``measure_*`` functions do the I/O. torch and bitsandbytes are imported only
when measuring: without torch, throughput falls back to numpy float32 and no quantization is
reported (a device without torch cannot train a torch model anyway).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from .. import __version__
from ..wire import DeviceProfile

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
#: cgroup v1 says "no limit" with PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages);
#: anything this large (1 EiB) is no limit either.
_NO_LIMIT = 1 << 60
_MIB = 1 << 20
#: smallest matrix worth timing: below it, call overhead dominates the figure
_MIN_N = 256
#: a dtype slower than this share of float32 has no fast path here (it is emulated)
_FAST_PATH = 0.5


# --- memory: pure parsers -------------------------------------------------------------------


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as ``{field: bytes}`` (the kernel writes kB, meaning KiB)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        fields[key.strip()] = int(parts[0]) * scale
    return fields


def mem_available(meminfo: dict[str, int]) -> int:
    """MemAvailable (kernel ≥ 3.14) or, before it existed, its usual approximation."""
    if "MemAvailable" in meminfo:
        return meminfo["MemAvailable"]
    try:
        return meminfo["MemFree"] + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
    except KeyError:
        raise ValueError("/proc/meminfo has neither MemAvailable nor MemFree") from None


def parse_cgroup_limit(text: str) -> int | None:
    """``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1): bytes, or None for no limit."""
    value = text.strip()
    if value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"cgroup memory limit {value!r} is neither 'max' nor a number of bytes") from None
    return None if limit >= _NO_LIMIT else limit


def parse_cgroup_usage(text: str) -> int:
    """``memory.current`` (v2) or ``memory.usage_in_bytes`` (v1), in bytes."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"cgroup memory usage {text.strip()!r} is not a number of bytes") from None


def parse_memory_stat(text: str) -> dict[str, int]:
    """``memory.stat`` as ``{key: value}``; we read the inactive page cache from it."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


@dataclass(frozen=True)
class CgroupPaths:
    """This process's cgroup, relative to the hierarchy roots, from ``/proc/self/cgroup``."""

    v2: str | None = None
    v1_memory: str | None = None


def parse_proc_cgroup(text: str) -> CgroupPaths:
    """Lines are ``id:controllers:path``; v2 is ``0::path``, v1 names ``memory`` in its list."""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return CgroupPaths(v2=v2, v1_memory=v1)


def cgroup_headroom(limit: int | None, usage: int, reclaimable: int = 0) -> int | None:
    """Bytes a cgroup can still grow by, or None without a limit.

    ``reclaimable`` is the inactive page cache: the kernel drops it before it OOM-kills, so
    counting it as used (as ``usage`` does) would make a container that once read a big file
    look full. Docker and the kubelet subtract it the same way ("working set").
    """
    if limit is None:
        return None
    working_set = max(0, usage - max(0, reclaimable))
    return max(0, limit - working_set)


def usable_memory(available: int, cgroup_limit: int | None, cgroup_usage: int = 0, cgroup_reclaimable: int = 0) -> int:
    """What training may use: the smaller of the host's MemAvailable and the cgroup's headroom."""
    headroom = cgroup_headroom(cgroup_limit, cgroup_usage, cgroup_reclaimable)
    return available if headroom is None else min(available, headroom)


# --- memory: reading this machine -----------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _ancestors(root: Path, relative: str) -> Iterator[Path]:
    """Our cgroup directory and its parents up to ``root``: a limit on any of them binds us.

    Without a cgroup namespace ``relative`` names a host path that the container may not
    have mounted; its own cgroup is then mounted at ``root`` itself.
    """
    start = root / relative.strip("/")
    if not start.is_dir():
        start = root
    current = start
    while True:
        yield current
        if current == root or root not in current.parents:
            return
        current = current.parent


def read_cgroup_headroom(proc_cgroup: str, root: Path = CGROUP_ROOT) -> int | None:
    """The tightest headroom over our cgroup and its ancestors (v2 first, then v1)."""
    paths = parse_proc_cgroup(proc_cgroup)
    layouts = []
    if paths.v2 is not None:
        layouts.append((root, paths.v2, "memory.max", "memory.current", "inactive_file"))
    if paths.v1_memory is not None:
        layouts.append((root / "memory", paths.v1_memory, "memory.limit_in_bytes",
                        "memory.usage_in_bytes", "total_inactive_file"))
    headrooms = []
    for base, relative, limit_file, usage_file, inactive_key in layouts:
        if not base.is_dir():
            continue
        for directory in _ancestors(base, relative):
            limit_text, usage_text = _read(directory / limit_file), _read(directory / usage_file)
            if limit_text is None or usage_text is None:
                continue
            try:
                limit, usage = parse_cgroup_limit(limit_text), parse_cgroup_usage(usage_text)
            except ValueError as exc:
                log.info("ignoring %s: %s", directory, exc)
                continue
            inactive = parse_memory_stat(_read(directory / "memory.stat") or "").get(inactive_key, 0)
            headroom = cgroup_headroom(limit, usage, inactive)
            if headroom is not None:
                log.debug("cgroup %s: limit %d, usage %d, inactive file %d", directory, limit, usage, inactive)
                headrooms.append(headroom)
    return min(headrooms) if headrooms else None


def measure_memory(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Usable bytes for training on this machine, rounded down to whole MiB."""
    meminfo = _read(proc / "meminfo")
    if meminfo is None:
        raise RuntimeError(f"cannot read {proc / 'meminfo'}: edgetune profile measures memory on Linux only")
    available = mem_available(parse_meminfo(meminfo))
    headroom = read_cgroup_headroom(_read(proc / "self" / "cgroup") or "", cgroup_root)
    usable = available if headroom is None else min(available, headroom)
    log.info("memory: MemAvailable %.2f GiB, cgroup headroom %s", available / 2**30,
             "none (no limit)" if headroom is None else f"{headroom / 2**30:.2f} GiB")
    return usable // _MIB * _MIB


# --- throughput -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulTiming:
    n: int
    iterations: int
    seconds: float

    @property
    def gflops(self) -> float:
        """A square n×n matmul is n³ multiply-adds, i.e. 2n³ floating-point operations."""
        return 2 * self.n**3 * self.iterations / self.seconds / 1e9


def time_square_matmul(make_step: Callable[[int], Callable[[], object]], budget_s: float, n: int = 1024) -> MatmulTiming:
    """Run ``make_step(n)()`` back to back for ``budget_s`` seconds after a warm-up.

    The warm-up call starts the thread pool and picks kernels; if one call then takes more
    than an eighth of the budget (a slow board, or an emulated dtype), ``n`` is halved so the
    figure still averages several calls. A first call at the smallest size says how fast this
    is, so an emulated dtype (bfloat16 without bf16 instructions: 100× slower) does not spend
    a minute in warm-ups of the largest size.
    """
    if n > _MIN_N:
        probe = make_step(_MIN_N)
        probe()
        start = time.perf_counter()
        probe()
        rate = 2 * _MIN_N**3 / max(time.perf_counter() - start, 1e-9)  # flop/s
        while n > _MIN_N and 2 * n**3 / rate > budget_s / 8:
            n //= 2
    while True:
        step = make_step(n)
        step()
        start = time.perf_counter()
        step()
        once = time.perf_counter() - start
        if once <= budget_s / 8 or n <= _MIN_N:
            break
        n //= 2
    iterations, start = 0, time.perf_counter()
    while True:
        step()
        iterations += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return MatmulTiming(n, iterations, elapsed)


def _torch_step(dtype_name: str) -> Callable[[int], Callable[[], object]]:
    import torch

    dtype = getattr(torch, dtype_name)

    def make(n: int) -> Callable[[], object]:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        return lambda: torch.matmul(a, b)

    return make


def _numpy_step(n: int) -> Callable[[], object]:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return lambda: np.matmul(a, b)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def bfloat16_works() -> bool:
    """Whether torch runs a bfloat16 matmul here (emulated on CPUs without bf16 instructions)."""
    try:
        import torch

        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite(torch.matmul(a, a).float()).all())
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        log.info("bfloat16 unavailable: %s", exc)
        return False


def _warn_if_busy() -> None:
    """Other work on the CPUs makes the figure read low; say so rather than hide it."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if load >= 1.0:
        log.warning("load average is %.1f on %d CPUs: other processes compete with the timing, "
                    "so GFLOP/s will read low; measure on an idle machine", load, cpu_count())


def measure_gflops(seconds: float, has_torch: bool, bf16: bool) -> dict[str, float]:
    """Sustained GFLOP/s per dtype, ``seconds / 2`` of timing each."""
    budget = seconds / 2
    _warn_if_busy()
    if not has_torch:
        log.info("torch is not installed: timing numpy float32 matmul instead")
        timing = time_square_matmul(_numpy_step, budget)
        return {"float32": round(timing.gflops, 1)}
    import torch

    log.info("timing torch matmul on %d threads", torch.get_num_threads())
    result = {}
    for dtype in ("float32", "bfloat16") if bf16 else ("float32",):
        timing = time_square_matmul(_torch_step(dtype), budget)
        log.info("%s: %d× %d² matmul in %.2f s = %.1f GFLOP/s", dtype, timing.iterations, timing.n,
                 timing.seconds, timing.gflops)
        if dtype != "float32" and timing.gflops < _FAST_PATH * result["float32"]:
            # emulated (no bf16 instructions): no fast path, and the planner must not time one
            log.info("%s runs at %.0f%% of float32 here: emulated, left out of the profile", dtype,
                     100 * timing.gflops / result["float32"])
            continue
        result[dtype] = max(0.1, round(timing.gflops, 1))
    return result


# --- quantization ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """bitsandbytes warns at import about optional kernels we do not need; keep probes quiet."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous)


def probe_bitsandbytes() -> tuple[str, ...]:
    """"int8" and/or "nf4" if a tiny bitsandbytes layer of that kind runs forward on the CPU."""
    with _quiet("bitsandbytes"):
        try:
            import bitsandbytes as bnb
            import torch
        except Exception as exc:  # noqa: BLE001 - a broken install is as good as none
            log.info("int8/nf4 unavailable: bitsandbytes does not import (%s)", exc)
            return ()
        builders = {
            "int8": lambda: bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False),
            "nf4": lambda: bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32),
        }
        found = []
        for kind, build in builders.items():
            try:
                layer = build().to("cpu")  # moving to a device is what quantizes the weights
                out = layer(torch.randn(2, 64))
                if out.shape != (2, 32) or not bool(torch.isfinite(out).all()):
                    raise RuntimeError(f"forward returned {tuple(out.shape)} with non-finite values")
                found.append(kind)
            except Exception as exc:  # noqa: BLE001 - any failure means "not here"
                log.info("%s unavailable: bitsandbytes %s forward on CPU failed: %s", kind, kind, exc)
        return tuple(found)


# --- the whole profile ----------------------------------------------------------------------


def cpu_count() -> int:
    """CPUs this process may run on (taskset/cpuset aware where the OS can tell)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def measure_profile(name: str | None = None, uplink_mbps: float | None = None, seconds: float = 2.0) -> DeviceProfile:
    """Measure this machine: about ``seconds`` of matmul timing plus a few seconds of imports.

    A short run overstates what a passively cooled board sustains once it heats up; pass a
    longer ``seconds`` (e.g. 120) on such devices. The uplink is not measured (that needs a
    peer); pass what the site's link sustains.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if uplink_mbps is not None and not uplink_mbps > 0:
        raise ValueError(f"uplink_mbps must be > 0, got {uplink_mbps}")
    memory = measure_memory()
    has_torch = _torch_available()
    bf16 = has_torch and bfloat16_works()
    gflops = measure_gflops(seconds, has_torch, bf16)
    quantization = (("bfloat16",) if bf16 else ()) + (probe_bitsandbytes() if has_torch else ())
    backend = f"torch {_torch_version()}" if has_torch else "numpy"
    return DeviceProfile(
        name=name or socket.gethostname() or "this-machine",
        memory_bytes=memory,
        gflops=gflops,
        cores=cpu_count(),
        quantization=quantization,
        uplink_mbps=uplink_mbps,
        source=f"measured {date.today().isoformat()} by edgetune profile {__version__} "
               f"({backend}, {platform.machine()})",
    )
