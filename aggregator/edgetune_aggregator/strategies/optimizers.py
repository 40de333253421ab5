"""Server optimizers: how the aggregated update of a round moves the global adapter.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021): the average of the devices' updates
is a *pseudo-gradient* Δ (the direction the fleet moved), and the server applies an optimizer
step to it instead of simply adding it:

- ``fedavg``:  x ← x + η·Δ                               (η = 1 is plain FedAvg)
- ``fedavgm``: m ← β·m + Δ;  x ← x + η·m                  (server momentum)
- ``fedadam``: m ← β₁·m + (1−β₁)·Δ;  v ← β₂·v + (1−β₂)·Δ²;  x ← x + η·m / (√v + τ)
- ``fedyogi``: as fedadam but v ← v − (1−β₂)·Δ²·sign(v − Δ²) (v grows more cautiously)

with v initialised to τ², as in the paper (no bias correction). The adaptive two act element-wise,
so they apply to the adapter factors (``fedit``, ``hetlora``). The exact strategies hold the update
as a low-rank product ``ΔW = B·A``; linear steps (fedavg, fedavgm) keep it low-rank and exact,
but an element-wise √v would turn it into a dense out × in matrix per layer and break the
exactness those strategies exist for, so they accept only the linear two.

The optimizer's state (m, v) persists across rounds; ``state_dict``/``load_state_dict`` let the
daemon keep it in its state dir so a restarted daemon continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .lowrank import LowRank, compress

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
LINEAR_OPTIMIZERS = ("fedavg", "fedavgm")
#: β (β₁) where none is given: fedavgm's 0.5 is what the fleet benchmark ran (docs/benchmarks.md);
#: 0.9 is Reddi et al.'s β₁ for the adaptive two
DEFAULT_MOMENTUM = {"fedavg": 0.0, "fedavgm": 0.5, "fedadam": 0.9, "fedyogi": 0.9}


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """One server optimizer and its settings. ``ServerOptimizerConfig()`` is plain FedAvg (the
    identity step the strategies are tested with); the daemon's default is
    :data:`DEFAULT_SERVER_OPTIMIZER`."""

    name: str = "fedavg"
    #: server learning rate η (1.0 with fedavg is plain FedAvg; Reddi et al. tune 1e-2..1 for adam/yogi)
    lr: float = 1.0
    #: fedavgm's β; fedadam/fedyogi's β₁ (None: ``DEFAULT_MOMENTUM`` of ``name``)
    momentum: float | None = None
    #: fedadam/fedyogi's β₂
    beta2: float = 0.99
    #: fedadam/fedyogi's τ, the adaptivity floor
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {self.name!r} is not one of {', '.join(SERVER_OPTIMIZERS)}")
        if self.momentum is None:
            object.__setattr__(self, "momentum", DEFAULT_MOMENTUM[self.name])
        if self.lr <= 0:
            raise ValueError(f"server optimizer lr must be > 0, got {self.lr}")
        for field_name in ("momentum", "beta2"):
            if not 0.0 <= getattr(self, field_name) < 1.0:
                raise ValueError(f"server optimizer {field_name} must be in [0, 1), got {getattr(self, field_name)}")
        if self.tau <= 0:
            raise ValueError(f"server optimizer tau must be > 0, got {self.tau}")


#: what the daemon, ``edgetune-aggregator serve`` and the simulator use unless told otherwise:
#: FedAvgM, server lr 1, β 0.5. In the fleet benchmark's sweep (10 rounds, 8 devices, SmolLM2)
#: it ended 5.9 % below FedAvg with hetlora and 7.4 % with fedit, and below FedAdam and FedYogi
#: by more (docs/benchmarks.md). Round 1 is FedAvg's; later rounds add half the last step.
DEFAULT_SERVER_OPTIMIZER = ServerOptimizerConfig("fedavgm", lr=1.0, momentum=0.5)


class ServerOptimizer:
    """Applies :class:`ServerOptimizerConfig` round after round, keeping its moments."""

    def __init__(self, config: ServerOptimizerConfig | None = None):
        self.config = config or ServerOptimizerConfig()
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}
        #: the exact strategies' momentum per layer: a product, or the dense matrix once the
        #: round's average went dense (its factors would hold more numbers than the matrix)
        self._m_lowrank: dict[str, LowRank | np.ndarray] = {}

    # --- adapter factors (element-wise) ---------------------------------------------------

    def step(self, params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next parameters from the pseudo-gradient ``delta`` (same names and shapes)."""
        c = self.config
        out = {}
        for name, x in params.items():
            x = np.asarray(x, np.float64)
            g = np.asarray(delta[name], np.float64)
            if c.name == "fedavg":
                step = g
            elif c.name == "fedavgm":
                step = self._m[name] = c.momentum * self._m.get(name, 0.0) + g
            else:
                m = self._m[name] = c.momentum * self._m.get(name, 0.0) + (1 - c.momentum) * g
                v = self._v.get(name)
                if v is None:
                    v = np.full_like(g, c.tau**2)
                g2 = g * g
                if c.name == "fedadam":
                    v = c.beta2 * v + (1 - c.beta2) * g2
                else:  # fedyogi
                    v = v - (1 - c.beta2) * g2 * np.sign(v - g2)
                self._v[name] = v
                step = m / (np.sqrt(v) + c.tau)
            out[name] = (x + c.lr * step).astype(np.float32)
        return out

    # --- low-rank updates (exact strategies) ------------------------------------------------

    def step_lowrank(self, update: Mapping[str, LowRank]) -> dict[str, LowRank]:
        """The step to add to ``ΔW`` for each layer, as a low-rank product (linear optimizers only)."""
        return {name: self.step_layer(name, g) for name, g in update.items()}

    def step_layer(self, name: str, g: LowRank | np.ndarray) -> LowRank | np.ndarray:
        """One layer's step (linear optimizers only): a product for a product, dense for a
        dense average. A dense step is factored only once, by the SVD of the new ΔW: FedAvgM
        keeps such a momentum dense (β·m + Δ is one add), not as factors that would be larger."""
        c = self.config
        if c.name not in LINEAR_OPTIMIZERS:
            raise ValueError(f"server optimizer {c.name} is element-wise and would make the exact "
                             f"strategies' low-rank update dense; use one of {', '.join(LINEAR_OPTIMIZERS)}")
        if c.name == "fedavgm":
            previous = self._m_lowrank.get(name)
            if isinstance(previous, np.ndarray) and not isinstance(g, np.ndarray):
                g = g.dense()
            if isinstance(g, np.ndarray):
                if previous is not None:
                    g = g + c.momentum * (previous if isinstance(previous, np.ndarray) else previous.dense())
            elif previous is not None:  # (a first step is the average, compact already: ExactSum.average_layer)
                g = compress(previous.scaled(c.momentum) + g)
            self._m_lowrank[name] = g
        return g * c.lr if isinstance(g, np.ndarray) else g.scaled(c.lr)

    # --- persistence ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"m:{k}": v for k, v in self._m.items()}
        state.update({f"v:{k}": v for k, v in self._v.items()})
        for name, lr in self._m_lowrank.items():
            if isinstance(lr, np.ndarray):
                state[f"md:{name}"] = lr
            else:
                state[f"mB:{name}"], state[f"mA:{name}"] = lr.B, lr.A
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._m, self._v, self._m_lowrank = {}, {}, {}
        for key, value in state.items():
            kind, _, name = key.partition(":")
            value = np.asarray(value, np.float64)
            if kind == "m":
                self._m[name] = value
            elif kind == "v":
                self._v[name] = value
            elif kind == "md":
                self._m_lowrank[name] = value
            elif kind == "mB":
                self._m_lowrank[name] = LowRank(value, np.asarray(state[f"mA:{name}"], np.float64))
            elif kind != "mA":
                raise ValueError(f"unknown server optimizer state entry {key!r}")
