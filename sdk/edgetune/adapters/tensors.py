"""What every adapter kind's tensors share: named float arrays checked against a layout of
shapes, norms and differences, and the majority vote on a fleet's starting adapter.

Pure numpy, no torch and no wire: the aggregator validates and measures adapters of any kind
with these, and a kind's package adds only what is its own (``lora/``, ``prompt/``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["Shapes", "Tensors", "agree", "as_float32", "check_tensors", "consensus", "dense_change", "dense_norm",
           "tensor_problem"]

#: tensor name -> shape: an adapter's layout on a model
Shapes = dict[str, tuple[int, ...]]
Tensors = Mapping[str, np.ndarray]


def as_float32(array: np.ndarray) -> np.ndarray:
    """The array as float32 (a bfloat16 array from the wire converts itself)."""
    to_float32 = getattr(array, "to_float32", None)
    return to_float32() if to_float32 else np.asarray(array, dtype=np.float32)


def check_tensors(tensors: Tensors, shapes: Shapes) -> str | None:
    """Why ``tensors`` is not an adapter of ``shapes`` (None if it is): same names, same
    shapes, finite float values."""
    problem = tensor_problem(tensors, shapes)
    return problem[1] if problem else None


def tensor_problem(tensors: Tensors, shapes: Shapes, dtypes: tuple[str, ...] | None = None,
                   values: bool = True) -> tuple[str, str] | None:
    """``(reason, detail)`` of what keeps ``tensors`` from being an adapter of ``shapes``, or
    None. Reasons: ``wrong_shape`` (names or shapes), ``bad_dtype`` (not a float, or not one
    of ``dtypes``), ``not_finite``; the cheap checks run on every tensor before any value is read.
    ``values=False``: no pass over the values (a caller that takes the norm checks them there:
    ``finite_norm``)."""
    missing, extra = shapes.keys() - tensors.keys(), tensors.keys() - shapes.keys()
    if missing or extra:
        parts = [f"missing {sorted(missing)[:3]}"] * bool(missing) + [f"unexpected {sorted(extra)[:3]}"] * bool(extra)
        return "wrong_shape", "; ".join(parts)
    # (dtype objects compared, not their names: ``str(dtype)`` is ~10 µs, 120 times an update)
    allowed = None if dtypes is None else _numpy_dtypes(tuple(dtypes))
    for name, array in tensors.items():
        if tuple(array.shape) != tuple(shapes[name]):
            return "wrong_shape", f"{name} has shape {list(array.shape)}, expected {list(shapes[name])}"
        if type(array).__name__ == "BFloat16Array":
            if dtypes is not None and "bfloat16" not in dtypes:
                return "bad_dtype", f"{name} has dtype bfloat16, expected one of {', '.join(dtypes)}"
            continue
        if allowed is not None and array.dtype not in allowed:
            return "bad_dtype", f"{name} has dtype {array.dtype}, expected one of {', '.join(dtypes)}"
        if array.dtype.kind != "f":
            return "bad_dtype", f"{name} has dtype {array.dtype}, expected a float type"
    if values:
        for name, array in tensors.items():
            if not math.isfinite(square_sum(array)):  # (NaN and ±inf make the sum so; finite squares cannot overflow it)
                return "not_finite", f"{name} contains NaN or infinity"
    return None


def finite_norm(tensors: Tensors) -> tuple[float, str | None]:
    """``(L2 norm over all tensors, None)``, or ``(nan or inf, the name of a tensor with NaN or
    infinity)``: one pass over the values does both (squares of float32 values cannot overflow
    the float64 sum, so it is finite exactly when every value is)."""
    sums = {name: square_sum(t) for name, t in tensors.items()}
    bad = next((name for name, value in sums.items() if not math.isfinite(value)), None)
    return math.sqrt(sum(sums.values())), bad


@functools.lru_cache(maxsize=16)
def _numpy_dtypes(names: tuple[str, ...]) -> frozenset:
    """The numpy dtypes of ``names`` (bfloat16, which numpy lacks, is told by its array type)."""
    return frozenset(np.dtype(n) for n in names if n != "bfloat16")


def square_sum(t: np.ndarray) -> float:
    """``Σ x²`` of a float tensor, accumulated in float64 (a BLAS dot of its float64 copy: the
    fastest way numpy has, ~4× ``np.square(...).sum()``). A float32 value squares to at most
    ~1.2e77, so the sum is finite exactly when every value is."""
    flat = np.ravel(as_float32(t)).astype(np.float64)
    return float(flat.dot(flat))


def _f64(t: np.ndarray) -> np.ndarray:
    return np.asarray(as_float32(t), np.float64)


def dense_norm(tensors: Tensors) -> float:
    """L2 norm over all tensors together, accumulated in float64."""
    return math.sqrt(sum(square_sum(t) for t in tensors.values()))


def dense_change(parent: Tensors, candidate: Tensors) -> float:
    """``‖candidate − parent‖`` over the parent's tensors (Frobenius, float64)."""
    return math.sqrt(sum(float(np.sum((_f64(candidate[n]) - _f64(parent[n])) ** 2)) for n in parent))


def agree(a: Tensors, b: Tensors, rtol: float = 1e-3) -> str | None:
    """Why two devices' starting adapters differ (None if they agree within ``rtol`` of the
    tensors' scale): they should be computed from the same base."""
    if a.keys() != b.keys():
        return f"tensors {sorted(a)} vs {sorted(b)}"
    for name in a:
        x, y = np.asarray(a[name], np.float32), np.asarray(b[name], np.float32)
        if x.shape != y.shape:
            return f"{name} has shape {list(y.shape)}, expected {list(x.shape)}"
        scale = float(np.abs(x).max()) or 1.0
        diff = float(np.abs(x - y).max())
        if diff > rtol * scale:
            return f"{name} differs by {diff:.3g} (scale {scale:.3g}): another base model?"
    return None


def consensus(inits: dict[str, dict]) -> tuple[dict | None, dict[str, str]]:
    """The starting adapter a strict majority of devices agree on, and why each other device's
    differs. Devices of one fleet share the base, so all should agree; one that does not runs
    another base (or lies), and must not decide the fleet's start. Without a strict majority
    (say one against one) nobody can tell which is right: ``(None, {device: "disagrees"})``."""
    devices = list(inits)
    agreeing = {d: [e for e in devices if agree(inits[d], inits[e]) is None] for d in devices}
    chosen = max(devices, key=lambda d: (len(agreeing[d]), -devices.index(d)))
    if 2 * len(agreeing[chosen]) <= len(devices):
        return None, {d: f"agrees with {len(agreeing[d])} of {len(devices)}" for d in devices}
    return inits[chosen], {d: agree(inits[chosen], inits[d]) for d in devices if d not in agreeing[chosen]}
