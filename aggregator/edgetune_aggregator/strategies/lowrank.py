"""Low-rank matrices kept as factors ``B @ A``, and exact sums of them.

The exact strategies (``stack``, ``svd``) work with weight updates ``ΔW = Σ pₖ·Bₖ·Aₖ`` without
forming ``ΔW`` when that is cheaper: a sum of low-rank products is the product of the stacked
factors, and its thin SVD follows from two QR factorisations and the SVD of a small k × k core,
``O((out + in)·k²)`` instead of ``O(out·in·min(out, in))``. Once the stacked rank would make the
factors larger than the dense matrix, :class:`LowRankSum` switches to a dense accumulator, so
memory never exceeds one dense matrix per adapted layer: O(model), whatever the fleet size.

Everything here is float64: sums over hundreds of devices must not depend on arrival order at
float32 precision, and the exactness tests ask for 1e-5 relative error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` with B (out, k) and A (k, in); k may be 0 (the zero matrix)."""

    B: np.ndarray
    A: np.ndarray

    @classmethod
    def zeros(cls, out_features: int, in_features: int) -> LowRank:
        return cls(np.zeros((out_features, 0)), np.zeros((0, in_features)))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> np.ndarray:
        return self.B @ self.A

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.B * factor, self.A)

    def __add__(self, other: LowRank) -> LowRank:
        """Exact: stacking the factors adds the products."""
        return LowRank(np.hstack([self.B, other.B]), np.vstack([self.A, other.A]))


@dataclass(frozen=True)
class Spectrum:
    """A thin SVD ``U @ diag(s) @ Vt``, singular values descending."""

    U: np.ndarray  # (out, k)
    s: np.ndarray  # (k,)
    Vt: np.ndarray  # (k, in)

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def factors(self, start: int = 0, stop: int | None = None) -> LowRank:
        """Components ``start:stop`` as balanced factors (√s on each side), the form whose
        leading columns/rows are the best approximation of each lower rank (Eckart–Young)."""
        root = np.sqrt(self.s[start:stop])
        return LowRank(self.U[:, start:stop] * root, root[:, None] * self.Vt[start:stop])


def _cutoff(s: np.ndarray, shape: tuple[int, int]) -> int:
    """How many singular values are not numerical noise (numpy's ``matrix_rank`` rule)."""
    if s.size == 0 or s[0] == 0:
        return 0
    tol = s[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s > tol))


def spectrum(matrix: LowRank | np.ndarray) -> Spectrum:
    """Thin SVD of a factored or dense matrix, without the numerically zero directions.

    Factored: ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` give ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of
    the k × k core rotates into the SVD of the whole. Exact up to float64 rounding.
    """
    if isinstance(matrix, np.ndarray):
        U, s, Vt = np.linalg.svd(matrix, full_matrices=False)
        shape = matrix.shape
    elif matrix.rank == 0:
        out_features, in_features = matrix.shape
        return Spectrum(np.zeros((out_features, 0)), np.zeros(0), np.zeros((0, in_features)))
    else:
        qb, rb = np.linalg.qr(matrix.B)  # (out, k'), (k', k)
        qa, ra = np.linalg.qr(matrix.A.T)  # (in, k'), (k', k)
        u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
        U, Vt = qb @ u, vt @ qa.T
        shape = matrix.shape
    keep = _cutoff(s, shape)
    return Spectrum(U[:, :keep], s[:keep], Vt[:keep])


def compress(matrix: LowRank) -> LowRank:
    """The same matrix with the fewest factor columns (its numerical rank)."""
    return spectrum(matrix).factors()


class LowRankSum:
    """Running ``Σ wₖ·Bₖ·Aₖ`` for one layer, in memory bounded by one dense matrix.

    Products are stacked while the stacked factors are smaller than ``out × in``; when they would
    not be, the accumulator turns dense. Either way the result is the exact sum. (It used to
    compress the stacked factors to their numerical rank first, in case the devices' products
    were redundant; they never are in a real fleet, and on SmolLM2 q,v that QR + SVD was 1.7 s
    of every exact round, 28 ms a layer, to learn that the sum has full rank.)

    Once dense, products are buffered and folded in with one matmul per ``limit / 4`` columns:
    adding a rank-8 product alone is a pass over the whole dense matrix for little arithmetic,
    and BLAS does a few wide products many times faster than many thin ones (docs/benchmarks.md,
    strategies). The buffer costs at most a quarter of the dense matrix's memory.
    """

    def __init__(self, out_features: int, in_features: int):
        self.shape = (out_features, in_features)
        self._factors = LowRank.zeros(out_features, in_features)
        self._dense: np.ndarray | None = None
        # stacked columns beyond which factors cost more than the dense matrix
        self._limit = max(1, (out_features * in_features) // (out_features + in_features))
        #: products waiting to be folded into the dense sum, and their columns
        self._waiting: list[tuple[np.ndarray, np.ndarray]] = []
        self._waiting_columns = 0

    def add(self, B: np.ndarray, A: np.ndarray, weight: float = 1.0) -> None:
        B = np.asarray(B, np.float64) * weight
        A = np.asarray(A, np.float64)
        if self._dense is not None:
            self._waiting.append((B, A))
            self._waiting_columns += A.shape[0]
            if self._waiting_columns >= max(1, self._limit // 4):
                self._fold()
            return
        stacked = self._factors + LowRank(B, A)
        if stacked.rank > self._limit:  # (turns dense: see the class's docstring)
            self._dense = stacked.dense()
            self._factors = LowRank.zeros(*self.shape)
            return
        self._factors = stacked

    def _fold(self) -> None:
        if self._waiting:
            B = np.hstack([b for b, _ in self._waiting])
            A = np.vstack([a for _, a in self._waiting])
            self._dense += B @ A
            self._waiting, self._waiting_columns = [], 0

    def add_dense(self, matrix: np.ndarray) -> None:
        """Add a dense matrix (another accumulator's dense sum): this one turns dense too."""
        if self._dense is None:
            self._dense = self._factors.dense()
            self._factors = LowRank.zeros(*self.shape)
        self._fold()
        self._dense += matrix

    def add_lowrank(self, matrix: LowRank, weight: float = 1.0) -> None:
        self.add(matrix.B, matrix.A, weight)

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    def nbytes(self) -> int:
        if self._dense is not None:
            return self._dense.nbytes + sum(b.nbytes + a.nbytes for b, a in self._waiting)
        return self._factors.B.nbytes + self._factors.A.nbytes

    def result(self) -> LowRank | np.ndarray:
        """The sum: factors, or the dense matrix once it went dense."""
        if self._dense is not None:
            self._fold()
            return self._dense
        return self._factors

    def spectrum(self) -> Spectrum:
        return spectrum(self.result())


__all__ = ["LowRank", "LowRankSum", "Spectrum", "compress", "spectrum"]
