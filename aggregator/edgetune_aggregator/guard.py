"""The last check before a global adapter is stored or sent: finite, the fleet's layout, and a
change from its parent no larger than the round's updates can explain. Pure functions.

Every update was checked on arrival, but what is about to be published is a sum: deltas that
are finite and each within bounds can still overflow float32 together (1e38 per element twice
is ``inf``), a server optimizer can amplify them, and a strategy can have a bug. One bad
global reaches every device at once, so it is checked as a whole.

The change is measured where it acts, on the effective weight update of each LoRA layer,
``ΔW = merged_B·merged_A + s·B·A`` (so every strategy is measured alike: ``stack`` hands out
fresh factors each round, but its ΔW moves only by what the round merged), in Frobenius norm
over all layers, without forming the matrices: ``‖B·A‖² = Σ (BᵀB) ∘ (A·Aᵀ)``. A soft prompt's
change is the norm of its embeddings' difference. The bound is ``ratio`` × the change a
typical accepted update (the round's lower median, after the influence bounds) would make on
its own: a weighted mean of the updates moves ΔW no further than its largest term, which the
influence bounds keep within a few typical ones, and the ratio leaves room for what is not a
plain mean (fedit's cross terms of averaged factors, a truncated merged part). The median, not
the largest, is the reference so that a hostile minority cannot widen the bound for itself:
with the influence bounds switched off, a 1e38 delta among honest ones is still refused here.
A round of one device is its own reference: only finiteness and the layout protect it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edgetune.adapters.lora import as_float32, module_names

from .strategies.optimizers import ServerOptimizerConfig

Tensors = Mapping[str, np.ndarray]

#: server optimizers whose steps are normalised element-wise
ADAPTIVE = ("fedadam", "fedyogi")
#: the default ``--max-global-change``: a generous multiple (see the module's docstring)
DEFAULT_CHANGE_RATIO = 10.0


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


def dense_change(parent: Tensors, candidate: Tensors) -> float:
    return math.sqrt(sum(float(np.sum((_f64(candidate[n]) - _f64(parent[n])) ** 2)) for n in parent))


def layout_problem(tensors: Tensors, merged: Tensors, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why the candidate is not the fleet's layout or not finite (None if it is both)."""
    if set(tensors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        return f"tensors differ from the layout (missing {missing[:2]}, extra {extra[:2]})"
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shapes[name]):
            return f"{name} has shape {tuple(t.shape)}, the layout {tuple(shapes[name])}"
    modules = {n.rsplit(".", 1)[0] for n in shapes}
    for name, t in merged.items():
        module, _, part = name.rpartition(".")
        if module not in modules or part not in ("merged_A", "merged_B") or t.ndim != 2:
            return f"merged tensor {name} {tuple(t.shape)} is not a factor of a layout matrix"
    for name, t in {**tensors, **merged}.items():
        if not np.all(np.isfinite(as_float32(t))):
            bad = int(np.size(t) - np.count_nonzero(np.isfinite(as_float32(t))))
            return f"{name} has {bad} non-finite value(s)"
    return None


def max_element_change(parent: Tensors, candidate: Tensors) -> float:
    return max((float(np.max(np.abs(_f64(candidate[n]) - _f64(parent[n])), initial=0.0)) for n in parent), default=0.0)


def check_candidate(shapes: Mapping[str, tuple[int, ...]], parent: tuple[Tensors, Tensors],
                    candidate: tuple[Tensors, Tensors], scale: float | None, typical_update: float,
                    ratio: float | None, optimizer: ServerOptimizerConfig | None = None) -> str | None:
    """Why the candidate global must not be published (None if it may). ``scale``: the LoRA
    scale alpha / R (None for a soft prompt); ``typical_update``: the change the round's
    lower-median update would make alone; ``ratio``: the bound's multiple (None: no change bound).

    With the linear server optimizers the step is η·(the round's mean), or with momentum β at
    most η/(1 − β) times the largest mean so far, so the bound is scaled by that gain. The adaptive
    ones (fedadam, fedyogi) normalise each element's step to about η whatever the updates'
    size (with the default β₁ = 0.9, β₂ = 0.99 at most ≈ 2.3·η), so their bound is on the
    largest element change of the factors: ``ratio`` × η."""
    optimizer = optimizer or ServerOptimizerConfig()
    with np.errstate(over="ignore", invalid="ignore"):
        problem = layout_problem(*candidate, shapes)
        if problem:
            return problem
        if ratio is None:
            return None
        if optimizer.name in ADAPTIVE:
            change, bound = max_element_change(parent[0], candidate[0]), ratio * optimizer.lr
            what = f"{ratio:g} × the server learning rate {optimizer.lr:g} ({optimizer.name} steps are normalised)"
            measure = "in one element of its factors"
        else:
            change = dense_change(parent[0], candidate[0]) if scale is None else lora_change(parent, candidate, scale)
            gain = optimizer.lr / (1.0 - optimizer.momentum if optimizer.name == "fedavgm" else 1.0)
            bound = ratio * gain * typical_update
            what = f"{ratio:g} × the round's median update's {typical_update:.4g}" + (
                f" × the server step's gain {gain:g}" if gain != 1.0 else "")
            measure = "(effective weights, Frobenius)" if scale is not None else "(Frobenius)"
    if not math.isfinite(change):
        return "its change from the parent version overflows"
    if change > bound * (1 + 1e-9) + 1e-12:
        return f"it moves {change:.4g} from the parent version {measure}, more than {what}"
    return None
