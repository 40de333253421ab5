"""Base-model precision for LoRA on CPU: float32, bfloat16, int8 and nf4 (QLoRA) on SmolLM2-135M.

Each configuration runs in a fresh subprocess, so peak RSS belongs to it alone: LoRA r=8 on
q_proj and v_proj, batches of 4 × 128 tokens packed from device 0's synthetic logs, the same
starting adapter and batches for every configuration, then the perplexity of held-out blocks.
Reports weight bytes, RSS, median step time (the first step, which warms up allocators and
kernels, left out), the loss of the last step, and held-out perplexity before training (the
quantized base alone) and after, with ratios against float32. Usage::

    python benchmarks/qlora.py [--steps 10] [--threads 2] [--configs float32 nf4 nf4+gc] [--markdown]

A ``+gc`` suffix turns gradient checkpointing on. Peak RSS is reported twice: over the whole
process (loading the float32 checkpoint included) and over training and evaluation alone.

``--malloc-mmap-threshold BYTES`` runs the children with glibc's ``MALLOC_MMAP_THRESHOLD_``.
By default glibc raises that threshold each time a large block is freed, so the per-step
temporaries (activations, logits, dequantized weights) end up in the heap, which keeps them
resident after they are freed; peak RSS then measures the allocator as much as the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time

log = logging.getLogger("qlora")

MODES = ("float32", "bfloat16", "int8", "nf4")
HELDOUT = 8  # blocks


def _rss_mb() -> tuple[float, float]:
    """(current, peak since the last reset) resident set size in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux ≥ 4.0; ``ru_maxrss`` restarts too)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(config: str, steps: int, threads: int, batch: int, seq_len: int) -> dict:
    """One configuration, measured in this process; returns the numbers as a dict."""
    import numpy as np
    import torch

    from edgetune.adapters.lora import init_lora
    from edgetune.data import generate_device_texts, pack_blocks
    from edgetune.models import load_model
    from edgetune.trainers.quantize import quantize_base, weight_bytes
    from edgetune.trainers.torch_lora import TorchLoraTrainer
    from edgetune.wire import LoraSpec, TrainSettings

    mode, _, flag = config.partition("+")
    torch.set_num_threads(threads)
    loaded = load_model(None)
    tok = loaded.tokenizer
    blocks = pack_blocks([tok.encode(t) for t in generate_device_texts(0, 400)], seq_len, tok.eos_token_id)
    train, heldout = blocks[:-HELDOUT], blocks[-HELDOUT:]  # (N, T)
    if len(train) < steps * batch:
        raise SystemExit(f"{len(train)} training blocks are too few for {steps} steps of {batch}")
    fp32_bytes = weight_bytes(loaded.model)
    quantize_base(loaded.model, mode)  # here, to measure the base alone; the trainer sees it done
    base_bytes = weight_bytes(loaded.model)

    spec = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    trainer = TorchLoraTrainer(loaded, spec, threads=threads, quantization=mode, gradient_checkpointing=flag == "gc")
    trainer.set_adapter(init_lora(spec, loaded.manifest.modules, seed=0))  # B = 0: the base alone
    rss_before, _ = _rss_mb()
    base_perplexity = trainer.perplexity(heldout)
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    windowed = _reset_peak_rss()

    stamps = [time.perf_counter()]
    settings = TrainSettings(local_steps=steps, batch_size=batch, seq_len=seq_len, learning_rate=1e-3, seed=0)
    result = trainer.train(
        (train[i * batch:(i + 1) * batch] for i in range(steps)),
        settings,
        on_step=lambda *_: stamps.append(time.perf_counter()),
    )
    step_seconds = np.diff(stamps)
    started = time.perf_counter()
    perplexity = trainer.perplexity(heldout)
    eval_seconds = time.perf_counter() - started
    _, train_peak = _rss_mb()
    lifetime_peak = max(lifetime_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "config": config,
        "fp32_weight_bytes": fp32_bytes,
        "weight_bytes": base_bytes,
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": lifetime_peak,
        "train_peak_rss_mb": train_peak if windowed else None,
        "first_step_s": float(step_seconds[0]),
        "median_step_s": float(statistics.median(step_seconds[1:])) if steps > 1 else float(step_seconds[0]),
        "final_loss": result.final_loss,
        "mean_loss": result.mean_loss,
        "base_perplexity": base_perplexity,
        "heldout_perplexity": perplexity,
        "eval_s": eval_seconds,
        "steps": result.steps,
    }


def run_config(config: str, args: argparse.Namespace) -> dict:
    """``config`` measured in a fresh interpreter; its JSON is the last line of its stdout."""
    command = [
        sys.executable, __file__, "--child", config, "--steps", str(args.steps), "--threads", str(args.threads),
        "--batch", str(args.batch), "--seq-len", str(args.seq_len),
    ]
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{config} failed with exit status {done.returncode}")
    log.info("%s: done in %.0f s", config, time.perf_counter() - started)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], markdown: bool) -> str:
    base = next((r for r in rows if r["config"] == "float32"), rows[0])
    header = [
        "config", "base weights MB", "RSS ready MB", "peak RSS MB (process)", "peak RSS MB (train+eval)",
        "median step s", f"loss at step {base['steps']}", "held-out ppl before", "held-out ppl after",
    ]

    def ratio(value: float, reference: float) -> str:
        return f"{value / reference:.2f}×"

    lines = []
    for r in rows:
        train_peak = r["train_peak_rss_mb"]
        lines.append([
            r["config"],
            f"{r['weight_bytes'] / 1e6:.0f} ({ratio(r['weight_bytes'], base['weight_bytes'])})",
            f"{r['rss_before_train_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f} ({ratio(r['peak_rss_mb'], base['peak_rss_mb'])})",
            "n/a" if train_peak is None else f"{train_peak:.0f} ({ratio(train_peak, base['train_peak_rss_mb'])})",
            f"{r['median_step_s']:.2f} ({ratio(r['median_step_s'], base['median_step_s'])})",
            f"{r['final_loss']:.4f} ({r['final_loss'] - base['final_loss']:+.4f})",
            f"{r['base_perplexity']:.2f} ({ratio(r['base_perplexity'], base['base_perplexity'])})",
            f"{r['heldout_perplexity']:.2f} ({ratio(r['heldout_perplexity'], base['heldout_perplexity'])})",
        ])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(MODES), help="modes, each optionally with +gc")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (e.g. 65536)")
    parser.add_argument("--markdown", action="store_true", help="print a table for docs/benchmarks.md")
    parser.add_argument("--json", action="store_true", help="print the raw numbers too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for config in [args.child] if args.child else args.configs:
        mode, _, flag = config.partition("+")
        if mode not in MODES or flag not in ("", "gc"):
            parser.error(f"bad config {config!r}: use one of {', '.join(MODES)}, optionally with +gc")

    if args.child:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(child(args.child, args.steps, args.threads, args.batch, args.seq_len)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    rows = []
    for config in args.configs:
        log.info("%s: running %d steps in a fresh process", config, args.steps)
        rows.append(run_config(config, args))
    if args.json:
        print(json.dumps(rows, indent=1))
    allocator = "" if args.malloc_mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
    print(f"SmolLM2-135M, LoRA r=8 q_proj+v_proj, batch {args.batch} × {args.seq_len}, "
          f"{args.steps} steps, {args.threads} threads{allocator}; ratios against float32\n")
    print(table(rows, args.markdown))


if __name__ == "__main__":
    main()
