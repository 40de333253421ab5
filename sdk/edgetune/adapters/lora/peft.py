"""A LoRA as PEFT writes it: ``adapter_config.json`` (``peft_type: LORA``) and the factors in
``adapter_model.safetensors``, so ``peft.PeftModel.from_pretrained(base, path)`` loads it. A frozen
merged delta is folded into the factors, each module at its own rank (``rank_pattern``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..peft_format import write_peft_files
from ..tensors import as_float32
from .spec import LoraSpec
from .tensors import module_names

_PEFT_PREFIX = "base_model.model."


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


def write_lora_peft(directory: Path, spec: LoraSpec, tensors: Mapping[str, np.ndarray], base_model: str = "",
                    merged: Mapping[str, np.ndarray] | None = None) -> None:
    config = peft_config(spec, base_model)
    if merged:
        trainable = set(module_names(tensors))
        tensors, ranks = fold_merged(spec, tensors, merged)
        # PEFT matches rank_pattern keys as regexes against the end of each module name
        config["rank_pattern"] = {re.escape(m): r for m, r in ranks.items()}
        config["alpha_pattern"] = dict(config["rank_pattern"])
        # layers with only a frozen delta must be targets too (full names match exactly)
        config["target_modules"] = sorted(set(config["target_modules"]) | (set(ranks) - trainable))
    renamed = {
        _PEFT_PREFIX + name.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): t
        for name, t in tensors.items()
    }
    write_peft_files(directory, config, renamed, {"format": "pt"})
