"""Writing an adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``),
so ``peft.PeftModel.from_pretrained(base, path)`` loads what the fleet trained: a LoRA, or a
soft prompt (PEFT prompt tuning).

The safetensors file is written here with numpy (an 8-byte header length, a JSON header, raw
little-endian data), because the aggregator must not need torch or extra packages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from .tensors import as_float32


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of float32 tensors (sorted by name, 8-byte aligned header)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(as_float32(tensors[name]), dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def write_peft_files(directory: Path, config: Mapping, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str]) -> None:
    """Both files, each written atomically (a kind's PEFT writer builds what goes in them)."""
    atomic_write_bytes(directory / "adapter_model.safetensors", safetensors_bytes(tensors, metadata))
    atomic_write_bytes(directory / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True).encode())


def write_peft_adapter(directory: Path, spec, tensors: Mapping[str, np.ndarray], base_model: str = "",
                       merged: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write an adapter of any kind into ``directory`` (created if needed), as its kind does
    (``AdapterKind.write_peft``). A frozen ``merged`` delta (see ``GlobalAdapter``) is folded in."""
    from .registry import adapter_kind

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter_kind(spec).write_peft(directory, spec, tensors, base_model, merged)
    return directory
