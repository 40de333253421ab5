"""The digest of a global adapter version: what names a version's weights wherever they are.

The aggregator records it with every version (``versions.json``) and puts it in the signed
``serving`` notice; a device computes it over the adapter it received and serves that adapter
only if the two are equal, so what a device serves is bit for bit the version the operator
promoted, whatever path its bytes took. SHA-256 over the tensors as float32 in name order,
each with its name and shape: two adapters with the same digest compute the same model.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from .tensors import Tensors, as_float32

__all__ = ["adapter_digest"]


def adapter_digest(tensors: Tensors, merged: Tensors | None = None) -> str:
    """SHA-256 (hex) of an adapter's trainable ``tensors`` and its frozen ``merged`` part."""
    h = hashlib.sha256(b"edgetune adapter digest 1\0")
    for part, named in ((b"tensors", tensors), (b"merged", merged or {})):
        h.update(part + struct.pack("<I", len(named)))
        for name in sorted(named):
            array = np.ascontiguousarray(as_float32(named[name]), dtype="<f4")
            encoded = name.encode()
            h.update(struct.pack("<II", len(encoded), array.ndim) + encoded)
            h.update(struct.pack(f"<{array.ndim}Q", *array.shape))
            h.update(memoryview(array).cast("B"))
    return h.hexdigest()
