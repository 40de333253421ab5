"""Coordinate-wise robust combination of deltas, for fleets that fear poisoning.

A weighted mean lets one device move the global adapter anywhere; a coordinate-wise median,
or a mean after dropping the ``trim`` largest and smallest values of each coordinate, bounds
what a minority can do (it moves each coordinate at most to the edge of the honest values).

Both are **not exact** and ignore sample counts (a weighted median would let a device claim a
majority of samples). They combine deltas of the same tensors element by element, so they
apply to the averaging strategies (``fedit``, ``dense``) only: the exact LoRA strategies
merge products ``Bₖ·Aₖ``, which a factor-wise median does not preserve. Lower-rank LoRA
deltas are zero-padded to the full rank first, as ``fedit`` does. Memory: every delta of the
round at once, O(devices × adapter), unlike the streaming mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgetune.adapters.tensors import as_float32

ROBUST_METHODS = ("median", "trimmed_mean")


def trimmed_mean(stack: np.ndarray, trim: float) -> np.ndarray:
    """Mean over axis 0 of ``stack`` after dropping ⌊trim·n⌋ smallest and largest values of
    each coordinate (trim in [0, 0.5)); trim 0 is the plain mean."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    n = stack.shape[0]
    k = int(np.floor(trim * n))
    if k == 0:
        return stack.mean(axis=0)
    ordered = np.sort(stack, axis=0)
    return ordered[k:n - k].mean(axis=0)


def _pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad at the end of each axis (a lower-rank LoRA factor's missing components)."""
    if array.shape == tuple(shape):
        return array
    return np.pad(array, [(0, full - have) for have, full in zip(array.shape, shape)])


def robust_combine(deltas: Sequence[Mapping[str, np.ndarray]], shapes: Mapping[str, tuple[int, ...]],
                   method: str, trim: float = 0.1) -> dict[str, np.ndarray]:
    """One delta per tensor of ``shapes``: the coordinate-wise ``median`` or ``trimmed_mean``
    of ``deltas`` (each zero-padded to ``shapes``), in float32."""
    if method not in ROBUST_METHODS:
        raise ValueError(f"robust method {method!r} is not one of {', '.join(ROBUST_METHODS)}")
    if not deltas:
        raise ValueError("robust aggregation needs at least one delta")
    out = {}
    for name, shape in shapes.items():
        stack = np.stack([_pad(np.asarray(as_float32(d[name]), np.float64), tuple(shape)) for d in deltas])
        combined = np.median(stack, axis=0) if method == "median" else trimmed_mean(stack, trim)
        out[name] = combined.astype(np.float32)
    return out
