"""A base model as a torch-free device sees it: ONNX Runtime artifacts and their tokenizer.

It stands where :class:`~edgetune.models.LoadedModel` stands for the torch backend (``name``,
``manifest``, ``tokenizer``), so the workload and device code do not care which backend
trains. The tokenizer is the ``tokenizers`` library reading the ``tokenizer.json`` that
``build-ort`` saved from the Hugging Face tokenizer (its post-processor included, so ids match
what the torch device gets), or the tiny test models' byte tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..wire import ModelManifest
from .artifacts import TOKENIZER, ArtifactManifest

__all__ = ["OrtModel", "FileTokenizer"]


class FileTokenizer:
    """``encode``/``decode``/``eos_token_id`` over a ``tokenizers.Tokenizer``."""

    def __init__(self, path: Path, eos_token_id: int | None):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Any) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


@dataclass
class OrtModel:
    folder: Path
    artifacts: ArtifactManifest
    tokenizer: Any

    @property
    def name(self) -> str:
        return self.artifacts.model.name

    @property
    def manifest(self) -> ModelManifest:
        return self.artifacts.model

    @classmethod
    def load(cls, folder: Path, expect_model_hash: str | None = None) -> OrtModel:
        """Read and verify the artifacts in ``folder`` (file digests, and the base weights'
        hash when ``expect_model_hash`` is given)."""
        from ..trainers.ort_lora import load_artifacts

        folder = Path(folder)
        artifacts = load_artifacts(folder, expect_model_hash)
        if artifacts.tokenizer == "bytes":
            from ..models.loading import ByteTokenizer

            tokenizer: Any = ByteTokenizer()
        else:
            tokenizer = FileTokenizer(folder / TOKENIZER, artifacts.eos_token_id)
        return cls(folder, artifacts, tokenizer)
