"""Aggregation strategies: pure decisions about how updates become the next global adapter.
They never touch the network or the disk; the daemon feeds them validated updates.

=========  ======  ==============================================================
name       exact   rule
=========  ======  ==============================================================
fedit      no      average A and B separately (zero-padded deltas)
hetlora    no      as fedit, each device weighted by ‖Bₖ·Aₖ‖_F
stack      yes     FLoRA: stack factors, fold the product into a frozen delta
svd        yes     FlexLoRA: SVD of Σ pₖ·Bₖ·Aₖ, each device starts from its rank
dense      yes     average of dense deltas (soft prompts; the only one for them)
=========  ======  ==============================================================
"""

from .base import NextGlobal, RoundMerge, RoundStart, Strategy
from .dense import Dense
from .exact import ExactStrategy
from .fedavg import FedAvg, fedavg
from .fedit import FedIT, fedit
from .hetlora import HetLoRA, hetlora
from .optimizers import (DEFAULT_SERVER_OPTIMIZER, LINEAR_OPTIMIZERS, SERVER_OPTIMIZERS, ServerOptimizer,
                         ServerOptimizerConfig)
from .stack import Stack, stack
from .svd import SVD, redistribute, svd

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedIT, HetLoRA, Stack, SVD, Dense)}


def make_strategy(name: str, optimizer: ServerOptimizerConfig | None = None, merged_rank: int | None = None) -> Strategy:
    """The strategy called ``name``, checked against the optimizer it must work with.
    ``merged_rank`` bounds an exact strategy's frozen delta (``ExactStrategy``)."""
    if name not in STRATEGIES:
        raise ValueError(f"aggregation strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    optimizer = optimizer or ServerOptimizerConfig()
    low_rank_exact = issubclass(cls, ExactStrategy)
    if low_rank_exact and optimizer.name not in LINEAR_OPTIMIZERS:
        raise ValueError(f"strategy {name} keeps the global update exactly low-rank and works with the "
                         f"server optimizers {', '.join(LINEAR_OPTIMIZERS)}, not {optimizer.name} "
                         "(element-wise adaptivity would make it dense); use fedit or hetlora with it")
    if low_rank_exact:
        return cls(optimizer, merged_rank=merged_rank)
    return cls(optimizer)


__all__ = [
    "DEFAULT_SERVER_OPTIMIZER", "Dense", "FedAvg", "FedIT", "HetLoRA", "LINEAR_OPTIMIZERS", "NextGlobal", "RoundMerge", "RoundStart", "SERVER_OPTIMIZERS",
    "SVD", "STRATEGIES", "ServerOptimizer", "ServerOptimizerConfig", "Stack", "Strategy", "fedavg", "fedit",
    "hetlora", "make_strategy", "redistribute", "stack", "svd",
]
