"""Bounded influence and the check of a global before it is published: the pure functions
(influence.py, guard.py) against every strategy and server optimizer, so that the defaults
never refuse an honest round and always refuse an overflowing or runaway one."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune.adapters.lora import init_lora
from edgetune.adapters.registry import adapter_shapes
from edgetune.simulate import TINY
from edgetune.wire import LoraSpec
from edgetune.adapters.lora import KIND, UpdateChange, lora_change, lora_update_change
from edgetune_aggregator.guard import DEFAULT_CHANGE_RATIO, check_candidate
from edgetune_aggregator.influence import InfluenceBounds, bound_influence, lower_median
from edgetune_aggregator.strategies import RoundStart, make_strategy
from edgetune_aggregator.strategies.optimizers import ServerOptimizerConfig
from edgetune_aggregator.validation import delta_norm

SPEC = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
SHAPES = adapter_shapes(SPEC, TINY)
SCALE = SPEC.alpha / SPEC.rank


def test_the_lower_median_ignores_any_minority_of_large_values():
    assert lower_median([3.0]) == 3.0
    assert lower_median([3.0, 1e9]) == 3.0
    assert lower_median([5.0, 1.0, 1e30]) == 5.0
    assert lower_median([4.0, 1.0, 2.0, 1e30]) == 2.0
    with pytest.raises(ValueError):
        lower_median([])


def test_a_ten_million_sample_claim_counts_at_most_the_ratio_times_the_median():
    claims = [500, 470, 1013, 851, 377, 510, 975, 10_000_000]
    bounded = bound_influence(claims, [1.0] * len(claims), InfluenceBounds())
    median = lower_median(claims)
    assert bounded[-1].samples == 4.0 * median
    assert [b.samples for b in bounded[:-1]] == claims[:-1]  # honest claims are untouched
    share = bounded[-1].samples / sum(b.samples for b in bounded)
    assert share <= 4.0 / (4.0 + len(claims) - 1) + 0.05  # the documented bound, at this spread
    unbounded = bound_influence(claims, [1.0] * len(claims), InfluenceBounds(sample_ratio=None))
    assert unbounded[-1].samples / sum(b.samples for b in unbounded) > 0.999


def test_a_huge_norm_is_clipped_to_the_ratio_times_the_median_norm():
    norms = [1.0, 1.2, 0.8, 1e38]
    bounded = bound_influence([10] * 4, norms, InfluenceBounds())
    assert [b.scale for b in bounded[:3]] == [1.0, 1.0, 1.0]
    assert bounded[3].scale * norms[3] == pytest.approx(5.0 * lower_median(norms))
    # two devices: the liar is bounded by the honest one
    pair = bound_influence([10, 10], [2.0, 1e30], InfluenceBounds())
    assert pair[1].scale * 1e30 == pytest.approx(10.0)
    assert bound_influence([10], [1e30], InfluenceBounds())[0].scale == 1.0  # no reference: guard.py's job


def test_influence_bounds_refuse_meaningless_ratios():
    for bad in (0.5, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            InfluenceBounds(sample_ratio=bad)
        with pytest.raises(ValueError):
            InfluenceBounds(norm_ratio=bad)


def test_the_change_norm_is_the_frobenius_norm_of_the_effective_weights():
    rng = np.random.default_rng(0)
    parent = init_lora(SPEC, TINY.modules, 0)
    parent = {k: (v + rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in parent.items()}
    candidate = {k: (v + rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in parent.items()}
    merged = {}
    for name in SHAPES:
        module = name.rsplit(".", 1)[0]
        merged[f"{module}.merged_B"] = rng.standard_normal((SHAPES[f"{module}.lora_B"][0], 3)).astype(np.float32)
        merged[f"{module}.merged_A"] = rng.standard_normal((3, SHAPES[f"{module}.lora_A"][1])).astype(np.float32)
    dense = 0.0
    for module in {n.rsplit(".", 1)[0] for n in SHAPES}:
        def w(t, m):
            out = SCALE * t[f"{module}.lora_B"].astype(np.float64) @ t[f"{module}.lora_A"].astype(np.float64)
            if m:
                out += m[f"{module}.merged_B"].astype(np.float64) @ m[f"{module}.merged_A"].astype(np.float64)
            return out
        dense += float(np.sum((w(candidate, merged) - w(parent, {})) ** 2))
    assert lora_change((parent, {}), (candidate, merged), SCALE) == pytest.approx(np.sqrt(dense), rel=1e-9)


def _rounds(strategy: str, optimizer: ServerOptimizerConfig, rounds: int = 4, poison: float | None = None):
    """Mixed-rank rounds of random deltas through a strategy (the last device sends ``poison``
    in every element, if given); yields (parent, candidate, the median update's change)."""
    rng = np.random.default_rng(1)
    strat = make_strategy(strategy, optimizer, SPEC.rank)
    tensors, merged = init_lora(SPEC, TINY.modules, 0), {}
    for r in range(rounds):
        start = RoundStart(dict(tensors), dict(merged), SCALE, seed=r)
        merge = strat.begin(start)
        changes = []
        for k, rank in enumerate((2, 4, 8, 8)):
            delta = {}
            for name, shape in SHAPES.items():
                shape = (rank, shape[1]) if name.endswith("lora_A") else (shape[0], rank)
                delta[name] = (rng.standard_normal(shape) * 1e-3 * (1 + k)).astype(np.float32)
            if poison is not None and k == 3:
                delta = {n: np.full(t.shape, poison, np.float32) for n, t in delta.items()}
            changes.append(lora_update_change(start.tensors, delta, SCALE))
            merge.add(delta, 10.0 + k)
        result = strat.finish(merge)
        yield (tensors, merged), (result.tensors, result.merged), lower_median(changes)
        tensors, merged = result.tensors, result.merged


@pytest.mark.parametrize("strategy,optimizer", [
    ("fedit", "fedavg"), ("hetlora", "fedavg"), ("stack", "fedavg"), ("svd", "fedavg"),
    ("fedit", "fedavgm"), ("svd", "fedavgm"), ("fedit", "fedadam"), ("hetlora", "fedyogi"),
])
def test_honest_rounds_pass_the_default_check_with_every_strategy(strategy, optimizer):
    settings = {"fedavgm": dict(lr=1.0, momentum=0.5), "fedadam": dict(lr=3e-3), "fedyogi": dict(lr=3e-3)}
    config = ServerOptimizerConfig(optimizer, **settings.get(optimizer, {}))
    for parent, candidate, typical in _rounds(strategy, config):
        assert check_candidate(KIND, SPEC, SHAPES, parent, candidate, typical, DEFAULT_CHANGE_RATIO, config) is None


def test_a_huge_delta_among_honest_ones_is_never_published_even_without_influence_bounds():
    config = ServerOptimizerConfig()
    parent, candidate, typical = next(_rounds("fedit", config, rounds=1, poison=1e38))
    why = check_candidate(KIND, SPEC, SHAPES, parent, candidate, typical, DEFAULT_CHANGE_RATIO, config)
    assert why is not None and ("moves" in why or "overflows" in why or "non-finite" in why), why


def test_a_non_finite_global_is_refused_even_with_the_change_bound_off():
    config = ServerOptimizerConfig()
    parent, candidate, typical = next(_rounds("fedit", config, rounds=1))
    broken = dict(candidate[0])
    name = sorted(broken)[0]
    broken[name] = broken[name].copy()
    broken[name][0, 0] = np.inf
    assert "non-finite" in check_candidate(KIND, SPEC, SHAPES, parent, (broken, {}), typical, None, config)
    merged = {f"{name.rsplit('.', 1)[0]}.merged_B": np.full((SHAPES[name][0], 1), np.nan, np.float32)}
    assert "non-finite" in check_candidate(KIND, SPEC, SHAPES, parent, (candidate[0], merged), typical, None, config)


def test_a_global_that_moves_far_more_than_its_updates_is_refused():
    config = ServerOptimizerConfig()
    parent, candidate, typical = next(_rounds("fedit", config, rounds=1))
    runaway = {n: parent[0][n] + 100 * (candidate[0][n] - parent[0][n]) for n in parent[0]}
    why = check_candidate(KIND, SPEC, SHAPES, parent, (runaway, {}), typical, DEFAULT_CHANGE_RATIO, config)
    assert why is not None and "more than 10" in why, why
    assert check_candidate(KIND, SPEC, SHAPES, parent, (runaway, {}), typical, None, config) is None
    wrong = dict(candidate[0])
    wrong.pop(sorted(wrong)[0])
    assert "layout" in check_candidate(KIND, SPEC, SHAPES, parent, (wrong, {}), typical, None, config)


def test_update_change_of_a_zero_delta_is_zero_and_grows_with_the_delta():
    start = init_lora(SPEC, TINY.modules, 0)
    zero = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    assert lora_update_change(start, zero, SCALE) == 0.0
    rng = np.random.default_rng(2)
    delta = {n: (rng.standard_normal(s) * 1e-3).astype(np.float32) for n, s in SHAPES.items()}
    small = lora_update_change(start, delta, SCALE)
    large = lora_update_change(start, {n: 2 * t for n, t in delta.items()}, SCALE)
    assert 0 < small < large
    assert delta_norm(delta) > 0


def _dense_update_change(start, delta, scale):
    """The definition, with every layer's ΔW formed: ``s·‖(B₀+ΔB)(A₀+ΔA) − B₀A₀‖_F``."""
    total = 0.0
    for name in (n[: -len(".lora_A")] for n in start if n.endswith(".lora_A")):
        dA, dB = (np.asarray(delta[f"{name}.lora_{x}"], np.float64) for x in "AB")
        r = dA.shape[0]
        A0 = np.asarray(start[f"{name}.lora_A"], np.float64)[:r]
        B0 = np.asarray(start[f"{name}.lora_B"], np.float64)[:, :r]
        total += float(np.sum((scale * ((B0 + dB) @ (A0 + dA) - B0 @ A0)) ** 2))
    return float(np.sqrt(total))


def test_one_meter_measures_a_rounds_deltas_of_any_rank_as_the_dense_definition_does():
    """``UpdateChange`` keeps buffers per rank from call to call: deltas of the full rank, of a
    lower one, of the full one again and of mixed ranks (layer by layer) all measure exactly."""
    rng = np.random.default_rng(7)
    start = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}

    def delta(rank_of):
        out = {}
        for n, s in SHAPES.items():
            r = rank_of(n)
            shape = (r, s[1]) if n.endswith(".lora_A") else (s[0], r)
            out[n] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        return out

    first = sorted(SHAPES)[0].rsplit(".", 1)[0]
    deltas = [delta(lambda n: 8), delta(lambda n: 4), delta(lambda n: 8),
              delta(lambda n: 2 if n.startswith(first) else 6)]
    meter = UpdateChange(start, SCALE)
    for d in deltas:
        expected = _dense_update_change(start, d, SCALE)
        assert meter(d) == pytest.approx(expected, rel=1e-9)
        assert lora_update_change(start, d, SCALE) == pytest.approx(expected, rel=1e-9)
    assert KIND.change_meter(start, SCALE)(deltas[0]) == pytest.approx(meter(deltas[0]), rel=1e-12)
