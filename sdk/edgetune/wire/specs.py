"""What configures training and describes a device or a model: adapter specs (each kind's own,
re-exported here), training settings, model manifests, device profiles and capabilities, and
the planner's per-device plan. They travel inside messages (``messages.py``) and in files
(profiles, manifests)."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.lora.spec import LoraSpec
from ..adapters.prompt.spec import PROMPT_INITS, PromptSpec
from ..adapters.registry import KINDS, spec_union
from .names import check_positive

__all__ = ["DEFAULT_MAX_PACKET", "MAX_MANIFEST_MODULES", "MAX_LAYER_DIM", "LoraSpec", "PROMPT_INITS", "PromptSpec", "AdapterSpec", "ADAPTER_KINDS", "CLIENT_OPTIMIZERS", "ALGORITHMS", "TrainSettings", "ImportanceSettings", "ModelManifest", "DeviceProfile", "Capabilities", "WIRE_VERSIONS", "DELTA_PRECISIONS", "QUANTIZATIONS", "DevicePlan"]

#: EMQX's default maximum packet: payloads above it travel as chunks
DEFAULT_MAX_PACKET = 1 << 20
#: a model manifest larger than this is refused (protects the aggregator's memory)
MAX_MANIFEST_MODULES = 10_000
MAX_LAYER_DIM = 1 << 17


#: an adapter of any registered kind (``edgetune.adapters.registry``); on the wire its ``kind``
#: field tells which. The specs are their kinds' own (``edgetune.adapters.lora.spec``, …).
AdapterSpec = spec_union()
ADAPTER_KINDS = tuple(KINDS)
CLIENT_OPTIMIZERS = ("adamw", "sgd")
#: fedavg: local steps, the update is trained − global; fedsgd: one gradient per round, the
#: update is −gradient and the server steps with its own learning rate
ALGORITHMS = ("fedavg", "fedsgd")


@dataclass(frozen=True)
class TrainSettings:
    """How a device trains in one round. ``seed`` makes a device's round reproducible."""

    local_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seq_len: int = 128
    seed: int = 0
    #: FedProx: add mu/2 · ‖θ − θ_start‖² over the adapter factors to the local loss (0: off)
    proximal_mu: float = 0.0
    #: the device's optimizer: "adamw" or "sgd" (plain SGD, weight decay coupled as in torch)
    optimizer: str = "adamw"
    #: "fedavg" (train local_steps, send trained − global) or "fedsgd" (send −∇ of one batch of
    #: batch_size × grad_accum blocks at the global adapter; the server's learning rate steps)
    algorithm: str = "fedavg"
    #: > 0: train this many passes over the device's own data instead of local_steps
    local_epochs: int = 0
    #: held-out blocks (of seq_len tokens) a device evaluates per round, at most: evaluation is
    #: part of a round's time, which the planner budgets for slow devices. 0: train rounds
    #: score nothing (the fleet is evaluated elsewhere); evaluation rounds score one block
    eval_blocks: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.eval_blocks <= 100_000:
            raise ValueError(f"TrainSettings.eval_blocks must be in 0..100000, got {self.eval_blocks}")
        for name in ("local_steps", "batch_size", "grad_accum", "seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"TrainSettings.{name} must be ≥ 1, got {value}")
        if self.optimizer not in CLIENT_OPTIMIZERS:
            raise ValueError(f"TrainSettings.optimizer {self.optimizer!r} is not one of {', '.join(CLIENT_OPTIMIZERS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"TrainSettings.algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if not 0 <= self.local_epochs <= 10_000:
            raise ValueError(f"TrainSettings.local_epochs must be in 0..10000, got {self.local_epochs}")
        check_positive(self.learning_rate, "TrainSettings.learning_rate")
        check_positive(self.weight_decay, "TrainSettings.weight_decay", allow_zero=True)
        check_positive(self.max_grad_norm, "TrainSettings.max_grad_norm", allow_zero=True)
        check_positive(self.proximal_mu, "TrainSettings.proximal_mu", allow_zero=True)


@dataclass(frozen=True)
class ImportanceSettings:
    """How devices score candidate weight matrices in a calibration round (docs/importance.md):
    sensitivity |w · ∂L/∂w| over ``batches`` batches, smoothed AdaLoRA-style with exponential
    moving averages of the sensitivity (``beta1``) and of its uncertainty (``beta2``)."""

    batches: int = 8
    beta1: float = 0.85
    beta2: float = 0.85
    #: blocks per scoring batch, at most (a device planned smaller uses its planned batch):
    #: scoring keeps every candidate's weight gradient, so it is slower and larger than a step
    batch_size: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.batches <= 10_000:
            raise ValueError(f"ImportanceSettings.batches must be in 1..10000, got {self.batches}")
        if not 1 <= self.batch_size <= 1_024:
            raise ValueError(f"ImportanceSettings.batch_size must be in 1..1024, got {self.batch_size}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ImportanceSettings.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelManifest:
    """What a device's frozen base looks like, so the daemon can validate adapter shapes
    without loading the model. ``modules`` maps each linear layer to (out_features, in_features).
    ``fingerprint`` hashes the architecture: devices of one fleet must agree on it."""

    name: str
    fingerprint: str
    modules: dict[str, tuple[int, int]]
    # Sizes the cost model needs beyond the linear layers (0: unknown, from an older SDK).
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_parameters: int = 0

    def __post_init__(self) -> None:
        if len(self.modules) > MAX_MANIFEST_MODULES:
            raise ValueError(f"ModelManifest.modules lists {len(self.modules)} layers (at most {MAX_MANIFEST_MODULES})")
        for name, (out_features, in_features) in self.modules.items():
            if not (0 < out_features <= MAX_LAYER_DIM and 0 < in_features <= MAX_LAYER_DIM):
                raise ValueError(f"ModelManifest.modules[{name!r}] has shape ({out_features}, {in_features}); "
                                 f"dimensions must be in 1..{MAX_LAYER_DIM}")


@dataclass(frozen=True)
class DeviceProfile:
    """What a device can afford, measured by ``edgetune profile`` or taken from a datasheet.

    The planner reads it to choose the device's adapter rank, base quantization and batch size.
    ``memory_bytes`` is what training may use: the cgroup limit or available memory, less what
    other processes hold, not the machine's total RAM.
    """

    name: str
    memory_bytes: int
    #: sustained dense matmul throughput per dtype ("float32", "bfloat16"), GFLOP/s
    gflops: dict[str, float]
    cores: int = 1
    #: base-weight quantizations that work here besides float32 ("bfloat16", "int8", "nf4")
    quantization: tuple[str, ...] = ()
    uplink_mbps: float | None = None
    #: where the figures come from: "measured <date> by edgetune profile" or a datasheet
    source: str = ""
    #: what the site's downlink sustains (None: as the uplink); the global adapter comes this way
    downlink_mbps: float | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"DeviceProfile.memory_bytes must be > 0, got {self.memory_bytes}")
        if not self.gflops or any(v <= 0 for v in self.gflops.values()):
            raise ValueError("DeviceProfile.gflops needs at least one dtype with a value > 0")
        if self.cores < 1:
            raise ValueError(f"DeviceProfile.cores must be ≥ 1, got {self.cores}")
        unknown = set(self.quantization) - {"bfloat16", "int8", "nf4"}
        if unknown:
            raise ValueError(f"DeviceProfile.quantization has unknown {sorted(unknown)}; allowed: bfloat16, int8, nf4")


#: the wire versions this SDK reads from peers (``codec.PEER_VERSIONS``; a test keeps them equal)
WIRE_VERSIONS = (2,)
#: what a delta may travel as (``quantize.PRECISIONS``; a test keeps them equal)
DELTA_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Capabilities:
    """What a device can train with, and what of the wire it speaks: the aggregator serves a
    device only what it can read (and refuses, saying what to upgrade, what it cannot).

    ``backends``: "torch" (PyTorch: any rank, quantized bases, gradient checkpointing,
    importance scoring) and/or "ort" (ONNX Runtime artifacts: float32 base, fixed modules, rank
    up to ``max_rank``; 0 means no limit)."""

    backends: tuple[str, ...] = ("torch",)
    #: adapter kinds it trains ("lora", "prompt"); ONNX Runtime artifacts train the one built
    adapters: tuple[str, ...] = ("lora",)
    max_packet: int = DEFAULT_MAX_PACKET
    max_rank: int = 0
    #: wire versions it reads (a later aggregator picks the newest both speak); a hello's own
    #: envelope says which version it was written in
    wire: tuple[int, ...] = WIRE_VERSIONS
    #: delta precisions it reads and writes ("fp32", "fp16", "int8"); tensors are packed
    #: (one buffer and an index) in every v2 message
    precisions: tuple[str, ...] = DELTA_PRECISIONS
    #: applies a global adapter's frozen ``merged`` delta (strategies that fold their aggregate
    #: into one, ``stack``); a device that cannot would train on the wrong model
    merged_delta: bool = True
    #: verifies the aggregator's signature on what it publishes (it holds the fleet's key)
    verifies_downlink: bool = False
    #: serves the version the fleet promotes and reports on it (edgetune ≥ 0.3): only such a
    #: device can be a staged rollout's canary (docs/operations.md)
    serves_versions: bool = False

    def __post_init__(self) -> None:
        if self.max_rank < 0:
            raise ValueError(f"Capabilities.max_rank must be ≥ 0, got {self.max_rank}")
        if not self.wire or any(not isinstance(v, int) or v < 1 for v in self.wire):
            raise ValueError(f"Capabilities.wire must list wire versions (integers ≥ 1), got {self.wire!r}")
        if len(self.precisions) > 16 or any(not isinstance(p, str) or len(p) > 16 for p in self.precisions):
            raise ValueError("Capabilities.precisions must be at most 16 names of at most 16 characters")

    @property
    def torch_free(self) -> bool:
        """Trains only through ONNX Runtime: no quantization, checkpointing or calibration."""
        return "torch" not in self.backends


QUANTIZATIONS = ("float32", "bfloat16", "int8", "nf4")


@dataclass(frozen=True)
class DevicePlan:
    """The configuration the planner chose for one device for a round."""

    rank: int
    quantization: str = "float32"
    batch_size: int = 4
    local_steps: int = 10
    gradient_checkpointing: bool = False
    #: what this device sends its update as ("": the task's ``delta_precision``): the planner
    #: quantizes where the device's uplink would otherwise cost it training steps
    delta_precision: str = ""

    def __post_init__(self) -> None:
        if self.delta_precision and self.delta_precision not in DELTA_PRECISIONS:
            raise ValueError(f"DevicePlan.delta_precision {self.delta_precision[:16]!r} not one of "
                             f"{', '.join(DELTA_PRECISIONS)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"DevicePlan.quantization {self.quantization!r} not one of {', '.join(QUANTIZATIONS)}")
        for name in ("rank", "batch_size", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DevicePlan.{name} must be ≥ 1, got {getattr(self, name)}")
