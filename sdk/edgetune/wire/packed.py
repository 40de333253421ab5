"""Packed tensors (wire v2): every tensor of a message in one contiguous buffer, described by an
index: five parallel lists ``[names, dtypes, shapes, offsets, blocks]`` (a tensor's ``name``,
``dtype``, ``shape`` and ``offset`` into the buffer, and its quantization ``block``, 0 if none).

A delta is 120 small tensors (SmolLM2-135M, LoRA r=8 on q,v): as one msgpack map per tensor
(wire v1) it cost a Python round trip each way per tensor, 0.23–0.38× a plain memory copy. Here
the encoder writes the index and joins the tensors' bytes once (``Blob``), and the decoder checks
the index in one pass and views the buffer with ``numpy.frombuffer``: no tensor is copied. Each
tensor starts at a multiple of ``ALIGN`` bytes (the gap is zeros), so every view is aligned; the
entries of a message tile its buffer in order, from 0 to its end, or the message is refused.

An ``int8`` entry holds ``n`` int8 values, then (aligned) ``⌈n / block⌉`` float32 scales
(``quantize.py``); it decodes to float32. ``float32``, ``float16`` and ``bfloat16`` (as
``BFloat16Array``) decode as they are, read-only views of the buffer.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import WireError
from .quantize import QuantizedTensor, dequantize
from .tensors import MAX_DIM_SIZE, MAX_DIMS, BFloat16Array

__all__ = ["ALIGN", "PACKED_DTYPES", "Blob", "Cursor", "pack_tensors", "unpack_tensors"]

#: every tensor's data starts at a multiple of this many bytes of the buffer
ALIGN = 8
#: the dtypes a packed entry may name; int8 means block-quantized (with scales)
PACKED_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
}
_NAME_OF = {np.dtype("<f4"): "float32", np.dtype("<f2"): "float16"}
#: dtype name -> (numpy dtype, bytes a value: 0 for int8, which is quantized)
_INFO = {name: (dtype, 0 if name == "int8" else dtype.itemsize) for name, dtype in PACKED_DTYPES.items()}
_SCALE = np.dtype("<f4")
_F32 = np.dtype(np.float32)
_ZEROS = bytes(ALIGN)
_BIG_ENDIAN_HOST = sys.byteorder == "big"
#: the most values a block-quantized tensor's block may hold (and the fewest: 1)
MAX_BLOCK = 1 << 16


class Blob:
    """The encoder's buffer: pieces joined once, when the message is written out."""

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.size = 0

    def add(self, data: memoryview | bytes) -> int:
        """Append ``data`` at the next aligned offset; returns that offset."""
        gap = -self.size % ALIGN
        if gap:
            self.pieces.append(_ZEROS[:gap])
            self.size += gap
        offset = self.size
        self.pieces.append(data)
        self.size += len(data)
        return offset


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and C-ordered, without a copy where it is already so."""
    if array.dtype.byteorder == ">" or (_BIG_ENDIAN_HOST and array.dtype.byteorder == "="):
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return memoryview(array.reshape(-1).view(np.uint8))


def pack_tensors(tensors: Mapping[str, Any], blob: Blob) -> list:
    """The index of ``tensors`` (arrays or ``QuantizedTensor``s), their bytes added to ``blob``:
    five parallel lists, ``[names, dtypes, shapes, offsets, blocks]`` (block 0: not quantized).
    (One pass, with the common case, a C-ordered float32 array, kept to a few operations: an
    adapter has hundreds of tensors.)"""
    names, kinds, shapes, offsets, blocks = [], [], [], [], []
    pieces, size = blob.pieces, blob.size
    for name, tensor in tensors.items():
        gap = -size % ALIGN
        if gap:
            pieces.append(_ZEROS[:gap])
            size += gap
        if type(tensor) is np.ndarray and tensor.dtype is _F32 and tensor.flags.c_contiguous and not _BIG_ENDIAN_HOST:
            data, kind, block = tensor, "float32", 0  # (bytes.join reads an array's buffer as it is)
        elif isinstance(tensor, QuantizedTensor):
            blob.size = size
            offset = blob.add(_raw(tensor.values))
            blob.add(_raw(np.ascontiguousarray(tensor.scales, dtype=_SCALE)))
            names.append(name), kinds.append("int8"), shapes.append(tensor.shape), offsets.append(offset)
            blocks.append(tensor.block)
            size = blob.size
            continue
        else:
            kind = "bfloat16" if isinstance(tensor, BFloat16Array) else _NAME_OF.get(np.dtype(tensor.dtype).newbyteorder("<"))
            if kind is None:
                raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}: a packed tensor is float32, float16, "
                                "bfloat16 or a QuantizedTensor")
            data, block = _raw(np.asarray(tensor)), 0
        names.append(name), kinds.append(kind), shapes.append(tensor.shape), offsets.append(size), blocks.append(block)
        pieces.append(data)
        size += data.nbytes
    blob.size = size
    return [names, kinds, shapes, offsets, blocks]


class Cursor:
    """Where the decoder is in a message's buffer: entries must follow each other in order."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.position = 0

    def finish(self) -> None:
        """The entries covered the whole buffer: no byte goes unaccounted for."""
        if self.position != len(self.data):
            raise WireError("bad_tensor", f"the tensor data has {len(self.data) - self.position} bytes no entry "
                            "describes")


def unpack_tensors(index: Any, cursor: Cursor, where: Any) -> dict[str, np.ndarray]:
    """Check the index against the buffer in one pass and view each tensor (int8 decoded to float32).

    Each tensor is an array over the buffer at its offset, made in one call: an entry costs
    well under a microsecond and a half, checks included."""
    if type(index) is dict and not index:  # (an empty map: no tensors)
        return {}
    if type(index) is not list or len(index) != 5 or not all(type(column) is list for column in index):
        _refuse(where, None, "expected [names, dtypes, shapes, offsets, blocks]")
    names, kinds, shapes, offsets, blocks = index
    if not len(names) == len(kinds) == len(shapes) == len(offsets) == len(blocks):
        _refuse(where, None, "the index's five lists differ in length")
    data, out, position = cursor.data, {}, cursor.position
    limit = len(data)
    for name, kind, shape, offset, block in zip(names, kinds, shapes, offsets, blocks):
        info = _INFO.get(kind) if type(kind) is str else None
        if info is None or type(name) is not str:
            _refuse(where, name, f"dtype {_shown(kind)} is not one of {', '.join(PACKED_DTYPES)}")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            _refuse(where, name, f"shape must be a list of ≤{MAX_DIMS} ints in [0, 2³¹)")
        n = 1
        for d in shape:
            if type(d) is not int or not 0 <= d < MAX_DIM_SIZE:
                _refuse(where, name, f"shape must be a list of ≤{MAX_DIMS} ints in [0, 2³¹)")
            n *= d
        start = position + (-position % ALIGN)
        if offset != start or type(offset) is not int:
            _refuse(where, name, f"offset {_shown(offset)} where the data continues at {start}")
        dtype, size = info
        if size:  # (a float type)
            end = offset + n * size
            if block != 0 or end > limit:
                _refuse(where, name, "only int8 entries have a block" if block != 0 else
                        f"needs bytes up to {end}, the data has {limit}")
            try:
                array = np.ndarray(shape, dtype, data, offset)  # (a read-only view of the buffer)
            except ValueError as exc:  # numpy's own limits (a 0-sized axis next to huge ones)
                _refuse(where, name, f"shape {shape}: {exc}")
            if kind == "bfloat16":
                array = array.view(BFloat16Array)
            elif _BIG_ENDIAN_HOST:
                array = array.astype(dtype.newbyteorder("="))
            out[name] = array
        else:
            if type(block) is not int or not 1 <= block <= MAX_BLOCK:
                _refuse(where, name, f"an int8 entry needs a block in 1..{MAX_BLOCK}")
            scales_at, count = offset + n + (-(offset + n) % ALIGN), -(-n // block)
            end = scales_at + 4 * count
            if end > limit:
                _refuse(where, name, f"needs bytes up to {end}, the data has {limit}")
            scales = np.frombuffer(data, _SCALE, count, scales_at)
            if count and not (np.isfinite(scales).all() and float(scales.min()) >= 0.0):
                _refuse(where, name, "scales must be finite and ≥ 0")
            try:
                out[name] = dequantize(np.frombuffer(data, np.int8, n, offset), scales, tuple(shape), block)
            except ValueError as exc:
                _refuse(where, name, f"shape {shape}: {exc}")
        position = end
    if len(out) != len(names):
        _refuse(where, None, "two entries of the same name")
    cursor.position = position
    return out


def _shown(value: Any) -> str:
    from .codec import shown  # (errors only; the codec imports this module)

    return shown(value)


def _refuse(where: Any, name: Any, detail: str) -> None:
    from .codec import path_text

    at = path_text(where) if name is None else f"{path_text(where)}[{_shown(name)}]"
    raise WireError("bad_tensor", f"{at}: {detail}")
