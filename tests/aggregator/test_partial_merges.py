"""A round merged in shares (aggregator workers, each merging the updates it took in) and the
shares added up at the coordinator give the global one merge of every update gives: to float64
rounding (the sums are added in another order), for every strategy. Products are compared for
the exact strategies (their factors are defined up to the signs of singular vectors)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune_aggregator.strategies import STRATEGIES, RoundStart, make_strategy
from edgetune_aggregator.weighting import SHARED_MERGE_MIN, Entry, Weighting
from edgetune_aggregator.influence import InfluenceBounds
from edgetune_aggregator.validation import UpdateLimits

R = 8
#: (out, in) of each adapted layer: big enough that the exact sums go dense within the round
LAYERS = {"l0.q": (48, 40), "l1.q": (48, 40), "l0.v": (16, 40)}


def _start(rng) -> RoundStart:
    tensors = {}
    for m, (o, i) in LAYERS.items():
        tensors[f"{m}.lora_A"] = rng.standard_normal((R, i)).astype(np.float32)
        tensors[f"{m}.lora_B"] = (0.1 * rng.standard_normal((o, R))).astype(np.float32)
    return RoundStart(tensors, {}, 2.0, seed=3)


def _delta(rng, rank: int) -> dict[str, np.ndarray]:
    out = {}
    for m, (o, i) in LAYERS.items():
        out[f"{m}.lora_A"] = (0.05 * rng.standard_normal((rank, i))).astype(np.float32)
        out[f"{m}.lora_B"] = (0.05 * rng.standard_normal((o, rank))).astype(np.float32)
    return out


def _delta_w(tensors, merged, scale) -> dict[str, np.ndarray]:
    out = {}
    for m in LAYERS:
        w = scale * tensors[f"{m}.lora_B"].astype(np.float64) @ tensors[f"{m}.lora_A"].astype(np.float64)
        if f"{m}.merged_B" in merged:
            w += merged[f"{m}.merged_B"].astype(np.float64) @ merged[f"{m}.merged_A"].astype(np.float64)
        out[m] = w
    return out


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "dense"])
@pytest.mark.parametrize("shares", [2, 3])
def test_shares_merged_apart_and_absorbed_equal_one_merge(name, shares):
    rng = np.random.default_rng(11)
    start = _start(rng)
    updates = [(_delta(rng, [2, 4, 8][k % 3]), float(1 + k % 5)) for k in range(30)]
    whole = make_strategy(name, merged_rank=None)
    one = whole.begin(start)
    for delta, weight in updates:
        one.add(delta, weight)
    want = whole.finish(one)

    apart = make_strategy(name, merged_rank=None)
    parts = [apart.begin(start) for _ in range(shares)]
    for index, (delta, weight) in enumerate(updates):  # (round-robin, as a shared subscription deals them)
        parts[index % shares].add(delta, weight)
    combined = apart.begin(start)
    for part in parts:
        combined.absorb(part.partial())
    assert (combined.count, combined.total_weight) == (one.count, one.total_weight)
    got = apart.finish(combined)

    if STRATEGIES[name].exact:
        fresh_scale = start.scale
        wants, gots = _delta_w(want.tensors, want.merged, fresh_scale), _delta_w(got.tensors, got.merged, fresh_scale)
        for m in LAYERS:
            np.testing.assert_allclose(gots[m], wants[m], rtol=1e-6, atol=1e-6 * np.abs(wants[m]).max())
    else:
        for k, v in want.tensors.items():
            np.testing.assert_allclose(got.tensors[k], v, rtol=1e-6, atol=1e-7)


def test_the_dense_strategy_merges_in_shares_too():
    rng = np.random.default_rng(2)
    start = RoundStart({"prompt": rng.standard_normal((4, 8)).astype(np.float32)}, {}, 1.0)
    deltas = [{"prompt": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(9)]
    strategy = make_strategy("dense")
    one = strategy.begin(start)
    parts = [strategy.begin(start) for _ in range(2)]
    for k, d in enumerate(deltas):
        one.add(d, 1.0 + k)
        parts[k % 2].add(d, 1.0 + k)
    combined = strategy.begin(start)
    for part in parts:
        combined.absorb(part.partial())
    np.testing.assert_allclose(strategy.finish(combined).tensors["prompt"], strategy.finish(one).tensors["prompt"],
                               rtol=1e-6)


def test_a_robust_combination_cannot_be_merged_in_shares():
    rng = np.random.default_rng(4)
    start = _start(rng)
    weighting = Weighting(UpdateLimits(), InfluenceBounds(), robust="median")
    shapes = {k: v.shape for k, v in start.tensors.items()}
    merge = weighting.begin(make_strategy("fedit"), start, [Entry(10, 1.0)], shapes)
    merge.add(0, _delta(rng, R))
    with pytest.raises(ValueError, match="every delta at once"):
        merge.partial()


@pytest.mark.parametrize("name", ["svd", "stack", "fedit"])
def test_the_close_merges_an_exact_strategy_in_two_threads_the_same_way_every_time(name):
    """``WeightedRound.merge_all``: an exact strategy's updates are merged in two halves, one
    per thread; the global equals one thread's merge to float64 rounding, a second run (a
    resumed round) is bit for bit the first, and each update's change is measured as merged
    (clipped updates scaled)."""
    from edgetune.adapters.lora import lora_update_change

    rng = np.random.default_rng(5)
    start = _start(rng)
    count = max(SHARED_MERGE_MIN, 24)
    deltas = [_delta(rng, [2, 4, 8][k % 3]) for k in range(count)]
    entries = [Entry(10 + k, 1.0 if k != 3 else 50.0) for k in range(count)]  # (one clipped by its norm)
    weighting = Weighting(UpdateLimits(max_norm=5.0), InfluenceBounds())
    shapes = {k: v.shape for k, v in start.tensors.items()}

    def run(shared: bool):
        merge = weighting.begin(make_strategy(name, merged_rank=None), start, entries, shapes)
        if shared:
            changes = merge.merge_all(lambda i: deltas[i], lambda: (lambda d: lora_update_change(start.tensors, d,
                                                                                                     start.scale)))
        else:
            changes = [lora_update_change(start.tensors, merge.add(i, d), start.scale) for i, d in enumerate(deltas)]
        return merge.finish(), changes

    (first, changes), (again, _), (alone, alone_changes) = run(True), run(True), run(False)
    assert first.tensors.keys() == again.tensors.keys()
    for k, v in first.tensors.items():
        np.testing.assert_array_equal(again.tensors[k], v)
    for k, v in first.merged.items():
        np.testing.assert_array_equal(again.merged[k], v)
    np.testing.assert_allclose(changes, alone_changes, rtol=1e-12)
    assert weighting.plan(entries)[3].scale == pytest.approx(0.1)  # (measured as merged: clipped)
    assert changes[3] < 0.2 * lora_update_change(start.tensors, deltas[3], start.scale)
    if STRATEGIES[name].exact:
        wants, gots = (_delta_w(alone.tensors, alone.merged, start.scale),
                       _delta_w(first.tensors, first.merged, start.scale))
        for m in LAYERS:
            np.testing.assert_allclose(gots[m], wants[m], rtol=1e-6, atol=1e-9 * np.abs(wants[m]).max())
    else:
        for k, v in alone.tensors.items():
            np.testing.assert_array_equal(first.tensors[k], v)  # (one thread: the same order)


def test_a_failure_in_the_second_half_of_the_merge_reaches_the_close():
    rng = np.random.default_rng(6)
    start = _start(rng)
    count = SHARED_MERGE_MIN
    deltas = [_delta(rng, R) for _ in range(count)]
    merge = Weighting(UpdateLimits(), InfluenceBounds()).begin(make_strategy("svd"), start,
                                                              [Entry(10, 1.0)] * count, {})

    def read(index):
        if index == count - 1:
            raise OSError("journal record unreadable")
        return deltas[index]

    with pytest.raises(OSError, match="unreadable"):
        merge.merge_all(read, lambda: (lambda d: 0.0))
