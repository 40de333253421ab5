"""Sample-weighted FedAvg of LoRA factors (FedIT).

Each factor is averaged on its own: ``A' = Σ pₖ·Aₖ`` and ``B' = Σ pₖ·Bₖ`` with
``pₖ = nₖ / Σ n``. This is **not exact**: the merged weight update is ``mean(B)·mean(A)``,
which differs from the average of the devices' updates ``Σ pₖ·Bₖ·Aₖ`` as soon as devices
move their factors differently. It is the rule of FedIT and the baseline the exact rules
(mixed ranks, stacking) are compared against.

Devices planned at a lower rank r train the leading r components (their alpha scaled by
r / R, so every update has the global scale alpha / R) and their deltas are zero-padded to the
global rank R before averaging. Zero-padding shrinks the components only some devices train,
which is one more way this rule is inexact.

Updates arrive as deltas against the global adapter (``Aₖ = A + ΔAₖ``), so
``A' = A + Σ pₖ·ΔAₖ``: the streaming form below keeps one running weighted sum per tensor,
making memory independent of the number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgetune.adapters.tensors import as_float32

Tensors = Mapping[str, np.ndarray]


def fedavg(global_tensors: Tensors, deltas: Sequence[Tensors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """The whole rule in one call (reference form; the daemon uses :class:`FedAvg`)."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("fedavg needs one weight per delta and at least one delta")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    return {
        name: (
            as_float32(g) + sum(w / total * as_float32(d[name]) for d, w in zip(deltas, weights))
        ).astype(np.float32)
        for name, g in global_tensors.items()
    }


class FedAvg:
    """Streaming FedAvg for one round: ``add`` each update as it arrives, ``result`` at close."""

    def __init__(self, global_tensors: Tensors):
        self.global_tensors = global_tensors
        self._sums = {name: np.zeros(t.shape, np.float64) for name, t in global_tensors.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        for name, acc in self._sums.items():
            # float64 accumulation: the order updates arrive in must not change the result, and
            # finite float32 deltas cannot overflow in the product (a Python float times a
            # float32 array would stay float32: 1e38 × 13 is inf there)
            acc += np.float64(weight) * as_float32(delta[name])
        self.total_weight += weight
        self.count += 1

    def nbytes(self) -> int:
        """Memory held by the running sums."""
        return sum(acc.nbytes for acc in self._sums.values())

    def partial(self, prefix: str = "sum:") -> dict[str, np.ndarray]:
        """The running sums, and the weight and count behind them (see ``RoundMerge.partial``)."""
        state = {f"{prefix}{name}": acc for name, acc in self._sums.items()}
        state[f"{prefix}_weight"] = np.array(self.total_weight, np.float64)
        state[f"{prefix}_count"] = np.array(self.count, np.float64)
        return state

    def absorb(self, partial: Mapping[str, np.ndarray], prefix: str = "sum:") -> None:
        for name, acc in self._sums.items():
            acc += np.asarray(partial[f"{prefix}{name}"], np.float64)
        self.total_weight += float(partial[f"{prefix}_weight"])
        self.count += int(partial[f"{prefix}_count"])

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        return {
            name: (as_float32(self.global_tensors[name]) + acc / self.total_weight).astype(np.float32)
            for name, acc in self._sums.items()
        }
