"""Which weight matrices get LoRA adapters: combine the devices' importance scores and pick the
matrices worth most within a budget of adapter parameters (docs/importance.md).

Pure Python on plain mappings, so the daemon runs it without torch. Shapes come from a model
manifest: module name -> (out_features, in_features). A LoRA adapter of rank r on a matrix costs
r·(in + out) parameters, which is also what it costs on the wire and in optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "GPT2_KINDS",
    "LLAMA_KINDS",
    "Layout",
    "adapter_cost",
    "candidate_modules",
    "combine_scores",
    "fixed_layout_budget",
    "select_layout",
]

Shapes = Mapping[str, tuple[int, int]]

#: every projection of a Llama-style block (SmolLM2): attention, then the gated MLP
LLAMA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: GPT-2's fused qkv, its two output projections (attention's and the MLP's) and the MLP input
GPT2_KINDS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class Layout:
    """The chosen matrices (full module names, sorted), their adapter parameters at the fleet
    rank, the budget they were chosen under, and the share of the total score they cover."""

    modules: tuple[str, ...]
    cost: int
    budget: int
    score_covered: float


def candidate_modules(modules: Shapes, kinds: Sequence[str]) -> list[str]:
    """Sorted full names of the layers whose last name part is one of ``kinds``."""
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a sequence of layer names, got the string {kinds!r}")
    wanted = set(kinds)
    names = sorted(name for name in modules if name.rsplit(".", 1)[-1] in wanted)
    if not names:
        raise ValueError(f"no layer of the model is one of {sorted(wanted)} (it has e.g. {sorted(modules)[:4]})")
    return names


def adapter_cost(modules: Shapes, names: Sequence[str], rank: int) -> int:
    """LoRA parameters of rank ``rank`` on ``names``: Σ rank·(in + out)."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"unknown modules {unknown[:3]}: names must come from the model's manifest")
    return sum(rank * (modules[n][0] + modules[n][1]) for n in names)


def fixed_layout_budget(modules: Shapes, kinds: Sequence[str] = ("q_proj", "v_proj"), *, rank: int) -> int:
    """Adapter parameters of the usual fixed layout (``kinds`` in every layer) at ``rank``: the
    default budget, so a chosen layout costs no more than the one it replaces."""
    return adapter_cost(modules, candidate_modules(modules, kinds), rank)


def combine_scores(reports: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """One score per matrix from the devices' ``(scores, weight)`` reports, weight = samples.

    Each device's scores are first normalised to sum 1: losses differ in scale between devices
    (data, sequence length, how far training has got), and a device should not dominate just
    because its loss is steeper. The normalised scores are then averaged with the devices'
    weights; a name a device did not report counts as 0 there. A device whose scores are all
    zero carries no ranking and is left out of the average, weight included. The result sums
    to 1, or is all zeros if no device had any signal.
    """
    if not reports:
        raise ValueError("no importance reports to combine")
    names = sorted({name for scores, _ in reports for name in scores})
    combined = dict.fromkeys(names, 0.0)
    total_weight = 0.0
    for index, (scores, weight) in enumerate(reports):
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"report {index} has weight {weight}: weights (sample counts) must be finite and > 0")
        _check_scores(scores, f"report {index}")
        total = math.fsum(scores.values())
        if total == 0:
            continue
        total_weight += weight
        for name, score in scores.items():
            combined[name] += weight * score / total
    if total_weight == 0:
        return combined
    return {name: value / total_weight for name, value in combined.items()}


def select_layout(scores: Mapping[str, float], modules: Shapes, rank: int, budget: int) -> Layout:
    """The matrices with the most total score whose adapters at ``rank`` cost ≤ ``budget``.

    That is a 0/1 knapsack. With a few hundred matrices an exact solver would do, but the
    scores are noisy estimates, so a fast rule with a guarantee is enough: take matrices by
    score per parameter, skipping any that no longer fits and carrying on with smaller ones;
    then compare that set with the single best matrix that fits and keep the better one. The
    comparison is what makes it a ½-approximation (greedy alone can be arbitrarily bad when one
    big matrix is worth more than everything cheaper). With equal costs (one kind of matrix)
    the greedy set is the top-k and exactly optimal. Ties go to the name that sorts first.

    Matrices scoring 0 are never chosen: they cost parameters and add nothing to the objective.
    """
    _check_scores(scores, "scores")
    if budget < 1:
        raise ValueError(f"budget must be ≥ 1 adapter parameter, got {budget}")
    costs = {name: adapter_cost(modules, [name], rank) for name in scores}
    total = math.fsum(scores.values())
    if total == 0:
        raise ValueError("every score is 0: the calibration found no signal; keep the fixed layout")
    useful = [n for n in sorted(scores) if scores[n] > 0 and costs[n] <= budget]
    if not useful:
        cheapest = min(costs[n] for n in scores if scores[n] > 0)
        raise ValueError(f"budget {budget} fits no scored matrix: the cheapest costs {cheapest} at rank {rank}")

    greedy: list[str] = []
    spent = 0
    for name in sorted(useful, key=lambda n: (-scores[n] / costs[n], n)):
        if spent + costs[name] <= budget:
            greedy.append(name)
            spent += costs[name]
    best = min(useful, key=lambda n: (-scores[n], costs[n], n))
    chosen = greedy if _value(greedy, scores) >= scores[best] else [best]
    return Layout(
        modules=tuple(sorted(chosen)),
        cost=sum(costs[n] for n in chosen),
        budget=budget,
        score_covered=_value(chosen, scores) / total,
    )


def _value(names: Sequence[str], scores: Mapping[str, float]) -> float:
    return math.fsum(scores[n] for n in names)


def _check_scores(scores: Mapping[str, float], what: str) -> None:
    for name, score in scores.items():
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{what}: the score of {name} is {score!r}; scores must be finite and ≥ 0")
