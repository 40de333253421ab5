"""How far a LoRA moves the model, measured where it acts: on each layer's effective weight
update ``ΔW = merged_B·merged_A + s·B·A``, in Frobenius norm over all layers, without forming
the matrices (``‖B·A‖² = Σ (BᵀB) ∘ (A·Aᵀ)``, O((out + in)·k²) a layer).

Measured on ΔW, every merge strategy is measured alike: ``stack`` hands out fresh factors each
round, but its ΔW moves only by what the round merged. The aggregator's guard
(``edgetune_aggregator.guard``) bounds a candidate global's change by what its updates move.
"""

from __future__ import annotations

import math

import numpy as np

from ..tensors import Tensors, as_float32
from .tensors import module_names

__all__ = ["lora_change", "lora_delta_factors", "lora_update_change", "product_sq_norm"]


def _f64(t: np.ndarray) -> np.ndarray:
    return np.asarray(as_float32(t), np.float64)


def product_sq_norm(B: np.ndarray, A: np.ndarray) -> float:
    """``‖B·A‖_F²`` in O((out + in)·k²), without B·A."""
    return max(float(np.sum((B.T @ B) * (A @ A.T))), 0.0)


def lora_delta_factors(tensors: Tensors, merged: Tensors, scale: float, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with ``B·A`` = the layer's ΔW (merged part and scaled trainable part stacked)."""
    Bs, As = [scale * _f64(tensors[f"{module}.lora_B"])], [_f64(tensors[f"{module}.lora_A"])]
    mB, mA = merged.get(f"{module}.merged_B"), merged.get(f"{module}.merged_A")
    if mB is not None and mA is not None:
        Bs.append(_f64(mB))
        As.append(_f64(mA))
    return np.hstack(Bs), np.vstack(As)


def lora_change(parent: tuple[Tensors, Tensors], candidate: tuple[Tensors, Tensors], scale: float) -> float:
    """``‖ΔW_candidate − ΔW_parent‖_F`` over all layers of the parent's layout."""
    total = 0.0
    for module in module_names(parent[0]):
        Bc, Ac = lora_delta_factors(*candidate, scale, module)
        Bp, Ap = lora_delta_factors(*parent, scale, module)
        total += product_sq_norm(np.hstack([Bc, -Bp]), np.vstack([Ac, Ap]))
    return math.sqrt(total)


def lora_update_change(start: Tensors, delta: Tensors, scale: float) -> float:
    """What one device's delta does to ΔW on its own: ``s·‖(B₀+ΔB)(A₀+ΔA) − B₀A₀‖_F`` per layer
    (a device of lower rank trains the leading ``r`` components of ``B₀, A₀``)."""
    total = 0.0
    for module in module_names(start):
        dA, dB = _f64(delta[f"{module}.lora_A"]), _f64(delta[f"{module}.lora_B"])
        r = dA.shape[0]
        B0, A0 = _f64(start[f"{module}.lora_B"])[:, :r], _f64(start[f"{module}.lora_A"])[:r]
        total += product_sq_norm(scale * np.hstack([B0 + dB, -B0]), np.vstack([A0 + dA, A0]))
    return math.sqrt(total)
