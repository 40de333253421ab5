"""Generating text on a device: the ONNX export with onnxruntime alone against the merged model
with transformers, both with a KV cache, on SmolLM2-135M.

A state dir holds one global adapter (random LoRA r=8 on q,v: the numbers do not depend on the
values). It is exported twice: ``export --merged`` (safetensors, for transformers) and ``export
--onnx`` (for ``edgetune generate``). Each generator runs in a fresh subprocess (peak RSS is its
own; the onnxruntime one with torch and transformers hidden, as on a device without them) and
decodes the same prompt greedily for ``--new-tokens`` tokens, after one short warm-up.
Reported: load time, new tokens/s, peak RSS, and whether both produced the same tokens.

    python benchmarks/onnx_generate.py [--new-tokens 64] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("onnx-generate")
REPO = Path(__file__).resolve().parent.parent
PROMPT = "Maintenance log, line 3: the pump"


def _peak_rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) / 1024


def child(kind: str, folder: str, new_tokens: int, threads: int) -> dict:
    started = time.perf_counter()
    if kind == "onnx":
        sys.path.insert(0, str(REPO / "tests"))
        from helpers.torch_free import hide, loaded_forbidden

        hide()
        from edgetune.ort.generate import OnnxGenerator

        generator = OnnxGenerator(Path(folder), threads=threads)
        load_s = time.perf_counter() - started
        generator.generate(PROMPT, 4, stop_at_eos=False)  # warm-up
        t0 = time.perf_counter()
        result = generator.generate(PROMPT, new_tokens, stop_at_eos=False)
        seconds, ids, torch_free = time.perf_counter() - t0, result.ids, not loaded_forbidden()
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        load_s = time.perf_counter() - started
        prompt = torch.tensor([tokenizer.encode(PROMPT)])
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=tokenizer.eos_token_id)
            seconds = time.perf_counter() - t0
        ids, torch_free = out[0, prompt.shape[1]:].tolist(), False
    return {"kind": kind, "load_s": round(load_s, 2), "tokens_per_s": round(new_tokens / seconds, 1),
            "peak_rss_mb": round(_peak_rss_mb()), "ids": ids, "torch_free": torch_free}


def prepare(root: Path) -> tuple[Path, Path]:
    """A state dir with one global adapter, exported merged and as ONNX (kept between runs)."""
    merged, onnx = root / "merged", root / "onnx"
    if (merged / "config.json").is_file() and (onnx / "model.onnx").is_file():
        return merged, onnx
    import numpy as np

    sys.path.insert(0, str(REPO / "aggregator"))
    from edgetune.adapters.lora import lora_shapes
    from edgetune.export import export_merged, export_onnx
    from edgetune.models import load_model
    from edgetune.wire import GlobalAdapter, LoraSpec
    from edgetune_aggregator.store import FleetState, StateStore

    loaded = load_model(None)
    spec = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(0, 0.02, shape).astype(np.float32)
               for name, shape in lora_shapes(spec, loaded.manifest.modules).items()}
    store = StateStore(root / "state")
    store.save_global(GlobalAdapter(1, 1, loaded.manifest.fingerprint, spec, tensors))
    store.save_state(FleetState("bench", loaded.manifest, spec, round=1, global_version=1))
    export_merged(root / "state", merged, force=True)
    export_onnx(root / "state", onnx, force=True)
    return merged, onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["onnx", "torch"])
    parser.add_argument("--folder")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "edgetune-bench" / "onnx-generate")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "onnx_generate.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.new_tokens, args.threads)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    merged, onnx = prepare(args.root)
    results: dict = {"new_tokens": args.new_tokens, "threads": args.threads, "prompt": PROMPT,
                     "onnx_model_mb": round((onnx / "model.onnx").stat().st_size / 2**20, 1)}
    for kind, folder in (("torch", merged), ("onnx", onnx)):
        command = [sys.executable, __file__, "--child", kind, "--folder", str(folder),
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise SystemExit(f"{kind} child failed:\n{done.stderr[-3000:]}")
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        log.info("%s: %s", kind, {k: v for k, v in results[kind].items() if k != "ids"})
    results["same_tokens"] = results["torch"]["ids"] == results["onnx"]["ids"]
    results["onnx_vs_torch"] = {
        "tokens_per_s": round(results["onnx"]["tokens_per_s"] / results["torch"]["tokens_per_s"], 2),
        "peak_rss": round(results["onnx"]["peak_rss_mb"] / results["torch"]["peak_rss_mb"], 2),
        "load_s": round(results["onnx"]["load_s"] / results["torch"]["load_s"], 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("torch", "onnx")}, indent=2))


if __name__ == "__main__":
    main()
