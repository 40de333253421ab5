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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import (HELDOUT_FRACTION, VALIDATION_FRACTION, BlockSampler, DataError, load_texts, pack_blocks,
                   split_heldout)
from .adapters.kind import BaseEmbeddings
from .adapters.registry import KINDS, adapter_kind
from .trainers import trainer_class
from .wire import AdapterSpec, ImportanceSettings, ModelManifest, TrainSettings

log = logging.getLogger(__name__)


class Workload:
    backend = "torch"
    #: the highest adapter rank this backend trains (0: any)
    max_rank = 0

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapter kinds this backend trains (announced in the hello's capabilities)."""
        return tuple(name for name, kind in KINDS.items() if self.backend in kind.trainers)

    def __init__(
        self,
        loaded: Any,
        train_texts: list[str],
        heldout_texts: list[str],
        threads: int | None = None,
        model_ref: str | None = None,
        robustness_texts: list[str] | None = None,
        validation_texts: list[str] | None = None,
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
        # other sites' held-out text, given by the operator: the robustness score's data
        self._robust_ids = [tokenizer.encode(t) for t in robustness_texts or []]
        # never trained on, by rounds or personalization: where personalization chooses α
        self._validation_ids = [tokenizer.encode(t) for t in validation_texts or []]
        self._robust_warned = self._validation_warned = False
        self._personal_cut: set[int] | None = None  # training texts personalization holds back (fallback)
        self.num_samples = len(train_texts)
        self._blocks: dict[tuple[str, int], np.ndarray] = {}
        self._trainer = None
        self._trainer_key: tuple | None = None

    @classmethod
    def load(
        cls,
        data: str | Path | list[str],
        model: str | None = None,
        heldout_fraction: float = HELDOUT_FRACTION,
        seed: int = 0,
        threads: int | None = None,
        *,
        trainer: str = "torch",
        artifacts: str | Path | None = None,
        model_hash: str | None = None,
        robustness: str | Path | list[str] | None = None,
        validation_fraction: float = VALIDATION_FRACTION,
    ) -> Workload:
        """``data`` is a ``.txt``/``.jsonl`` file or a list of records; ``model`` a model ref
        for :func:`edgetune.models.load_model` (default: SmolLM2-135M-Instruct GGUF).

        ``trainer`` is "torch", "ort" or "auto" (:func:`choose_backend`); the ort backend trains
        the ``artifacts`` folder of ``edgetune build-ort`` (whose base is the model, so ``model``
        is not loaded), refusing it if its base weights do not hash to ``model_hash``.

        ``robustness`` (a file or records) is held-out text of the *other* sites, which the
        operator supplies: the robustness score is the perplexity on it. ``validation_fraction``
        of the training records (with at least 10) are set aside for personalization to choose
        α on: neither rounds nor personalization train on them.
        """
        texts = data if isinstance(data, list) else load_texts(Path(data))
        train, heldout = split_heldout(texts, heldout_fraction, seed=seed)
        validation: list[str] = []
        if validation_fraction > 0 and len(train) >= 10:
            train, validation = split_heldout(train, validation_fraction, seed=seed + 1)
        robust = robustness if isinstance(robustness, list) or robustness is None else load_texts(Path(robustness))
        if choose_backend(trainer, artifacts) == "ort":
            from .ort.model import OrtModel

            return OrtWorkload(OrtModel.load(Path(artifacts), model_hash), train, heldout, threads,
                               robustness_texts=robust, validation_texts=validation)
        from .models import load_model

        return cls(load_model(model), train, heldout, threads, model_ref=model or "default", robustness_texts=robust,
                   validation_texts=validation)

    @property
    def manifest(self) -> ModelManifest:
        return self.loaded.manifest

    def trainer(self, spec: AdapterSpec, quantization: str = "float32", gradient_checkpointing: bool = False):
        """The trainer for this configuration (a LoRA or a soft-prompt trainer, by the spec's
        kind); rebuilt only when it changes between rounds.

        A change of quantization needs the base reloaded from disk, because quantizing the
        frozen weights in place cannot be undone.
        """
        key = (spec, quantization, gradient_checkpointing)
        if self._trainer is not None and key == self._trainer_key:
            return self._trainer
        Trainer = trainer_class(self.backend, spec)
        self._plain_base(quantization)
        self._trainer = Trainer(self.loaded, spec, threads=self.threads, quantization=quantization,
                                gradient_checkpointing=gradient_checkpointing)
        self._trainer_key = key
        return self._trainer

    def initial_adapter(self, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        """This device's proposal for the fleet's starting adapter, for a kind that starts from
        the base (an initialization round: a soft prompt from its token embeddings)."""
        return adapter_kind(spec).initial_from_base(spec, self.embeddings(spec), seed)

    def embeddings(self, spec: AdapterSpec) -> BaseEmbeddings:
        """The base's token embeddings and tokenizer, as a trainer of ``spec`` sees them
        (adapters leave the input embeddings as they are)."""
        from .trainers.torch_prompt import embedding_rows, embedding_std

        model = self.loaded.model
        return _Embeddings(lambda ids: embedding_rows(model, ids), lambda: embedding_std(model),
                           self.loaded.tokenizer.encode, self.manifest.vocab_size)

    def train_blocks(self, seq_len: int) -> int:
        """How many training blocks of ``seq_len`` tokens this device holds (an epoch)."""
        return len(self._packed("train", seq_len))

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
            if self._trainer.restores_base:
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
            if split.startswith("personal-"):  # personalization trains on part, picks α on the rest
                cut = self._personal_cut
                ids = [self._train_ids[i] for i in range(len(self._train_ids)) if (i in cut) == (split == "personal-val")]
            else:
                ids = {"train": self._train_ids, "heldout": self._heldout_ids, "robust": self._robust_ids,
                       "validation": self._validation_ids}[split]
            self._blocks[key] = pack_blocks(ids, seq_len, self._eos)  # (N, seq_len)
        return self._blocks[key]

    def heldout_blocks(self, seq_len: int) -> np.ndarray:
        return self._packed("heldout", seq_len)

    @property
    def has_robustness(self) -> bool:
        return bool(self._robust_ids)

    def robustness_blocks(self, seq_len: int, limit: int | None = None) -> np.ndarray:
        """Blocks of the other sites' held-out text (empty if none was given, or too little
        for one block: the score is optional and must not stop training). ``limit`` takes that
        many spread evenly over the whole set: it holds several sites one after another, and
        the first blocks would all be the first site's."""
        if self._robust_ids:
            try:
                blocks = self._packed("robust", seq_len)
            except DataError as exc:
                if not self._robust_warned:
                    log.warning("no robustness score: %s", exc)
                    self._robust_warned = True
            else:
                if limit is not None and len(blocks) > limit:
                    blocks = blocks[np.linspace(0, len(blocks) - 1, limit).round().astype(int)]
                return blocks
        return np.zeros((0, seq_len), np.int64)

    def personal_split(self, seq_len: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) blocks for personalization. With validation records set aside
        when the workload was made (``Workload.load`` does), all training blocks and those;
        otherwise ``fraction`` of the training texts (at least one) held back from
        personalization — but the federated rounds trained on them, which favours small α."""
        if self._validation_ids:
            try:
                return self._packed("train", seq_len), self._packed("validation", seq_len)
            except DataError as exc:
                if not self._validation_warned:
                    log.warning("the validation records are too short for one block (%s): choosing α on training "
                                "records personalization leaves out", exc)
                    self._validation_warned = True
        n = len(self._train_ids)
        if n < 2:
            raise ValueError("personalization needs at least two training texts (one to train, one to choose α on)")
        count = min(n - 1, max(1, round(fraction * n)))
        cut = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
        if self._personal_cut != cut:
            self._personal_cut = cut
            self._blocks = {k: v for k, v in self._blocks.items() if not k[0].startswith("personal-")}
        return self._packed("personal-train", seq_len), self._packed("personal-val", seq_len)

    def batches_from(self, blocks: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
        """Endless (batch_size, T) batches of ``blocks``, shuffled per epoch with ``seed``."""
        sampler = BlockSampler(blocks, seed=seed)
        while True:
            yield sampler.next_batch(batch_size)

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

    @property
    def adapters(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.loaded.artifacts.adapter.kind,)

    def __init__(self, loaded: Any, train_texts: list[str], heldout_texts: list[str], threads: int | None = None,
                 robustness_texts: list[str] | None = None, validation_texts: list[str] | None = None):
        super().__init__(loaded, train_texts, heldout_texts, threads, robustness_texts=robustness_texts,
                         validation_texts=validation_texts)
        self._weights_checked = False

    def trainer(self, spec: AdapterSpec, quantization: str = "float32", gradient_checkpointing: bool = False):
        if quantization != "float32":
            raise ValueError(f"the ort backend trains a float32 base only, not {quantization}: "
                             "plan this device with the 'ort' capability, or use the torch backend")
        if gradient_checkpointing:
            log.info("the ort backend has no gradient checkpointing; training without it")
        key = (spec,)
        if self._trainer is not None and key == self._trainer_key:
            return self._trainer
        Trainer = trainer_class(self.backend, spec)
        if self._trainer is not None:
            self._trainer.unload()
            self._trainer = None
        model = self.loaded
        # the first trainer checks the base weights' hash; the files were checked on load
        self._trainer = Trainer(model.folder, spec, threads=self.threads, manifest=model.artifacts,
                                       verify_weights=not self._weights_checked)
        self._weights_checked = True
        self._trainer_key = key
        return self._trainer

    @property
    def max_rank(self) -> int:  # type: ignore[override]
        return self.loaded.artifacts.adapter.rank

    def embeddings(self, spec: AdapterSpec) -> BaseEmbeddings:
        trainer = self.trainer(spec)  # reads the embedding matrix from the checkpoint
        return _Embeddings(trainer.embedding_rows, trainer.embedding_std, self.loaded.tokenizer.encode,
                           self.manifest.vocab_size)

    def importance(self, modules, settings, importance, quantization="float32", seed=0):
        raise ValueError("importance scoring (a calibration round) needs the torch backend: the ONNX Runtime "
                         "artifacts compute gradients of the LoRA factors only")


@dataclass(frozen=True)
class _Embeddings:
    """``BaseEmbeddings`` over a backend's own lookups."""

    rows: Callable[[np.ndarray], np.ndarray]
    std: Callable[[], float]
    encode: Callable[[str], list[int]]
    vocab_size: int


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
