"""How much one device may move a round: its claimed sample count and its update's norm are
bounded relative to the round's other updates, by default. Pure functions.

Why relative: a fleet's honest devices differ (a Xeon trains seven steps of batch 8, a Pi one
of batch 2; one site has twice the text of another), so no absolute bound fits every fleet,
but a claim of 10,000,000 samples or a delta of 1e38 per element is far outside *this round's*
spread. The reference is the round's **lower median** (the ⌈n/2⌉-th smallest value): a
minority of liars cannot move it beyond the honest values, and with two devices it is the
smaller one, so a liar facing one honest device is bounded by that device.

- **Samples**: a device's weight counts at most ``sample_ratio`` × the lower median of the
  round's claims. Its share of a round of n devices is then at most
  ``ratio / (ratio + n − 1)`` of the weight if everyone else claims the median (4 / 11 with
  8 devices at the default 4).
- **Norm**: a delta whose L2 norm is above ``norm_ratio`` × the lower median of the round's
  norms is scaled onto that bound (its direction kept), so its pull on the average is at most
  that many typical updates.

A round of one device has no reference and is bounded by the absolute limits alone
(``UpdateLimits``) and by the check of the global before it is published (``guard.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InfluenceBounds:
    """``serve --max-sample-ratio R --max-norm-ratio R`` (0 on the command line: unbounded)."""

    #: a claim counts at most this multiple of the round's lower-median claim (None: unbounded)
    sample_ratio: float | None = 4.0
    #: a delta's norm is clipped at this multiple of the round's lower-median norm (None: unbounded)
    norm_ratio: float | None = 5.0

    def __post_init__(self) -> None:
        for name in ("sample_ratio", "norm_ratio"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{name} must be a finite number ≥ 1 (None: unbounded), got {value}")


@dataclass(frozen=True)
class Bounded:
    """One update's share of the round after the bounds."""

    #: the samples it counts with (≤ what it claimed)
    samples: float
    #: the factor its delta is scaled by (1.0: untouched)
    scale: float


def lower_median(values: Sequence[float]) -> float:
    """The ⌈n/2⌉-th smallest value (``[3, 1e9]`` → 3): robust to any minority of large values."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def bound_influence(samples: Sequence[int], norms: Sequence[float], bounds: InfluenceBounds) -> list[Bounded]:
    """Each update's counted samples and delta scale, in the order given. Norms must be
    finite and ≥ 0 (the intake refuses non-finite deltas before they are journaled)."""
    if len(samples) != len(norms):
        raise ValueError(f"{len(samples)} sample counts for {len(norms)} norms")
    if not samples:
        return []
    sample_cap = math.inf if bounds.sample_ratio is None else bounds.sample_ratio * lower_median(samples)
    reference = lower_median(norms) if bounds.norm_ratio is not None else 0.0
    norm_cap = math.inf if bounds.norm_ratio is None or reference == 0.0 else bounds.norm_ratio * reference
    return [Bounded(float(min(n, sample_cap)), 1.0 if norm <= norm_cap else norm_cap / norm)
            for n, norm in zip(samples, norms)]
