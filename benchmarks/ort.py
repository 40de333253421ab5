"""The ONNX Runtime trainer against the PyTorch trainer on SmolLM2-135M, and the size of a
device environment without PyTorch against one with it.

Both trainers run in fresh subprocesses (so peak RSS is each one's own) on the same batches:
LoRA r=8 on q_proj and v_proj, batches of 4 × 128 tokens packed from the Debian ``fortunes``
category ``computers``, the same zero-B start, AdamW at lr 1e-3 with clipping at 1.0. Reported:
tokens/s over the steps after the first (which warms up allocators and kernels), median step
time, peak RSS over the whole process and over training alone, the time to get ready (model
load for torch; file digests, checkpoint, sessions and the weights hash for ORT), held-out
perplexity after training, and how far the two backends' step losses are apart. The ORT child
runs with torch and transformers hidden (``tests/helpers/torch_free.py``), as on a device without them:
with torch merely installed, ``import onnxruntime`` imports it (``onnxruntime.tools``).

``--envs`` also builds two virtual environments with pip and measures their installed size:
what a torch-free device needs (``edgetune[ort]``: onnxruntime-training, onnx, tokenizers,
numpy, msgpack, paho-mqtt, pyyaml) and what a PyTorch device needs (``edgetune[torch]``).
The onnxruntime-training wheel carries ONNX Runtime's CUDA provider library, which a CPU
device never loads; the torch-free environment is measured again without it, after checking
that it still trains (a few steps on tiny-model artifacts, in that environment).

    python benchmarks/ort.py [--steps 12] [--threads 2] [--envs] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("ort-bench")
REPO = Path(__file__).resolve().parent.parent
HELDOUT = 8
BLOCKED = ("torch", "transformers", "peft")


def _rss_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(backend: str, artifacts: str, steps: int, threads: int, batch: int, seq_len: int) -> dict:
    if backend == "ort":  # before anything imports torch
        sys.path.insert(0, str(REPO / "tests"))
        from helpers.torch_free import hide

        hide()
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from fortunes import load_category

    from edgetune.adapters.lora import init_lora
    from edgetune.data import pack_blocks
    from edgetune.wire import LoraSpec, TrainSettings

    spec = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    started = time.perf_counter()
    if backend == "ort":
        from edgetune.ort.model import OrtModel
        from edgetune.trainers.ort_lora import OrtLoraTrainer

        model = OrtModel.load(Path(artifacts))
        trainer = OrtLoraTrainer(model.folder, spec, threads=threads, manifest=model.artifacts)
        tokenizer, modules = model.tokenizer, model.manifest.modules
    else:
        import torch

        from edgetune.models import load_model
        from edgetune.trainers.torch_lora import TorchLoraTrainer

        torch.set_num_threads(threads)
        loaded = load_model(None)
        trainer = TorchLoraTrainer(loaded, spec, threads=threads)
        tokenizer, modules = loaded.tokenizer, loaded.manifest.modules
    ready_s = time.perf_counter() - started
    texts = load_category("computers")
    blocks = pack_blocks([tokenizer.encode(t) for t in texts], seq_len, tokenizer.eos_token_id)
    train, heldout = blocks[:-HELDOUT], blocks[-HELDOUT:]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))[: steps * batch]
    batches = [train[order[i * batch:(i + 1) * batch]] for i in range(steps)]
    trainer.set_adapter(init_lora(spec, modules, seed=0))
    settings = TrainSettings(local_steps=steps, batch_size=batch, seq_len=seq_len, learning_rate=1e-3)
    times, losses = [], []
    last = [time.perf_counter()]

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        losses.append(loss)

    rss_ready, peak_ready = _rss_mb()
    _reset_peak_rss()
    last[0] = time.perf_counter()
    trainer.train(iter(batches), settings, on_step)
    _, peak_train = _rss_mb()
    ppl = trainer.perplexity(heldout, batch_size=4)
    _, peak_all = _rss_mb()
    steady = times[1:]
    return {
        "backend": backend,
        "ready_s": round(ready_s, 2),
        "median_step_s": round(statistics.median(steady), 3),
        "tokens_per_s": round(batch * seq_len * len(steady) / sum(steady), 1),
        "losses": [round(x, 5) for x in losses],
        "heldout_ppl": round(ppl, 3),
        "rss_ready_mb": round(rss_ready, 0),
        "peak_rss_mb": round(max(peak_ready, peak_all), 0),
        "peak_rss_training_mb": round(peak_train, 0),
        "imported_torch": any(m.split(".")[0] in BLOCKED for m in sys.modules),
    }


def run_child(backend: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", backend, "--artifacts", str(args.artifacts),
               "--steps", str(args.steps), "--threads", str(args.threads), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{backend} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CHECK = """
import sys, numpy as np
from edgetune.trainers.ort_lora import OrtLoraTrainer
from edgetune.wire import LoraSpec, TrainSettings
trainer = OrtLoraTrainer(sys.argv[1], LoraSpec(rank=4, alpha=8.0))
settings = TrainSettings(local_steps=3, batch_size=2, seq_len=16)
rng = np.random.default_rng(0)
result = trainer.train(iter([rng.integers(0, 256, (2, 16)) for _ in range(3)]), settings)
assert result.steps == 3 and np.isfinite(result.final_loss) and "torch" not in sys.modules
print("trained", result.final_loss)
"""


def env_size(packages: list[str], folder: Path, check_artifacts: Path | None = None) -> dict:
    """Install ``packages`` into a fresh venv and measure site-packages (what pip adds); with
    ``check_artifacts``, also without ORT's CUDA provider, after training in the venv."""
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    empty = _du(folder)
    started = time.perf_counter()
    subprocess.run(pip + packages, check=True)
    subprocess.run(pip + ["--no-deps", "-e", str(REPO)], check=True)
    freeze = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.split()
    result = {"installed_mb": round((_du(folder) - empty) / 2**20, 1), "packages": len(freeze),
              "install_s": round(time.perf_counter() - started, 1),
              "has_torch": any(p.startswith("torch==") for p in freeze)}
    if check_artifacts is not None:
        cuda = list(folder.rglob("libonnxruntime_providers_cuda*.so"))
        result["cuda_provider_mb"] = round(sum(f.stat().st_size for f in cuda) / 2**20, 1)
        for f in cuda:
            f.unlink()
        done = subprocess.run([str(folder / "bin" / "python"), "-c", CHECK, str(check_artifacts)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"the torch-free environment does not train without the CUDA provider:\n{done.stderr[-2000:]}")
        result["trains_without_cuda_provider"] = True
        result["without_cuda_provider_mb"] = round((_du(folder) - empty) / 2**20, 1)
    return result


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _project_extra(name: str) -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for r in project["optional-dependencies"][name] if not r.startswith("edgetune[")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["ort", "torch"])
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "edgetune-bench" / "ort-smollm2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--envs", action="store_true", help="also measure torch-free and PyTorch environments")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "ort.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.artifacts), args.steps, args.threads, args.batch, args.seq_len)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results: dict = {"steps": args.steps, "threads": args.threads, "batch": args.batch, "seq_len": args.seq_len}
    if not (args.artifacts / "edgetune-ort.json").is_file():
        from edgetune.ort.build import build_artifacts

        started = time.perf_counter()
        build_artifacts(None, args.artifacts, rank=8, alpha=16.0, targets=("q_proj", "v_proj"), force=True)
        results["build_s"] = round(time.perf_counter() - started, 1)
    results["artifact_mb"] = {f.name: round(f.stat().st_size / 2**20, 1) for f in sorted(args.artifacts.iterdir())}
    for backend in ("torch", "ort"):
        log.info("training with %s", backend)
        results[backend] = run_child(backend, args)
        log.info("%s: %s", backend, {k: v for k, v in results[backend].items() if k != "losses"})
    torch_losses, ort_losses = results["torch"]["losses"], results["ort"]["losses"]
    results["max_rel_loss_gap"] = max(abs(a - b) / abs(a) for a, b in zip(torch_losses, ort_losses))
    results["ort_vs_torch"] = {
        "tokens_per_s": round(results["ort"]["tokens_per_s"] / results["torch"]["tokens_per_s"], 2),
        "peak_rss": round(results["ort"]["peak_rss_mb"] / results["torch"]["peak_rss_mb"], 2),
        "peak_rss_training": round(results["ort"]["peak_rss_training_mb"] / results["torch"]["peak_rss_training_mb"], 2),
    }
    if args.envs:
        root = Path(tempfile.mkdtemp(prefix="edgetune-envs-"))
        try:
            from edgetune.ort.build import build_artifacts

            build_artifacts("tiny-llama", root / "tiny-artifacts", rank=4, alpha=8.0)
            results["env_ort"] = env_size(_project_extra("ort"), root / "ort", root / "tiny-artifacts")
            results["env_torch"] = env_size(_project_extra("torch"), root / "torch")
            results["env_ratio"] = round(results["env_ort"]["installed_mb"] / results["env_torch"]["installed_mb"], 3)
            results["env_ratio_without_cuda_provider"] = round(
                results["env_ort"]["without_cuda_provider_mb"] / results["env_torch"]["installed_mb"], 3)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("torch", "ort")}, indent=2))


if __name__ == "__main__":
    main()
