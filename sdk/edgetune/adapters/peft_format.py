"""Writing an adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``),
so ``peft.PeftModel.from_pretrained(base, path)`` loads what the fleet trained: a LoRA, or a
soft prompt (PEFT prompt tuning).

The safetensors file is written here with numpy (an 8-byte header length, a JSON header, raw
little-endian data), because the aggregator must not need torch or extra packages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..wire import AdapterSpec, LoraSpec, PromptSpec
from .lora import as_float32, module_names

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


def fold_merged(
    spec: LoraSpec, tensors: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One LoRA per module that equals ``merged + (alpha/rank)·B·A`` exactly: factors
    ``[merged_B | s·B]`` and ``[merged_A ; A]`` at scale 1, so each module gets its own rank
    (PEFT's ``rank_pattern``, with ``alpha_pattern`` equal to it)."""
    scale = spec.alpha / spec.rank
    folded: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for module in module_names(tensors):
        B = as_float32(tensors[f"{module}.lora_B"]) * scale
        A = as_float32(tensors[f"{module}.lora_A"])
        if f"{module}.merged_A" in merged:
            B = np.hstack([as_float32(merged[f"{module}.merged_B"]), B])
            A = np.vstack([as_float32(merged[f"{module}.merged_A"]), A])
        folded[f"{module}.lora_B"], folded[f"{module}.lora_A"] = B.astype(np.float32), A.astype(np.float32)
        ranks[module] = A.shape[0]
    # a frozen delta on a layer without trainable factors becomes a LoRA of its own
    for name in merged:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".merged_A") and module not in ranks and merged[name].shape[0] > 0:
            folded[f"{module}.lora_B"] = as_float32(merged[f"{module}.merged_B"])
            folded[f"{module}.lora_A"] = as_float32(merged[name])
            ranks[module] = merged[name].shape[0]
    return folded, ranks


def prompt_config(spec: PromptSpec, token_dim: int, base_model: str) -> dict:
    """PEFT's prompt-tuning config. The init is recorded as RANDOM whatever the fleet used: PEFT
    re-runs a TEXT init when it loads (fetching a tokenizer), only to overwrite it with the
    saved prompt. Layer and head counts are left for PEFT to read from the base's config."""
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "revision": None,
    }


def write_peft_adapter(
    directory: Path,
    spec: AdapterSpec,
    tensors: Mapping[str, np.ndarray],
    base_model: str = "",
    merged: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write both files atomically into ``directory`` (created if needed). A frozen ``merged``
    delta (see ``GlobalAdapter``) is folded into the factors, per-module ranks and all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, PromptSpec):
        from .prompt import PROMPT

        prompt = tensors[PROMPT]
        metadata = {"format": "pt", "edgetune_init": spec.init, "edgetune_init_text": spec.init_text}
        atomic_write_bytes(directory / "adapter_model.safetensors", safetensors_bytes({PROMPT: prompt}, metadata))
        config = json.dumps(prompt_config(spec, int(prompt.shape[1]), base_model), indent=2, sort_keys=True)
        atomic_write_bytes(directory / "adapter_config.json", config.encode())
        return directory
    config_dict = peft_config(spec, base_model)
    if merged:
        trainable = set(module_names(tensors))
        tensors, ranks = fold_merged(spec, tensors, merged)
        # PEFT matches rank_pattern keys as regexes against the end of each module name
        config_dict["rank_pattern"] = {re.escape(m): r for m, r in ranks.items()}
        config_dict["alpha_pattern"] = dict(config_dict["rank_pattern"])
        # layers with only a frozen delta must be targets too (full names match exactly)
        config_dict["target_modules"] = sorted(set(config_dict["target_modules"]) | (set(ranks) - trainable))
    renamed = {
        _PEFT_PREFIX + name.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): t
        for name, t in tensors.items()
    }
    atomic_write_bytes(directory / "adapter_model.safetensors", safetensors_bytes(renamed, {"format": "pt"}))
    config = json.dumps(config_dict, indent=2, sort_keys=True)
    atomic_write_bytes(directory / "adapter_config.json", config.encode())
    return directory
