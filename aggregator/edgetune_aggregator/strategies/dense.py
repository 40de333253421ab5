"""``dense``: the sample-weighted average of dense deltas, for adapters without factors (a
soft prompt's ``prompt_embeddings``).

**Exact.** A prompt enters the model linearly as parameters, so the average of the devices'
trained prompts is ``start + Σ pₖ·Δₖ``; there is no product of factors to go wrong. Every
server optimizer applies element-wise (``fedadam``, ``fedyogi`` too). With FedSGD the deltas
are negative gradients, and the server optimizer's learning rate is the SGD step.
"""

from __future__ import annotations

import numpy as np

from .base import NextGlobal, RoundMerge, RoundStart, Strategy, Tensors
from .fedavg import FedAvg


class _Mean(RoundMerge):
    def __init__(self, start: RoundStart):
        super().__init__(start)
        self.sums = FedAvg({k: np.zeros(v.shape, np.float32) for k, v in start.tensors.items()})

    def _add(self, delta: Tensors, weight: float) -> None:
        self.sums.add(delta, weight)

    def nbytes(self) -> int:
        return self.sums.nbytes()

    def _partial(self) -> dict[str, np.ndarray]:
        return self.sums.partial()

    def _absorb(self, partial) -> None:
        self.sums.absorb(partial)


class Dense(Strategy):
    name = "dense"
    exact = True

    def begin(self, start: RoundStart) -> RoundMerge:
        return _Mean(start)

    def finish(self, merge: RoundMerge) -> NextGlobal:
        assert isinstance(merge, _Mean)
        tensors = self.optimizer.step(merge.start.tensors, merge.sums.result())
        return NextGlobal(tensors, {})
