"""Predict peak memory and step time of LoRA training for a model, a configuration and a device.

Pure functions of (architecture, configuration, calibration, profile). The architecture part is
counted exactly (parameters, LoRA shapes, tensors saved for backward); the parts that depend
on the framework (the process's fixed overhead, how many copies of the logits are alive at the
peak, how much of a quantized base is held dequantized during backward, how close each kernel
gets to the device's matmul throughput) are coefficients measured on a real model by
``benchmarks/calibrate_costmodel.py`` and stored in ``calibration.json`` next to this file.

Why the quantization terms matter: on small models, bitsandbytes' CPU path keeps fp32
copies of dequantized weights for the backward pass, so nf4 can *raise* peak memory even though
the weights shrink 3×. A model that only counted weight bytes would pick nf4 exactly where it
hurts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters.lora import lora_shapes
from ..wire import DevicePlan, DeviceProfile, LoraSpec, ModelManifest

FLOAT = 4  # bytes: activations, LoRA factors, optimizer state and logits are float32

#: storage bytes per weight of a quantized linear layer (data + its scales)
BYTES_PER_WEIGHT = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "int8": 1.0,  # + one float32 scale per output row, added in weight_bytes()
    "nf4": 0.5 + 4 / 64,  # 4 bits + a float32 absmax per block of 64
}

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    """Framework coefficients, fitted to measurements (see ``docs/planner.md``)."""

    #: resident bytes of the process before any weights: interpreter, torch, transformers
    overhead_bytes: float
    #: per quantization: multiplier on the counted activation floats (allocator slack,
    #: temporaries; quantized layers save extra per-token copies for their backward)
    activation_scale: dict[str, float]
    #: float32 copies of the (batch, seq, vocab) logits alive at the peak
    logits_copies: float
    #: per quantization: fraction of the linear weights held in float32 during backward
    dequantized_fraction: dict[str, float] = field(default_factory=dict)
    #: per quantization: seconds per GFLOP relative to the profile's float32 throughput
    seconds_per_gflop: dict[str, float] = field(default_factory=dict)
    #: fixed seconds per optimizer step (Python, optimizer, data)
    step_overhead_s: float = 0.0
    #: matmul GFLOP/s per dtype of the machine the times were measured on
    reference_gflops: dict[str, float] = field(default_factory=dict)
    #: what the coefficients were fitted on (model, machine, date)
    fitted_on: str = ""
    #: coefficients fitted on another training backend ("ort": ONNX Runtime), each a dict of
    #: this class's fields; the default backend ("torch") uses the ones above
    backends: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> Calibration:
        return cls(**json.loads(Path(path).read_text()))

    def for_backend(self, backend: str) -> Calibration:
        """The coefficients of ``backend``: its own where they were measured, else (with a
        different framework's overheads, so less accurate) the default backend's."""
        if backend == "torch" or backend not in self.backends:
            return self
        return Calibration(**{**self.backends[backend], "backends": {}})

    def save(self, path: Path = CALIBRATION_FILE) -> None:
        from ..atomic import atomic_write_json

        atomic_write_json(path, asdict(self))


@dataclass(frozen=True)
class Arch:
    """The sizes of a decoder-only transformer that training cost depends on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_parameters: int
    modules: dict[str, tuple[int, int]]

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> Arch:
        missing = [f for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_parameters")
                   if not getattr(manifest, f)]
        if missing:
            raise ValueError(f"model manifest of {manifest.name} lacks {', '.join(missing)}: "
                             "the device runs an SDK too old for planning")
        return cls(manifest.vocab_size, manifest.hidden_size, manifest.num_layers, manifest.num_heads,
                   manifest.num_parameters, dict(manifest.modules))

    @property
    def linear_parameters(self) -> int:
        """Weights of the transformer blocks' linear layers: what quantization shrinks."""
        return sum(out * inp for out, inp in self.modules.values())

    @property
    def per_layer_linear_out(self) -> float:
        """Σ out_features of one block's linear layers (their outputs are saved activations)."""
        return sum(out for out, _ in self.modules.values()) / self.num_layers

    @property
    def per_layer_linear_in(self) -> float:
        return sum(inp for _, inp in self.modules.values()) / self.num_layers


@dataclass(frozen=True)
class Config:
    """One candidate configuration for one device."""

    rank: int
    quantization: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    #: the training framework: "torch", or "ort" (ONNX Runtime, float32 only)
    backend: str = "torch"
    #: what its update travels as ("fp32", "fp16", "int8")
    delta_precision: str = "fp32"

    def plan(self, local_steps: int) -> DevicePlan:
        return DevicePlan(self.rank, self.quantization, self.batch_size, local_steps, self.gradient_checkpointing,
                          self.delta_precision)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident bytes, by what holds them."""

    overhead: float
    weights: float
    adapter: float
    activations: float
    logits: float
    dequantized: float

    @property
    def total(self) -> float:
        return self.overhead + self.weights + self.adapter + self.activations + self.logits + self.dequantized


def lora_parameters(arch: Arch, config: Config) -> int:
    spec = LoraSpec(rank=config.rank, target_modules=config.target_modules)
    return sum(a * b for a, b in lora_shapes(spec, arch.modules).values())


def weight_bytes(arch: Arch, quantization: str) -> float:
    """Frozen base at rest: linear layers at their precision, the rest (embeddings, norms) float32."""
    linear = arch.linear_parameters
    scales = sum(out for out, _ in arch.modules.values()) * FLOAT if quantization == "int8" else 0
    return linear * BYTES_PER_WEIGHT[quantization] + scales + (arch.num_parameters - linear) * FLOAT


def activation_floats(arch: Arch, config: Config) -> float:
    """Floats saved for backward in one step, counted from the block's structure.

    Per token and block: the inputs and outputs of every linear layer (inputs for the weight's
    backward, outputs feeding the elementwise ops that save them) and the two norms' inputs; per
    head and query, the attention scores and their softmax (eager attention saves both). With
    gradient checkpointing only each block's input is kept, plus one block being recomputed.
    The calibrated ``activation_scale`` absorbs what this count misses (shared inputs, RoPE,
    allocator slack); the count gets the scaling in batch, length, width and depth right.
    """
    tokens = config.batch_size * config.seq_len
    per_token = 2 * arch.hidden_size + arch.per_layer_linear_in + arch.per_layer_linear_out
    attention = 2 * arch.num_heads * config.seq_len  # scores + probabilities, per token
    block = tokens * (per_token + attention)
    if config.gradient_checkpointing:
        return tokens * arch.hidden_size * arch.num_layers + block
    return block * arch.num_layers


def estimate_memory(arch: Arch, config: Config, calibration: Calibration) -> MemoryEstimate:
    calibration = calibration.for_backend(config.backend)
    tokens = config.batch_size * config.seq_len
    adapter = lora_parameters(arch, config) * FLOAT * 4  # weights, gradients, Adam's two moments
    dequantized = calibration.dequantized_fraction.get(config.quantization, 0.0) * arch.linear_parameters * FLOAT
    return MemoryEstimate(
        overhead=calibration.overhead_bytes,
        weights=weight_bytes(arch, config.quantization),
        adapter=adapter,
        activations=calibration.activation_scale[config.quantization] * activation_floats(arch, config) * FLOAT,
        logits=calibration.logits_copies * tokens * arch.vocab_size * FLOAT,
        dequantized=dequantized,
    )


def step_gflop(arch: Arch, config: Config) -> float:
    """GFLOP of one optimizer step: forward, backward to the inputs (the base is frozen, so no
    weight gradients but the LoRA ones), and one more forward with checkpointing."""
    tokens = config.batch_size * config.seq_len
    matmuls = 2 * tokens * (arch.linear_parameters + arch.vocab_size * arch.hidden_size)
    attention = 4 * tokens * config.seq_len * arch.hidden_size * arch.num_layers
    lora = 6 * tokens * lora_parameters(arch, config)
    forward = matmuls + attention
    passes = 3 if config.gradient_checkpointing else 2
    return (forward * passes + lora) / 1e9


def estimate_scoring_memory(arch: Arch, candidates: int, batch_size: int, seq_len: int,
                            calibration: Calibration) -> float:
    """Peak bytes of importance scoring (a calibration round) on a float32 base: the training
    estimate of a tiny adapter, plus the two bfloat16 moving averages kept for each of the
    ``candidates`` weights scored (gradients are folded in and dropped one matrix at a time,
    ``edgetune.trainers.importance``). An estimate from the structure, not a calibrated fit."""
    base = estimate_memory(arch, Config(1, "float32", batch_size, seq_len), calibration).total
    return base + candidates * (2 + 2)


def eval_gflop(arch: Arch, config: Config, tokens: int) -> float:
    """GFLOP of evaluating ``tokens`` held-out tokens in blocks of ``config.seq_len``: one
    forward pass (the base's matmuls, the LM head, attention, the adapter)."""
    matmuls = 2 * tokens * (arch.linear_parameters + arch.vocab_size * arch.hidden_size)
    attention = 2 * tokens * config.seq_len * arch.hidden_size * arch.num_layers
    return (matmuls + attention + 2 * tokens * lora_parameters(arch, config)) / 1e9


def estimate_eval_seconds(arch: Arch, config: Config, profile: DeviceProfile, calibration: Calibration,
                          tokens: int) -> float:
    """Seconds to evaluate ``tokens`` held-out tokens on ``profile``'s device, timed like a
    training step's GFLOP (an estimate: inference runs no backward pass and no optimizer)."""
    if tokens <= 0:
        return 0.0
    calibration = calibration.for_backend(config.backend)
    dtype = compute_dtype(config.quantization)
    device, reference = profile.gflops.get(dtype), calibration.reference_gflops.get(dtype)
    per_gflop = calibration.seconds_per_gflop.get(config.quantization)
    if not device or not reference or per_gflop is None:
        return 0.0  # (estimate_step_seconds refuses such a configuration with the reason)
    return eval_gflop(arch, config, tokens) * per_gflop * reference / device


def compute_dtype(quantization: str) -> str:
    """The dtype the matmuls of a base run in: bf16 layers multiply in bf16; int8 and nf4
    layers are dequantized to float32 on CPU."""
    return "bfloat16" if quantization == "bfloat16" else "float32"


def estimate_step_seconds(arch: Arch, config: Config, profile: DeviceProfile, calibration: Calibration) -> float:
    """Seconds per optimizer step on ``profile``'s device: the calibration machine's measured
    fixed seconds per step and seconds per GFLOP, scaled by how much faster or slower the
    device's matmuls are in the dtype that quantization computes in (an assumption: the kernels
    and the interpreter scale alike, as the fleet simulator also assumes)."""
    calibration = calibration.for_backend(config.backend)
    dtype = compute_dtype(config.quantization)
    device = profile.gflops.get(dtype)
    reference = calibration.reference_gflops.get(dtype)
    if not device or not reference:
        raise ValueError(f"no {dtype} throughput for {profile.name} or the calibration: cannot time {config.quantization}")
    per_gflop = calibration.seconds_per_gflop.get(config.quantization)
    if per_gflop is None:
        raise ValueError(f"no calibration for quantization {config.quantization!r}")
    # The fixed part (Python, the optimizer, data) runs on the same cores, so it scales with the
    # device's speed too: a Raspberry Pi's interpreter is as much slower as its matmuls.
    return (calibration.step_overhead_s + step_gflop(arch, config) * per_gflop) * reference / device
