"""Trainers that turn local data into an updated adapter: one class per (backend, adapter kind),
all behind the ``Trainer`` protocol below.

Which class trains what is the table ``trainer_class`` reads: each adapter kind names its
trainers by backend (``AdapterKind.trainers``, "module:Class"), imported only when asked for.
Importing this package imports no framework: ``edgetune.trainers.torch_lora`` pulls in torch and
PEFT, so a device without PyTorch can still speak the protocol and train with ONNX Runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Trainer", "trainer_class"]


class Trainer(Protocol):
    """What the device, personalization and the benchmarks ask of a trainer, whatever trains."""

    @property
    def trainable_parameters(self) -> int: ...

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load the trainable tensors (the kind's layout at the trainer's rank)."""

    def get_adapter(self) -> dict[str, np.ndarray]: ...

    def set_merged(self, merged: Mapping[str, np.ndarray]) -> None:
        """Apply a frozen delta on top of the base (``GlobalAdapter.merged``; {} for none)."""

    def train(self, batches: Iterator[np.ndarray], settings: Any, on_step: Callable[[int, int, float], None] | None = None,
              **options: Any) -> Any:
        """Run ``settings.local_steps`` optimizer steps; a ``TrainResult``."""

    def gradient(self, batches: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """One gradient at the current adapter (FedSGD): (gradients, loss, tokens)."""

    def perplexity(self, blocks: np.ndarray, batch_size: int = 8) -> float: ...

    def unload(self) -> None:
        """Release the base for the next trainer."""


def trainer_class(backend: str, spec: Any) -> type:
    """The trainer of ``spec``'s kind on ``backend`` ("torch" or "ort"); ValueError when that
    backend cannot train the kind."""
    from ..adapters.registry import adapter_kind

    kind = adapter_kind(spec)
    path = kind.trainers.get(backend)
    if path is None:
        raise ValueError(f"the {backend} backend cannot train {kind.name} adapters (it trains: "
                         f"{', '.join(k for k, v in _kinds().items() if backend in v) or 'none'})")
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _kinds() -> dict[str, Mapping[str, str]]:
    from ..adapters.registry import KINDS

    return {name: kind.trainers for name, kind in KINDS.items()}
