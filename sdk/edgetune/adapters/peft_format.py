"""Writing a LoRA adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``),
so ``peft.PeftModel.from_pretrained(base, path)`` loads what the fleet trained.

The safetensors file is written here with numpy (an 8-byte header length, a JSON header, raw
little-endian data), because the aggregator must not need torch or extra packages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..wire.schema import LoraSpec
from .lora import as_float32

_PEFT_PREFIX = "base_model.model."


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


def peft_config(spec: LoraSpec, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(set(spec.target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft_adapter(
    directory: Path, spec: LoraSpec, tensors: Mapping[str, np.ndarray], base_model: str = ""
) -> Path:
    """Write both files atomically into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    renamed = {
        _PEFT_PREFIX + name.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): t
        for name, t in tensors.items()
    }
    atomic_write_bytes(directory / "adapter_model.safetensors", safetensors_bytes(renamed, {"format": "pt"}))
    config = json.dumps(peft_config(spec, base_model), indent=2, sort_keys=True)
    atomic_write_bytes(directory / "adapter_config.json", config.encode())
    return directory
