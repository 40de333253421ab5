"""Tensors on the wire: ``{"dtype": str, "shape": [int, ...], "data": bytes}``, little-endian.

Why not pickle or ``.npy``: pickle executes code on load, and ``.npy`` carries a text header that
must be parsed; a three-field map is trivially validated and decoded with ``numpy.frombuffer``
without copying. numpy has no bfloat16, so bfloat16 tensors decode zero-copy into
:class:`BFloat16Array`, a uint16 view of the raw bits that converts to float32 on request.
"""

from __future__ import annotations

import sys
from math import prod
from typing import Any

import numpy as np

from .errors import WireError

#: Wire dtype name -> numpy dtype (little-endian).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 31
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class BFloat16Array(np.ndarray):
    """Raw bfloat16 bits held as uint16 (numpy has no bfloat16 type)."""

    def to_float32(self) -> np.ndarray:
        # bfloat16 is the top half of a float32: shift the bits back into place.
        return (np.asarray(self, dtype=np.uint32) << 16).view(np.float32)


def to_bfloat16(values: np.ndarray) -> BFloat16Array:
    """Round float32 values to bfloat16 (round to nearest, ties to even)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out.view(BFloat16Array)


_NAME_OF = {dtype: name for name, dtype in DTYPES.items() if name != "bfloat16"}
_NAME_OF.update({dtype.newbyteorder(">"): name for dtype, name in list(_NAME_OF.items())})


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Map for one tensor. ``data`` is a memoryview, so msgpack copies it once, straight
    into its output buffer."""
    name = _NAME_OF.get(array.dtype)
    if name is None:
        if not isinstance(array, BFloat16Array):
            raise TypeError(f"dtype {array.dtype} cannot go on the wire; use one of {', '.join(DTYPES)}")
        name = "bfloat16"
    if array.dtype.byteorder == ">" or (_BIG_ENDIAN_HOST and array.dtype.byteorder == "="):
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    # (reshape before view: a 0-d array cannot change its itemsize)
    return {"dtype": name, "shape": list(array.shape), "data": memoryview(array.reshape(-1).view(np.uint8))}


def _text(what: Any) -> str:
    from .codec import path_text  # (tensor errors are rare; keep the import off the hot path)

    return path_text(what)


def _shown(value: Any) -> str:
    from .codec import shown  # (a bounded repr: the dtype may be any received value)

    return shown(value)


def decode_tensor(obj: Any, what: Any = "tensor") -> np.ndarray:
    """Validate and decode a tensor map without copying its data.

    The result is read-only (it views the message's bytes); copy it to modify it.
    """
    if type(obj) is not dict:
        raise WireError("bad_tensor", f"{_text(what)}: expected a map, got {type(obj).__name__}")
    try:
        name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    except KeyError:
        missing = {"dtype", "shape", "data"} - set(obj)
        raise WireError("bad_tensor", f"{_text(what)}: missing {', '.join(sorted(missing))}") from None
    dtype = DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise WireError("bad_tensor", f"{_text(what)}: dtype {_shown(name)} not one of {', '.join(DTYPES)}")
    if type(shape) not in (list, tuple) or len(shape) > MAX_DIMS or not all(
        type(d) is int and 0 <= d < MAX_DIM_SIZE for d in shape
    ):
        raise WireError("bad_tensor", f"{_text(what)}: shape must be a list of ≤{MAX_DIMS} ints in [0, 2³¹)")
    if type(data) not in (bytes, bytearray, memoryview):
        raise WireError("bad_tensor", f"{_text(what)}: data must be bytes")
    expected = prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            "bad_tensor",
            f"{_text(what)}: {len(data)} bytes of data for shape {list(shape)} {name} (needs {expected})",
        )
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # numpy's own limits (e.g. a 0-sized axis next to a huge one)
        raise WireError("bad_tensor", f"{_text(what)}: shape {list(shape)}: {exc}") from None
    if name == "bfloat16":
        array = array.view(BFloat16Array)
    if dtype.byteorder == "<" and sys.byteorder == "big":
        array = array.astype(dtype.newbyteorder("="))
    return array
