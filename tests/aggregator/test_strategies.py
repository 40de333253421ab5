"""Heterogeneous-rank aggregation: exactness, redistribution, server optimizers, memory.

Reference values are computed densely here (``Σ pₖ·Bₖ·Aₖ`` with numpy), independently of the
factored arithmetic the strategies use.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgetune_aggregator.strategies import (
    RoundStart,
    ServerOptimizer,
    ServerOptimizerConfig,
    fedit,
    hetlora,
    make_strategy,
    redistribute,
    stack,
    svd,
)
from edgetune_aggregator.strategies.lowrank import LowRank, LowRankSum, compress, spectrum

RANKS = (2, 4, 8, 16)


def random_adapters(rng, out_features=48, in_features=40, ranks=RANKS):
    return [(rng.standard_normal((out_features, r)), rng.standard_normal((r, in_features))) for r in ranks]


def weighted_products(adapters, weights):
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(pk * B @ A for pk, (B, A) in zip(p, adapters))


def relative_error(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_strategies_reproduce_the_weighted_sum_of_products(seed):
    rng = np.random.default_rng(seed)
    adapters = random_adapters(rng)
    weights = rng.integers(1, 100, len(adapters))
    want = weighted_products(adapters, weights)
    B, A = stack(adapters, weights)
    assert B.shape[1] == A.shape[0] == sum(RANKS)
    assert relative_error(B @ A, want) < 1e-5
    aggregate = svd(adapters, weights)
    assert relative_error((aggregate.U * aggregate.s) @ aggregate.Vt, want) < 1e-5
    assert np.all(np.diff(aggregate.s) <= 0)


def test_fedit_and_hetlora_are_not_exact():
    """The documented gap: averaging factors gives mean(B)·mean(A), not mean(B·A). On random
    factors of ranks 2..16 the error is of the order of the update itself."""
    rng = np.random.default_rng(0)
    adapters = random_adapters(rng)
    weights = [1, 2, 3, 4]
    want = weighted_products(adapters, weights)
    gaps = {name: relative_error(np.matmul(*rule(adapters, weights)), want) for name, rule in
            (("fedit", fedit), ("hetlora", hetlora))}
    assert gaps["fedit"] > 0.3 and gaps["hetlora"] > 0.3, gaps
    # with one device the factor average is that device's own factors: no gap
    B, A = fedit(adapters[:1], [1])
    assert relative_error(B @ A, adapters[0][0] @ adapters[0][1]) < 1e-12


def test_hetlora_weights_by_product_norm_by_hand():
    B1, A1 = np.array([[1.0]]), np.array([[1.0]])  # ‖B·A‖ = 1
    B2, A2 = np.array([[3.0]]), np.array([[1.0]])  # ‖B·A‖ = 3
    B, A = hetlora([(B1, A1), (B2, A2)], [1, 1])
    # weights ∝ 1·1 and 1·3: B = (1·1 + 3·3) / 4 = 2.5, A = (1 + 3) / 4 = 1
    assert B[0, 0] == pytest.approx(2.5) and A[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("rank", RANKS)
def test_svd_redistribution_is_the_best_factorisation_of_each_rank(rank):
    rng = np.random.default_rng(rank)
    adapters = random_adapters(rng)
    weights = [4, 3, 2, 1]
    aggregate = svd(adapters, weights)
    B, A = redistribute(aggregate, rank)
    assert B.shape == (48, rank) and A.shape == (rank, 40)
    U, s, Vt = np.linalg.svd(weighted_products(adapters, weights))
    best = (U[:, :rank] * s[:rank]) @ Vt[:rank]  # Eckart–Young
    assert relative_error(B @ A, best) < 1e-8
    # balanced factors: B and A carry √s each, so neither dwarfs the other for training
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.linalg.norm(A, axis=1), rtol=1e-8)


def test_redistribution_beyond_the_aggregate_rank_pads_with_zeros():
    aggregate = svd([(np.ones((5, 1)), np.ones((1, 4)))], [1])
    B, A = redistribute(aggregate, 3)
    assert B.shape == (5, 3) and np.allclose(B @ A, np.ones((5, 4)))


def test_lowrank_sum_goes_dense_and_stays_exact():
    rng = np.random.default_rng(0)
    acc = LowRankSum(20, 16)
    want = np.zeros((20, 16))
    for _ in range(12):
        B, A, w = rng.standard_normal((20, 3)), rng.standard_normal((3, 16)), rng.uniform(0.5, 2)
        acc.add(B, A, w)
        want += w * B @ A
    assert acc.is_dense  # 36 stacked columns > 20·16 / 36
    assert acc.nbytes() <= 20 * 16 * 8
    assert relative_error(np.asarray(acc.result()), want) < 1e-12
    spec = acc.spectrum()
    assert relative_error((spec.U * spec.s) @ spec.Vt, want) < 1e-12


def test_compress_keeps_the_product_with_its_numerical_rank():
    rng = np.random.default_rng(1)
    B, A = rng.standard_normal((30, 2)), rng.standard_normal((2, 25))
    redundant = LowRank(np.hstack([B, 2 * B, B]), np.vstack([A, A, -A]))  # rank 2, 6 columns
    small = compress(redundant)
    assert small.rank == 2
    assert relative_error(small.dense(), redundant.dense()) < 1e-12
    assert spectrum(LowRank.zeros(3, 4)).rank == 0


# --- the streaming strategies, as the daemon runs them --------------------------------------


MODULES = {"layers.0.q": (24, 20), "layers.0.v": (12, 20)}
SCALE = 2.0


def round_start(rng, rank=16, merged=False) -> RoundStart:
    tensors = {}
    for m, (out_features, in_features) in MODULES.items():
        tensors[f"{m}.lora_A"] = rng.standard_normal((rank, in_features)).astype(np.float32)
        tensors[f"{m}.lora_B"] = (0.1 * rng.standard_normal((out_features, rank))).astype(np.float32)
    extra = {}
    if merged:
        for m, (out_features, in_features) in MODULES.items():
            extra[f"{m}.merged_B"] = rng.standard_normal((out_features, 3)).astype(np.float32)
            extra[f"{m}.merged_A"] = rng.standard_normal((3, in_features)).astype(np.float32)
    return RoundStart(tensors, extra, SCALE, seed=7)


def random_delta(rng, rank):
    delta = {}
    for m, (out_features, in_features) in MODULES.items():
        delta[f"{m}.lora_A"] = (0.1 * rng.standard_normal((rank, in_features))).astype(np.float32)
        delta[f"{m}.lora_B"] = (0.1 * rng.standard_normal((out_features, rank))).astype(np.float32)
    return delta


def effective(tensors, merged, module):
    total = SCALE * tensors[f"{module}.lora_B"].astype(np.float64) @ tensors[f"{module}.lora_A"]
    if f"{module}.merged_B" in merged:
        total = total + merged[f"{module}.merged_B"].astype(np.float64) @ merged[f"{module}.merged_A"]
    return total


def device_model(start: RoundStart, delta, module):
    """A device's whole update after training: global with its leading r components moved."""
    r = delta[f"{module}.lora_A"].shape[0]
    B0 = start.tensors[f"{module}.lora_B"].astype(np.float64)
    A0 = start.tensors[f"{module}.lora_A"].astype(np.float64)
    B, A = B0.copy(), A0.copy()
    B[:, :r] += delta[f"{module}.lora_B"]
    A[:r] += delta[f"{module}.lora_A"]
    return effective({f"{module}.lora_B": B, f"{module}.lora_A": A}, start.merged, module)


@pytest.mark.parametrize("name", ["stack", "svd"])
@pytest.mark.parametrize("merged", [False, True])
def test_streaming_exact_strategies_average_the_devices_models(name, merged):
    rng = np.random.default_rng(3)
    start = round_start(rng, merged=merged)
    deltas = [random_delta(rng, r) for r in RANKS]
    weights = [5, 1, 3, 2]
    strategy = make_strategy(name)
    merge = strategy.begin(start)
    for delta, weight in zip(deltas, weights):
        merge.add(delta, weight)
    result = strategy.finish(merge)
    for module in MODULES:
        want = sum(w * device_model(start, d, module) for d, w in zip(deltas, weights)) / sum(weights)
        assert relative_error(effective(result.tensors, result.merged, module), want) < 1e-5
        assert result.tensors[f"{module}.lora_A"].shape[0] == 16
    if name == "stack":  # fresh factors: a zero product, with gradients through a random A
        assert not any(np.any(t) for n, t in result.tensors.items() if n.endswith("lora_B"))
        assert all(np.any(t) for n, t in result.tensors.items() if n.endswith("lora_A"))


def test_svd_strategy_gives_each_device_its_best_rank():
    rng = np.random.default_rng(4)
    start = round_start(rng)
    strategy = make_strategy("svd")
    merge = strategy.begin(start)
    for r in RANKS:
        merge.add(random_delta(rng, r), 1.0)
    result = strategy.finish(merge)
    for module in MODULES:
        total = effective(result.tensors, result.merged, module)
        U, s, Vt = np.linalg.svd(total, full_matrices=False)
        for r in RANKS:  # what a device of rank r trains from: the leading r components
            B = result.tensors[f"{module}.lora_B"][:, :r].astype(np.float64)
            A = result.tensors[f"{module}.lora_A"][:r].astype(np.float64)
            assert A.shape == (r, MODULES[module][1])
            best = (U[:, :r] * s[:r]) @ Vt[:r]  # (r ≥ 12 on the 12 × 20 layer: the whole update)
            assert relative_error(SCALE * B @ A, best) < 1e-5


def test_fedit_streaming_equals_the_rule_on_padded_deltas():
    rng = np.random.default_rng(5)
    start = round_start(rng)
    deltas = [random_delta(rng, r) for r in RANKS]
    weights = [2, 2, 1, 5]
    strategy = make_strategy("fedit")
    merge = strategy.begin(start)
    for delta, weight in zip(deltas, weights):
        merge.add(delta, weight)
    result = strategy.finish(merge)
    for module in MODULES:
        # the pure rule on each device's factors completed with the components it did not train
        adapters = []
        for d in deltas:
            r = d[f"{module}.lora_A"].shape[0]
            B = start.tensors[f"{module}.lora_B"].astype(np.float64).copy()
            A = start.tensors[f"{module}.lora_A"].astype(np.float64).copy()
            B[:, :r] += d[f"{module}.lora_B"]
            A[:r] += d[f"{module}.lora_A"]
            adapters.append((B, A))
        B, A = fedit(adapters, weights)
        np.testing.assert_allclose(result.tensors[f"{module}.lora_B"], B, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.tensors[f"{module}.lora_A"], A, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedit", "hetlora", "stack", "svd"])
def test_aggregation_memory_does_not_grow_with_the_number_of_devices(name):
    """100 synthetic updates (mixed ranks) through the streaming merge: the running sums and the
    peak traced allocation stay those of 10 updates (O(model), not O(devices))."""
    modules = {f"layers.{i}.q": (96, 64) for i in range(4)}

    def run(count: int) -> tuple[int, int]:
        rng = np.random.default_rng(count)
        tensors = {}
        for m, (o, i) in modules.items():
            tensors[f"{m}.lora_A"] = rng.standard_normal((16, i)).astype(np.float32)
            tensors[f"{m}.lora_B"] = rng.standard_normal((o, 16)).astype(np.float32)
        strategy = make_strategy(name)
        merge = strategy.begin(RoundStart(tensors, {}, 1.0, seed=1))
        deltas = []
        for k in range(4):  # a few distinct deltas reused: generating 100 would dominate the trace
            r = RANKS[k % len(RANKS)]
            deltas.append({n: rng.standard_normal((r, t.shape[1]) if n.endswith("A") else (t.shape[0], r)).astype(np.float32)
                           for n, t in tensors.items()})
        tracemalloc.start()
        try:
            for k in range(count):
                merge.add(deltas[k % len(deltas)], 1.0 + k % 3)
            held = merge.nbytes()
            strategy.finish(merge)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return held, peak

    held_10, peak_10 = run(10)
    held_100, peak_100 = run(100)
    dense = sum(o * i * 8 for o, i in modules.values())
    assert held_100 <= max(held_10, 2 * dense), (held_10, held_100)
    assert peak_100 <= 1.5 * peak_10 + 64 * 1024, (peak_10, peak_100)


# --- server optimizers ----------------------------------------------------------------------


def test_fedavgm_by_hand():
    opt = ServerOptimizer(ServerOptimizerConfig("fedavgm", lr=0.5, momentum=0.9))
    x = {"w": np.array([1.0])}
    x = opt.step(x, {"w": np.array([2.0])})  # m = 2; x = 1 + 0.5·2 = 2
    assert x["w"][0] == pytest.approx(2.0)
    x = opt.step(x, {"w": np.array([1.0])})  # m = 0.9·2 + 1 = 2.8; x = 2 + 1.4 = 3.4
    assert x["w"][0] == pytest.approx(3.4)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_by_hand(name):
    c = ServerOptimizerConfig(name, lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    opt = ServerOptimizer(c)
    g = 0.5
    x = opt.step({"w": np.array([0.0])}, {"w": np.array([g])})
    m = 0.1 * g
    v0 = c.tau**2
    v = 0.99 * v0 + 0.01 * g * g if name == "fedadam" else v0 - 0.01 * g * g * np.sign(v0 - g * g)
    assert x["w"][0] == pytest.approx(0.1 * m / (np.sqrt(v) + c.tau), rel=1e-5)
    # the state survives a save/load round trip: the next step is the same either way
    copy = ServerOptimizer(c)
    copy.load_state_dict(opt.state_dict())
    a = opt.step({"w": np.array([1.0])}, {"w": np.array([-0.2])})
    b = copy.step({"w": np.array([1.0])}, {"w": np.array([-0.2])})
    assert a["w"][0] == b["w"][0]


def test_momentum_on_exact_strategies_stays_exact():
    """fedavgm on stack: the second round's step is β·(first aggregate) + second aggregate."""
    rng = np.random.default_rng(6)
    strategy = make_strategy("stack", ServerOptimizerConfig("fedavgm", lr=1.0, momentum=0.5))
    start = round_start(rng)
    wants = []
    for _ in range(2):
        delta = random_delta(rng, 4)
        merge = strategy.begin(start)
        merge.add(delta, 1.0)
        wants.append({m: device_model(start, delta, m) - effective(start.tensors, start.merged, m) for m in MODULES})
        before = {m: effective(start.tensors, start.merged, m) for m in MODULES}
        result = strategy.finish(merge)
        start = RoundStart(result.tensors, result.merged, SCALE, seed=8)
    for m in MODULES:
        step = effective(result.tensors, result.merged, m) - before[m]
        assert relative_error(step, 0.5 * wants[0][m] + wants[1][m]) < 1e-5


def test_fedavgm_momentum_of_a_dense_average_stays_dense_and_survives_a_restart():
    """A dense average (the products went dense) steps as β·m + Δ with m kept as the matrix (its
    factors would be larger); a later low-rank average joins it; state_dict keeps it."""
    rng = np.random.default_rng(11)
    opt = ServerOptimizer(ServerOptimizerConfig("fedavgm", lr=0.5, momentum=0.9))
    dense1 = rng.standard_normal((6, 5))
    step1 = opt.step_layer("q", dense1)
    assert isinstance(step1, np.ndarray) and np.allclose(step1, 0.5 * dense1)
    copy = ServerOptimizer(opt.config)
    copy.load_state_dict(opt.state_dict())
    assert isinstance(copy.state_dict()["md:q"], np.ndarray)
    low = LowRank(rng.standard_normal((6, 2)), rng.standard_normal((2, 5)))
    for optimizer in (opt, copy):  # (the restarted one takes the same step)
        step2 = optimizer.step_layer("q", low)
        np.testing.assert_allclose(step2, 0.5 * (0.9 * dense1 + low.dense()), rtol=1e-12)
    # a layer that never went dense keeps its momentum as factors
    opt.step_layer("v", low)
    assert {"mB:v", "mA:v"} <= set(opt.state_dict())


def test_incompatible_choices_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        make_strategy("median")
    with pytest.raises(ValueError, match="fedavg, fedavgm"):
        make_strategy("svd", ServerOptimizerConfig("fedadam"))
    make_strategy("hetlora", ServerOptimizerConfig("fedyogi"))
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizerConfig("sgd")
    with pytest.raises(ValueError, match="at least one"):
        fedit([], [])
    with pytest.raises(ValueError, match="no updates"):
        make_strategy("svd").finish(make_strategy("svd").begin(round_start(np.random.default_rng(0))))


@pytest.mark.parametrize("name", ["stack", "svd"])
@pytest.mark.parametrize("cap", [0, 4, 16])
def test_a_bounded_merged_delta_is_the_best_approximation_of_its_size(name, cap):
    """With ``merged_rank`` the global is the truncated SVD of the exact ΔW (computed densely
    here), the frozen delta has at most ``cap`` components per layer, and the reported error is
    the relative Frobenius norm of what was cut."""
    rng = np.random.default_rng(5)
    start = round_start(rng, merged=True)
    deltas = [random_delta(rng, r) for r in RANKS]
    weights = [5, 1, 3, 2]
    strategy = make_strategy(name, merged_rank=cap)
    merge = strategy.begin(start)
    for delta, weight in zip(deltas, weights):
        merge.add(delta, weight)
    result = strategy.finish(merge)
    keep = cap + (16 if name == "svd" else 0)  # svd also keeps the trainable rank-16 part
    worst = 0.0
    for module in MODULES:
        exact = sum(w * device_model(start, d, module) for d, w in zip(deltas, weights)) / sum(weights)
        U, s, Vt = np.linalg.svd(exact, full_matrices=False)
        best = (U[:, :keep] * s[:keep]) @ Vt[:keep]
        got = effective(result.tensors, result.merged, module)
        assert np.linalg.norm(got - best) <= 1e-5 * np.linalg.norm(exact)
        merged_rank = result.merged[f"{module}.merged_A"].shape[0] if f"{module}.merged_A" in result.merged else 0
        assert merged_rank <= cap
        worst = max(worst, float(np.sqrt(np.sum(s[keep:] ** 2) / np.sum(s**2))))
    assert result.truncation_error == pytest.approx(worst, rel=1e-6, abs=1e-12)


def test_the_default_bound_keeps_the_downlink_within_twice_fedits():
    """The daemon's default cap (the fleet's rank): whatever the rounds did, a device downloads
    the trainable factors plus at most as much again; unbounded, the frozen delta outgrows them."""
    from edgetune_aggregator.config import AggregatorConfig
    from edgetune.wire import LoraSpec

    rng = np.random.default_rng(6)
    rank, shapes = 4, {"q": (96, 80), "v": (64, 80)}
    spec = LoraSpec(rank=rank, target_modules=tuple(shapes))
    assert AggregatorConfig(fleet="f", state_dir=None, adapter=spec).merged_rank_for(spec) == rank
    assert AggregatorConfig(fleet="f", state_dir=None, adapter=spec, merged_rank=-1).merged_rank_for(spec) is None

    def start_of(tensors, merged):
        return RoundStart(tensors, merged, SCALE, seed=7)

    def delta(r):
        return {**{f"{m}.lora_A": (0.1 * rng.standard_normal((r, i))).astype(np.float32) for m, (o, i) in shapes.items()},
                **{f"{m}.lora_B": (0.1 * rng.standard_normal((o, r))).astype(np.float32) for m, (o, i) in shapes.items()}}

    tensors = {**{f"{m}.lora_A": rng.standard_normal((rank, i)).astype(np.float32) for m, (o, i) in shapes.items()},
               **{f"{m}.lora_B": np.zeros((o, rank), np.float32) for m, (o, i) in shapes.items()}}
    fedit_bytes = sum(t.nbytes for t in tensors.values())
    for name in ("svd", "stack"):
        for cap, bounded in ((rank, True), (None, False)):
            strategy = make_strategy(name, merged_rank=cap)
            start = start_of(dict(tensors), {})
            for _ in range(4):  # rounds of 4 devices at ranks 1..4: up to 10 new components a layer
                merge = strategy.begin(start)
                for r in (1, 2, 3, 4):
                    merge.add(delta(r), 1.0)
                result = strategy.finish(merge)
                start = start_of(result.tensors, result.merged)
            total = sum(t.nbytes for t in result.tensors.values()) + sum(t.nbytes for t in result.merged.values())
            assert (total <= 2 * fedit_bytes) == bounded, (name, cap, total, fedit_bytes)
            assert (result.truncation_error is not None and result.truncation_error > 0) == bounded


def test_the_daemon_defaults_to_the_fleet_benchmarks_server_optimizer():
    """FedAvgM (lr 1, β 0.5) by default, in the config and on the command line; β defaults per
    optimizer when not given; ``--server-optimizer fedavg`` is plain FedAvg again."""
    from edgetune_aggregator.cli import build_parser, config_from_args
    from edgetune_aggregator.config import AggregatorConfig
    from edgetune_aggregator.strategies import DEFAULT_SERVER_OPTIMIZER

    assert DEFAULT_SERVER_OPTIMIZER == ServerOptimizerConfig("fedavgm", lr=1.0, momentum=0.5)
    assert AggregatorConfig(fleet="f", state_dir="s").server_optimizer == DEFAULT_SERVER_OPTIMIZER
    base = ["serve", "--broker", "mqtt://localhost:1883", "--fleet", "f", "--state-dir", "s"]
    assert config_from_args(build_parser().parse_args(base)).server_optimizer == DEFAULT_SERVER_OPTIMIZER
    adam = config_from_args(build_parser().parse_args([*base, "--server-optimizer", "fedadam", "--server-lr", "0.01"]))
    assert (adam.server_optimizer.name, adam.server_optimizer.momentum) == ("fedadam", 0.9)
    plain = config_from_args(build_parser().parse_args([*base, "--server-optimizer", "fedavg"]))
    opt = ServerOptimizer(plain.server_optimizer)
    x, g = {"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}
    assert np.array_equal(opt.step(opt.step(x, g), g)["w"], np.full(3, 2.0, np.float32))  # no momentum
    momentum = ServerOptimizer(DEFAULT_SERVER_OPTIMIZER)
    assert np.array_equal(momentum.step(momentum.step(x, g), g)["w"], np.full(3, 2.5, np.float32))  # 1, then 1.5
