"""The part ``stack`` and ``svd`` share: the exact average of the devices' weight updates.

Device k starts from ``(B₀, A₀)`` truncated to its rank rₖ (the rest of the global is frozen in
its model) and ends at ``Bₖ = B₀ + ΔBₖ``, ``Aₖ = A₀ + ΔAₖ``. Its weight update relative to the
round's global is ``Uₖ = s·(Bₖ·Aₖ − B₀·A₀) = s·(B₀·ΔAₖ + ΔBₖ·Aₖ)``, a product of rank ≤ 2rₖ whose
factors are ``[B₀ | ΔBₖ]`` and ``[ΔAₖ ; Aₖ]``. The round's aggregate ``Σ pₖ·Uₖ`` is
accumulated per layer in a :class:`LowRankSum` (exact, memory bounded by one dense matrix per
layer), then a linear server optimizer step turns it into the step added to the global ``ΔW``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np

from edgetune.adapters.tensors import as_float32

from .base import RoundMerge, RoundStart, Strategy, Tensors
from .lowrank import LowRank, LowRankSum, Spectrum, spectrum


class ExactSum(RoundMerge):
    """``Σ wₖ·Uₖ`` per layer, split by what each part costs. With ΔAₖ, ΔBₖ padded to the round's
    rank R (the components a device did not train are zero),

        Σ wₖ·Uₖ = s·B₀·(Σ wₖ·ΔAₖ) + s·(Σ wₖ·ΔBₖ)·A₀ + s·Σ wₖ·ΔBₖ·ΔAₖ:

    the first two are rank R whatever the fleet (two running sums the size of the adapter),
    and only the products of the deltas, rank rₖ each, go to a :class:`LowRankSum` (half
    the columns of stacking ``[B₀ | ΔBₖ]·[ΔAₖ; Aₖ]``, and folded into its dense sum in batches)."""

    def __init__(self, start: RoundStart):
        super().__init__(start)
        self.sums: dict[str, LowRankSum] = {}
        #: module -> (Σ wₖ·ΔBₖ (out, R), Σ wₖ·ΔAₖ (R, in)), float64
        self.linear: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._start: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for module in start.modules:
            B0, A0 = start.factors(module)
            self._start[module] = (B0, A0)
            self.linear[module] = (np.zeros_like(B0), np.zeros_like(A0))
            self.sums[module] = LowRankSum(B0.shape[0], A0.shape[1])

    def _add(self, delta: Tensors, weight: float) -> None:
        s = self.start.scale
        for module in self.start.modules:
            dA = np.asarray(as_float32(delta[f"{module}.lora_A"]), np.float64)
            dB = np.asarray(as_float32(delta[f"{module}.lora_B"]), np.float64)
            r = dA.shape[0]
            sum_B, sum_A = self.linear[module]
            sum_A[:r] += weight * dA
            sum_B[:, :r] += weight * dB
            self.sums[module].add(dB * s, dA, weight)

    def total(self, module: str) -> LowRank | np.ndarray:
        """``Σ wₖ·Uₖ`` of a layer (unnormalised): factors, or dense once the products went dense."""
        s = self.start.scale
        B0, A0 = self._start[module]
        sum_B, sum_A = self.linear[module]
        products = self.sums[module].result()
        if isinstance(products, np.ndarray):
            return products + (B0 * s) @ sum_A + (sum_B * s) @ A0
        return LowRank(B0 * s, sum_A) + LowRank(sum_B * s, A0) + products

    def average(self) -> dict[str, LowRank]:
        """``Σ pₖ·Uₖ`` per layer (pₖ = weight / total weight), as compact factors."""
        return {module: _factored(self.average_layer(module)) for module in self.sums}

    def average_layer(self, module: str) -> LowRank | np.ndarray:
        """``Σ pₖ·Uₖ`` of one layer: compact factors, or the dense matrix once the sum went dense
        (factoring it would cost an SVD that the strategy's own, of the new ΔW, makes needless)."""
        if not self.count:
            raise ValueError("no updates to aggregate")
        total = self.total(module)
        if isinstance(total, np.ndarray):
            return total / self.total_weight
        return spectrum(total).factors().scaled(1.0 / self.total_weight)

    def nbytes(self) -> int:
        linear = sum(b.nbytes + a.nbytes for b, a in self.linear.values())
        return sum(acc.nbytes() for acc in self.sums.values()) + linear

    def _partial(self) -> dict[str, np.ndarray]:
        state = {}
        for module, (sum_B, sum_A) in self.linear.items():
            state[f"linB:{module}"], state[f"linA:{module}"] = sum_B, sum_A
            products = self.sums[module].result()
            if isinstance(products, np.ndarray):
                state[f"dense:{module}"] = products
            else:
                state[f"B:{module}"], state[f"A:{module}"] = products.B, products.A
        return state

    def _absorb(self, partial) -> None:
        for module, (sum_B, sum_A) in self.linear.items():
            sum_B += np.asarray(partial[f"linB:{module}"], np.float64)
            sum_A += np.asarray(partial[f"linA:{module}"], np.float64)
            if f"dense:{module}" in partial:
                self.sums[module].add_dense(np.asarray(partial[f"dense:{module}"], np.float64))
            else:
                self.sums[module].add(partial[f"B:{module}"], partial[f"A:{module}"])


def _factored(matrix: LowRank | np.ndarray) -> LowRank:
    return spectrum(matrix).factors() if isinstance(matrix, np.ndarray) else matrix


def new_delta(start: RoundStart, module: str, step: LowRank | np.ndarray) -> Spectrum:
    """The spectrum of a layer's next ``ΔW``: the global's (``current_delta``) plus the step,
    dense if the step is (one SVD of an out × in matrix), else from the stacked factors."""
    current = current_delta(start, module)
    out_features, in_features = current.shape
    if isinstance(step, LowRank) and step.rank * (out_features + in_features) > out_features * in_features:
        step = step.dense()  # (factors larger than the matrix: one SVD of it costs less than two QRs)
    if isinstance(step, np.ndarray):
        return spectrum(step + current.dense())
    return spectrum(current + step)


def current_delta(start: RoundStart, module: str) -> LowRank:
    """The global's whole ``ΔW`` for a layer: merged + s·B₀·A₀."""
    B0, A0 = start.factors(module)
    total = LowRank(B0 * start.scale, A0)
    mB, mA = start.merged.get(f"{module}.merged_B"), start.merged.get(f"{module}.merged_A")
    if mB is not None and mA is not None:
        total = LowRank(np.asarray(as_float32(mB), np.float64), np.asarray(as_float32(mA), np.float64)) + total
    return total


def as_merged(deltas: dict[str, LowRank]) -> dict[str, np.ndarray]:
    """Layer -> low-rank ΔW as wire ``merged`` factors (layers with nothing left out)."""
    out = {}
    for module, lr in deltas.items():
        if lr.rank:
            out[f"{module}.merged_B"] = lr.B.astype(np.float32)
            out[f"{module}.merged_A"] = lr.A.astype(np.float32)
    return out


def truncation_error(spec: Spectrum, keep: int) -> float:
    """Relative Frobenius error of keeping the leading ``keep`` components of ``spec``:
    ``√(Σ_{i≥keep} sᵢ²) / √(Σ sᵢ²)`` (Eckart–Young: the best any rank-``keep`` matrix does)."""
    energy = float(np.sum(spec.s**2))
    if energy == 0.0 or keep >= spec.rank:
        return 0.0
    return float(np.sqrt(np.sum(spec.s[keep:] ** 2) / energy))


class ExactStrategy(Strategy):
    """Base of ``stack`` and ``svd``: the round's exact aggregate, then a linear server step.

    ``merged_rank`` bounds the frozen ``merged`` delta a device downloads to that many
    components per layer (None: unbounded, exact for ever, but the downlink grows each round
    by up to Σ rₖ components). With a bound the global keeps the best approximation of ΔW of
    that size (truncated SVD) and reports what it cut (``NextGlobal.truncation_error``).
    """

    exact = True

    def __init__(self, optimizer=None, merged_rank: int | None = None):
        super().__init__(optimizer)
        if merged_rank is not None and merged_rank < 0:
            raise ValueError(f"merged_rank must be ≥ 0 (0: no frozen delta) or None (unbounded), got {merged_rank}")
        self.merged_rank = merged_rank

    def begin(self, start: RoundStart) -> RoundMerge:
        return ExactSum(start)

    def layers(self, merge: RoundMerge):
        """``(module, spectrum of its next ΔW)`` in module order, two layers worked on at once
        and at most three layers' temporaries (dense average, SVD) in memory. LAPACK's SVD runs
        without the GIL, and the SVDs are most of a close's finish once the sums are dense
        (SmolLM2 q,v: 60 of them, ~4 s on one core); the layers are independent (the server
        optimizer's state is per layer), so the result does not depend on which thread ran one."""
        assert isinstance(merge, ExactSum)

        def next_delta(module: str) -> Spectrum:
            return new_delta(merge.start, module, self.optimizer.step_layer(module, merge.average_layer(module)))

        modules = iter(merge.start.modules)
        with ThreadPoolExecutor(2, thread_name_prefix="exact-layers") as pool:
            pending = deque((m, pool.submit(next_delta, m)) for m in islice(modules, 2))
            while pending:
                module, future = pending.popleft()
                following = next(modules, None)
                if following is not None:
                    pending.append((following, pool.submit(next_delta, following)))
                yield module, future.result()
