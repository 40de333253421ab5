"""Soft prompts as plain arrays: one tensor, ``prompt_embeddings`` (num_virtual_tokens, hidden).

Pure numpy like ``edgetune.adapters.lora``: the aggregator validates and averages prompts
without a framework. A prompt is dense and linear in its parameters, so averaging prompts is
averaging the models' inputs exactly; no rank bookkeeping exists here.

The starting prompt is made of the base's own token embeddings (PEFT's SAMPLE_VOCAB and TEXT
initialisations), which only a device holds: :func:`init_token_ids` says which tokens, the
device looks their rows up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..tensors import Shapes
from .spec import PromptSpec

if TYPE_CHECKING:
    from ...wire import ModelManifest

#: the prompt's tensor name, as PEFT saves it (``adapter_model.safetensors``)
PROMPT = "prompt_embeddings"


def prompt_shapes(spec: PromptSpec, model: ModelManifest) -> Shapes:
    if model.hidden_size < 1:
        raise ValueError(f"model {model.name} does not report its hidden size (a device with an older SDK): "
                         "it cannot train a soft prompt")
    return {PROMPT: (spec.num_virtual_tokens, model.hidden_size)}


def init_token_ids(spec: PromptSpec, encode: Callable[[str], list[int]], vocab_size: int, seed: int) -> np.ndarray:
    """The ``num_virtual_tokens`` token ids whose embeddings start the prompt.

    ``vocab``: drawn uniformly from the vocabulary with ``seed`` (the same on every device);
    ``text``: ``init_text``'s tokens, repeated to length or cut (as PEFT's TEXT init)."""
    n = spec.num_virtual_tokens
    if spec.init == "random":
        raise ValueError("a random prompt starts from no tokens")
    if spec.init == "vocab":
        if vocab_size < 1:
            raise ValueError("the model reports no vocabulary size: use init='text'")
        return np.random.default_rng(seed).integers(0, vocab_size, size=n, dtype=np.int64)
    ids = [int(i) for i in encode(spec.init_text)]
    if not ids:
        raise ValueError(f"init_text {spec.init_text[:40]!r} encodes to no tokens")
    return np.resize(np.asarray(ids, np.int64), n)  # repeats, then cuts


def prompt_from_embeddings(spec: PromptSpec, embeddings: Callable[[np.ndarray], np.ndarray], encode: Callable[[str], list[int]],
                           vocab_size: int, seed: int, std: Callable[[], float] | None = None) -> dict[str, np.ndarray]:
    """The starting prompt: rows ``embeddings(ids)`` for :func:`init_token_ids`, or for
    ``init="random"`` seeded Gaussian vectors with the embedding matrix's ``std()``."""
    if spec.init == "random":
        if std is None:
            raise ValueError("a random prompt needs the embedding matrix's standard deviation")
        width = np.asarray(embeddings(np.zeros(1, np.int64))).shape[1]
        rows = np.random.default_rng(seed).normal(0.0, float(std()), (spec.num_virtual_tokens, width)).astype(np.float32)
        return {PROMPT: rows}
    ids = init_token_ids(spec, encode, vocab_size, seed)
    rows = np.asarray(embeddings(ids), np.float32)
    if rows.shape[0] != spec.num_virtual_tokens or rows.ndim != 2:
        raise ValueError(f"embedding lookup returned shape {rows.shape}")
    return {PROMPT: np.ascontiguousarray(rows)}


def chunked_std(rows: Callable[[int, int], np.ndarray], count: int, chunk: int = 4096) -> float:
    """Population standard deviation of a matrix read as ``rows(start, stop)`` blocks of float64,
    without a float64 copy of a whole vocabulary-sized matrix on a small device (the scale of
    a ``random`` prompt; every backend sums the same blocks in the same order)."""
    total = squares = n = 0.0
    for start in range(0, count, chunk):
        block = rows(start, min(count, start + chunk))
        total, squares, n = total + float(block.sum()), squares + float((block * block).sum()), n + block.size
    mean = total / n
    return float(np.sqrt(max(squares / n - mean * mean, 0.0)))
