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

__all__ = ["UpdateChange", "lora_change", "lora_delta_factors", "lora_update_change", "product_sq_norm"]


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
    """What one device's delta does to ΔW on its own: ``s·‖(B₀+ΔB)(A₀+ΔA) − B₀A₀‖_F`` over all
    layers (a device of lower rank trains the leading ``r`` components of ``B₀, A₀``)."""
    return UpdateChange(start, scale)(delta)


class UpdateChange:
    """``lora_update_change`` of many deltas against one round's start (the aggregator measures
    every update of a round). Per layer ``(B₀+ΔB)(A₀+ΔA) − B₀A₀ = B₀ΔA + ΔB·A₁`` with
    ``A₁ = A₀+ΔA``, so its squared norm is, in r×r Gram matrices only,
    ``Σ (B₀ᵀB₀)∘(ΔAΔAᵀ) + 2 Σ (B₀ᵀΔB)∘(ΔA A₁ᵀ) + Σ (ΔBᵀΔB)∘(A₁A₁ᵀ)``.

    Why a class: ``B₀ᵀB₀`` and the start's float64 factors are made once a round, the layers of
    one shape are measured together (a few batched matmuls per shape instead of a dozen numpy
    calls per layer), and a delta is converted into buffers kept from call to call: a fresh
    megabyte-sized temporary costs its page faults every time, which on a sandboxed machine
    took longer than the arithmetic. So one instance serves one thread at a time."""

    def __init__(self, start: Tensors, scale: float):
        self.scale = abs(float(scale))
        groups: dict[tuple, list[str]] = {}
        for module in module_names(start):
            key = (np.shape(start[f"{module}.lora_B"]), np.shape(start[f"{module}.lora_A"]))
            groups.setdefault(key, []).append(module)
        self._groups = [_Layers(modules, start) for modules in groups.values()]

    def __call__(self, delta: Tensors) -> float:
        return self.scale * math.sqrt(sum(group.sq_change(delta) for group in self._groups))


class _Layers:
    """Layers of one shape: their start factors stacked in float64, ``B₀ᵀ`` and ``B₀ᵀB₀``, and
    per delta rank the buffers a delta is converted into."""

    def __init__(self, modules: list[str], start: Tensors):
        self.modules = modules
        self.B0t = np.ascontiguousarray(np.stack([_f64(start[f"{m}.lora_B"]) for m in modules]).transpose(0, 2, 1))
        self.A0 = np.stack([_f64(start[f"{m}.lora_A"]) for m in modules])  # (L, R, in)
        self.gram_B0 = np.matmul(self.B0t, self.B0t.transpose(0, 2, 1))  # (L, R, R)
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def sq_change(self, delta: Tensors) -> float:
        dAs = [as_float32(delta[f"{m}.lora_A"]) for m in self.modules]
        dBs = [as_float32(delta[f"{m}.lora_B"]) for m in self.modules]
        r = dAs[0].shape[0]
        if any(a.shape[0] != r for a in dAs) or any(b.shape[1] != r for b in dBs):
            # (a delta trains one rank in every layer; measured layer by layer if not)
            return sum(self._layer(i, a, b) for i, (a, b) in enumerate(zip(dAs, dBs)))
        buffers = self._buffers.get(r)
        if buffers is None:
            L, _, n_in = self.A0.shape
            buffers = self._buffers[r] = (np.empty((L, r, n_in)), np.empty((L, self.B0t.shape[2], r)),
                                          np.empty((L, r, n_in)))
        dA, dB, A1 = buffers
        for i, (a, b) in enumerate(zip(dAs, dBs)):
            dA[i], dB[i] = a, b
        np.add(self.A0[:, :r], dA, out=A1)
        dAt = dA.transpose(0, 2, 1)
        total = np.sum(self.gram_B0[:, :r, :r] * np.matmul(dA, dAt))
        A1t = A1.transpose(0, 2, 1)
        total += 2.0 * np.sum(np.matmul(self.B0t[:, :r], dB) * np.matmul(dA, A1t))
        total += np.sum(np.matmul(dB.transpose(0, 2, 1), dB) * np.matmul(A1, A1t))
        return max(float(total), 0.0)

    def _layer(self, i: int, dA: np.ndarray, dB: np.ndarray) -> float:
        r = dA.shape[0]
        B0, A0 = self.B0t[i, :r].T, self.A0[i, :r]
        return product_sq_norm(np.hstack([B0, _f64(dB)]), np.vstack([_f64(dA), A0 + dA]))
