"""Inputs for the LoRA trainer tests on the tiny models built in code: byte-tokenized training
text, each model's LoRA targets, and frozen merged deltas. Shared by the PyTorch trainer, export,
quantization and importance tests, so they train and compare on the same data."""

from __future__ import annotations

import numpy as np
from edgetune.models import ByteTokenizer, load_model
from edgetune.wire import LoraSpec

#: the training text: one maintenance sentence, repeated (the byte tokenizer needs no vocabulary)
TEXT = "the pump on line 3 vibrates at 12.5 mm/s; replace bearing B-7 before the next shift. " * 8


def blocks(seq_len: int = 32) -> np.ndarray:
    """``TEXT`` byte-tokenized into as many whole rows of ``seq_len`` tokens as it fills."""
    ids = np.array(ByteTokenizer().encode(TEXT), dtype=np.int64)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)  # (N, T)


def batches(data: np.ndarray, batch_size: int = 4, seed: int = 0):
    """Endless seeded batches of rows of ``data``, each drawn without repeats."""
    rng = np.random.default_rng(seed)
    while True:
        yield data[rng.choice(len(data), batch_size, replace=False)]  # (B, T)


def spec_for(ref: str, rank: int = 4) -> LoraSpec:
    """LoRA on the attention projections of a tiny model (``c_attn`` in GPT-2, q and v in Llama)."""
    targets = ("c_attn",) if ref.startswith("tiny-gpt2") else ("q_proj", "v_proj")
    return LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=targets)


def merged_for(ref: str, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """A frozen delta on a LoRA target and on a layer LoRA does not touch, with a different k
    each, plus a module with k = 0 (allowed: it contributes nothing)."""
    if ref.startswith("tiny-gpt2"):
        ks = {"transformer.h.0.attn.c_attn": 3, "transformer.h.1.mlp.c_fc": 2, "transformer.h.1.attn.c_proj": 0}
    else:
        ks = {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 2, "model.layers.1.self_attn.o_proj": 0}
    modules = load_model(ref).manifest.modules
    rng = np.random.default_rng(seed)
    merged = {}
    for name, k in ks.items():
        out_features, in_features = modules[name]
        merged[f"{name}.merged_B"] = rng.normal(0, scale, (out_features, k)).astype(np.float32)
        merged[f"{name}.merged_A"] = rng.normal(0, scale * 4, (k, in_features)).astype(np.float32)
    return merged
