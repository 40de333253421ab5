"""``fedit``: average the A and B factors separately (FedIT), zero-padded to the largest rank.

**Not exact.** The merged update is ``mean(B)·mean(A)``, which differs from the average of the
devices' updates ``Σ pₖ·Bₖ·Aₖ`` as soon as devices move their factors differently (the cross
terms ``pᵢ·pⱼ·Bᵢ·Aⱼ`` do not cancel). It is the common rule and the baseline the exact
strategies are measured against; ``tests/aggregator/test_strategies.py`` shows the gap.

With mixed ranks, a device of rank r trained only the leading r components, so the daemon pads
its *delta* with zeros: the components it did not train stay where the global had them (padding
the trained factors themselves with zeros would shrink those components every round). The
streaming form keeps one float64 running sum per tensor (``FedAvg``), so memory is O(adapter).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgetune.adapters.lora import pad_rank

from .base import NextGlobal, RoundMerge, RoundStart, Strategy, Tensors, check_weights
from .fedavg import FedAvg


def fedit(adapters: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """One layer: ``(Σ pₖ·pad(Bₖ), Σ pₖ·pad(Aₖ))`` for (Bₖ (out, rₖ), Aₖ (rₖ, in)), padded to max rₖ."""
    p = check_weights(weights, len(adapters))
    rank = max(A.shape[0] for _, A in adapters)
    B = sum(pk * np.pad(np.asarray(Bk, np.float64), ((0, 0), (0, rank - Bk.shape[1]))) for pk, (Bk, _) in zip(p, adapters))
    A = sum(pk * np.pad(np.asarray(Ak, np.float64), ((0, rank - Ak.shape[0]), (0, 0))) for pk, (_, Ak) in zip(p, adapters))
    return B, A


class _FactorAverage(RoundMerge):
    """Weighted average of zero-padded deltas, per tensor."""

    def __init__(self, start: RoundStart):
        super().__init__(start)
        self.sums = FedAvg({k: np.zeros(v.shape, np.float32) for k, v in start.tensors.items()})

    def _add(self, delta: Tensors, weight: float) -> None:
        self.sums.add(pad_rank(delta, self.start.rank), weight)

    def pseudo_gradient(self) -> dict[str, np.ndarray]:
        return self.sums.result()

    def nbytes(self) -> int:
        return self.sums.nbytes()

    def _partial(self) -> dict[str, np.ndarray]:
        return self.sums.partial()

    def _absorb(self, partial) -> None:
        self.sums.absorb(partial)


class FedIT(Strategy):
    name = "fedit"
    exact = False

    def begin(self, start: RoundStart) -> RoundMerge:
        return _FactorAverage(start)

    def finish(self, merge: RoundMerge) -> NextGlobal:
        assert isinstance(merge, _FactorAverage)
        tensors = self.optimizer.step(merge.start.tensors, merge.pseudo_gradient())
        return NextGlobal(tensors, dict(merge.start.merged))
