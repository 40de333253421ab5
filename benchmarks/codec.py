"""Codec throughput: encode + decode of a SmolLM2-135M LoRA r=8 (q_proj, v_proj) delta.

Compares, in one run on the same data: our wire v2 codec (a whole ``Update`` message as sent,
its 120 tensors packed in one buffer; also its float16 and int8 forms), ``pickle`` of the same
dict of arrays, numpy ``.npy`` bytes per tensor (Flower's representation), and a plain memory
copy per tensor (out to bytes and back into a new array: the floor for a codec that copies once
each way). Reports MB/s of float32 payload and each one's speed against ours.

How it is timed, and why: each round trip is timed on its own, the codecs taking turns (so a
drift of the machine's speed hits them alike), with the garbage collector off while timing (as
``timeit`` does: a collection falls on whichever codec is running, not on the one that made the
garbage), and with glibc told to keep freed memory (``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_``, set by re-running this script) as a long-running process's allocator
does after its first large buffers; without it, every fresh megabyte costs page faults, and which
codec pays them depends on the order they run in. ``--runs N`` repeats the whole measurement in N
fresh processes and reports each codec's median run and the spread.

    python benchmarks/codec.py [--repeat 300] [--runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- codec:begin -->", "<!-- codec:end -->"
#: glibc keeps freed memory instead of returning it at once (see the module docstring)
MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_MMAP_THRESHOLD_": str(256 << 20)}
#: the roadmap's targets for wire v2 against each alternative (speed of ours ÷ theirs)
TARGETS = {"plain memory copy": 0.6, "numpy .npy bytes": 10.0, "pickle": 1.0}

# SmolLM2-135M: 30 layers, hidden 576, q_proj 576->576, v_proj 576->192 (3 kv heads of 64)
SMOLLM2_MODULES = {
    f"model.layers.{i}.self_attn.{name}": shape
    for i in range(30)
    for name, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))
}


def make_delta() -> dict[str, np.ndarray]:
    from edgetune.adapters.lora import lora_shapes
    from edgetune.wire import LoraSpec

    rng = np.random.default_rng(0)
    shapes = lora_shapes(LoraSpec(rank=8), SMOLLM2_MODULES)
    return {name: (rng.standard_normal(shape) * 1e-3).astype(np.float32) for name, shape in shapes.items()}


def ours(delta, precision: str = "fp32"):
    from edgetune.wire import TrainMetrics, Update, decode_message, encode_message
    from edgetune.wire.quantize import quantize_tensors

    sent = delta if precision == "fp32" else quantize_tensors(delta, precision)
    update = Update("bench", 1, 0, 100, sent, TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
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


CODECS = {
    "edgetune wire v2": lambda d: ours(d),
    "edgetune wire v2, fp16": lambda d: ours(d, "fp16"),
    "edgetune wire v2, int8": lambda d: ours(d, "int8"),
    "pickle": with_pickle,
    "numpy .npy bytes": with_npy,
    "plain memory copy": memory_copy,
}


def wire_bytes(delta, precision: str) -> int:
    from edgetune.wire import TrainMetrics, Update, encode_message
    from edgetune.wire.quantize import quantize_tensors

    sent = delta if precision == "fp32" else quantize_tensors(delta, precision)
    return len(encode_message(Update("bench", 1, 0, 100, sent, TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))))


def measure(repeat: int) -> dict:
    """One run: median and best seconds of a round trip per codec, taking turns."""
    delta = make_delta()
    for name in ("edgetune wire v2", "numpy .npy bytes", "pickle", "plain memory copy"):
        decoded = CODECS[name](delta)
        assert all(np.array_equal(decoded[k].ravel(), delta[k].ravel()) for k in delta), name  # (the copy stays flat)
    times: dict[str, list[float]] = {name: [] for name in CODECS}
    for fn in CODECS.values():
        fn(delta)  # warm-up
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            for name, fn in CODECS.items():
                start = time.perf_counter()
                fn(delta)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    values = sum(a.size for a in delta.values())
    return {"values": values, "tensors": len(delta), "megabytes": values * 4 / 1e6,
            "median_s": {n: statistics.median(t) for n, t in times.items()},
            "best_s": {n: min(t) for n, t in times.items()},
            "wire_bytes": {p: wire_bytes(delta, p) for p in ("fp32", "fp16", "int8")}}


def run_child(repeat: int) -> dict:
    env = dict(os.environ, **MALLOC)
    out = subprocess.run([sys.executable, __file__, "--child", str(repeat)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Per codec: MB/s and our speed ÷ its speed (by median round trip) in each run; the median run."""
    mb = runs[0]["megabytes"]
    rows = {}
    for name in CODECS:
        rates = [mb / r["median_s"][name] for r in runs]
        ratios = [r["median_s"][name] / r["median_s"]["edgetune wire v2"] for r in runs]
        rows[name] = {"mb_per_s": statistics.median(rates), "ratio": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)]}
    return rows


def markdown(result: dict) -> str:
    rows, runs = result["rows"], result["runs"]
    fp32 = runs[0]["wire_bytes"]["fp32"]
    lines = [
        BEGIN,
        "## Codec: encode + decode of a LoRA delta",
        "",
        f"`python benchmarks/codec.py --repeat {result['repeat']} --runs {len(runs)} --markdown` (or `make bench`), "
        f"{result['date']}, {result['machine']}.",
        "",
        f"The payload is the delta of SmolLM2-135M with LoRA r=8 on q_proj and v_proj: {runs[0]['values']:,} float32 "
        f"values ({runs[0]['megabytes']:.2f} MB) in {runs[0]['tensors']} tensors. \"edgetune wire v2\" encodes and "
        "decodes a whole `Update` message as sent (its tensors packed in one buffer, `sdk/edgetune/wire/packed.py`); "
        "the fp16 and int8 rows include quantizing and dequantizing. \"plain memory copy\" copies each tensor out to "
        "bytes and back into a new array, the floor for any codec that copies once each way. The codecs take turns, "
        "with the garbage collector off while timing and glibc keeping freed memory (the module docstring says why); "
        f"each figure is the median of {result['repeat']} round trips, and the table the median of {len(runs)} runs "
        "in fresh processes, with the range of the ratio over the runs.",
        "",
        "| codec (encode + decode) | MB/s | edgetune v2's speed ÷ this one's (range over runs) | bytes on the wire |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        wire = ""
        if name.startswith("edgetune"):
            precision = name.split(", ")[1] if ", " in name else "fp32"
            wire = f"{runs[0]['wire_bytes'][precision]:,} ({runs[0]['wire_bytes'][precision] / fp32:.3f}×)"
        low, high = row["ratio_range"]
        lines.append(f"| {name} | {row['mb_per_s']:,.0f} | {row['ratio']:.2f} ({low:.2f}–{high:.2f}) | {wire} |")
    lines += ["", "Against the targets (issue 17; met if every run meets it):", ""]
    for name, target in TARGETS.items():
        low, high = rows[name]["ratio_range"]
        met = low >= target
        lines.append(f"- {'≥' if name != 'pickle' else 'ahead of'} {target:g}× {name}: **{'met' if met else 'not met'}** "
                     f"({low:.2f}–{high:.2f}×).")
    lines.append(END)
    return "\n".join(lines)


def write_docs(section: str) -> None:
    from edgetune.bench.sections import replace_section

    replace_section(DOCS, section, BEGIN, END)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help=f"write the section into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args()
    import platform

    runs = [run_child(args.repeat) for _ in range(args.runs)]
    result = {"date": date.today().isoformat(), "repeat": args.repeat, "runs": runs, "rows": summarize(runs),
              "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"}
    (ROOT / "benchmarks" / "results" / "codec.json").write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if args.markdown:
        write_docs(section)


if __name__ == "__main__":
    main()
