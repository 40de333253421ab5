"""A soft prompt as PEFT writes it: ``adapter_config.json`` (``peft_type: PROMPT_TUNING``) and
``prompt_embeddings`` in ``adapter_model.safetensors``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..peft_format import write_peft_files
from .spec import PromptSpec
from .tensors import PROMPT


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


def write_prompt_peft(directory: Path, spec: PromptSpec, tensors: Mapping[str, np.ndarray],
                      base_model: str = "") -> None:
    prompt = tensors[PROMPT]
    metadata = {"format": "pt", "edgetune_init": spec.init, "edgetune_init_text": spec.init_text}
    write_peft_files(directory, prompt_config(spec, int(prompt.shape[1]), base_model), {PROMPT: prompt}, metadata)
