"""The ℓ2 pull toward the global adapter used by personalization, as pure functions.

Personalization minimises ``loss(θ) + λ/2·‖θ − θ_g‖²`` (Profit's ``l2_to_global``). Adding the
penalty's gradient ``λ·(θ − θ_g)`` to the loss gradient works for SGD with λ·lr < 2 and not at
all for Adam, whose per-coordinate normalisation turns any λ into a pull of size ~lr. So each
trainer steps on the data gradient and then applies the penalty's *proximal map*

    θ ← θ_g + (θ − θ_g) / (1 + lr·λ)

the exact minimiser of ``λ/2·‖θ − θ_g‖² + 1/(2·lr)·‖θ − θ_step‖²``. With SGD this is the
proximal-gradient method for the penalised objective (same stationary points:
``∇loss + λ·(θ − θ_g) = 0``); with Adam it is the decoupled form, as AdamW decouples weight
decay (a pull toward 0 rather than toward θ_g). Any λ is stable, and λ → ∞ keeps θ = θ_g.
"""

from __future__ import annotations

import numpy as np

__all__ = ["l2_penalty", "l2_gradient", "prox_to_anchor"]


def l2_penalty(theta: np.ndarray, anchor: np.ndarray, lam: float) -> float:
    """``λ/2·‖θ − θ_g‖²`` (float64 sum)."""
    diff = np.asarray(theta, np.float64) - np.asarray(anchor, np.float64)
    return 0.5 * lam * float(np.dot(diff.ravel(), diff.ravel()))


def l2_gradient(theta: np.ndarray, anchor: np.ndarray, lam: float) -> np.ndarray:
    """``λ·(θ − θ_g)``, the penalty's gradient."""
    return (lam * (np.asarray(theta, np.float64) - np.asarray(anchor, np.float64))).astype(np.float32)


def prox_to_anchor(theta: np.ndarray, anchor: np.ndarray, lr: float, lam: float) -> None:
    """Apply the penalty's proximal map with step ``lr`` to ``theta`` in place."""
    if lam <= 0:
        return
    theta -= anchor
    theta *= np.float32(1.0 / (1.0 + lr * lam))
    theta += anchor
