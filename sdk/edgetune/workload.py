"""A device's model, data and trainer, bound together.

The device loop only asks for "a trainer for this adapter spec", "held-out blocks of this
length" and "training batches"; how text becomes token blocks and which framework trains is
decided here, once, so the protocol code stays framework-free. :class:`Workload` trains with
PyTorch, :class:`OrtWorkload` with ONNX Runtime artifacts (no torch, no transformers);
:func:`choose_backend` picks one for ``--trainer torch|ort|auto``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data import BlockSampler, load_texts, pack_blocks, split_heldout
from .wire import ImportanceSettings, LoraSpec, ModelManifest, TrainSettings

log = logging.getLogger(__name__)


class Workload:
    backend = "torch"
    #: the highest adapter rank this backend trains (0: any)
    max_rank = 0

    def __init__(
        self,
        loaded: Any,
        train_texts: list[str],
        heldout_texts: list[str],
        threads: int | None = None,
        model_ref: str | None = None,
    ):
        self.loaded = loaded
        self.threads = threads
        #: how to load a fresh base (quantizing one is irreversible); None: cannot reload
        self.model_ref = model_ref
        tokenizer = loaded.tokenizer
        self._eos = getattr(tokenizer, "eos_token_id", None)
        # Tokenize once; packing into blocks of the task's length is cheap and done on demand.
        self._train_ids = [tokenizer.encode(t) for t in train_texts]
        self._heldout_ids = [tokenizer.encode(t) for t in heldout_texts]
        self.num_samples = len(train_texts)
        self._blocks: dict[tuple[str, int], np.ndarray] = {}
        self._trainer = None
        self._trainer_key: tuple | None = None

    @classmethod
    def load(
        cls,
        data: str | Path | list[str],
        model: str | None = None,
        heldout_fraction: float = 0.1,
        seed: int = 0,
        threads: int | None = None,
        *,
        trainer: str = "torch",
        artifacts: str | Path | None = None,
        model_hash: str | None = None,
    ) -> Workload:
        """``data`` is a ``.txt``/``.jsonl`` file or a list of records; ``model`` a model ref
        for :func:`edgetune.models.load_model` (default: SmolLM2-135M-Instruct GGUF).

        ``trainer`` is "torch", "ort" or "auto" (:func:`choose_backend`); the ort backend trains
        the ``artifacts`` folder of ``edgetune build-ort`` (whose base is the model, so ``model``
        is not loaded), refusing it if its base weights do not hash to ``model_hash``.
        """
        texts = data if isinstance(data, list) else load_texts(Path(data))
        train, heldout = split_heldout(texts, heldout_fraction, seed=seed)
        if choose_backend(trainer, artifacts) == "ort":
            from .ort.model import OrtModel

            return OrtWorkload(OrtModel.load(Path(artifacts), model_hash), train, heldout, threads)
        from .models import load_model

        return cls(load_model(model), train, heldout, threads, model_ref=model or "default")

    @property
    def manifest(self) -> ModelManifest:
        return self.loaded.manifest

    def trainer(self, spec: LoraSpec, quantization: str = "float32", gradient_checkpointing: bool = False):
        """The trainer for this configuration; rebuilt only when it changes between rounds.

        A change of quantization needs the base reloaded from disk, because quantizing the
        frozen weights in place cannot be undone.
        """
        key = (spec, quantization, gradient_checkpointing)
        if self._trainer is not None and key == self._trainer_key:
            return self._trainer
        from .trainers.torch_lora import TorchLoraTrainer

        self._plain_base(quantization)
        self._trainer = TorchLoraTrainer(self.loaded, spec, threads=self.threads, quantization=quantization,
                                         gradient_checkpointing=gradient_checkpointing)
        self._trainer_key = key
        return self._trainer

    def importance(self, modules: list[str], settings: TrainSettings, importance: ImportanceSettings,
                   quantization: str = "float32", seed: int = 0):
        """Score candidate weight matrices on this device's training data (a calibration
        round; ``edgetune.trainers.importance``). Needs a float base: float32 or bfloat16."""
        from .trainers.importance import score_matrices

        if quantization not in ("float32", "bfloat16"):
            raise ValueError(f"importance scoring needs a float base, not {quantization}")
        self._plain_base(quantization)
        self.loaded.model.requires_grad_(False)
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        return score_matrices(self.loaded.model, modules, self.batches(settings, seed), importance)

    def _plain_base(self, quantization: str) -> None:
        """Leave ``loaded.model`` a base without LoRA layers, in ``quantization`` (quantizing it
        if needed, reloading it if it holds another precision)."""
        from .trainers.quantize import quantization_of, quantize_base

        if self._trainer is not None:
            if self._trainer_key[1] == "float32":
                self._trainer.unload()
            self._trainer = None  # (drop the old PEFT wrapper before building the next)
            self._trainer_key = None
        current = quantization_of(self.loaded.model)
        if any(type(m).__module__.startswith("peft.") for m in self.loaded.model.modules()) or (
            current != quantization and current != "float32"
        ):
            self._reload_base()
        quantize_base(self.loaded.model, quantization)

    def _reload_base(self) -> None:
        if self.model_ref is None:
            raise RuntimeError("this workload cannot reload its base model to change quantization "
                               "(it was built from an already loaded model)")
        from .models import load_model

        log.info("reloading the base model %s to change its quantization", self.model_ref)
        self.loaded = load_model(self.model_ref)

    def _packed(self, split: str, seq_len: int) -> np.ndarray:
        key = (split, seq_len)
        if key not in self._blocks:
            ids = self._train_ids if split == "train" else self._heldout_ids
            self._blocks[key] = pack_blocks(ids, seq_len, self._eos)  # (N, seq_len)
        return self._blocks[key]

    def heldout_blocks(self, seq_len: int) -> np.ndarray:
        return self._packed("heldout", seq_len)

    def batches(self, settings: TrainSettings, seed: int) -> Iterator[np.ndarray]:
        """Endless (batch_size, seq_len) batches, shuffled per epoch with ``seed``."""
        sampler = BlockSampler(self._packed("train", settings.seq_len), seed=seed)
        while True:
            yield sampler.next_batch(settings.batch_size)


class OrtWorkload(Workload):
    """A workload whose trainer is ONNX Runtime (``edgetune.trainers.ort_lora``): a float32
    base, the artifacts' modules, any rank up to theirs. No importance scoring (it needs the
    base weights' gradients, which the artifacts do not compute)."""

    backend = "ort"

    def __init__(self, loaded: Any, train_texts: list[str], heldout_texts: list[str], threads: int | None = None):
        super().__init__(loaded, train_texts, heldout_texts, threads)
        self._weights_checked = False

    def trainer(self, spec: LoraSpec, quantization: str = "float32", gradient_checkpointing: bool = False):
        if quantization != "float32":
            raise ValueError(f"the ort backend trains a float32 base only, not {quantization}: "
                             "plan this device with the 'ort' capability, or use the torch backend")
        if gradient_checkpointing:
            log.info("the ort backend has no gradient checkpointing; training without it")
        key = (spec,)
        if self._trainer is not None and key == self._trainer_key:
            return self._trainer
        from .trainers.ort_lora import OrtLoraTrainer

        if self._trainer is not None:
            self._trainer.unload()
            self._trainer = None
        model = self.loaded
        # the first trainer checks the base weights' hash; the files were checked on load
        self._trainer = OrtLoraTrainer(model.folder, spec, threads=self.threads, manifest=model.artifacts,
                                       verify_weights=not self._weights_checked)
        self._weights_checked = True
        self._trainer_key = key
        return self._trainer

    @property
    def max_rank(self) -> int:  # type: ignore[override]
        return self.loaded.artifacts.adapter.rank

    def importance(self, modules, settings, importance, quantization="float32", seed=0):
        raise ValueError("importance scoring (a calibration round) needs the torch backend: the ONNX Runtime "
                         "artifacts compute gradients of the LoRA factors only")


def choose_backend(trainer: str, artifacts: str | Path | None) -> str:
    """``torch`` or ``ort`` for ``--trainer``. ``auto`` takes PyTorch when torch and
    transformers are installed (it can quantize, checkpoint and score importance), and the
    ONNX Runtime artifacts otherwise."""
    if trainer not in ("torch", "ort", "auto"):
        raise ValueError(f"unknown trainer {trainer!r}: use torch, ort or auto")
    has_torch = _installed("torch") and _installed("transformers")
    if trainer == "auto":
        if has_torch:
            return "torch"
        if artifacts is None:
            raise ValueError("PyTorch is not installed and no --artifacts were given: install edgetune[torch], or "
                             "build ONNX Runtime artifacts with `edgetune build-ort` and pass --artifacts DIR")
        trainer = "ort"  # and checked below, before anything is downloaded
    if trainer == "ort":
        if artifacts is None:  # (for auto, checked above with its own message)
            raise ValueError("--trainer ort needs --artifacts DIR (made by `edgetune build-ort`)")
        if not _distribution("onnxruntime-training"):
            raise ValueError("--trainer ort needs ONNX Runtime training (the onnxruntime-training distribution, not "
                             "onnxruntime): pip install 'edgetune[ort]'")
    elif not has_torch:
        raise ValueError("--trainer torch needs PyTorch: pip install 'edgetune[torch]', or use --trainer ort")
    return trainer


def _distribution(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        return False
