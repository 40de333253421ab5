"""``svd`` (FlexLoRA): form ΔW = Σ pₖ·Bₖ·Aₖ, give each device its best rank-rₖ factorisation.

FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", 2024) averages the devices' full products and redistributes the truncated
SVD of the result, so a device of rank r starts from the best rank-r approximation of the global
update (Eckart–Young) rather than from padded or cropped factors. **Exact** aggregation: the
global ΔW is ``Σ pₖ·ΔWₖ``.

Representation: the SVD ``ΔW = U·S·Vᵀ`` (descending) is published as trainable factors of the
fleet's rank R, ``B = U_R·√S_R / √s`` and ``A = √S_R·V_Rᵀ / √s`` (s = alpha / R), so the leading rₖ
components of (B, A) are exactly the best rank-rₖ factorisation; the components beyond R go into
the frozen ``merged`` delta. Unlike FlexLoRA's server-only full-rank ΔW, devices therefore run the
exact global model, and a device of rank r trains the leading r directions of it with the rest
frozen. The SVD comes from QR factorisations of the stacked factors (``lowrank.spectrum``), never
from the dense out × in matrix unless the sum is denser than its factors.

The frozen tail grows by up to Σ rₖ components a round. With ``merged_rank`` (the daemon's
default: the fleet's rank R, so a device downloads at most twice what ``fedit`` sends) only the
next ``merged_rank`` components are kept: the global is then the best rank-(R + merged_rank)
approximation of the exact ΔW, and the round log records the relative error of the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import NextGlobal, RoundMerge
from .exact import ExactStrategy, as_merged, truncation_error
from .lowrank import LowRank, Spectrum, spectrum
from .stack import fresh_factors, stack


def svd(adapters: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> Spectrum:
    """One layer: the thin SVD of ``Σ pₖ·Bₖ·Aₖ`` (exact, numerically zero directions dropped)."""
    return spectrum(LowRank(*stack(adapters, weights)))


def redistribute(aggregate: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's starting factors: the best rank-``rank`` factorisation, (out, r) and (r, in)."""
    lr = aggregate.factors(0, rank)
    if lr.rank < rank:  # the aggregate has lower rank: the missing directions start at zero
        B = np.pad(lr.B, ((0, 0), (0, rank - lr.rank)))
        A = np.pad(lr.A, ((0, rank - lr.rank), (0, 0)))
        return B, A
    return lr.B, lr.A


class SVD(ExactStrategy):
    name = "svd"

    def finish(self, merge: RoundMerge) -> NextGlobal:
        start = merge.start
        R, root_s = start.rank, np.sqrt(start.scale)
        fresh = None
        tensors, tails, worst = {}, {}, None
        keep = None if self.merged_rank is None else R + self.merged_rank
        for module, spec in self.layers(merge):
            if keep is not None:
                error = truncation_error(spec, keep)
                worst = error if worst is None else max(worst, error)
            top = spec.factors(0, R)
            B, A = top.B / root_s, top.A / root_s
            if top.rank < R:
                # Fewer directions than the rank: the extra components start as fresh LoRA
                # factors (random A, zero B), which change nothing yet but receive gradients.
                fresh = fresh if fresh is not None else fresh_factors(start, start.seed)
                B = np.hstack([B, fresh[f"{module}.lora_B"][:, top.rank:]])
                A = np.vstack([A, fresh[f"{module}.lora_A"][top.rank:]])
            tensors[f"{module}.lora_B"] = B.astype(np.float32)
            tensors[f"{module}.lora_A"] = A.astype(np.float32)
            tails[module] = spec.factors(R, keep)
        return NextGlobal(tensors, as_merged(tails), worst)
