"""Measure LoRA training on a real model, fit the cost model's coefficients, report its accuracy.

Each configuration (quantization × batch × length × checkpointing) trains a few steps in a fresh
process, so its peak RSS is its own. Memory coefficients are fitted by non-negative least
squares, time coefficients by least squares. Accuracy is reported **leave-one-out**: each
configuration is predicted by coefficients fitted without it, so the table shows how the model
does on configurations it has not seen. Usage::

    python benchmarks/calibrate_costmodel.py [--model REF] [--steps 4] [--save] [--markdown]

``--save`` writes the coefficients fitted on all configurations to
``sdk/edgetune/planning/calibration.json``.

``--backend ort --artifacts DIR`` measures the ONNX Runtime trainer instead (float32, no
checkpointing; ``DIR`` from ``edgetune build-ort --rank 8 --targets q_proj,v_proj``), in
processes where torch is hidden as on a device without it; ``--save`` then stores its
coefficients under ``backends["ort"]`` and leaves PyTorch's as they are.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

CONFIGS = [
    # (quantization, batch, seq_len, gradient checkpointing)
    ("float32", 1, 128, False),
    ("float32", 2, 128, False),
    ("float32", 4, 128, False),
    ("float32", 8, 128, False),
    ("float32", 4, 256, False),
    ("float32", 2, 64, False),
    ("float32", 4, 128, True),
    ("float32", 8, 128, True),
    ("bfloat16", 2, 128, False),
    ("bfloat16", 4, 128, False),
    ("bfloat16", 8, 128, False),
    ("int8", 1, 128, False),
    ("int8", 2, 128, False),
    ("int8", 4, 128, False),
    ("int8", 8, 128, False),
    ("nf4", 1, 128, False),
    ("nf4", 2, 128, False),
    ("nf4", 4, 128, False),
    ("nf4", 8, 128, False),
]
# ONNX Runtime trains a float32 base without checkpointing: PyTorch's configurations of that kind
ORT_CONFIGS = [c for c in CONFIGS if c[0] == "float32" and not c[3]]
RANK, TARGETS = 8, ("q_proj", "v_proj")

# the measured part, shared by both children: a few steps, median step time, peak RSS
_LOOP = r"""
times = []
def batches():
    i = 0
    while True:
        yield blocks[(i * args["batch"]) % (len(blocks) - args["batch"]):][: args["batch"]]
        i += 1
last = [time.perf_counter()]
def on_step(step, total, loss):
    now = time.perf_counter(); times.append(now - last[0]); last[0] = now
settings = TrainSettings(local_steps=args["steps"], batch_size=args["batch"], seq_len=args["seq_len"], learning_rate=1e-4)
result = trainer.train(batches(), settings, on_step)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "idle_rss": idle_rss, "step_s": statistics.median(times[1:]), "loss": result.final_loss}))
"""

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from edgetune.data import generate_device_texts, pack_blocks
from edgetune.models import load_model
from edgetune.trainers.torch_lora import TorchLoraTrainer
from edgetune.wire import LoraSpec, TrainSettings
idle_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = load_model(args["model"])
ids = [loaded.tokenizer.encode(t) for t in generate_device_texts(0, 600)]
blocks = pack_blocks(ids, args["seq_len"], loaded.tokenizer.eos_token_id)
trainer = TorchLoraTrainer(loaded, LoraSpec(rank=args["rank"], target_modules=tuple(args["targets"])),
                           quantization=args["quantization"], gradient_checkpointing=args["checkpointing"])
""" + _LOOP


CHILD_ORT = r"""
import json, resource, statistics, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
from helpers.torch_free import hide
hide()
from pathlib import Path
from edgetune.data import generate_device_texts, pack_blocks
from edgetune.ort.model import OrtModel
from edgetune.trainers.ort_lora import OrtLoraTrainer
from edgetune.wire import LoraSpec, TrainSettings
idle_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = OrtModel.load(Path(args["artifacts"]))
ids = [model.tokenizer.encode(t) for t in generate_device_texts(0, 600)]
blocks = pack_blocks(ids, args["seq_len"], model.tokenizer.eos_token_id)
trainer = OrtLoraTrainer(model.folder, LoraSpec(rank=args["rank"], target_modules=tuple(args["targets"])),
                         threads=args["threads"], manifest=model.artifacts)
""" + _LOOP


@dataclass
class Measurement:
    quantization: str
    batch: int
    seq_len: int
    checkpointing: bool
    peak_rss: float
    step_s: float
    idle_rss: float


def measure(model: str, steps: int, threads: int, done: list[Measurement] = (), artifacts: str | None = None
            ) -> list[Measurement]:
    """Each configuration in a fresh process: PyTorch's, or with ``artifacts`` ONNX Runtime's."""
    results = list(done)
    have = {(m.quantization, m.batch, m.seq_len, m.checkpointing) for m in done}
    child = CHILD_ORT if artifacts else CHILD
    for quantization, batch, seq_len, checkpointing in (ORT_CONFIGS if artifacts else CONFIGS):
        if (quantization, batch, seq_len, checkpointing) in have:
            continue
        args = dict(model=model, rank=RANK, targets=TARGETS, quantization=quantization, batch=batch,
                    seq_len=seq_len, checkpointing=checkpointing, steps=steps, threads=threads,
                    artifacts=artifacts, tests=str(Path(__file__).resolve().parent.parent / "tests"))
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", child, json.dumps(args)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {quantization} b{batch} t{seq_len}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        data = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(Measurement(quantization, batch, seq_len, checkpointing, data["peak_rss"], data["step_s"], data["idle_rss"]))
        print(f"  {quantization:>8} b{batch} t{seq_len} ckpt={checkpointing!s:5} peak {data['peak_rss'] / 2**20:7.0f} MiB  "
              f"step {data['step_s']:6.2f} s  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return results


def _reference_gflops(backend: str) -> dict:
    """The machine's matmul throughput, measured as a device of this backend measures itself
    (``edgetune profile``): with torch for PyTorch, with torch hidden (numpy) for ONNX Runtime,
    so a device's profile scales these coefficients by the same kind of kernel."""
    if backend == "torch":
        from edgetune.profiling import measure_profile

        return measure_profile(seconds=4.0).gflops
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from helpers.torch_free import hide; hide(); "
            "from edgetune.profiling import measure_profile; print(json.dumps(measure_profile(seconds=4.0).gflops))")
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    out = subprocess.run([sys.executable, "-c", code, tests], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(arch, measurements, reference_gflops: float, fitted_on: str):
    from scipy.optimize import nnls

    from edgetune.planning.costmodel import Calibration, Config, FLOAT, activation_floats, lora_parameters, step_gflop, weight_bytes

    all_quants = sorted({m.quantization for m in measurements})
    quants = [q for q in all_quants if q != "float32"]
    rows, target = [], []
    for m in measurements:
        config = Config(RANK, m.quantization, m.batch, m.seq_len, m.checkpointing, TARGETS)
        known = weight_bytes(arch, m.quantization) + lora_parameters(arch, config) * FLOAT * 4
        row = [1.0, m.batch * m.seq_len * arch.vocab_size * FLOAT]
        row += [activation_floats(arch, config) * FLOAT * (m.quantization == q) for q in all_quants]
        row += [arch.linear_parameters * FLOAT * (m.quantization == q) for q in quants]
        rows.append(row)
        target.append(m.peak_rss - known)
    coef, _ = nnls(np.array(rows), np.array(target))
    # time: step = overhead + c_q · GFLOP, one c per quantization
    time_rows = [[1.0] + [step_gflop(arch, Config(RANK, m.quantization, m.batch, m.seq_len, m.checkpointing, TARGETS))
                          * (m.quantization == q) for q in all_quants] for m in measurements]
    time_coef, *_ = np.linalg.lstsq(np.array(time_rows), np.array([m.step_s for m in measurements]), rcond=None)
    n = len(all_quants)
    return Calibration(
        overhead_bytes=float(coef[0]),
        logits_copies=float(coef[1]),
        activation_scale={q: float(c) for q, c in zip(all_quants, coef[2:2 + n])},
        dequantized_fraction={q: float(c) for q, c in zip(quants, coef[2 + n:])},
        seconds_per_gflop={q: float(c) for q, c in zip(all_quants, time_coef[1:])},
        step_overhead_s=max(0.0, float(time_coef[0])),
        reference_gflops=reference_gflops,
        fitted_on=fitted_on,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model ref (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--measurements", help="reuse measurements from this JSON file instead of measuring")
    parser.add_argument("--dump", help="write the measurements to this JSON file")
    parser.add_argument("--extend", help="measure only configurations missing from this dump, then rewrite it")
    parser.add_argument("--backend", choices=["torch", "ort"], default="torch")
    parser.add_argument("--artifacts", help="ONNX Runtime artifacts of --model (edgetune build-ort), for --backend ort")
    args = parser.parse_args()
    if (args.backend == "ort") != bool(args.artifacts):
        parser.error("--backend ort needs --artifacts DIR, and --artifacts needs --backend ort")

    from edgetune.models import load_model
    from edgetune.planning.costmodel import Arch, Config, estimate_memory, estimate_step_seconds
    from edgetune.wire import DeviceProfile

    manifest = load_model(args.model).manifest
    arch = Arch.from_manifest(manifest)
    if args.measurements:
        measurements = [Measurement(**m) for m in json.load(open(args.measurements))]
        reference = json.load(open(args.measurements + ".gflops"))
    elif args.extend:
        done = [Measurement(**m) for m in json.load(open(args.extend))]
        reference = json.load(open(args.extend + ".gflops"))
        measurements = measure(args.model, args.steps, args.threads, done, args.artifacts)
        json.dump([asdict(m) for m in measurements], open(args.extend, "w"), indent=1)
    else:
        reference = _reference_gflops(args.backend)
        count = len(ORT_CONFIGS if args.artifacts else CONFIGS)
        print(f"this machine: {reference} GFLOP/s; measuring {count} configurations", file=sys.stderr)
        measurements = measure(args.model, args.steps, args.threads, artifacts=args.artifacts)
        if args.dump:
            json.dump([asdict(m) for m in measurements], open(args.dump, "w"), indent=1)
            json.dump(reference, open(args.dump + ".gflops", "w"))
    fitted_on = (f"{manifest.name}, LoRA r={RANK} on {','.join(TARGETS)}, {args.backend}, {platform.machine()} "
                 f"{args.threads} threads, {time.strftime('%Y-%m-%d')}")
    everything = fit(arch, measurements, reference, fitted_on)
    profile = DeviceProfile("calibration", 1 << 40, dict(reference))
    rows = []
    for i, m in enumerate(measurements):
        held_out = fit(arch, measurements[:i] + measurements[i + 1:], reference, fitted_on)
        config = Config(RANK, m.quantization, m.batch, m.seq_len, m.checkpointing, TARGETS)
        memory = estimate_memory(arch, config, held_out).total if m.quantization in held_out.activation_scale else float("nan")
        if m.quantization not in held_out.seconds_per_gflop or m.quantization not in held_out.activation_scale:
            step = float("nan")  # its quantization's only other sample was this one
        else:
            step = estimate_step_seconds(arch, config, profile, held_out)
        rows.append((m, memory, step))
    if args.markdown:
        print("| quantization | batch × seq | checkpointing | peak RSS measured | predicted | error | step measured | predicted | error |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for m, memory, step in rows:
        mem_err = (memory - m.peak_rss) / m.peak_rss * 100
        time_err = (step - m.step_s) / m.step_s * 100
        cells = [m.quantization, f"{m.batch} × {m.seq_len}", "on" if m.checkpointing else "off",
                 f"{m.peak_rss / 2**20:,.0f} MiB", f"{memory / 2**20:,.0f} MiB", f"{mem_err:+.1f} %",
                 f"{m.step_s:.2f} s", f"{step:.2f} s", f"{time_err:+.1f} %"]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    mem_errors = [abs(memory - m.peak_rss) / m.peak_rss for m, memory, _ in rows]
    time_errors = [abs(step - m.step_s) / m.step_s for m, _, step in rows if step == step]
    print(f"\nleave-one-out: memory error mean {np.mean(mem_errors) * 100:.1f} %, max {np.max(mem_errors) * 100:.1f} %; "
          f"step time error mean {np.mean(time_errors) * 100:.1f} %, max {np.max(time_errors) * 100:.1f} %")
    print(f"coefficients (all configurations): {json.dumps(asdict(everything), indent=1)}")
    if args.save:
        from edgetune.planning.costmodel import Calibration

        if args.backend == "ort":  # PyTorch's coefficients stay; ONNX Runtime's go beside them
            current = Calibration.load()
            fitted = asdict(everything)
            fitted.pop("backends")
            everything = replace(current, backends={**current.backends, "ort": fitted})
        else:
            everything = replace(everything, backends=Calibration.load().backends)
        everything.save()
        print("saved to sdk/edgetune/planning/calibration.json", file=sys.stderr)


if __name__ == "__main__":
    main()
