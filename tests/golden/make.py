"""How the golden messages in this folder were made (run once, with the edgetune that speaks the
wire version named in each file; the tests never run this, they decode the committed files).

    PYTHONPATH=<a checkout of that version>/sdk python tests/golden/make.py v1|v2

``v1``: with the SDK before wire v2 (commit e30c2af): what an older device sends.
``v2``: with wire v2: every message kind whose layout matters (tensors packed, quantized, signed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """The tensors the test recomputes: seeded, float32."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in shapes.items()}


SHAPES = {"layers.0.q_proj.lora_A": (2, 8), "layers.0.q_proj.lora_B": (8, 2), "layers.0.v_proj.lora_A": (2, 8),
          "layers.0.v_proj.lora_B": (4, 2)}
MANIFEST = {"layers.0.q_proj": (8, 8), "layers.0.v_proj": (4, 8)}


def messages(version: str) -> dict[str, object]:
    from edgetune.wire import (Capabilities, GlobalAdapter, Hello, LoraSpec, ModelManifest, RoundTask, TaskKind,
                               TrainMetrics, Update)

    model = ModelManifest("golden", "0123456789abcdef", MANIFEST, 32, 8, 1, 2, 1000)
    delta = tensors(SHAPES, 1)
    out = {
        "hello": Hello("dev-1", "golden", model, Capabilities(), 10),
        "update": Update("dev-1", 3, 2, 40, delta, TrainMetrics(1.5, 1024, 2.0, 4.1, 4.5, 10, 20), "run-golden"),
        "task": RoundTask(3, TaskKind.TRAIN, 2, "0123456789abcdef", LoraSpec(rank=2, alpha=4.0), run_id="run-golden"),
        "global": GlobalAdapter(2, 2, "0123456789abcdef", LoraSpec(rank=2, alpha=4.0), tensors(SHAPES, 2),
                                {"layers.0.q_proj.merged_A": tensors({"a": (1, 8)}, 3)["a"],
                                 "layers.0.q_proj.merged_B": tensors({"b": (8, 1)}, 4)["b"]}),
    }
    if version == "v2":
        from edgetune.wire import Refusal, encode_message
        from edgetune.wire.quantize import quantize_tensors

        out["update-fp16"] = Update("dev-1", 3, 2, 40, quantize_tensors(delta, "fp16"), TrainMetrics(1.5, 1024, 2.0, 4.1, 4.5),
                                    "run-golden")
        out["update-int8"] = Update("dev-1", 3, 2, 40, quantize_tensors(delta, "int8"), TrainMetrics(1.5, 1024, 2.0, 4.1, 4.5),
                                    "run-golden")
        out["task"] = RoundTask(3, TaskKind.TRAIN, 2, "0123456789abcdef", LoraSpec(rank=2, alpha=4.0), run_id="run-golden",
                                delta_precision="int8")
        out["refusal"] = Refusal("dev-1", "unsupported_precision", "the fleet sends deltas as int8; this device reads fp32",
                                 "edgetune on this device (the aggregator runs 0.2.0)", "ab" * 32)
        # the global adapter as a fleet with a fleet key publishes it: signed, whole, for the topic
        # without the chunk index (Ed25519 signatures are deterministic: same key, same bytes)
        out["global-signed"] = fleet_signer().sign(SIGNED_TOPIC, encode_message(out["global"]), nonce=bytes(range(16)))
        # (edgetune 0.3: versions and staged rollout; optional fields, so still wire v2)
        from edgetune.wire import Serving, ServingReport

        out["serving"] = Serving(7, "cd" * 32, 9, "ef" * 32, ("dev-1", "dev-4"))
        out["serving-report"] = ServingReport("dev-1", 9, "ef" * 32, True, "", 7, 12.5, 12.75)
    return out


#: the topic the signed golden is signed for, and the fleet key's seed (a test key, public here)
SIGNED_TOPIC = "edgetune/v1/golden/global"
FLEET_SEED = bytes(range(32))
#: its ``issued`` number
ISSUED = 1_765_000_000_000_000


def fleet_signer():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from edgetune.wire.signing import FleetSigner

    return FleetSigner(Ed25519PrivateKey.from_private_bytes(FLEET_SEED), floor=ISSUED - 1, now=lambda: 0)


def main() -> None:
    from edgetune.wire import encode_message

    version = sys.argv[1]
    for name, message in messages(version).items():
        (HERE / f"{version}-{name}.msgpack").write_bytes(encode_message(message))
        print(f"{version}-{name}.msgpack")


if __name__ == "__main__":
    main()
