"""LoRA training of a frozen base with PyTorch and PEFT, exchanging adapters as numpy arrays.

The fleet speaks in ``{module}.lora_A`` (rank, in) / ``{module}.lora_B`` (out, rank) arrays
(``edgetune.adapters.lora``); this module is the only place that knows how PEFT stores them.
PEFT keeps that same orientation for GPT-2's ``Conv1D`` layers too (``fan_in_fan_out`` only
transposes the *base* weight when merging), so arrays are copied as they are.

The base can be stored in bfloat16, int8 or nf4 (``edgetune.trainers.quantize``) and its
activations recomputed in backward (gradient checkpointing); the LoRA factors stay float32.

A global adapter's frozen ``merged`` delta (``GlobalAdapter.merged``) is applied by forward
hooks rather than added into the weights: an int8 or nf4 weight cannot take a small float
update without losing it to rounding, and a hook works the same for every base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import peft
import torch
from transformers.pytorch_utils import Conv1D

from ..adapters.tensors import as_float32, check_tensors
from ..adapters.lora import check_merged, lora_shapes
from ..models.loading import LoadedModel
from ..wire import LoraSpec
from .quantize import quantization_of, quantize_base
from .result import TrainResult
from .torch_base import TorchTrainer, proximal_term

log = logging.getLogger(__name__)

__all__ = ["TorchLoraTrainer", "TrainResult", "proximal_term"]

_ADAPTER = "default"  # PEFT's name for the one adapter we attach


class TorchLoraTrainer(TorchTrainer):
    """Trains the LoRA factors of ``spec`` on ``loaded``'s model; the base stays frozen.

    PEFT wraps the model in place, so ``loaded.model`` now carries LoRA layers: give each
    trainer its own ``LoadedModel``.

    ``quantization`` ("float32", "bfloat16", "int8", "nf4") converts ``loaded.model``'s linear
    layers in place before LoRA is attached. That cannot be undone: to train in another
    precision, load the base again. ``gradient_checkpointing`` recomputes each layer's
    activations in backward, trading one more forward pass per step for activation memory.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        spec: LoraSpec,
        threads: int | None = None,
        *,
        quantization: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        self.shapes = lora_shapes(spec, loaded.manifest.modules)
        base = quantize_base(loaded.model, quantization)  # checks the mode before changing anything
        if threads is not None:
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.spec = spec
        self.quantization = quantization
        self._modules = sorted({name.rsplit(".", 1)[0] for name in self.shapes})
        # PEFT wants fan_in_fan_out=True for Conv1D (weights stored (in, out)) and warns otherwise
        conv1d = any(isinstance(base.get_submodule(m), Conv1D) for m in self._modules)
        config = peft.LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.target_modules),
            lora_dropout=spec.dropout,
            bias="none",
            fan_in_fan_out=conv1d,
        )
        self.model = peft.get_peft_model(base, config)
        self.model.eval()
        self._checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # enabled after wrapping, so PEFT adds no input-grad hook that would outlive unload();
            # non-reentrant checkpointing passes gradients to LoRA even though the embeddings'
            # output does not require grad, so no such hook is needed
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = self.model.base_model.model
        self._layers = {m: wrapped.get_submodule(m) for m in self._modules}
        self._params = [self._weight(name) for name in self.shapes]  # in fleet-name order
        if len(self._params) != sum(p.requires_grad for p in self.model.parameters()):
            raise RuntimeError("PEFT made other parameters trainable than the LoRA factors")
        self._merged_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def restores_base(self) -> bool:
        """A quantized base stays quantized when unloaded (see ``unload``)."""
        return self.quantization == "float32"

    def unload(self) -> None:
        """Take the LoRA layers out again, leaving ``loaded.model`` the plain frozen base, so a
        trainer for another spec (rank, targets) can wrap it next.

        A quantized base stays quantized: the next trainer must ask for the same quantization
        (another one raises ``ValueError``); a fresh ``load_model`` gives a float32 base.
        """
        self.set_merged({})  # hooks on layers PEFT did not wrap would outlive the trainer
        base = self.model.unload()
        if self._checkpointing:
            base.gradient_checkpointing_disable()
        mode = quantization_of(base)
        if mode != "float32":
            log.warning(
                "the unloaded base of %s stays %s-quantized: wrap it again with quantization=%r, "
                "or load the model again to train in another precision", self.loaded.name, mode, mode,
            )
        self.loaded.model = base

    # --- adapter exchange -------------------------------------------------------------

    def _weight(self, name: str) -> torch.Tensor:
        module, factor = name.rsplit(".", 1)  # factor is "lora_A" or "lora_B"
        return getattr(self._layers[module], factor)[_ADAPTER].weight

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """Load the fleet's factors into the model (copied; the arrays are not kept)."""
        problem = check_tensors(tensors, self.shapes)
        if problem:
            raise ValueError(f"adapter does not fit {self.loaded.name} with {self.spec}: {problem}")
        with torch.no_grad():
            for name, array in tensors.items():
                self._weight(name).copy_(torch.from_numpy(np.array(as_float32(array), dtype=np.float32)))  # (a copy: wire arrays are read-only)

    def get_adapter(self) -> dict[str, np.ndarray]:
        """The current factors as float32 arrays the caller owns."""
        with torch.no_grad():
            return {name: self._weight(name).detach().cpu().numpy().astype(np.float32, copy=True) for name in self.shapes}

    def set_merged(self, merged: Mapping[str, np.ndarray]) -> None:
        """Apply a global adapter's frozen delta ``{m}.merged_B @ {m}.merged_A`` to every later
        forward (training and perplexity) of module ``m``, replacing the previous one; ``{}``
        removes it. The factors are copied and never trained.

        Each module gets a forward hook adding ``(x @ A.T) @ B.T`` to its output (the PEFT layer
        for a LoRA target, so base, LoRA and delta add up), computed in float32 and cast to the
        output's dtype. Gradient checkpointing recomputes it like any other op in the layer.
        """
        problem = check_merged(merged, self.loaded.manifest.modules)  # before anything changes
        if problem:
            raise ValueError(f"merged delta does not fit {self.loaded.name}: {problem}")
        for handle in self._merged_hooks:
            handle.remove()
        self._merged_hooks = []
        wrapped = self.model.base_model.model
        for module_name in sorted({name.rsplit(".", 1)[0] for name in merged}):
            a = torch.tensor(as_float32(merged[f"{module_name}.merged_A"]), dtype=torch.float32)  # (k, in), a copy
            b = torch.tensor(as_float32(merged[f"{module_name}.merged_B"]), dtype=torch.float32)  # (out, k)
            if a.shape[0] == 0:
                continue  # k = 0: nothing to add
            module = wrapped.get_submodule(module_name)
            device = next(module.parameters()).device
            self._merged_hooks.append(module.register_forward_hook(_low_rank_hook(b.to(device), a.to(device))))
        if self._merged_hooks:
            log.debug("frozen merged delta on %d modules", len(self._merged_hooks))

    # --- forward -------------------------------------------------------------------------

    def _forward(self, batch: np.ndarray, labels: bool) -> Any:
        ids = torch.as_tensor(np.asarray(batch, dtype=np.int64))  # (B, T)
        if ids.ndim != 2:
            raise ValueError(f"token batches must have shape (B, T), got {tuple(ids.shape)}")
        # explicit mask and positions: the ONNX trainer feeds the same inputs
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        # use_cache=False: every forward sees whole blocks, so a KV cache would only cost memory
        # (and make gradient checkpointing warn that it drops it)
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids if labels else None,
            use_cache=False,
        )

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        return self._forward(batch, labels=False).logits


def _low_rank_hook(b: torch.Tensor, a: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook adding ``x @ (B @ A).T`` to a linear layer's output, without ever
    forming the (out, in) matrix: two thin matmuls cost (in + out) · k per token."""

    def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b)  # (..., out)
        return output + delta.to(output.dtype)

    return hook
