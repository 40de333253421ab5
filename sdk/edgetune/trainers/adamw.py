"""AdamW, SGD and gradient clipping as PyTorch computes them, on flat float32 numpy vectors.

The ONNX Runtime trainer takes its gradients from ORT and steps here: ORT keeps AdamW's
moments inside the checkpoint state, where nothing resets them short of loading a new state
and sessions (7 s per round for SmolLM2 on 2 cores), while a round must start with fresh
moments as the torch trainer's new ``torch.optim.AdamW`` does. Here the moments are two
arrays the size of the adapter (460,800 floats for SmolLM2 r=8 on q,v; a step costs
milliseconds), reset by making new ones, and weight decay and clipping are per round, not
baked into a graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["AdamW", "SGD", "clip_by_global_norm"]


def clip_by_global_norm(grad: np.ndarray, max_norm: float) -> float:
    """Scale ``grad`` in place to L2 norm ≤ ``max_norm`` (``torch.nn.utils.clip_grad_norm_``:
    factor max_norm / (norm + 1e-6), applied when below 1); returns the norm before."""
    norm = float(np.linalg.norm(grad.astype(np.float64)))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        grad *= np.float32(coef)
    return norm


@dataclass
class AdamW:
    """``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments, eps outside the
    square root of the corrected second moment) over one flat parameter vector."""

    size: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    step_count: int = 0
    m: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.m = np.zeros(self.size, np.float32)
        self.v = np.zeros(self.size, np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        """Update ``param`` (float32, flat) in place from ``grad``."""
        beta1, beta2 = self.betas
        self.step_count += 1
        if self.weight_decay:
            param *= np.float32(1.0 - self.lr * self.weight_decay)
        self.m *= np.float32(beta1)
        self.m += np.float32(1.0 - beta1) * grad
        self.v *= np.float32(beta2)
        self.v += np.float32(1.0 - beta2) * grad * grad
        bias1 = 1.0 - beta1 ** self.step_count
        bias2 = 1.0 - beta2 ** self.step_count
        denom = np.sqrt(self.v) / np.float32(np.sqrt(bias2)) + np.float32(self.eps)
        param -= np.float32(self.lr / bias1) * self.m / denom


@dataclass
class SGD:
    """``torch.optim.SGD`` without momentum: weight decay added to the gradient (coupled)."""

    lr: float
    weight_decay: float = 0.0

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        if self.weight_decay:
            grad = grad + np.float32(self.weight_decay) * param
        param -= np.float32(self.lr) * grad
