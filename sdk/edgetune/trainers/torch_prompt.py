"""Soft-prompt training (PEFT prompt tuning) of a frozen base with PyTorch.

The fleet speaks one array, ``prompt_embeddings`` (num_virtual_tokens, hidden)
(``edgetune.adapters.prompt``); PEFT keeps it as ``prompt_encoder["default"].embedding.weight``
and puts it before every input's token embeddings. The model sees N + T positions; the logits
of the last T are the block's, so loss and perplexity are over the same T − 1 predicted tokens
as a LoRA trainer's (``edgetune.trainers.torch_base``).

The base may be quantized (``edgetune.trainers.quantize``) like the LoRA trainer's; the prompt
stays float32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import peft
import torch

from ..adapters.tensors import as_float32, check_tensors
from ..adapters.prompt import PROMPT, chunked_std, prompt_shapes
from ..models.loading import LoadedModel
from ..wire import PromptSpec
from .quantize import quantize_base
from .torch_base import TorchTrainer

log = logging.getLogger(__name__)

__all__ = ["TorchPromptTrainer", "embedding_rows", "embedding_std"]

_ADAPTER = "default"


class TorchPromptTrainer(TorchTrainer):
    """Trains a soft prompt of ``spec`` on ``loaded``'s frozen model. As with the LoRA trainer,
    PEFT wraps ``loaded.model``: give each trainer its own ``LoadedModel`` or ``unload()``."""

    def __init__(
        self,
        loaded: LoadedModel,
        spec: PromptSpec,
        threads: int | None = None,
        *,
        quantization: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        self.shapes = prompt_shapes(spec, loaded.manifest)
        base = quantize_base(loaded.model, quantization)
        if threads is not None:
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.spec = spec
        self.quantization = quantization
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens,
                                         prompt_tuning_init="RANDOM")
        self.model = peft.get_peft_model(base, config)
        self.model.eval()
        self._checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._prompt = self.model.prompt_encoder[_ADAPTER].embedding.weight
        if tuple(self._prompt.shape) != self.shapes[PROMPT]:
            raise RuntimeError(f"PEFT made a prompt of shape {tuple(self._prompt.shape)}, expected {self.shapes[PROMPT]}")
        self._params = [self._prompt]

    def unload(self) -> None:
        """Leave ``loaded.model`` the plain frozen base (prompt tuning does not touch its layers)."""
        base = self.model.base_model
        if self._checkpointing:
            base.gradient_checkpointing_disable()
        self.loaded.model = base

    # --- adapter exchange -------------------------------------------------------------

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        problem = check_tensors(tensors, self.shapes)
        if problem:
            raise ValueError(f"prompt does not fit {self.loaded.name} with {self.spec}: {problem}")
        with torch.no_grad():
            self._prompt.copy_(torch.from_numpy(np.array(as_float32(tensors[PROMPT]), dtype=np.float32)))

    def get_adapter(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {PROMPT: self._prompt.detach().cpu().numpy().astype(np.float32, copy=True)}

    def set_merged(self, merged: Mapping[str, np.ndarray]) -> None:
        if merged:
            raise ValueError("a soft prompt has no merged delta")

    # --- forward -------------------------------------------------------------------------

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        if ids.ndim != 2:
            raise ValueError(f"token batches must have shape (B, T), got {tuple(ids.shape)}")
        # positions 0..N+T-1 (PEFT ignores explicit position ids for prompt tuning)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits[:, self.spec.num_virtual_tokens:]


def embedding_std(model: torch.nn.Module) -> float:
    """The standard deviation of the base's input embedding matrix (float64 over all entries,
    so every backend gets the same number from the same weights)."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        return chunked_std(lambda start, stop: weight[start:stop].double().cpu().numpy(), weight.shape[0])


def embedding_rows(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of the base's input embedding matrix, float32 (a prompt's starting point)."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        return weight[torch.as_tensor(np.asarray(ids, np.int64))].float().cpu().numpy()
