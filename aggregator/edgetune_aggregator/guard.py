"""The last check before a global adapter is stored or sent: finite, the fleet's layout, and a
change from its parent no larger than the round's updates can explain. Pure functions.

Every update was checked on arrival, but what is about to be published is a sum: deltas that
are finite and each within bounds can still overflow float32 together (1e38 per element twice
is ``inf``), a server optimizer can amplify them, and a strategy can have a bug. One bad
global reaches every device at once, so it is checked as a whole.

The change is measured by the adapter's kind where it acts (``AdapterKind.global_change``): on
the effective weight update of each LoRA layer, ``ΔW = merged_B·merged_A + s·B·A``
(``edgetune.adapters.lora.change``), on a soft prompt's embeddings. The bound is ``ratio`` × the change a
typical accepted update (the round's lower median, after the influence bounds) would make on
its own: a weighted mean of the updates moves ΔW no further than its largest term, which the
influence bounds keep within a few typical ones, and the ratio leaves room for what is not a
plain mean (fedit's cross terms of averaged factors, a truncated merged part). The median, not
the largest, is the reference so that a hostile minority cannot widen the bound for itself:
with the influence bounds switched off, a 1e38 delta among honest ones is still refused here.
A round of one device is its own reference: only finiteness and the layout protect it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edgetune.adapters.kind import AdapterKind
from edgetune.adapters.tensors import Tensors, as_float32

from .strategies.optimizers import ServerOptimizerConfig

#: server optimizers whose steps are normalised element-wise
ADAPTIVE = ("fedadam", "fedyogi")
#: the default ``--max-global-change``: a generous multiple (see the module's docstring)
DEFAULT_CHANGE_RATIO = 10.0


def layout_problem(tensors: Tensors, merged: Tensors, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why the candidate is not the fleet's layout or not finite (None if it is both)."""
    if set(tensors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        return f"tensors differ from the layout (missing {missing[:2]}, extra {extra[:2]})"
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shapes[name]):
            return f"{name} has shape {tuple(t.shape)}, the layout {tuple(shapes[name])}"
    modules = {n.rsplit(".", 1)[0] for n in shapes}
    for name, t in merged.items():
        module, _, part = name.rpartition(".")
        if module not in modules or part not in ("merged_A", "merged_B") or t.ndim != 2:
            return f"merged tensor {name} {tuple(t.shape)} is not a factor of a layout matrix"
    for name, t in {**tensors, **merged}.items():
        if not np.all(np.isfinite(as_float32(t))):
            bad = int(np.size(t) - np.count_nonzero(np.isfinite(as_float32(t))))
            return f"{name} has {bad} non-finite value(s)"
    return None


def _f64(t: np.ndarray) -> np.ndarray:
    return np.asarray(as_float32(t), np.float64)


def max_element_change(parent: Tensors, candidate: Tensors) -> float:
    return max((float(np.max(np.abs(_f64(candidate[n]) - _f64(parent[n])), initial=0.0)) for n in parent), default=0.0)


def check_candidate(kind: AdapterKind, spec, shapes: Mapping[str, tuple[int, ...]], parent: tuple[Tensors, Tensors],
                    candidate: tuple[Tensors, Tensors], typical_update: float, ratio: float | None,
                    optimizer: ServerOptimizerConfig | None = None) -> str | None:
    """Why the candidate global must not be published (None if it may). ``kind`` measures the
    change (``AdapterKind.global_change``) of an adapter of ``spec``; ``typical_update``: the
    change the round's lower-median update would make alone; ``ratio``: the bound's multiple
    (None: no change bound).

    With the linear server optimizers the step is η·(the round's mean), or with momentum β at
    most η/(1 − β) times the largest mean so far, so the bound is scaled by that gain. The adaptive
    ones (fedadam, fedyogi) normalise each element's step to about η whatever the updates'
    size (with the default β₁ = 0.9, β₂ = 0.99 at most ≈ 2.3·η), so their bound is on the
    largest element change of the factors: ``ratio`` × η."""
    optimizer = optimizer or ServerOptimizerConfig()
    with np.errstate(over="ignore", invalid="ignore"):
        problem = layout_problem(*candidate, shapes)
        if problem:
            return problem
        if ratio is None:
            return None
        if optimizer.name in ADAPTIVE:
            change, bound = max_element_change(parent[0], candidate[0]), ratio * optimizer.lr
            what = f"{ratio:g} × the server learning rate {optimizer.lr:g} ({optimizer.name} steps are normalised)"
            measure = "in one element of its factors"
        else:
            change = kind.global_change(parent, candidate, kind.scale(spec))
            gain = optimizer.lr / (1.0 - optimizer.momentum if optimizer.name == "fedavgm" else 1.0)
            bound = ratio * gain * typical_update
            what = f"{ratio:g} × the round's median update's {typical_update:.4g}" + (
                f" × the server step's gain {gain:g}" if gain != 1.0 else "")
            measure = kind.change_measure
    if not math.isfinite(change):
        return "its change from the parent version overflows"
    if change > bound * (1 + 1e-9) + 1e-12:
        return f"it moves {change:.4g} from the parent version {measure}, more than {what}"
    return None
