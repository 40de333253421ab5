"""Text generation with onnxruntime alone, from a folder made by ``edgetune export --onnx``.

The graph is optimum's ``text-generation-with-past`` export of the base with the fleet's
adapter merged in: it takes ``input_ids``, ``attention_mask``, (``position_ids``) and the
previous keys and values (``past_key_values.{i}.key``/``value``, (batch, kv_heads, past, head
dim)), and returns ``logits`` and ``present.*``. The prompt goes in once, then one token per
step with the cache, so each new token costs one token's compute. numpy and onnxruntime
(or onnxruntime-training, which contains it) only: no torch, no transformers.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Generation", "OnnxGenerator"]

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class Generation:
    text: str
    #: the new tokens only (not the prompt)
    ids: list[int]
    prompt_tokens: int
    seconds: float


class OnnxGenerator:
    """Greedy or sampled generation, batch 1, from ``folder``'s ``model.onnx``."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        path = self.folder / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: make the folder with `edgetune export --onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._past = sorted((int(m.group(1)), m.group(2), name) for name in self._inputs if (m := _PAST.match(name)))
        config = json.loads((self.folder / "config.json").read_text())
        eos = config.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.tokenizer = _tokenizer(self.folder, next(iter(self.eos_token_ids), None))

    def _empty_past(self) -> dict[str, np.ndarray]:
        past = {}
        for _, _, name in self._past:
            shape = self._inputs[name].shape  # e.g. ['batch_size', 2, 'past_sequence_length', 16]
            heads, head_dim = shape[1], shape[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ValueError(f"{name} has no fixed head sizes in {self.folder / 'model.onnx'}: {shape}")
            past[name] = np.zeros((1, heads, 0, head_dim), np.float32)
        return past

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``ids`` (T, vocab), without a cache."""
        outputs = self._run(np.asarray([ids], np.int64), 0, self._empty_past())
        return outputs["logits"][0]

    def _run(self, ids: np.ndarray, offset: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, offset + length), np.int64), **past}
        if "position_ids" in self._inputs:
            feed["position_ids"] = np.arange(offset, offset + length, dtype=np.int64)[None, :]
        return dict(zip(self._outputs, self.session.run(self._outputs, feed)))

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, stop_at_eos: bool = True) -> Generation:
        """Continue ``prompt``: greedy at ``temperature`` 0, else sampled from the softmax at that
        temperature over the ``top_k`` likeliest tokens (0: all)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        started = time.perf_counter()
        prompt_ids = list(self.tokenizer.encode(prompt))
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        rng = np.random.default_rng(seed)
        new: list[int] = []
        ids, offset, past = np.asarray([prompt_ids], np.int64), 0, self._empty_past()
        for _ in range(max_new_tokens):
            outputs = self._run(ids, offset, past)
            offset += ids.shape[1]
            past = {name: outputs[name.replace("past_key_values", "present")] for _, _, name in self._past}
            token = _pick(outputs["logits"][0, -1], temperature, top_k, rng)
            new.append(token)
            if stop_at_eos and token in self.eos_token_ids:
                break
            ids = np.asarray([[token]], np.int64)
        return Generation(self.tokenizer.decode(new), new, len(prompt_ids), time.perf_counter() - started)


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(scaled.size, p=probs))


def _tokenizer(folder: Path, eos_token_id: int | None):
    if (folder / "tokenizer.json").is_file():
        from .model import FileTokenizer

        return FileTokenizer(folder / "tokenizer.json", eos_token_id)
    try:
        record = json.loads((folder / "edgetune-export.json").read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("tokenizer") == "bytes":
        from ..models.loading import ByteTokenizer

        return ByteTokenizer()
    raise FileNotFoundError(f"{folder} has no tokenizer.json: export it again with `edgetune export --onnx`")
