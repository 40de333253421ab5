"""``hetlora``: zero-pad, weight each device by the norm of its update, truncate back per device.

HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", 2024) averages zero-padded factors with weights proportional to ``‖Bₖ·Aₖ‖_F``, so a
device whose adapter barely moved (little or unhelpful data, a low rank) pulls the global less.
Here the weight of device k on layer m is ``nₖ·‖Bₖₘ·Aₖₘ‖_F`` (sample count times norm, per
layer), and each device truncates the global back to its own rank when it starts the next round
(the leading components, as every device does).

**Not exact**, for the same reason as ``fedit`` (factors are averaged, not products) and, on
purpose, because the norm weighting changes the target away from ``Σ pₖ·Bₖ·Aₖ``. Deltas are
zero-padded (see ``fedit``). Streaming: one float64 sum per tensor plus one weight per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import NextGlobal, RoundMerge, RoundStart, Strategy, Tensors, check_weights
from .fedit import fedit


def product_norm(B: np.ndarray, A: np.ndarray) -> float:
    """``‖B·A‖_F`` without forming B·A: ``trace((BᵀB)(AAᵀ))`` costs O((out + in)·r²)."""
    B, A = np.asarray(B, np.float64), np.asarray(A, np.float64)
    return float(np.sqrt(max(np.sum((B.T @ B) * (A @ A.T)), 0.0)))


def hetlora(adapters: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """One layer: fedit of the zero-padded factors, weighted by ``pₖ·‖Bₖ·Aₖ‖_F`` (plain ``pₖ`` if
    every product is zero)."""
    p = check_weights(weights, len(adapters))
    norms = np.array([product_norm(B, A) for B, A in adapters])
    scaled = p * norms
    return fedit(adapters, scaled if scaled.sum() > 0 else p)


def truncate(B: np.ndarray, A: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """What a device of ``rank`` starts from: the leading components."""
    return B[:, :rank], A[:rank]


class _NormWeighted(RoundMerge):
    def __init__(self, start: RoundStart):
        super().__init__(start)
        self.sums = {k: np.zeros(v.shape, np.float64) for k, v in start.tensors.items()}
        self.plain = {k: np.zeros(v.shape, np.float64) for k, v in start.tensors.items()}
        self.norm_weight = dict.fromkeys(start.modules, 0.0)

    def _add(self, delta: Tensors, weight: float) -> None:
        for module in self.start.modules:
            B, A, r = self.start.trained(module, delta)
            w = weight * product_norm(B, A)
            self.norm_weight[module] += w
            for factor in ("lora_A", "lora_B"):
                name = f"{module}.{factor}"
                d = np.asarray(delta[name], np.float64)
                target = (slice(0, r), slice(None)) if factor == "lora_A" else (slice(None), slice(0, r))
                self.sums[name][target] += w * d
                self.plain[name][target] += weight * d

    def pseudo_gradient(self) -> dict[str, np.ndarray]:
        out = {}
        for module in self.start.modules:
            w = self.norm_weight[module]
            for factor in ("lora_A", "lora_B"):
                name = f"{module}.{factor}"
                out[name] = self.sums[name] / w if w > 0 else self.plain[name] / self.total_weight
        return out

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.sums.values()) + sum(a.nbytes for a in self.plain.values())

    def _partial(self) -> dict[str, np.ndarray]:
        state = {f"sum:{k}": v for k, v in self.sums.items()} | {f"plain:{k}": v for k, v in self.plain.items()}
        return state | {f"norm:{m}": np.array(w, np.float64) for m, w in self.norm_weight.items()}

    def _absorb(self, partial) -> None:
        for name in self.sums:
            self.sums[name] += np.asarray(partial[f"sum:{name}"], np.float64)
            self.plain[name] += np.asarray(partial[f"plain:{name}"], np.float64)
        for module in self.norm_weight:
            self.norm_weight[module] += float(partial[f"norm:{module}"])


class HetLoRA(Strategy):
    name = "hetlora"
    exact = False

    def begin(self, start: RoundStart) -> RoundMerge:
        return _NormWeighted(start)

    def finish(self, merge: RoundMerge) -> NextGlobal:
        assert isinstance(merge, _NormWeighted)
        if not merge.count:
            raise ValueError("no updates to aggregate")
        tensors = self.optimizer.step(merge.start.tensors, merge.pseudo_gradient())
        return NextGlobal(tensors, dict(merge.start.merged))
