"""Bytes on the wire per device and round, against the size of the model they adapt.

For SmolLM2-135M (its real manifest: every linear layer's shape, the parameter count), the
messages a device exchanges in one train round are built and encoded exactly as the SDK and
the daemon do it (``Channel.prepare``: msgpack, Ed25519-signed for the uplink, chunked over
1 MiB):

- **up**: the device's ``Update`` (its adapter delta, metrics), signed;
- **down**: the retained ``GlobalAdapter`` it trains on, plus the round's ``RoundTask``, both
  signed with the fleet key (``--fleet-key``). With ``fedit``/``hetlora`` the global is the
  trainable factors; with ``stack``/``svd`` it also carries the frozen merged delta, which the
  daemon bounds to the adapter's rank by default (so the download is at most twice fedit's),
  shown here at that bound.

LoRA at ranks 4, 8, 16 on q,v, and a soft prompt of 20 virtual tokens, each with its deltas as
float32, float16 and int8 (``--delta-precision``: both ways). No training: the sizes depend on
shapes, not values. Usage::

    python benchmarks/communication.py [--markdown] [--docs docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "int8")
#: the roadmap's bounds on a device's traffic per round, % of the model (LoRA r=8)
BOUNDS = {"fp32": 0.5, "int8": 0.15}


def sizes(manifest, spec, merged_rank: int = 0, precision: str = "fp32") -> dict:
    from edgetune.adapters.registry import adapter_shapes
    from edgetune.transport.channel import Channel
    from edgetune.transport.memory import MemoryBroker, MemoryTransport
    from edgetune.wire import GlobalAdapter, RoundTask, TaskKind, Topics, TrainMetrics, Update
    from edgetune.wire.quantize import quantize_tensors
    from edgetune.wire.signing import FleetSigner, Signer

    rng = np.random.default_rng(0)
    shapes = adapter_shapes(spec, manifest)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    topics = Topics("fleet")
    transport = MemoryTransport(MemoryBroker(), "d")
    device, aggregator = (Channel(transport, topics.sender_of, signer=Signer.generate("dev-1")),
                          Channel(transport, topics.sender_of, signer=FleetSigner.generate()))
    update = Update("dev-1", 3, 2, 500, quantize_tensors(tensors, precision),
                    TrainMetrics(3.1, 4096, 12.0, 41.0, 44.0, 0, 0), "run")
    up = len(device.prepare(topics.update("dev-1"), update)[0])
    merged = {}
    if merged_rank:
        for name in (n.removesuffix(".lora_A") for n in shapes if n.endswith(".lora_A")):
            o, i = manifest.modules[name]
            merged[f"{name}.merged_B"] = rng.standard_normal((o, merged_rank)).astype(np.float32)
            merged[f"{name}.merged_A"] = rng.standard_normal((merged_rank, i)).astype(np.float32)
    adapter = GlobalAdapter(2, 2, manifest.fingerprint, spec, quantize_tensors(tensors, precision),
                            quantize_tensors(merged, precision))
    task = RoundTask(3, TaskKind.TRAIN, 2, manifest.fingerprint, spec, delta_precision=precision)
    down = (len(aggregator.prepare(topics.global_adapter, adapter)[0])
            + len(aggregator.prepare(topics.task, task)[0]))
    return {"parameters": sum(t.size for t in tensors.values()), "up": up, "down": down, "precision": precision}


def run() -> dict:
    from edgetune.models import load_model
    from edgetune.wire import LoraSpec, PromptSpec

    loaded = load_model(None)
    manifest = loaded.manifest
    model_bytes = manifest.num_parameters * 4  # the frozen base as float32 tensors
    rows = []
    for rank in (4, 8, 16):
        spec = LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=("q_proj", "v_proj"))
        for precision in PRECISIONS:
            rows.append({"adapter": f"LoRA r={rank} on q,v", "strategy": "fedit, hetlora",
                         **sizes(manifest, spec, precision=precision)})
        for precision in PRECISIONS:
            rows.append({"adapter": f"LoRA r={rank} on q,v", "strategy": "stack, svd (merged delta at its bound)",
                         **sizes(manifest, spec, merged_rank=rank, precision=precision)})
    for precision in PRECISIONS:
        rows.append({"adapter": "soft prompt, 20 tokens", "strategy": "dense",
                     **sizes(manifest, PromptSpec(20), precision=precision)})
    return {"model": manifest.name, "model_parameters": manifest.num_parameters, "model_bytes": model_bytes,
            "date": date.today().isoformat(), "rows": rows}


def markdown(result: dict) -> str:
    mb = result["model_bytes"]
    lines = ["<!-- communication:begin -->", "## Communication per device and round (issues 14, 17)", "",
             f"`python benchmarks/communication.py --markdown` ({result['date']}): the messages of one train round, "
             f"encoded as the SDK and the daemon encode them (wire v2: msgpack, tensors packed; the update signed by "
             f"the device, the global adapter and task by the fleet key). The model: {result['model']}, "
             f"{result['model_parameters']:,} parameters, {mb / 1e6:,.0f} MB as float32.", "",
             "| adapter | strategy | deltas | trainable parameters | up (update) | down (global + task) | up ÷ model | "
             "down ÷ model | ÷ float32 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {(r["adapter"], r["strategy"]): r for r in result["rows"] if r["precision"] == "fp32"}
    for r in result["rows"]:
        f32 = base[(r["adapter"], r["strategy"])]
        lines.append(f"| {r['adapter']} | {r['strategy']} | {r['precision']} | {r['parameters']:,} | "
                     f"{r['up'] / 1e6:.2f} MB | {r['down'] / 1e6:.2f} MB | {100 * r['up'] / mb:.3f} % | "
                     f"{100 * r['down'] / mb:.3f} % | {r['up'] / f32['up']:.3f} up, {r['down'] / f32['down']:.3f} down |")
    verdicts = {}
    for precision, bound in BOUNDS.items():
        verdicts[precision] = []
        for r in (r for r in result["rows"] if r["adapter"].startswith("LoRA r=8") and r["precision"] == precision):
            for way in ("up", "down"):
                share = 100 * r[way] / mb
                verdicts[precision].append(f"{way} with {r['strategy'].split(' (')[0]}: {share:.2f} % "
                                           f"({'met' if share < bound else 'missed'})")
    lines += ["", "Against the roadmap's bounds per device and round at LoRA r=8: under 0.5 % of the model with float32 "
              "deltas: " + "; ".join(verdicts["fp32"]) + ". Under 0.15 % with int8 deltas: " + "; ".join(verdicts["int8"])
              + ". The exact strategies' download is bounded at twice fedit's by the merged rank "
              "(`--merged-rank`, docs/aggregation.md); unbounded, it grows every round. What each precision costs in "
              "quality: the FedPipe fleet's precision arms below.", "<!-- communication:end -->"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--docs", type=Path, help="write the section into this Markdown file")
    args = parser.parse_args()
    result = run()
    text = markdown(result)
    print(text if args.markdown else "\n".join(f"{r['adapter']:<24} {r['strategy']:<40} up {r['up']:>10,} B  "
                                               f"down {r['down']:>10,} B" for r in result["rows"]))
    if args.docs:
        from edgetune.bench.sections import replace_section

        replace_section(args.docs, text, "<!-- communication:begin -->", "<!-- communication:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
