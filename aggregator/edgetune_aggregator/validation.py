"""What an update must be before it is merged: the round's layout, finite values, a bounded
norm and a plausible sample count. Pure functions; the daemon counts the reasons.

Every refusal has a short reason (a Prometheus label and a ``rounds.json`` key) and a detail
for the log. Shapes are checked against the layout *the daemon* derives from the fleet's
model and adapter, never against what the update claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgetune.adapters.tensors import dense_norm, finite_norm, tensor_problem

#: dtypes an adapter tensor may travel in (float64 would double what a round must hold)
ADAPTER_DTYPES = ("float32", "float16", "bfloat16")
NORM_ACTIONS = ("clip", "reject")
#: envelope, tensor names and msgpack framing on top of the tensors' bytes
_ENVELOPE_BYTES = 64 << 10
_PER_TENSOR_BYTES = 512


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds every update must meet (``serve --max-update-norm …``)."""

    #: L2 norm of the whole delta (all tensors together); None: unbounded
    max_norm: float | None = None
    #: what an update over ``max_norm`` gets: scaled down onto the bound, or refused
    norm_action: str = "clip"
    min_samples: int = 1
    #: an update's weight in the average is its sample count: cap what one device can claim
    max_samples: int = 10_000_000

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be a finite number > 0, got {self.max_norm}")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action {self.norm_action!r} is not one of {', '.join(NORM_ACTIONS)}")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(f"need 1 ≤ min_samples ≤ max_samples, got {self.min_samples} and {self.max_samples}")


@dataclass(frozen=True)
class Refusal:
    reason: str
    detail: str


def check_layout(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                 values: bool = True) -> Refusal | None:
    """Same tensor names and shapes as the layout, one of ``ADAPTER_DTYPES``, finite values
    (``values=False``: left to ``measure_delta``, which reads the values once for the norm too)."""
    problem = tensor_problem(tensors, shapes, ADAPTER_DTYPES, values)
    return Refusal(*problem) if problem else None


def measure_delta(tensors: Mapping[str, np.ndarray]) -> tuple[float, Refusal | None]:
    """``(norm, None)`` of a delta whose layout passed, or ``(norm, not_finite)``: one pass over
    its values (an update's 460,800 of them for SmolLM2 r=8) where two would check, then measure."""
    norm, bad = finite_norm(tensors)
    return norm, Refusal("not_finite", f"{bad} contains NaN or infinity") if bad is not None else None


#: the L2 norm of an update's delta, all tensors together, accumulated in float64
delta_norm = dense_norm


def clip_scale(norm: float, limits: UpdateLimits) -> float:
    """The factor that puts a delta of L2 norm ``norm`` onto the absolute bound (1.0 within it).
    Clipping keeps the direction and caps any one device's pull on the average (``weighting.py``
    applies it at the merge)."""
    return 1.0 if limits.max_norm is None or norm <= limits.max_norm else limits.max_norm / norm


def check_norm(norm: float, limits: UpdateLimits) -> Refusal | None:
    """A refusal for a delta of L2 norm ``norm`` above the bound when the limits reject such
    deltas (``norm_action="reject"``); None when it passes or is to be clipped (at the merge)."""
    if limits.max_norm is not None and norm > limits.max_norm and limits.norm_action == "reject":
        return Refusal("norm_exceeded", f"norm {norm:.4g} > bound {limits.max_norm:.4g}")
    return None


def check_samples(num_samples: int, limits: UpdateLimits) -> Refusal | None:
    if not limits.min_samples <= num_samples <= limits.max_samples:
        return Refusal("sample_count", f"{num_samples} samples is outside {limits.min_samples}..{limits.max_samples}")
    return None


def max_result_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The most bytes a result for this layout can take on the wire (float32 tensors, names,
    envelope, signature): a payload claiming more is refused before it is reassembled."""
    values = sum(math.prod(s) for s in shapes.values())
    return 4 * values + _PER_TENSOR_BYTES * len(shapes) + _ENVELOPE_BYTES
