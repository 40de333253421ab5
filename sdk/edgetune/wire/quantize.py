"""Quantized tensors for the wire: float16, and int8 with one float32 scale per block of values.

An adapter delta is small and its values are spread evenly, so 8 bits with a scale per block of
``BLOCK`` values keep it to a bound that follows each block's own range, for about a quarter of
the bytes: ``n`` int8 values and ``⌈n / BLOCK⌉`` float32 scales (0.258 of float32's bytes at
``BLOCK = 128``). The bounds, per element ``x`` and its decoded ``x̂``:

- ``fp32``: exact.
- ``fp16``: ``|x − x̂| ≤ |x| · 2⁻¹¹`` for ``|x| ≥ 2⁻¹⁴`` (round to nearest), ``≤ 2⁻²⁵`` below.
  A tensor with a value beyond float16's range (65504) travels as float32 instead.
- ``int8``: ``|x − x̂| ≤ s / 2 + 2⁻²² · max|x|`` with ``s = max|x| over the block / 127``, i.e.
  ``≤ max|x| / 254`` and float32's rounding of ``x / s`` and ``q · s``.

What is dropped is not lost when a device sends with error feedback (``ErrorFeedback``): the
residual of this round's quantization is added to the next round's delta before quantizing, so
over rounds the sum of what was sent stays within one round's bound of the sum of the deltas.
Pure numpy; the encoder packs a ``QuantizedTensor`` as it is (``packed.py``), the decoder
returns float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCK", "PRECISIONS", "ErrorFeedback", "QuantizedTensor", "dequantize", "error_bound", "quantize",
           "quantize_int8", "quantize_tensors", "wire_bytes"]

#: what a delta may travel as: float32 (exact), float16, or int8 with per-block scales
PRECISIONS = ("fp32", "fp16", "int8")
#: values per int8 scale
BLOCK = 128
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class QuantizedTensor:
    """``values`` (int8, the tensor flattened) times the scale of each block of ``block`` of them."""

    values: np.ndarray  # (n,) int8
    scales: np.ndarray  # (⌈n / block⌉,) float32, ≥ 0
    shape: tuple[int, ...]
    block: int = BLOCK

    @property
    def size(self) -> int:
        return int(self.values.size)

    def to_float32(self) -> np.ndarray:
        return dequantize(self.values, self.scales, self.shape, self.block)


def quantize_int8(array: np.ndarray, block: int = BLOCK) -> QuantizedTensor:
    """Symmetric int8 per block of ``block`` values: ``round(x / s)`` with ``s = max|x| / 127``."""
    x = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    n = x.size
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:n] = x
    grid = padded.reshape(blocks, block)
    scales = (np.abs(grid).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    values = np.clip(np.rint(grid / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
    return QuantizedTensor(values, scales, tuple(array.shape), block)


def dequantize(values: np.ndarray, scales: np.ndarray, shape: tuple[int, ...], block: int) -> np.ndarray:
    """The float32 tensor an int8 one stands for."""
    n = values.size
    full = n // block
    out = np.empty(n, np.float32)
    if full:
        np.multiply(values[:full * block].reshape(full, block), scales[:full, None], out=out[:full * block].reshape(full, block),
                    dtype=np.float32)
    if n > full * block:
        np.multiply(values[full * block:], scales[full], out=out[full * block:], dtype=np.float32)
    return out.reshape(shape)


def _float32(tensor) -> np.ndarray:
    """Its values as float32 (a ``BFloat16Array`` holds bits, which ``asarray`` would misread)."""
    if hasattr(tensor, "to_float32"):
        return tensor.to_float32()
    return np.asarray(tensor, dtype=np.float32)


def quantize(array: np.ndarray, precision: str):
    """The tensor as it travels at ``precision`` (``PRECISIONS``)."""
    array = _float32(array)
    if precision == "fp32":
        return np.ascontiguousarray(array)
    if precision == "fp16":
        x = array
        if x.size and float(np.abs(x).max()) > _FP16_MAX:  # (beyond float16's range: kept exact)
            return np.ascontiguousarray(x)
        return x.astype(np.float16)
    if precision == "int8":
        return quantize_int8(array)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def wire_bytes(values: int, precision: str) -> float:
    """Bytes ``values`` adapter values take on the wire at ``precision`` (tensor data only)."""
    if precision == "fp32":
        return 4.0 * values
    if precision == "fp16":
        return 2.0 * values
    if precision == "int8":
        return values + 4.0 * -(-values // BLOCK)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def quantize_tensors(tensors: Mapping[str, np.ndarray], precision: str) -> dict:
    return {name: quantize(t, precision) for name, t in tensors.items()}


def decoded(tensor) -> np.ndarray:
    """What a receiver decodes a quantized tensor to (float32 or float16 values)."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.to_float32()
    return np.asarray(tensor)


def error_bound(array: np.ndarray, precision: str) -> np.ndarray:
    """The bound on each element's error at ``precision`` (see the module docstring)."""
    x = np.asarray(array, dtype=np.float32)
    if precision == "fp32":
        return np.zeros_like(x)
    if precision == "fp16":
        if x.size and float(np.abs(x).max()) > _FP16_MAX:
            return np.zeros_like(x)
        a = np.abs(x)
        return np.where(a >= 2.0 ** -14, a * 2.0 ** -11, 2.0 ** -25).astype(np.float32)
    if precision == "int8":
        q = quantize_int8(x)
        per_block = q.scales / 2.0 + q.scales * 127.0 * 2.0 ** -22  # (float32 rounds x / s and q · s)
        return np.repeat(per_block, q.block)[: x.size].reshape(x.shape).astype(np.float32)
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


class ErrorFeedback:
    """A device's memory of what quantization dropped: ``compress`` adds it to the next delta
    before quantizing and keeps the new remainder. The memory belongs to one fleet run and one
    layout: a delta of other tensors or shapes (another rank, a new run) starts it afresh."""

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}
        self._key: object = None

    def compress(self, delta: Mapping[str, np.ndarray], precision: str, key: object = None) -> dict:
        """The delta to send at ``precision``; ``key`` names what the memory belongs to (a run)."""
        shapes = {name: tuple(np.shape(t)) for name, t in delta.items()}
        if key != self._key or {n: r.shape for n, r in self.residual.items()} != shapes:
            self.residual, self._key = {}, key
        if precision == "fp32":  # (exact: what is left of earlier rounds goes with it)
            sent = {name: _float32(t) + self.residual.get(name, np.float32(0.0)) for name, t in delta.items()}
            self.residual = {}
            return sent
        sent = {}
        for name, t in delta.items():
            y = _float32(t) + self.residual.get(name, np.float32(0.0))
            q = quantize(y, precision)
            self.residual[name] = (y - decoded(q).astype(np.float32)).astype(np.float32)
            sent[name] = q
        return sent
