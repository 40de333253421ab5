"""Codec throughput: encode + decode of a SmolLM2-135M LoRA r=8 (q_proj, v_proj) delta.

Compares, in one run on the same data: our msgpack ``{dtype, shape, data}`` codec (a whole
``Update`` message, as sent), ``pickle`` of the same dict of arrays, numpy ``.npy`` bytes per
tensor (Flower's representation), and a plain memory copy (the floor any codec must copy at
least once). Reports MB/s and ratios. Usage::

    python benchmarks/codec.py [--repeat 50] [--markdown]
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import time

import numpy as np

from edgetune.adapters.lora import lora_shapes
from edgetune.wire import LoraSpec, TrainMetrics, Update, decode_message, encode_message

# SmolLM2-135M: 30 layers, hidden 576, q_proj 576->576, v_proj 576->192 (3 kv heads of 64)
SMOLLM2_MODULES = {
    f"model.layers.{i}.self_attn.{name}": shape
    for i in range(30)
    for name, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))
}


def make_delta() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = lora_shapes(LoraSpec(rank=8), SMOLLM2_MODULES)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def ours(delta):
    update = Update("bench", 1, 0, 100, delta, TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
    return decode_message(encode_message(update)).delta


def with_pickle(delta):
    return pickle.loads(pickle.dumps(delta, protocol=pickle.HIGHEST_PROTOCOL))


def with_npy(delta):
    blobs = {}
    for name, array in delta.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        blobs[name] = buffer.getvalue()
    return {name: np.load(io.BytesIO(blob), allow_pickle=False) for name, blob in blobs.items()}


def memory_copy(delta):
    # one copy out (serialize) and one copy in (deserialize): the floor for any codec
    blobs = {name: array.tobytes() for name, array in delta.items()}
    return {name: np.frombuffer(blob, np.float32).copy() for name, blob in blobs.items()}


def measure(fn, delta, repeat: int) -> float:
    """Median seconds of one encode+decode round trip."""
    fn(delta)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(delta)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--markdown", action="store_true", help="print a table for docs/benchmarks.md")
    args = parser.parse_args()
    delta = make_delta()
    values = sum(a.size for a in delta.values())
    megabytes = values * 4 / 1e6
    for name, decoded in (("ours", ours(delta)), ("npy", with_npy(delta))):
        assert all(np.array_equal(decoded[k], delta[k]) for k in delta), name
    results = {
        "edgetune msgpack": measure(ours, delta, args.repeat),
        "pickle": measure(with_pickle, delta, args.repeat),
        "numpy .npy bytes": measure(with_npy, delta, args.repeat),
        "plain memory copy": measure(memory_copy, delta, args.repeat),
    }
    ours_s = results["edgetune msgpack"]
    print(f"LoRA r=8 q,v delta of SmolLM2-135M: {values:,} float32 values ({megabytes:.2f} MB), "
          f"{len(delta)} tensors, median of {args.repeat}")
    if args.markdown:
        print("\n| codec (encode + decode) | MB/s | edgetune's speed ÷ this one's |\n|---|---:|---:|")
    for name, seconds in results.items():
        rate = megabytes / seconds
        ratio = seconds / ours_s
        if args.markdown:
            print(f"| {name} | {rate:,.0f} | {ratio:.2f}× |")
        else:
            print(f"{name:<20} {rate:10,.0f} MB/s   edgetune's speed ÷ this one's: {ratio:5.2f}")


if __name__ == "__main__":
    main()
