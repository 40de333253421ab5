"""Sample-weighted FedAvg of LoRA factors, against values worked out by hand."""

import numpy as np
import pytest

from edgetune_aggregator.strategies import FedAvg, fedavg


def test_weighted_average_of_deltas_by_hand():
    base = {"m.lora_A": np.array([[1.0, 2.0]], np.float32)}
    deltas = [{"m.lora_A": np.array([[1.0, 1.0]], np.float32)}, {"m.lora_A": np.array([[3.0, -1.0]], np.float32)}]
    # weights 1 and 3: [1, 2] + (1·[1, 1] + 3·[3, -1]) / 4 = [1, 2] + [2.5, -0.5]
    expected = np.array([[3.5, 1.5]], np.float32)
    np.testing.assert_array_equal(fedavg(base, deltas, [1, 3])["m.lora_A"], expected)
    streaming = FedAvg(base)
    for delta, weight in zip(deltas, [1, 3]):
        streaming.add(delta, weight)
    np.testing.assert_array_equal(streaming.result()["m.lora_A"], expected)


def test_streaming_equals_reference_in_any_order():
    rng = np.random.default_rng(0)
    base = {"a": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal((8, 4)).astype(np.float32)}
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()} for _ in range(5)]
    weights = [10, 1, 7, 3, 30]
    reference = fedavg(base, deltas, weights)
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        streaming = FedAvg(base)
        for i in order:
            streaming.add(deltas[i], weights[i])
        for name in base:
            np.testing.assert_allclose(streaming.result()[name], reference[name], rtol=1e-6, atol=1e-7)


def test_factor_averaging_is_not_the_average_update():
    """The documented inexactness: mean(B)·mean(A) ≠ mean(B·A)."""
    a1, a2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    b1, b2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])
    merged = fedavg({"A": np.zeros((1, 2)), "B": np.zeros((2, 1))}, [{"A": a1, "B": b1}, {"A": a2, "B": b2}], [1, 1])
    assert not np.allclose(merged["B"] @ merged["A"], (b1 @ a1 + b2 @ a2) / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        fedavg({"a": np.zeros(1)}, [], [])
    with pytest.raises(ValueError, match="no updates"):
        FedAvg({"a": np.zeros(1)}).result()
    with pytest.raises(ValueError, match="> 0"):
        FedAvg({"a": np.zeros(1)}).add({"a": np.zeros(1)}, 0)
