"""What every aggregation strategy looks like to the daemon.

A round starts from the published global adapter: trainable factors ``start`` (rank R, scale
``s = alpha / R``) and a frozen low-rank delta ``merged``. Device k trains the leading rₖ
components (the rest stays in its model, frozen; ``edgetune.adapters.lora.split_rank``) and
sends ``Δₖ = trained − start[:rₖ]``. A strategy turns the weighted deltas into the next
``(start, merged)``; how, and whether the result is exact, is each strategy's business.

"Exact" means: the next global weight update equals the sample-weighted average of the devices'
trained weight updates, ``ΔW' = Σ pₖ·ΔWₖ`` — for fresh factors, ``Σ pₖ·Bₖ·Aₖ``.

Strategies are decision objects: no network, no disk. ``add`` is called once per accepted
update as it arrives, so memory depends on the model, not the number of devices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from edgetune.adapters.tensors import as_float32
from edgetune.adapters.lora import module_names

from .optimizers import ServerOptimizer, ServerOptimizerConfig

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class RoundStart:
    """The global adapter a round's devices started from."""

    tensors: dict[str, np.ndarray]  # trainable factors, rank R
    merged: dict[str, np.ndarray]  # frozen delta factors (scaled)
    scale: float  # alpha / R
    #: a seed for strategies that hand out fresh factors next round
    seed: int = 0
    modules: list[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", module_names(self.tensors))

    @property
    def rank(self) -> int:
        return self.tensors[f"{self.modules[0]}.lora_A"].shape[0]

    def factors(self, module: str, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) of a module's start, its leading ``rank`` components, as float64."""
        B = np.asarray(as_float32(self.tensors[f"{module}.lora_B"]), np.float64)
        A = np.asarray(as_float32(self.tensors[f"{module}.lora_A"]), np.float64)
        return (B, A) if rank is None else (B[:, :rank], A[:rank])

    def trained(self, module: str, delta: Tensors) -> tuple[np.ndarray, np.ndarray, int]:
        """A device's trained (B, A) for a module and its rank, from its delta."""
        dA = np.asarray(as_float32(delta[f"{module}.lora_A"]), np.float64)
        dB = np.asarray(as_float32(delta[f"{module}.lora_B"]), np.float64)
        rank = dA.shape[0]
        B0, A0 = self.factors(module, rank)
        return B0 + dB, A0 + dA, rank


@dataclass(frozen=True)
class NextGlobal:
    tensors: dict[str, np.ndarray]
    merged: dict[str, np.ndarray]
    #: exact strategies with a bounded downlink: ‖ΔW − ΔW_kept‖_F / ‖ΔW‖_F of the layer that
    #: lost most to the rank cap (None: nothing was truncated, or the strategy keeps no ΔW)
    truncation_error: float | None = None


class RoundMerge(ABC):
    """Accumulates one round's updates."""

    def __init__(self, start: RoundStart):
        self.start = start
        self.count = 0
        self.total_weight = 0.0

    def add(self, delta: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        self._add(delta, float(weight))
        self.count += 1
        self.total_weight += float(weight)

    @abstractmethod
    def _add(self, delta: Tensors, weight: float) -> None: ...

    def nbytes(self) -> int:
        """Memory held by the running sums (for tests and benchmarks)."""
        return 0

    # --- partial sums: a share of the round's updates merged elsewhere (aggregator workers) ---

    def partial(self) -> dict[str, np.ndarray]:
        """This merge's running sums as named arrays: what a worker that merged a share of the
        round's updates hands the coordinator, which ``absorb``s every share into one merge."""
        state = self._partial()
        state["_count"] = np.array(self.count, np.float64)
        state["_weight"] = np.array(self.total_weight, np.float64)
        return state

    def absorb(self, partial: Mapping[str, np.ndarray]) -> None:
        """Add another merge's ``partial`` (same round start, other updates): the result is the
        merge of both shares, equal to one merge of all of them up to float64 rounding (the sums
        are added in another order)."""
        self._absorb(partial)
        self.count += int(partial["_count"])
        self.total_weight += float(partial["_weight"])

    def _partial(self) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged in shares")

    def _absorb(self, partial: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged in shares")


class Strategy(ABC):
    name: ClassVar[str]
    exact: ClassVar[bool]

    def __init__(self, optimizer: ServerOptimizerConfig | None = None):
        self.optimizer = ServerOptimizer(optimizer)

    @abstractmethod
    def begin(self, start: RoundStart) -> RoundMerge: ...

    @abstractmethod
    def finish(self, merge: RoundMerge) -> NextGlobal:
        """The next global adapter (raises ``ValueError`` without updates)."""


def check_weights(weights, count: int) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    if count == 0 or weights.shape != (count,):
        raise ValueError("aggregation needs one weight per adapter and at least one adapter")
    if not np.all(weights > 0):
        raise ValueError("aggregation weights must be > 0")
    return weights / weights.sum()
