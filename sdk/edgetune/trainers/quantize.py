"""Storing the frozen base in less memory before LoRA wraps it (bfloat16, int8, nf4 / QLoRA).

Only the base's linear layers are converted: they hold most of a transformer's weights and they
are what bitsandbytes has kernels for. Embeddings and ``lm_head`` stay float32: small models tie
the two, and ``lm_head`` makes the logits that the loss reads directly. LoRA factors stay
float32 whatever the base is, so adapters on the wire do not depend on it.

Quantization is one-way and in place: the float32 weights are gone afterwards (the tensors kept
as they are get memory of their own, so the checkpoint's memory map is released). A model remembers
its mode (``quantization_of``); asking for another one raises, because the only way back is to
load the base again. It must run before PEFT wraps the model, since PEFT picks its LoRA layer
class (plain, 8-bit, 4-bit) from the base layer it finds.

GPT-2's ``Conv1D`` layers (``y = x @ W + b``, ``W`` stored (in, out)) are converted to the
equivalent ``nn.Linear`` first, so GPT-2 bases shrink too. Adapters are unaffected: PEFT stores
``lora_A`` (r, in) and ``lora_B`` (out, r) the same way for both layer kinds.

bitsandbytes on CPU, as of 0.50: on CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight
into an inference-only layout the first time it runs without gradients (our ``perplexity``).
Backward through that layout returns no gradient, silently, so every later training step would
be wrong; the repacking is switched off here. ``Linear8bitLt`` casts activations to float16 and
logs a warning saying so on every call of every layer; that one message is filtered out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

__all__ = ["MODES", "BFloat16Linear", "quantization_of", "quantize_base", "weight_bytes"]

MODES = ("float32", "bfloat16", "int8", "nf4")
_ATTRIBUTE = "edgetune_quantization"  # set on the model; absent means float32


class BFloat16Linear(nn.Linear):
    """A linear layer stored in bfloat16 inside a float32 model: it computes in bfloat16 and
    hands float32 back, so the layers around it (norms, LoRA, the loss) keep float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def quantization_of(model: nn.Module) -> str:
    """The mode ``quantize_base`` stored ``model``'s base in (``"float32"`` if never called)."""
    return getattr(model, _ATTRIBUTE, "float32")


def quantize_base(model: nn.Module, mode: str, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Convert the frozen base's linear layers to ``mode`` in place and return ``model``.

    ``skip`` names layers to leave alone, by full name or last name part; layers sharing the
    input embedding's weight are always left alone. Calling it again with the same mode does
    nothing; another mode raises, since the original weights no longer exist.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    current = quantization_of(model)
    if current == mode:
        return model
    if current != "float32":
        raise ValueError(
            f"the model is already quantized to {current}; load the base again (load_model) to use {mode}"
        )
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError("the model already carries PEFT layers: quantize the base before wrapping it with LoRA")
    bnb = _bitsandbytes() if mode in ("int8", "nf4") else None
    before = weight_bytes(model)
    skip = tuple(skip)
    tied = _input_embedding_weight(model)
    converted: set[int] = set()  # ids of the new tensors
    count = 0
    for name, layer in list(model.named_modules()):
        if type(layer) not in (nn.Linear, Conv1D) or _skipped(name, skip):
            continue
        if tied is not None and layer.weight is tied:
            log.info("leaving %s unquantized: it shares its weight with the input embeddings", name)
            continue
        linear = _as_linear(layer)
        new = _convert(linear, mode, bnb)
        new.train(layer.training)
        new.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        converted.update(id(t) for t in (*new.parameters(), *new.buffers()))
        count += 1
    _own_storage(model, converted)
    setattr(model, _ATTRIBUTE, mode)
    # PEFT reads these flags to pick its bnb LoRA layers instead of wrapping them as plain Linear
    if mode == "nf4":
        model.is_loaded_in_4bit = True
    elif mode == "int8":
        model.is_loaded_in_8bit = True
        _quiet_int8_cast_warning()
    log.info(
        "quantized %d linear layers to %s: weights %.1f MB -> %.1f MB",
        count, mode, before / 1e6, weight_bytes(model) / 1e6,
    )
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as stored: parameters and buffers at their own dtype,
    plus what bitsandbytes keeps beside them (4-bit absmax and code books, nested or not; int8
    row scales). Tensors shared between modules are counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _stored_tensors(model):
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


# --- helpers ------------------------------------------------------------------------------


def _bitsandbytes() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as e:
        raise RuntimeError(
            "int8 and nf4 quantization need bitsandbytes: run `pip install bitsandbytes`, "
            "or use quantization 'float32' or 'bfloat16'"
        ) from e
    return bitsandbytes


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return getattr(embeddings, "weight", None)


def _as_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` itself, or for a ``Conv1D`` the ``nn.Linear`` computing the same function."""
    if isinstance(layer, nn.Linear):
        return layer
    linear = nn.Linear(layer.nx, layer.nf, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=False)  # (out, in)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    return linear


def _convert(linear: nn.Linear, mode: str, bnb: Any) -> nn.Module:
    """A new layer holding ``linear``'s weights in ``mode``; built on the meta device so that no
    throwaway random weights are allocated."""
    shape = (linear.in_features, linear.out_features)
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if mode == "bfloat16":
        new = BFloat16Linear(*shape, bias=has_bias, device="meta")
        new.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        return new
    if mode == "nf4":
        new = bnb.nn.Linear4bit(*shape, bias=has_bias, compute_dtype=torch.float32, quant_type="nf4", device="meta")
        # .to(a real device) is where bitsandbytes quantizes (blocks of 64, nested absmax)
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=new).to("cpu")
        new.support_avx512bf16_for_cpu = False  # its inference-only repacking breaks backward
    else:
        new = bnb.nn.Linear8bitLt(*shape, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return new


def _own_storage(model: nn.Module, converted: set[int]) -> None:
    """Give the tensors that were not converted (embeddings, norms, lm_head) memory of their own.

    ``from_pretrained`` leaves every weight a view into one memory map of the safetensors
    file, and that map lives while any of its tensors does: keeping the embeddings would keep
    all the float32 weights mapped, and resident once read, so quantizing would save nothing.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in converted:
            tensor.data = tensor.data.clone()


def _stored_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        yield from _quant_state_tensors(getattr(weight, "quant_state", None))
        for holder in (weight, getattr(module, "state", None)):  # int8: SCB moves on first forward
            for attr in ("CB", "SCB"):
                value = getattr(holder, attr, None)
                if isinstance(value, torch.Tensor):
                    yield value


def _quant_state_tensors(state: Any) -> Iterator[torch.Tensor]:
    if state is None:
        return
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) is type(state):  # the nested state quantizing absmax
            yield from _quant_state_tensors(value)


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs this on every forward of every int8 layer (210 times per step on
    SmolLM2-135M); the cast to float16 is expected, so the message says nothing new."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())
