"""``stack`` (FLoRA): stack the devices' factors, so the product is exactly Σ pₖ·Bₖ·Aₖ.

FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", 2024): ``[p₁B₁ | … | p_KB_K] · [A₁; …; A_K] = Σ pₖ·Bₖ·Aₖ`` for any mix of
ranks, with no cross terms. **Exact.** The stacked product is folded into the global's frozen
delta (``merged``), and every device starts the next round from fresh factors of its own rank
(A random, B = 0: its first product is zero, so the frozen delta is the whole global update).

In the daemon a device's update relative to the round start is already a product
(``edgetune_aggregator.strategies.exact``); stacking those is the same identity. The frozen delta
is re-factored to its numerical rank after each round (exact), so it grows by at most Σ rₖ a
round and never beyond ``min(out, in)`` per layer. With ``merged_rank`` (the daemon's default:
the fleet's rank) the frozen delta keeps only its best rank-``merged_rank`` approximation, so a
device downloads at most twice what ``fedit`` sends; the round log records the error of the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgetune.adapters.lora import init_lora
from edgetune.wire import LoraSpec

from .base import NextGlobal, RoundMerge, RoundStart, check_weights
from .exact import ExactStrategy, as_merged, truncation_error
from .lowrank import LowRank


def stack(adapters: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """One layer: ``(B, A)`` with ``B·A = Σ pₖ·Bₖ·Aₖ`` exactly; rank Σ rₖ."""
    p = check_weights(weights, len(adapters))
    B = np.hstack([pk * np.asarray(Bk, np.float64) for pk, (Bk, _) in zip(p, adapters)])
    A = np.vstack([np.asarray(Ak, np.float64) for _, Ak in adapters])
    return B, A


def fresh_factors(start: RoundStart, seed: int) -> dict[str, np.ndarray]:
    """New trainable factors of the round's rank: A ~ U(±1/√in) seeded, B = 0 (a zero product)."""
    modules = {}
    for module in start.modules:
        B0, A0 = start.factors(module)
        modules[module] = (B0.shape[0], A0.shape[1])
    spec = LoraSpec(rank=start.rank, target_modules=tuple(modules))
    return init_lora(spec, modules, seed)


class Stack(ExactStrategy):
    name = "stack"

    def finish(self, merge: RoundMerge) -> NextGlobal:
        start = merge.start
        merged: dict[str, LowRank] = {}
        worst = None
        for module, spec in self.layers(merge):
            # the whole ΔW so far (merged + s·B₀A₀; B₀ = 0 unless the fleet switched strategy), plus the step
            if self.merged_rank is None:
                merged[module] = spec.factors()
                continue
            error = truncation_error(spec, self.merged_rank)  # bounded downlink: the best rank-merged_rank approximation
            worst = error if worst is None else max(worst, error)
            merged[module] = spec.factors(0, self.merged_rank)
        return NextGlobal(fresh_factors(start, start.seed), as_merged(merged), worst)
