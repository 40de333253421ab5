"""LoRA training with ONNX Runtime, for devices without PyTorch (numpy and onnxruntime-training
only; this module never imports torch or transformers). The loop, FedSGD and perplexity are
``edgetune.trainers.ort_base``'s.

It trains the artifacts ``edgetune build-ort`` made (``edgetune.ort.artifacts``) and speaks the
same arrays as :class:`~edgetune.trainers.torch_lora.TorchLoraTrainer`: ``{module}.lora_A``
(rank, in) and ``{module}.lora_B`` (out, rank), so the aggregator cannot tell the two apart.

- **Lower ranks.** The graphs hold factors of the artifacts' rank R. A round at rank r < R
  pads the factors with zeros: a zero row of A and the matching zero column of B get zero
  gradients, stay zero under AdamW (zero moments, zero decay) and add nothing, so training is
  exactly rank r.
- **Frozen merged delta.** ``set_merged`` adds ``merged_B @ merged_A`` to the frozen base
  weights in the checkpoint (float32, so nothing is lost to rounding), from a pristine copy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..adapters.tensors import as_float32, check_tensors
from ..adapters.lora import check_merged, lora_shapes, targets
from ..ort.artifacts import ArtifactError, ArtifactManifest, check_kind
from ..wire import LoraSpec
from .ort_base import OrtTrainer, contiguous_order, load_artifacts

log = logging.getLogger(__name__)

__all__ = ["OrtLoraTrainer", "contiguous_order", "load_artifacts"]


class OrtLoraTrainer(OrtTrainer):
    """Trains the LoRA factors of ``spec`` with the ONNX Runtime artifacts in ``folder``.

    ``spec`` must select the modules the artifacts were built for, at a rank up to theirs and
    the same scale (alpha / rank); anything else raises :class:`ArtifactError` saying what to
    rebuild. Only a float32 base exists here: quantization and gradient checkpointing are
    PyTorch features.
    """

    def __init__(self, folder: Path, spec: LoraSpec, threads: int | None = None,
                 manifest: ArtifactManifest | None = None, *, verify_weights: bool = True) -> None:
        super().__init__(folder, threads, manifest)
        modules = self.manifest.model.modules
        _check_layout(self.manifest, spec, targets(spec, modules), spec.rank)
        self.spec = spec
        self.shapes = lora_shapes(spec, modules)
        self._entries = {p.name: p for p in self.manifest.parameters}
        if set(self._entries) != set(lora_shapes(LoraSpec(self.manifest.adapter.rank, self.manifest.adapter.alpha,
                                                          self.manifest.adapter.modules), modules)):
            raise ArtifactError(f"the parameters of {self.folder} do not match its adapter layout: rebuild it")
        self._merged: dict[str, np.ndarray] = {}
        self._start(verify_weights)

    # --- adapter exchange ---------------------------------------------------------------

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load the fleet's factors (rank ≤ the artifacts', zero-padded up to it)."""
        problem = check_tensors(tensors, self.shapes)
        if problem:
            raise ValueError(f"adapter does not fit the artifacts with {self.spec}: {problem}")
        for name, array in tensors.items():
            array = as_float32(array)
            padded = np.zeros(self._entries[name].shape, np.float32)
            if name.endswith(".lora_A"):
                padded[: array.shape[0]] = array
            else:
                padded[:, : array.shape[1]] = array
            self._state.parameters[self._entries[name].ort_name] = padded

    def get_adapter(self) -> dict[str, np.ndarray]:
        """The current factors (at this trainer's rank) as float32 arrays the caller owns,
        read with ``get_contiguous_parameters`` and mapped back to names by the manifest."""
        flat = self._module.get_contiguous_parameters(trainable_only=True).numpy()
        out, offset = {}, 0
        rank = self.spec.rank
        for entry in self.manifest.parameters:
            size = math.prod(entry.shape)
            if entry.name in self.shapes:
                array = flat[offset:offset + size].reshape(entry.shape)
                array = array[:rank] if entry.name.endswith(".lora_A") else array[:, :rank]
                out[entry.name] = np.array(array, dtype=np.float32)
            offset += size
        return out

    def set_merged(self, merged: Mapping[str, np.ndarray]) -> None:
        """Apply ``{m}.merged_B @ {m}.merged_A`` to module ``m``'s frozen weight from now on,
        replacing the previous delta; ``{}`` removes it."""
        problem = check_merged(merged, self.manifest.model.modules)
        if problem:
            raise ValueError(f"merged delta does not fit {self.manifest.model.name}: {problem}")
        missing = sorted({n.rsplit(".", 1)[0] for n in merged} - set(self.manifest.base_weights))
        if missing:
            raise ArtifactError(f"the artifacts do not expose the weights of {missing[:3]}: rebuild them")
        self._merged = {name: as_float32(array).copy() for name, array in merged.items()}
        self._apply_merged()

    def _apply_merged(self) -> None:
        modules = {name.rsplit(".", 1)[0] for name in self._merged}
        for module in sorted(modules | {m for m in self._pristine}):
            ort_name, transposed = self.manifest.base_weights[module]
            if module not in self._pristine:
                self._pristine[module] = self._state.parameters[ort_name].data.copy()
            weight = self._pristine[module]
            if module in modules:
                delta = self._merged[f"{module}.merged_B"] @ self._merged[f"{module}.merged_A"]  # (out, in)
                weight = weight + (delta.T if transposed else delta)
            self._state.parameters[ort_name] = np.ascontiguousarray(weight, dtype=np.float32)
            if module not in modules:
                del self._pristine[module]

    def gradient(self, batches: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """FedSGD: the mean loss's gradient over ``batches`` at this trainer's rank."""
        grads, loss, tokens = self._full_gradient(batches)
        rank = self.spec.rank
        return ({name: g[:rank] if name.endswith(".lora_A") else g[:, :rank]
                 for name, g in grads.items() if name in self.shapes}, loss, tokens)


def _check_layout(manifest: ArtifactManifest, spec: LoraSpec, modules: Iterable[str], rank: int) -> None:
    """Refuse a round the graphs cannot train: other modules, a rank above the artifacts',
    another scale (alpha / rank), or dropout (the graphs are built without it)."""
    check_kind(manifest, spec, f"--rank {spec.rank} --targets {','.join(spec.target_modules)}")
    wanted = tuple(sorted(modules))
    built = manifest.adapter
    if wanted != tuple(sorted(built.modules)):
        extra = sorted(set(wanted) - set(built.modules))[:3]
        lacking = sorted(set(built.modules) - set(wanted))[:3]
        raise ArtifactError(
            f"the round trains LoRA on {len(wanted)} modules (targets {list(spec.target_modules)}) but the "
            f"artifacts were built for {len(built.modules)} (targets {list(built.target_modules)}); not built: "
            f"{extra}, not trained: {lacking}. Rebuild with `edgetune build-ort --targets "
            f"{','.join(spec.target_modules)}`"
        )
    if rank > built.rank:
        raise ArtifactError(f"the round trains rank {rank} but the artifacts were built for rank {built.rank}: "
                            f"rebuild with `edgetune build-ort --rank {rank}`")
    scale = spec.alpha / spec.rank
    if not math.isclose(scale, built.scale, rel_tol=1e-6):
        raise ArtifactError(f"the round scales LoRA by alpha/rank = {scale:g} but the artifacts by {built.scale:g}: "
                            f"rebuild with `edgetune build-ort --rank {spec.rank} --alpha {spec.alpha:g}`")
    if spec.dropout:
        raise ArtifactError(f"the round uses LoRA dropout {spec.dropout:g}; the ONNX Runtime graphs are built "
                            "without dropout: train this fleet with dropout 0 or on the torch backend")
