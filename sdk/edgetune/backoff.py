"""What a device does when training does not fit: back off, never crash the application.

The ladder, cheapest loss of quality first: halve the micro-batch (gradient accumulation doubles,
so the optimizer sees the same batch), then turn on gradient checkpointing, then halve the
adapter rank, then quantize the frozen base harder (float32 → bfloat16 → int8 → nf4, as far as
the device supports).
"""

from __future__ import annotations

import dataclasses
import os

from .wire import DevicePlan

_STRONGER = {"float32": "bfloat16", "bfloat16": "int8", "int8": "nf4"}


class MemoryBudgetExceeded(MemoryError):
    """The process grew past the device's memory budget while training."""


_OOM_PHRASES = ("can't allocate memory", "out of memory", "failed to allocate memory", "bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, PyTorch's CPU allocator failing (a RuntimeError saying so), or ONNX Runtime's
    (its exceptions derive from Exception, not RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    from_runtime = isinstance(exc, RuntimeError) or type(exc).__module__.startswith("onnxruntime")
    text = str(exc).lower()
    return from_runtime and any(phrase in text for phrase in _OOM_PHRASES)


def next_fallback(plan: DevicePlan, grad_accum: int, supported: tuple[str, ...],
                  checkpointing: bool = True) -> tuple[DevicePlan, int, str] | None:
    """The next rung below ``plan``: (new plan, new gradient accumulation, what changed), or
    None when nothing is left to give up. ``checkpointing=False`` (a backend without it, such
    as ONNX Runtime) skips that rung rather than retrying the same configuration."""
    if plan.batch_size > 1:
        smaller = dataclasses.replace(plan, batch_size=plan.batch_size // 2)
        return smaller, grad_accum * 2, f"batch {plan.batch_size} → {smaller.batch_size}"
    if checkpointing and not plan.gradient_checkpointing:
        return dataclasses.replace(plan, gradient_checkpointing=True), grad_accum, "gradient checkpointing on"
    if plan.rank > 1:
        lower = dataclasses.replace(plan, rank=plan.rank // 2)
        return lower, grad_accum, f"rank {plan.rank} → {lower.rank}"
    quantization = _STRONGER.get(plan.quantization)
    while quantization is not None and quantization not in supported:
        quantization = _STRONGER.get(quantization)
    if quantization is not None:
        return dataclasses.replace(plan, quantization=quantization), grad_accum, f"base {plan.quantization} → {quantization}"
    return None


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
