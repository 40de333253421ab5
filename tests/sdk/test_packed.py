"""Wire v2's packed tensors and quantized deltas: one buffer per message viewed without copies,
an index checked in one pass, and fp16 / int8 within their documented error bounds, with error
feedback keeping the sum of what was sent within one round's bound of the sum of the deltas."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edgetune.wire import GlobalAdapter, LoraSpec, TrainMetrics, Update, WireError, decode_message, encode_message
from edgetune.wire.packed import ALIGN
from edgetune.wire.quantize import BLOCK, ErrorFeedback, QuantizedTensor, error_bound, quantize, quantize_tensors

RNG = np.random.default_rng(7)
DELTA = {
    "m.q.lora_A": (RNG.standard_normal((8, 576)) * 1e-3).astype(np.float32),
    "m.q.lora_B": (RNG.standard_normal((576, 8)) * 1e-3).astype(np.float32),
    "m.v.lora_A": (RNG.standard_normal((3, 5)) * 1e-2).astype(np.float32),  # (sizes that need padding)
    "m.v.lora_B": (RNG.standard_normal((7, 3)) * 1e-2).astype(np.float32),
}


def _update(delta) -> Update:
    return Update("dev-1", 1, 0, 10, delta, TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))


def _decoded(delta) -> dict:
    return decode_message(encode_message(_update(delta))).delta


def test_the_tensors_are_views_of_the_payload_aligned_and_in_order():
    big = {**DELTA, "m.o.lora_A": (RNG.standard_normal((32, 576)) * 1e-3).astype(np.float32)}
    payload = encode_message(_update(big))
    assert len(payload) > 64 * 1024  # (smaller envelopes are read with one copy: cheaper than a reader)
    decoded = decode_message(payload).delta
    for name, array in big.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == np.float32 and not decoded[name].flags.writeable
        assert np.shares_memory(decoded[name], np.frombuffer(payload, np.uint8))  # no copy
    envelope = msgpack.unpackb(payload)
    names, kinds, shapes, offsets, blocks = envelope["body"]["delta"]
    assert names == list(big) and set(kinds) == {"float32"} and blocks == [0] * len(big)
    assert all(o % ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
    assert list(payload[-len(envelope["data"]):]) == list(envelope["data"])  # the data is the envelope's last entry


def test_fp16_and_bfloat16_and_mixed_tensors_round_trip():
    from edgetune.wire import BFloat16Array, to_bfloat16

    mixed = {"a": DELTA["m.q.lora_A"].astype(np.float16), "b": to_bfloat16(DELTA["m.v.lora_B"]),
             "c": DELTA["m.v.lora_A"], "d": quantize(DELTA["m.q.lora_B"], "int8")}
    decoded = _decoded(mixed)
    np.testing.assert_array_equal(decoded["a"], mixed["a"])
    assert isinstance(decoded["b"], BFloat16Array)
    np.testing.assert_array_equal(decoded["b"].to_float32(), mixed["b"].to_float32())
    np.testing.assert_array_equal(decoded["c"], mixed["c"])
    np.testing.assert_array_equal(decoded["d"], mixed["d"].to_float32())
    assert decoded["d"].dtype == np.float32


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("source", ["random", "heavy tails", "real"])
def test_quantization_errors_are_within_the_bound(precision, source):
    if source == "random":
        x = RNG.standard_normal(10_000).astype(np.float32) * 1e-3
    elif source == "heavy tails":
        x = (RNG.standard_cauchy(10_000) * 1e-4).astype(np.float32)
        x[::997] = 0.0
    else:  # a delta a real trainer made (tiny Llama, LoRA r=2, a few AdamW steps): see test_torch_lora
        x = _real_delta()
    sent = decode_message(encode_message(_update({"x": quantize(x, precision)}))).delta["x"]
    error = np.abs(np.asarray(sent, np.float32) - x)
    bound = error_bound(x, precision)
    assert (error <= bound).all(), float((error - bound).max())
    if precision == "fp32":
        assert not error.any()


def _real_delta() -> np.ndarray:
    """The trained − global delta of a tiny Llama after three AdamW steps (torch, no network)."""
    pytest.importorskip("torch")
    from edgetune.adapters.lora import init_lora
    from edgetune.models import load_model
    from edgetune.trainers.torch_lora import TorchLoraTrainer
    from edgetune.wire import TrainSettings

    loaded = load_model("tiny-llama")
    spec = LoraSpec(rank=2, alpha=4.0)
    trainer = TorchLoraTrainer(loaded, spec)
    start = init_lora(spec, loaded.manifest.modules, 0)
    trainer.set_adapter(start)
    blocks = np.random.default_rng(0).integers(0, loaded.manifest.vocab_size, size=(6, 16))
    batches = iter([blocks[:2], blocks[2:4], blocks[4:]])
    trainer.train(batches, TrainSettings(local_steps=3, batch_size=2, seq_len=16, learning_rate=1e-2))
    trained = trainer.get_adapter()
    return np.concatenate([(trained[n] - start[n]).ravel() for n in sorted(start)]).astype(np.float32)


def test_int8_is_about_a_quarter_of_the_bytes():
    big = {name: np.tile(t, (4, 1)) for name, t in DELTA.items()}
    fp32 = len(encode_message(_update(big)))
    int8 = len(encode_message(_update(quantize_tensors(big, "int8"))))
    fp16 = len(encode_message(_update(quantize_tensors(big, "fp16"))))
    assert int8 <= 0.27 * fp32 and fp16 <= 0.51 * fp32, (int8 / fp32, fp16 / fp32)


def test_fp16_beyond_its_range_travels_as_float32():
    x = np.array([1.0, 7e4, -3.0], np.float32)
    sent = quantize(x, "fp16")
    assert sent.dtype == np.float32
    np.testing.assert_array_equal(_decoded({"x": sent})["x"], x)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_with_error_feedback_the_sum_over_rounds_stays_within_one_rounds_bound(precision):
    """20 rounds of deltas: what the receiver summed differs from the sum of the deltas by the
    last round's residual only, which is within one round's bound; without feedback it drifts."""
    feedback, shapes = ErrorFeedback(), {"a": (16, 64), "b": (64, 16)}
    rng = np.random.default_rng(3)
    total = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    received = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
    plain = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
    for _ in range(20):
        delta = {n: (rng.standard_normal(s) * 1e-3 + 2e-4).astype(np.float32) for n, s in shapes.items()}
        got = _decoded(feedback.compress(delta, precision, key="run-1"))
        once = _decoded(quantize_tensors(delta, precision))
        for n in shapes:
            total[n] += delta[n]
            received[n] += np.asarray(got[n], np.float64)
            plain[n] += np.asarray(once[n], np.float64)
    for n in shapes:
        drift = np.abs(received[n] - total[n])
        bound = error_bound(delta[n] + feedback.residual[n], precision)  # (the last round's)
        assert (drift <= bound * 1.01 + 1e-7).all(), float((drift - bound).max())
        assert np.abs(plain[n] - total[n]).max() > drift.max()  # (feedback is what keeps it there)


def test_error_feedback_starts_afresh_for_another_run_or_layout():
    feedback = ErrorFeedback()
    feedback.compress({"a": np.full((4, 4), 1e-3, np.float32)}, "int8", key="run-1")
    feedback.residual["a"] += 1.0
    assert float(np.abs(feedback.compress({"a": np.zeros((4, 4), np.float32)}, "int8", key="run-2")["a"].to_float32()).max()) == 0
    feedback.residual["a"] += 1.0
    feedback.compress({"a": np.zeros((2, 4), np.float32)}, "int8", key="run-2")  # (another rank: another shape)
    assert feedback.residual["a"].shape == (2, 4) and not feedback.residual["a"].any()


def test_a_switch_to_float32_sends_what_is_left_over():
    """The planner may move a device from int8 to float32 between rounds: its first float32
    update carries the remainder, so nothing quantization dropped is lost."""
    feedback = ErrorFeedback()
    delta = {"a": (np.random.default_rng(5).standard_normal((8, 40)) * 1e-3).astype(np.float32)}
    sent = feedback.compress(delta, "int8", key="run-1")["a"].to_float32()
    left = feedback.residual["a"].copy()
    assert np.abs(left).max() > 0
    exact = feedback.compress(delta, "fp32", key="run-1")["a"]
    np.testing.assert_allclose(sent + exact, 2 * delta["a"], rtol=0, atol=1e-9)
    assert not feedback.residual


def _index_case(mutate) -> bytes:
    envelope = msgpack.unpackb(encode_message(_update(quantize_tensors(DELTA, "int8") | {"f": DELTA["m.v.lora_A"]})))
    mutate(envelope)
    return msgpack.packb(envelope, use_bin_type=True)


def _set(column: int, row: int, value):
    def mutate(envelope):
        envelope["body"]["delta"][column][row] = value
    return mutate


@pytest.mark.parametrize("mutate, fragment", [
    (_set(1, 0, "float64"), "dtype 'float64' is not one of"),
    (_set(2, 0, [8, -576]), "shape must be"),
    (_set(3, 1, 8), "offset 8 where the data continues at"),
    (_set(0, 1, "m.q.lora_A"), "two entries of the same name"),
    (_set(4, 0, 0), "an int8 entry needs a block"),
    (_set(4, 4, 128), "only int8 entries have a block"),
    (lambda e: e["body"]["delta"].pop(), "expected [names, dtypes, shapes, offsets, blocks]"),
    (lambda e: e["body"]["delta"][0].pop(), "differ in length"),
    (lambda e: e.__setitem__("data", e["data"][:-4]), "needs bytes up to"),
    (lambda e: e.__setitem__("data", e["data"] + b"\0" * 8), "no entry describes"),
], ids=["dtype", "shape", "offset", "duplicate", "block", "float block", "columns", "lengths", "short", "trailing"])
def test_a_bad_index_is_refused_with_its_reason(mutate, fragment):
    with pytest.raises(WireError) as info:
        decode_message(_index_case(mutate))
    assert info.value.reason == "bad_tensor" and fragment in str(info.value), str(info.value)


def test_int8_scales_must_be_finite_and_not_negative():
    q = quantize(DELTA["m.q.lora_A"], "int8")
    bad = QuantizedTensor(q.values, -q.scales, q.shape, q.block)
    with pytest.raises(WireError, match="scales must be finite"):
        _decoded({"x": bad})
    assert BLOCK == q.block and q.scales.size == -(-q.size // BLOCK)


def test_a_global_adapter_packs_tensors_and_merged_in_one_buffer():
    merged = {"m.q.merged_A": np.ones((1, 576), np.float32), "m.q.merged_B": np.ones((576, 1), np.float32)}
    adapter = GlobalAdapter(3, 3, "f" * 16, LoraSpec(), DELTA, merged)
    payload = encode_message(adapter)
    decoded = decode_message(payload)
    for name in DELTA:
        np.testing.assert_array_equal(decoded.tensors[name], DELTA[name])
    for name in merged:
        np.testing.assert_array_equal(decoded.merged[name], merged[name])
    envelope = msgpack.unpackb(payload)
    assert envelope["body"]["merged"][3][0] > envelope["body"]["tensors"][3][-1]  # one buffer, in field order


def test_a_bfloat16_delta_is_quantized_from_its_values_not_its_bits():
    from edgetune.wire import to_bfloat16

    x = (np.random.default_rng(9).standard_normal((6, 50)) * 1e-2).astype(np.float32)
    bf16 = to_bfloat16(x)
    for precision in ("fp16", "int8"):
        sent = ErrorFeedback().compress({"x": bf16}, precision)["x"]
        got = sent.to_float32() if isinstance(sent, QuantizedTensor) else np.asarray(sent, np.float32)
        assert np.abs(got - bf16.to_float32()).max() <= float(error_bound(bf16.to_float32(), precision).max())
