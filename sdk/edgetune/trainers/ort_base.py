"""What the ONNX Runtime trainers share, whatever the adapter (numpy and onnxruntime-training
only; this module never imports torch or transformers): the artifacts' sessions, the training
loop, one-gradient FedSGD rounds and held-out perplexity.

``OrtLoraTrainer`` (``ort_lora``) and ``OrtPromptTrainer`` (``ort_prompt``) add how the fleet's
arrays map onto the artifacts' trainable parameters, speaking the same arrays as their PyTorch
counterparts so the aggregator cannot tell the backends apart.

- **The optimizer steps in numpy** (``edgetune.trainers.adamw``: PyTorch's AdamW, SGD and
  clipping): ORT computes the gradients (``train_step``), the parameters go out with
  ``get_contiguous_parameters`` and back with ``copy_buffer_to_parameters``. ORT's own optimizer
  graph keeps its moments in the checkpoint state, and only a new state and new sessions
  (7 s per round on SmolLM2) would give a round the fresh moments the torch trainer starts with.
- **Gradient accumulation and FedProx** go through the graph's ``loss_scale`` and
  ``prox_scale`` inputs (``edgetune.ort.build``): ORT sums gradients over ``train_step`` calls.
- **Personalization's pull toward the global adapter** is the proximal map of
  ``edgetune.trainers.penalty``, applied after each step, as the torch trainers do.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..ort.artifacts import (
    CHECKPOINT,
    EVAL_MODEL,
    TRAINING_MODEL,
    ArtifactError,
    ArtifactManifest,
    load_manifest,
    weights_digest,
)
from ..ort.runtime import training
from ..wire import TrainSettings
from .adamw import SGD, AdamW, clip_by_global_norm
from .penalty import prox_to_anchor
from .result import TrainResult

log = logging.getLogger(__name__)

__all__ = ["OrtTrainer", "contiguous_order", "load_artifacts"]


def load_artifacts(folder: Path, expect_model_hash: str | None = None, verify: bool = True) -> ArtifactManifest:
    """The manifest of an artifact folder, its files checked against their digests and, with
    ``expect_model_hash``, its base weights against the hash the user expects (a prefix is
    enough)."""
    manifest = load_manifest(Path(folder), verify_files=verify)
    if expect_model_hash and not manifest.model_hash.startswith(expect_model_hash.lower()):
        raise ArtifactError(
            f"the artifacts in {folder} were built for base weights {manifest.model_hash[:16]}…, not the expected "
            f"{expect_model_hash[:16]}…: build them from this fleet's model with `edgetune build-ort`"
        )
    return manifest


class OrtTrainer:
    """Base class; see the module docstring. Subclasses set ``shapes`` and map names in
    ``set_adapter``/``get_adapter``."""

    shapes: dict[str, tuple[int, ...]]

    def __init__(self, folder: Path, threads: int | None, manifest: ArtifactManifest | None) -> None:
        """Read the manifest; a subclass checks its layout, then calls :meth:`_start`."""
        self.folder = Path(folder)
        self.manifest = manifest or load_artifacts(self.folder)
        self.threads = threads
        self.quantization = "float32"  # the only base the artifacts hold

    def _start(self, verify_weights: bool) -> None:
        self._open()
        if verify_weights:
            self._check_weights()

    # --- sessions -----------------------------------------------------------------------

    def _open(self) -> None:
        """The checkpoint state and the training and eval sessions."""
        import onnxruntime as ort

        training()  # (without the torch imports of onnxruntime.training's __init__)
        from onnxruntime.training.api import CheckpointState, Module

        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self._state = CheckpointState.load_checkpoint(str(self.folder / CHECKPOINT))
        self._module = Module(str(self.folder / TRAINING_MODEL), self._state, str(self.folder / EVAL_MODEL),
                              session_options=options)
        self._pristine: dict[str, np.ndarray] = {}  # frozen base weights before any merged delta
        if self._module.get_parameters_size(trainable_only=True) != self.manifest.trainable_size:
            raise ArtifactError(f"the checkpoint in {self.folder} holds another number of trainable parameters "
                                "than its manifest: rebuild the artifacts")
        order = contiguous_order(self._state, self._module, [p.ort_name for p in self.manifest.parameters])
        if order != [p.ort_name for p in self.manifest.parameters]:
            raise ArtifactError(f"this ONNX Runtime lays out the trainable parameters of {self.folder} in another "
                                "order than its manifest records: rebuild the artifacts with this version")

    def _check_weights(self) -> None:
        anchors = {p.anchor for p in self.manifest.parameters}
        digest = weights_digest((name, p.data) for name, p in self._state.parameters
                                if not p.requires_grad and name not in anchors)
        if digest != self.manifest.model_hash:
            raise ArtifactError(f"the checkpoint in {self.folder} holds other base weights (sha256 {digest[:12]}…) "
                                f"than its manifest says ({self.manifest.model_hash[:12]}…): rebuild the artifacts")

    @property
    def trainable_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def unload(self) -> None:
        self._module = None
        self._state = None

    # --- training and evaluation ----------------------------------------------------------

    def train(
        self,
        batches: Iterator[np.ndarray],
        settings: TrainSettings,
        on_step: Callable[[int, int, float], None] | None = None,
        *,
        l2_to_global: float = 0.0,
    ) -> TrainResult:
        """``settings.local_steps`` steps of ``settings.optimizer`` (PyTorch's AdamW or SGD,
        fresh moments) over the adapter, each averaging the gradients of
        ``settings.grad_accum`` micro-batches and clipped to ``settings.max_grad_norm``;
        FedProx and ``l2_to_global`` as the torch trainers (``TorchTrainer.train``)."""
        from onnxruntime import OrtValue

        if settings.optimizer == "sgd":
            optimizer = SGD(settings.learning_rate, settings.weight_decay)
        else:
            optimizer = AdamW(self.manifest.trainable_size, settings.learning_rate, self.manifest.optimizer.betas,
                              self.manifest.optimizer.eps, settings.weight_decay)
        anchor = self._flat().copy() if l2_to_global > 0 else None
        if settings.proximal_mu > 0:  # the anchor is where this round starts
            for entry in self.manifest.parameters:
                self._state.parameters[entry.anchor] = self._state.parameters[entry.ort_name].data
        loss_scale = np.array([1.0 / settings.grad_accum], np.float32)
        prox_scale = np.array([settings.proximal_mu / settings.grad_accum], np.float32)
        losses: list[float] = []
        tokens = 0
        started = time.perf_counter()
        batches = iter(batches)
        self._module.train()
        for step in range(1, settings.local_steps + 1):
            micro = []
            for _ in range(settings.grad_accum):
                batch = next(batches, None)
                if batch is None:
                    break
                micro.append(batch)
            if len(micro) < settings.grad_accum:
                log.warning("training data ran out after %d of %d steps", step - 1, settings.local_steps)
                break
            self._module.lazy_reset_grad()
            step_loss = 0.0
            for batch in micro:
                ids, mask, positions = _inputs(batch)
                _, data_loss = self._module(ids, mask, positions, loss_scale, prox_scale)
                step_loss += float(data_loss) / settings.grad_accum
                tokens += int(ids.size)
            grad = np.concatenate([self._grad(p) for p in self.manifest.parameters])
            if settings.max_grad_norm > 0:
                clip_by_global_norm(grad, settings.max_grad_norm)
            params = self._flat()
            optimizer.step(params, grad)
            if anchor is not None:
                prox_to_anchor(params, anchor, settings.learning_rate, l2_to_global)
            self._module.copy_buffer_to_parameters(OrtValue.ortvalue_from_numpy(params)._ortvalue, trainable_only=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, settings.local_steps, step_loss)
        self._module.lazy_reset_grad()
        self._module.eval()
        if not losses:
            raise ValueError("no training step was made: the batch iterator yielded too few batches")
        seconds = time.perf_counter() - started
        log.info("trained %d steps in %.2f s (onnxruntime): loss %.4f -> %.4f (%d tokens)",
                 len(losses), seconds, losses[0], losses[-1], tokens)
        return TrainResult(float(np.mean(losses)), losses[-1], tokens, seconds, len(losses))

    def _flat(self) -> np.ndarray:
        """The trainable parameters, one float32 vector in the manifest's order (a copy)."""
        return np.array(self._module.get_contiguous_parameters(trainable_only=True).numpy(), dtype=np.float32)

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A flat vector in the manifest's order, as full-size arrays by fleet name."""
        out, offset = {}, 0
        for entry in self.manifest.parameters:
            size = math.prod(entry.shape)
            out[entry.name] = flat[offset:offset + size].reshape(entry.shape)
            offset += size
        return out

    def _full_gradient(self, batches: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """The mean loss's gradient over ``batches`` for every trainable parameter, full size."""
        if not batches:
            raise ValueError("a gradient needs at least one batch")
        scale = np.array([1.0 / len(batches)], np.float32)
        zero = np.zeros(1, np.float32)
        self._module.train()
        self._module.lazy_reset_grad()
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            ids, mask, positions = _inputs(batch)
            _, data_loss = self._module(ids, mask, positions, scale, zero)
            loss_sum += float(data_loss) / len(batches)
            tokens += int(ids.size)
        grads = {e.name: self._grad(e).reshape(e.shape).copy() for e in self.manifest.parameters}
        self._module.lazy_reset_grad()
        self._module.eval()
        return grads, loss_sum, tokens

    def _grad(self, entry) -> np.ndarray:
        grad = self._state.parameters[entry.ort_name].grad  # the sum over this step's train_step calls
        return np.zeros(math.prod(entry.shape), np.float32) if grad is None else grad.ravel()

    def perplexity(self, blocks: np.ndarray, batch_size: int = 8) -> float:
        """exp of the mean next-token NLL over all predicted tokens of ``blocks`` (N, T), with
        the current adapter, through the eval graph."""
        blocks = np.asarray(blocks, dtype=np.int64)
        if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
            raise ValueError(f"perplexity needs blocks of shape (N ≥ 1, T ≥ 2), got {blocks.shape}")
        self._module.eval()
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        nll, count = 0.0, 0
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            ids, mask, positions = _inputs(batch)
            _, data_loss = self._module(ids, mask, positions, one, zero)
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            nll += float(data_loss) * predicted
            count += predicted
        return math.exp(nll / count)


def contiguous_order(state, module, names: list[str]) -> list[str]:
    """The order in which ``get_contiguous_parameters(trainable_only=True)`` lays out the
    trainable parameters ``names``, found by filling each with its own index and reading the
    buffer back (ORT follows the training graph's input order, which need not be the
    checkpoint's). The parameters are restored afterwards."""
    saved = {name: state.parameters[name].data.copy() for name in names}
    try:
        for i, name in enumerate(names):
            state.parameters[name] = np.full(saved[name].shape, i, np.float32)
        flat = module.get_contiguous_parameters(trainable_only=True).numpy()
        order, offset = [], 0
        while offset < flat.size:
            name = names[int(flat[offset])]
            order.append(name)
            offset += saved[name].size
        return order
    finally:
        for name, value in saved.items():
            state.parameters[name] = value


def _inputs(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(batch, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"token batches must have shape (B, T), got {ids.shape}")
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape))
    return ids, np.ones_like(ids), positions
