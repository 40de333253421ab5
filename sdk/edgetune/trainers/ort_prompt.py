"""Soft-prompt training with ONNX Runtime (numpy and onnxruntime-training only; never torch).

Trains the artifacts of ``edgetune build-ort --prompt-tokens N`` and speaks the array
``prompt_embeddings`` (N, hidden) as :class:`~edgetune.trainers.torch_prompt.TorchPromptTrainer`
does. The loop, FedSGD and perplexity are ``edgetune.trainers.ort_base``'s; the starting
prompt of an initialization round reads rows of the input embedding matrix from the
checkpoint (the manifest names it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..adapters.tensors import as_float32, check_tensors
from ..adapters.prompt import PROMPT, chunked_std, prompt_shapes
from ..ort.artifacts import ArtifactError, ArtifactManifest, check_kind
from ..wire import PromptSpec
from .ort_base import OrtTrainer

log = logging.getLogger(__name__)

__all__ = ["OrtPromptTrainer"]


class OrtPromptTrainer(OrtTrainer):
    """Trains a soft prompt of ``spec`` with the artifacts in ``folder`` (built for the same
    number of virtual tokens; anything else raises :class:`ArtifactError`)."""

    def __init__(self, folder: Path, spec: PromptSpec, threads: int | None = None,
                 manifest: ArtifactManifest | None = None, *, verify_weights: bool = True) -> None:
        super().__init__(folder, threads, manifest)
        _check_layout(self.manifest, spec)
        self.spec = spec
        self.shapes = prompt_shapes(spec, self.manifest.model)
        entries = {p.name: p for p in self.manifest.parameters}
        if set(entries) != {PROMPT} or tuple(entries[PROMPT].shape) != self.shapes[PROMPT]:
            raise ArtifactError(f"the parameters of {self.folder} do not match its soft-prompt layout: rebuild it")
        self._entry = entries[PROMPT]
        self._start(verify_weights)

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        problem = check_tensors(tensors, self.shapes)
        if problem:
            raise ValueError(f"prompt does not fit the artifacts with {self.spec}: {problem}")
        self._state.parameters[self._entry.ort_name] = np.ascontiguousarray(as_float32(tensors[PROMPT]),
                                                                             dtype=np.float32)

    def get_adapter(self) -> dict[str, np.ndarray]:
        return {PROMPT: self._split(self._flat())[PROMPT].copy()}

    def set_merged(self, merged: Mapping[str, np.ndarray]) -> None:
        if merged:
            raise ValueError("a soft prompt has no merged delta")

    def gradient(self, batches: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """FedSGD: the mean loss's gradient over ``batches``."""
        return self._full_gradient(batches)

    def _embedding(self) -> np.ndarray:
        name = self.manifest.adapter.embedding
        if not name:
            raise ArtifactError(f"the artifacts in {self.folder} do not name the embedding matrix: rebuild them")
        return np.asarray(self._state.parameters[name].data, np.float32)

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the base's input embedding matrix (a prompt's starting point)."""
        return self._embedding()[np.asarray(ids, np.int64)]

    def embedding_std(self) -> float:
        """The embedding matrix's standard deviation, as ``torch_prompt.embedding_std``."""
        matrix = self._embedding()
        return chunked_std(lambda start, stop: matrix[start:stop].astype(np.float64), matrix.shape[0])


def _check_layout(manifest: ArtifactManifest, spec: PromptSpec) -> None:
    """Refuse a prompt round the graphs cannot train: other artifacts, or another prompt length."""
    check_kind(manifest, spec, f"--prompt-tokens {spec.num_virtual_tokens}")
    built = manifest.adapter
    if built.num_virtual_tokens != spec.num_virtual_tokens:
        raise ArtifactError(f"the round trains a soft prompt of {spec.num_virtual_tokens} virtual tokens but the "
                            f"artifacts were built for {built.num_virtual_tokens}: rebuild with `edgetune build-ort "
                            f"--prompt-tokens {spec.num_virtual_tokens}`")
