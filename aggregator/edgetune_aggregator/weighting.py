"""How much each journaled update counts in a round, as a wrapper around the merge strategy:
norm clipping (absolute, ``UpdateLimits.max_norm``), the influence bounds relative to the
round (``influence.py``), the staleness factor of a late update, and, for fleets that fear
poisoning, a coordinate-wise robust combination instead of the weighted mean.

The strategy itself stays a pure average of what it is given (``strategies/``). The round's
handler streams the journaled updates, one at a time in device order, into the wrapper; the
wrapper scales and weighs each before the strategy sees it (or holds it, for a robust
combination), so a round interrupted by restarts merges exactly what an uninterrupted one would.
An exact strategy merges in two threads (``merge_all``): the first half of the updates and the
second, each into its own sums, added in that order, the same split every time.
The plan of weights is made up front from what was recorded when each update arrived (its
sample claim, its norm, its lag), so nothing is decoded twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgetune.adapters.tensors import Shapes, as_float32

from .influence import InfluenceBounds, bound_influence
from .strategies import NextGlobal, RoundMerge, RoundStart, Strategy
from .strategies.robust import robust_combine
from .validation import UpdateLimits, clip_scale

#: the fewest updates an exact strategy merges in two shares (fewer: one thread does them all)
SHARED_MERGE_MIN = 16


def scaled(delta: Mapping[str, np.ndarray], scale: float) -> Mapping[str, np.ndarray]:
    """A delta as the plan merges it: times its ``Weight.scale`` (untouched at 1.0)."""
    if scale == 1.0:
        return delta
    return {k: as_float32(t) * np.float32(scale) for k, t in delta.items()}


@dataclass(frozen=True)
class Entry:
    """One accepted update as the round recorded it when it arrived."""

    samples: int
    #: the L2 norm of its delta as sent
    norm: float
    #: global versions between the one it trained on and the round's (0: on time)
    lag: int = 0


@dataclass(frozen=True)
class Weight:
    """What the round makes of one update."""

    #: its delta is multiplied by this (the absolute and the relative norm bound; 1.0: untouched)
    scale: float
    #: the samples it counts with (the influence bound; ≤ its claim)
    samples: float
    #: its weight in the strategy's average: samples × the staleness factor (1 + lag)^-exponent
    weight: float


@dataclass(frozen=True)
class Weighting:
    """The fleet's rules (``AggregatorConfig``: limits, influence, staleness_exponent, robust, trim)."""

    limits: UpdateLimits
    influence: InfluenceBounds
    staleness_exponent: float = 0.5
    #: None: the strategy's weighted mean; "median" or "trimmed_mean" (strategies/robust.py)
    robust: str | None = None
    trim: float = 0.1

    def plan(self, entries: list[Entry]) -> list[Weight]:
        """Each update's scale and weight, in the order given (pure)."""
        absolute = [clip_scale(e.norm, self.limits) for e in entries]
        bounded = bound_influence([e.samples for e in entries], [e.norm * a for e, a in zip(entries, absolute)],
                                  self.influence)
        return [Weight(a * b.scale, b.samples, b.samples * (1.0 + e.lag) ** -self.staleness_exponent)
                for e, a, b in zip(entries, absolute, bounded)]

    def begin(self, strategy: Strategy, start: RoundStart, entries: list[Entry], shapes: Shapes) -> WeightedRound:
        return WeightedRound(self, strategy, start, self.plan(entries), shapes)


class WeightedRound:
    """One round's merge behind the weighting: ``add`` the i-th planned update's delta as it
    is read from the journal, then ``finish``."""

    def __init__(self, rules: Weighting, strategy: Strategy, start: RoundStart, weights: list[Weight], shapes: Shapes):
        self.rules = rules
        self.strategy = strategy
        self.weights = weights
        self.merge: RoundMerge = strategy.begin(start)
        self._shapes = shapes
        self._held: list[Mapping[str, np.ndarray]] = []  # a robust combination needs every delta at once

    def add(self, index: int, delta: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Merge update ``index``'s delta as planned; returns the delta as merged (scaled)."""
        delta = self._scaled(index, delta)
        if self.rules.robust:
            self._held.append(delta)
        else:
            self.merge.add(delta, self.weights[index].weight)
        return delta

    def merge_all(self, read: Callable[[int], Mapping[str, np.ndarray]],
                  meter: Callable[[], Callable[[Mapping[str, np.ndarray]], float]]) -> list[float]:
        """``add`` every planned update, ``read(i)`` giving the i-th delta; returns each one's
        change as merged, measured by a ``meter()`` (one per thread: a meter keeps buffers).

        An exact strategy's add is mostly BLAS, which runs without the GIL: from
        ``SHARED_MERGE_MIN`` updates on, a second thread merges the second half of them into
        sums of its own, absorbed after the first half. The split depends only on the count, so
        a resumed round merges bit for bit what an uninterrupted one does; against one thread
        the sums are added in another order (equal to float64 rounding). It costs the strategy's
        sums a second time (for SmolLM2 q,v and svd: ~106 MB of dense float64 accumulators)."""
        count = len(self.weights)
        changes: list[float] = [0.0] * count
        if not self.strategy.exact or self.rules.robust or count < SHARED_MERGE_MIN:
            change = meter()
            for index in range(count):
                changes[index] = change(self.add(index, read(index)))
            return changes
        half = (count + 1) // 2
        second = self.strategy.begin(self.merge.start)
        failed: list[BaseException] = []

        def merge_second_half() -> None:
            try:
                change = meter()
                for index in range(half, count):
                    delta = self._scaled(index, read(index))
                    second.add(delta, self.weights[index].weight)
                    changes[index] = change(delta)
            except BaseException as exc:  # (raised again by the caller's thread)
                failed.append(exc)

        thread = threading.Thread(target=merge_second_half, name="merge-second-half", daemon=True)
        thread.start()
        try:
            change = meter()
            for index in range(half):
                changes[index] = change(self.add(index, read(index)))
        finally:
            thread.join()
        if failed:
            raise failed[0]
        self.merge.absorb(second.partial())
        return changes

    def _scaled(self, index: int, delta: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return scaled(delta, self.weights[index].scale)

    def partial(self) -> dict[str, np.ndarray]:
        """The strategy's running sums of this share of the round (``RoundMerge.partial``)."""
        if self.rules.robust:
            raise ValueError(f"a {self.rules.robust} combination needs every delta at once: it cannot be merged "
                             "in shares (aggregator workers); use the weighted mean, or one aggregator process")
        return self.merge.partial()

    def finish(self) -> NextGlobal:
        if self._held:
            self.merge.add(robust_combine(self._held, self._shapes, self.rules.robust, self.rules.trim), 1.0)
        return self.strategy.finish(self.merge)

    @property
    def shares(self) -> list[float | None]:
        """Each update's share of the round's weight (None without any weight)."""
        total = sum(w.weight for w in self.weights)
        return [w.weight / total if total > 0 else None for w in self.weights]


__all__ = ["SHARED_MERGE_MIN", "Entry", "Weight", "WeightedRound", "Weighting", "scaled"]
