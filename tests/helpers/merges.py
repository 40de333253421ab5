"""Every merge of a test fleet recomputed here, independently of the strategy modules, from the
updates an ``Observer`` saw on the broker: the daemon's arithmetic is checked against a second,
plain implementation (dense matrices, float64), not against itself."""

from __future__ import annotations

import numpy as np
from edgetune.wire import GlobalAdapter, Update
from edgetune_aggregator.store import StateStore
from edgetune_aggregator.strategies import DEFAULT_SERVER_OPTIMIZER, ServerOptimizerConfig

from helpers.fleet import Observer


def expected_fedavg(previous: GlobalAdapter, updates: list[Update]) -> dict[str, np.ndarray]:
    """FedAvg of (zero-padded) deltas recomputed here, independently of the strategy modules."""
    total = sum(u.num_samples for u in updates)
    out = {}
    for name, value in previous.tensors.items():
        acc = value.astype(np.float64)
        for u in updates:
            d = u.delta[name].astype(np.float64)
            padded = np.zeros_like(acc)
            padded[: d.shape[0], : d.shape[1]] = d
            acc = acc + u.num_samples * padded / total
        out[name] = acc
    return out


def trained_factors(previous: GlobalAdapter, update: Update, module: str) -> tuple[np.ndarray, np.ndarray]:
    """A device's trained (B, A) for one module: the global it started from plus its delta."""
    dA, dB = (update.delta[f"{module}.{f}"].astype(np.float64) for f in ("lora_A", "lora_B"))
    r = dA.shape[0]
    A0 = previous.tensors[f"{module}.lora_A"].astype(np.float64)[:r]
    B0 = previous.tensors[f"{module}.lora_B"].astype(np.float64)[:, :r]
    return B0 + dB, A0 + dA


def expected_hetlora(previous: GlobalAdapter, updates: list[Update]) -> dict[str, np.ndarray]:
    """Per module: deltas weighted by samples × ‖Bₖ·Aₖ‖_F (dense here)."""
    out = {}
    for name in previous.tensors:
        module = name.rsplit(".", 1)[0]
        weights = [u.num_samples * np.linalg.norm(np.matmul(*trained_factors(previous, u, module))) for u in updates]
        acc = previous.tensors[name].astype(np.float64)
        for u, w in zip(updates, weights):
            d = u.delta[name].astype(np.float64)
            padded = np.zeros_like(acc)
            padded[: d.shape[0], : d.shape[1]] = d
            acc = acc + w * padded / sum(weights)
        out[name] = acc
    return out


def effective_delta(adapter: GlobalAdapter, module: str) -> np.ndarray:
    """The weight update a global adapter makes to one layer: merged + (alpha/rank)·B·A."""
    spec = adapter.adapter
    B = adapter.tensors[f"{module}.lora_B"].astype(np.float64)
    A = adapter.tensors[f"{module}.lora_A"].astype(np.float64)
    total = spec.alpha / spec.rank * B @ A
    if f"{module}.merged_B" in adapter.merged:
        total = total + adapter.merged[f"{module}.merged_B"].astype(np.float64) @ adapter.merged[f"{module}.merged_A"]
    return total


def expected_exact(previous: GlobalAdapter, updates: list[Update], module: str) -> np.ndarray:
    """Σ pₖ·ΔWₖ: each device's whole model update (its frozen rest included), densely."""
    spec = previous.adapter
    s = spec.alpha / spec.rank
    total = sum(u.num_samples for u in updates)
    result = effective_delta(previous, module)
    for u in updates:
        B, A = trained_factors(previous, u, module)
        r = A.shape[0]
        B0 = previous.tensors[f"{module}.lora_B"].astype(np.float64)[:, :r]
        A0 = previous.tensors[f"{module}.lora_A"].astype(np.float64)[:r]
        result = result + u.num_samples / total * s * (B @ A - B0 @ A0)
    return result


def check_rounds(store: StateStore, observer: Observer, rounds: int, devices: int, strategy: str | None = None,
                 optimizer: ServerOptimizerConfig = DEFAULT_SERVER_OPTIMIZER) -> None:
    """Every round's global is the strategy's merge of what was seen (default: the fleet's own),
    stepped by the server optimizer (default: the daemon's, FedAvgM: the merge plus β times the
    previous round's step; one round's step is the difference of two stored globals)."""
    assert optimizer.name in ("fedavg", "fedavgm") and optimizer.lr == 1.0, "recomputed here for those only"
    beta = optimizer.momentum if optimizer.name == "fedavgm" else 0.0
    strategy = strategy or store.load_state().strategy
    from helpers.waiting import wait_for

    # (the daemon has finished: what it published is on the broker, on its way to the observer)
    assert wait_for(lambda: all(r in observer.globals for r in range(rounds + 1)), 30), sorted(observer.globals)
    for r in range(1, rounds + 1):
        seen = observer.updates[r]
        assert len(seen) == devices, f"round {r}: saw {len(seen)} updates"
        previous, merged = store.load_global(r - 1), store.load_global(r)
        before = store.load_global(r - 2) if r >= 2 else None
        assert all(u.base_version == r - 1 for u in seen)
        if strategy in ("fedit", "hetlora"):
            expected = (expected_fedavg if strategy == "fedit" else expected_hetlora)(previous, seen)
            for name, value in expected.items():
                if before is not None:
                    value = value + beta * (previous.tensors[name].astype(np.float64) - before.tensors[name])
                np.testing.assert_allclose(merged.tensors[name], value, rtol=1e-5, atol=1e-7)
        else:
            for name in previous.tensors:
                if name.endswith(".lora_A"):
                    module = name.rsplit(".", 1)[0]
                    want = expected_exact(previous, seen, module)
                    if before is not None:
                        want = want + beta * (effective_delta(previous, module) - effective_delta(before, module))
                    got = effective_delta(merged, module)
                    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-7, module
        for name in merged.tensors:
            # what was published on the broker is what was written to disk
            np.testing.assert_array_equal(observer.globals[r].tensors[name], merged.tensors[name])
        for name in merged.merged:
            np.testing.assert_array_equal(observer.globals[r].merged[name], merged.merged[name])
        assert any(not np.allclose(merged.tensors[n], previous.tensors[n]) for n in previous.tensors)
