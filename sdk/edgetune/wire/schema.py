"""The edgetune wire schema: every message kind, every topic, and the schema version.

Both sides (devices in ``edgetune``, the daemon in ``edgetune_aggregator``) import this module
and nothing else to know what goes on the wire; ``docs/protocol.md`` describes it for people.
Messages are frozen dataclasses; ``edgetune.wire.codec`` turns them into msgpack maps
``{"v": SCHEMA_VERSION, "kind": KIND, "body": {...}}`` and back, validating every field.

Rules that keep old and new peers talking: a new field gets a default (older senders omit it),
unknown fields are ignored on receipt, and anything that changes the meaning of an existing
field bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgetune/v1"
#: sender name of everything the aggregator publishes (devices have their own ids)
AGGREGATOR_ID = "aggregator"
#: EMQX's default maximum packet: payloads above it travel as chunks
DEFAULT_MAX_PACKET = 1 << 20
#: topic kinds a device publishes under, each as ``{kind}/{device_id}``
DEVICE_TOPIC_KINDS = ("hello", "presence", "update", "eval", "importance", "init", "personal", "progress", "error",
                      "artifact_request")
#: the most bytes one ArtifactData carries (it must fit one MQTT packet with its envelope)
MAX_ARTIFACT_CHUNK = 1 << 19
#: a model manifest larger than this is refused (protects the aggregator's memory)
MAX_MANIFEST_MODULES = 10_000
MAX_LAYER_DIM = 1 << 17

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_name(value: str, what: str) -> str:
    """Fleet and device names become MQTT topic levels: no wildcards, no slashes."""
    if not isinstance(value, str) or not _NAME.match(value):
        shown = repr(value[:40]) + ("…" if len(value) > 40 else "") if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{what} {shown} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def _positive(value: float, what: str, allow_zero: bool = False) -> None:
    # (written so that NaN fails: every comparison with it is False)
    if not math.isfinite(value) or not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{what} must be {'≥ 0' if allow_zero else '> 0'}, got {value}")


# --- configuration carried in tasks ---------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """Which linear layers get LoRA factors, and their rank.

    A module named ``m`` gets ``m.lora_A`` of shape (rank, in) and ``m.lora_B`` of shape
    (out, rank); the update it makes to the frozen weight is ``(alpha / rank) · B @ A``.
    ``target_modules`` match the last component(s) of a module name, as in PEFT.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    #: the adapter kind on the wire (``AdapterSpec`` is a union told apart by it)
    kind: str = "lora"

    def __post_init__(self) -> None:
        if self.kind != "lora":
            raise ValueError(f"LoraSpec.kind must be 'lora', got {self.kind!r}")
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"LoraSpec.rank must be in 1..1024, got {self.rank}")
        _positive(self.alpha, "LoraSpec.alpha")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")


PROMPT_INITS = ("vocab", "random", "text")


@dataclass(frozen=True)
class PromptSpec:
    """A soft prompt (PEFT prompt tuning): ``num_virtual_tokens`` trainable embeddings put
    before every input; the frozen model is otherwise untouched. One tensor,
    ``prompt_embeddings`` of shape (num_virtual_tokens, hidden_size).

    Its start needs the base's token embeddings, which only devices hold, so a prompt fleet
    begins with an initialization round (``TaskKind.INITIALIZE``): ``init="vocab"`` takes the
    embeddings of ``num_virtual_tokens`` vocabulary tokens drawn with the task's seed,
    ``init="random"`` Gaussian vectors (seeded) with the embedding matrix's standard deviation,
    ``init="text"`` the embeddings of ``init_text``'s tokens, repeated or cut to length (PEFT's
    SAMPLE_VOCAB, RANDOM and TEXT initialisations; PEFT's RANDOM uses a unit Gaussian, which is
    far larger than a small model's embeddings).
    """

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str = ""
    kind: str = "prompt"

    def __post_init__(self) -> None:
        if self.kind != "prompt":
            raise ValueError(f"PromptSpec.kind must be 'prompt', got {self.kind!r}")
        if not 1 <= self.num_virtual_tokens <= 1024:
            raise ValueError(f"PromptSpec.num_virtual_tokens must be in 1..1024, got {self.num_virtual_tokens}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptSpec.init {self.init!r} is not one of {', '.join(PROMPT_INITS)}")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("PromptSpec.init 'text' needs a non-empty init_text")
        if len(self.init_text) > 10_000:
            raise ValueError("PromptSpec.init_text is longer than 10,000 characters")


#: an adapter of either kind; on the wire the ``kind`` field tells which
AdapterSpec = LoraSpec | PromptSpec
ADAPTER_KINDS = ("lora", "prompt")
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
        _positive(self.learning_rate, "TrainSettings.learning_rate")
        _positive(self.weight_decay, "TrainSettings.weight_decay", allow_zero=True)
        _positive(self.max_grad_norm, "TrainSettings.max_grad_norm", allow_zero=True)
        _positive(self.proximal_mu, "TrainSettings.proximal_mu", allow_zero=True)


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


# --- device -> aggregator -------------------------------------------------------------------


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


@dataclass(frozen=True)
class Capabilities:
    """What a device can train with. ``backends``: "torch" (PyTorch: any rank, quantized
    bases, gradient checkpointing, importance scoring) and/or "ort" (ONNX Runtime artifacts:
    float32 base, fixed modules, rank up to ``max_rank``; 0 means no limit)."""

    backends: tuple[str, ...] = ("torch",)
    #: adapter kinds it trains ("lora", "prompt"); ONNX Runtime artifacts train the one built
    adapters: tuple[str, ...] = ("lora",)
    max_packet: int = DEFAULT_MAX_PACKET
    max_rank: int = 0

    def __post_init__(self) -> None:
        if self.max_rank < 0:
            raise ValueError(f"Capabilities.max_rank must be ≥ 0, got {self.max_rank}")

    @property
    def torch_free(self) -> bool:
        """Trains only through ONNX Runtime: no quantization, checkpointing or calibration."""
        return "torch" not in self.backends


@dataclass(frozen=True)
class Hello:
    """Sent (retained) when a device joins, so a daemon that starts later still sees it."""

    device_id: str
    sdk_version: str
    model: ModelManifest
    capabilities: Capabilities = field(default_factory=Capabilities)
    num_samples: int = 0
    profile: DeviceProfile | None = None

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")


@dataclass(frozen=True)
class Presence:
    """Online/offline state; the offline form is the device's MQTT last will."""

    device_id: str
    online: bool

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")


@dataclass(frozen=True)
class TrainMetrics:
    train_loss: float
    train_tokens: int
    train_seconds: float
    #: perplexity of the adapter this device just trained, on its own held-out split (None:
    #: the task asked for no scores, ``TrainSettings.eval_blocks`` = 0)
    local_ppl: float | None
    #: perplexity of the global adapter it started from, on the same split
    global_ppl: float | None
    #: transport bytes since the previous report (whole MQTT payloads)
    bytes_sent: int = 0
    bytes_received: int = 0
    #: robustness: perplexity of the global / the trained adapter on the other sites' held-out
    #: text the operator gave this device (None: it has none)
    global_robust_ppl: float | None = None
    local_robust_ppl: float | None = None


@dataclass(frozen=True)
class Update:
    """A device's contribution to one round: ``trained - global`` for every adapter tensor.

    Sending the difference rather than the factors costs the same bytes but lets the daemon
    rebuild each device's factors exactly (global + delta) and, later, quantize small deltas.
    """

    device_id: str
    round: int
    base_version: int
    num_samples: int
    delta: dict[str, np.ndarray]
    metrics: TrainMetrics
    #: the fleet run the round belongs to (``RoundTask.run_id``): with the signature, it keeps an
    #: update from an earlier run of the fleet from being replayed into a new one (empty: older SDK)
    run_id: str = ""

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if self.num_samples < 1:
            raise ValueError(f"Update.num_samples must be ≥ 1, got {self.num_samples}")


@dataclass(frozen=True)
class ImportanceReport:
    """A device's answer to a calibration round: one score per candidate weight matrix
    (module name -> smoothed sensitivity, see docs/importance.md). A few hundred floats."""

    device_id: str
    round: int
    num_samples: int
    scores: dict[str, float]
    tokens: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if self.num_samples < 1:
            raise ValueError(f"ImportanceReport.num_samples must be ≥ 1, got {self.num_samples}")
        if len(self.scores) > MAX_MANIFEST_MODULES:
            raise ValueError(f"ImportanceReport.scores has {len(self.scores)} entries (at most {MAX_MANIFEST_MODULES})")


@dataclass(frozen=True)
class AdapterInit:
    """A device's answer to an initialization round: the starting adapter computed from its
    base (for a soft prompt: token embeddings). Devices of one fleet share the base, so every
    answer must agree: the aggregator takes the one a strict majority agrees on and leaves the
    other devices out of the fleet."""

    device_id: str
    round: int
    tensors: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")


@dataclass(frozen=True)
class EvalMetrics:
    global_ppl: float
    eval_tokens: int
    #: perplexity on the other sites' held-out text (None: this device has none)
    robust_ppl: float | None = None


@dataclass(frozen=True)
class EvalReport:
    device_id: str
    round: int
    global_version: int
    num_samples: int
    metrics: EvalMetrics

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")


@dataclass(frozen=True)
class PersonalizationReport:
    """What personalizing did on one device (``Device.personalize``): the personalization
    score (perplexity on its own held-out data) and the robustness score (on the other sites'
    held-out data) of the global adapter it started from, of the locally fine-tuned one (α = 1)
    and of the personal adapter it now serves (α chosen or given)."""

    device_id: str
    global_version: int
    alpha: float
    global_ppl: float
    local_ppl: float
    personal_ppl: float
    global_robust_ppl: float | None = None
    local_robust_ppl: float | None = None
    personal_robust_ppl: float | None = None
    #: validation perplexity at each α tried, as ``{"0.3": ppl}`` (empty when α was given)
    validation: dict[str, float] = field(default_factory=dict)
    #: the settings used: learning_rate, steps, optimizer, l2_to_global
    settings: dict[str, str] = field(default_factory=dict)
    train_seconds: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"PersonalizationReport.alpha must be in [0, 1], got {self.alpha}")
        if len(self.validation) > 1000 or len(self.settings) > 100:
            raise ValueError("PersonalizationReport carries too many entries")


@dataclass(frozen=True)
class Progress:
    """Best-effort (QoS 0) training progress for dashboards and the demo's progress bars."""

    device_id: str
    round: int
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class ErrorReport:
    """A device could not do what the task asked; ``code`` is stable, ``message`` for people."""

    device_id: str
    round: int
    code: str
    message: str


# --- aggregator -> devices ------------------------------------------------------------------


QUANTIZATIONS = ("float32", "bfloat16", "int8", "nf4")


@dataclass(frozen=True)
class DevicePlan:
    """The configuration the planner chose for one device for a round."""

    rank: int
    quantization: str = "float32"
    batch_size: int = 4
    local_steps: int = 10
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"DevicePlan.quantization {self.quantization!r} not one of {', '.join(QUANTIZATIONS)}")
        for name in ("rank", "batch_size", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DevicePlan.{name} must be ≥ 1, got {getattr(self, name)}")


class TaskKind(str, Enum):
    #: score candidate weight matrices (ImportanceReport); picks the adapter layout
    CALIBRATE = "calibrate"
    #: compute the starting adapter from the base's embeddings (AdapterInit; prompt fleets)
    INITIALIZE = "initialize"
    TRAIN = "train"
    EVALUATE = "evaluate"
    FINISHED = "finished"


@dataclass(frozen=True)
class RoundTask:
    """What the fleet does now. Published retained: a device that connects late reads it."""

    round: int
    kind: TaskKind
    global_version: int
    model_fingerprint: str
    adapter: AdapterSpec = field(default_factory=LoraSpec)
    train: TrainSettings = field(default_factory=TrainSettings)
    deadline_s: float = 600.0
    #: per-device configuration from the planner; a device not listed uses adapter/train
    plans: dict[str, DevicePlan] = field(default_factory=dict)
    #: devices that sit this round out, and why (the planner found nothing that fits)
    excluded: dict[str, str] = field(default_factory=dict)
    #: identifies one fleet run (one state dir): round numbers restart with a new run
    run_id: str = ""
    #: for CALIBRATE tasks: how to score the candidate matrices (adapter.target_modules)
    importance: ImportanceSettings = field(default_factory=ImportanceSettings)
    #: the aggregator folds in updates up to this many versions late (FedBuff); 0: an update
    #: after the deadline is refused, so a device that cannot make it stops training
    max_staleness: int = 0

    def __post_init__(self) -> None:
        _positive(self.deadline_s, "RoundTask.deadline_s")
        if self.max_staleness < 0:
            raise ValueError(f"RoundTask.max_staleness must be ≥ 0, got {self.max_staleness}")


@dataclass(frozen=True)
class GlobalAdapter:
    """The merged adapter, published retained and chunked (it is usually over one packet).

    A soft prompt (``PromptSpec``) has one tensor, ``prompt_embeddings``, and no ``merged``.
    For LoRA, the weight a device runs for module ``m`` is
    ``W + merged[m.merged_B] @ merged[m.merged_A] + (alpha / rank) · tensors[m.lora_B] @ tensors[m.lora_A]``:
    ``tensors`` are the trainable factors devices start from (each truncates them to its
    planned rank), ``merged`` an optional frozen low-rank delta (already scaled) that strategies
    which restart the factors every round (``stack``) fold their aggregate into.
    """

    version: int
    round: int
    model_fingerprint: str
    adapter: AdapterSpec
    tensors: dict[str, np.ndarray]
    merged: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactOffer:
    """What the aggregator can hand out (retained): a backend's artifact folder, described by
    its manifest file (``edgetune-ort.json``, verbatim), whose file digests the device checks
    every file against; ``sizes`` for each file, and the chunk size it serves."""

    backend: str
    manifest: bytes
    sizes: dict[str, int]
    chunk_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= MAX_ARTIFACT_CHUNK:
            raise ValueError(f"ArtifactOffer.chunk_size must be in 1..{MAX_ARTIFACT_CHUNK}, got {self.chunk_size}")
        for name, size in self.sizes.items():
            check_name(name, "artifact file name")
            if size < 0:
                raise ValueError(f"ArtifactOffer.sizes[{name!r}] is negative")


@dataclass(frozen=True)
class ArtifactRequest:
    """A device asks for ``length`` bytes of artifact file ``file`` from ``offset``."""

    device_id: str
    backend: str
    file: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        check_name(self.file, "artifact file name")
        if self.offset < 0 or not 1 <= self.length <= MAX_ARTIFACT_CHUNK:
            raise ValueError(f"ArtifactRequest wants offset ≥ 0 and length in 1..{MAX_ARTIFACT_CHUNK}")


@dataclass(frozen=True)
class ArtifactData:
    """Bytes ``offset``.. of artifact file ``file`` (``size`` bytes in all), for one device."""

    file: str
    offset: int
    size: int
    data: bytes

    def __post_init__(self) -> None:
        check_name(self.file, "artifact file name")
        if self.offset < 0 or self.offset + len(self.data) > self.size or len(self.data) > MAX_ARTIFACT_CHUNK:
            raise ValueError(f"ArtifactData for {self.file} has {len(self.data)} bytes at {self.offset} of {self.size}")


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload larger than the packet limit.

    ``transfer`` is the SHA-256 (hex) of the whole payload: it groups the chunks and checks
    the reassembled bytes. Chunks may arrive twice or out of order (QoS 1 redelivery).
    """

    transfer: str
    index: int
    count: int
    size: int
    data: bytes

    def __post_init__(self) -> None:
        # (a fixed-length id: the reassembler holds ids of unfinished transfers as keys)
        if len(self.transfer) != 64 or not _HEX64.match(self.transfer):
            raise ValueError("Chunk.transfer must be the 64 hex digits of a SHA-256")


@dataclass(frozen=True)
class Signed:
    """A device message with the device's Ed25519 signature (``edgetune.wire.signing``).

    ``payload`` is the inner message, encoded; the signature covers the topic, the nonce and
    the payload's SHA-256, so a signed message cannot be replayed on another topic or another
    fleet, and the aggregator verifies it before decoding the (possibly large) payload.
    ``nonce`` is random per message and doubles as the idempotency id of an update: a device
    resending an unacknowledged update resends the same signed bytes.
    """

    device_id: str
    #: which of the device's keys signed (first 16 hex digits of SHA-256 of the raw public key)
    key_id: str
    nonce: bytes
    payload: bytes
    signature: bytes

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if len(self.nonce) != 16 or len(self.signature) != 64 or len(self.key_id) != 16:
            raise ValueError("Signed needs a 16-byte nonce, a 64-byte signature and a 16-digit key id")


@dataclass(frozen=True)
class Receipt:
    """The aggregator's answer to a device's round result, sent once the result is on disk
    (accepted) or refused: a device resends an unanswered result (same nonce) until then."""

    device_id: str
    round: int
    #: the nonce of the signed result (empty for an unsigned one)
    nonce: bytes
    accepted: bool
    #: why it was refused (a reason counted by the aggregator), empty if accepted
    reason: str = ""

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if len(self.reason) > 64 or len(self.nonce) > 16:
            raise ValueError("Receipt reason is limited to 64 characters and its nonce to 16 bytes")


#: kind name on the wire -> message class
MESSAGE_KINDS: dict[str, type] = {
    "hello": Hello,
    "presence": Presence,
    "update": Update,
    "eval": EvalReport,
    "importance": ImportanceReport,
    "init": AdapterInit,
    "personal": PersonalizationReport,
    "progress": Progress,
    "error": ErrorReport,
    "task": RoundTask,
    "global": GlobalAdapter,
    "chunk": Chunk,
    "signed": Signed,
    "receipt": Receipt,
    "artifact_offer": ArtifactOffer,
    "artifact_request": ArtifactRequest,
    "artifact_data": ArtifactData,
}
KIND_OF: dict[type, str] = {cls: kind for kind, cls in MESSAGE_KINDS.items()}


# --- topics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet: ``edgetune/v1/{fleet}/{kind}[/{device_id}]``.

    Device messages carry the device id as the last topic level, so a broker ACL can pin each
    client to its own topics (``edgetune-aggregator provision`` writes one section per device)
    and the daemon can check the sender.
    """

    fleet: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    # aggregator -> devices (retained)
    @property
    def task(self) -> str:
        return f"{self.base}/task"

    @property
    def global_adapter(self) -> str:
        """Prefix of the retained chunks ``global/{index}`` of the current global adapter."""
        return f"{self.base}/global"

    def global_chunk(self, index: int) -> str:
        return f"{self.global_adapter}/{index}"

    @property
    def aggregator_status(self) -> str:
        return f"{self.base}/aggregator"

    # device -> aggregator
    def hello(self, device_id: str) -> str:
        return f"{self.base}/hello/{device_id}"

    def presence(self, device_id: str) -> str:
        return f"{self.base}/presence/{device_id}"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{device_id}"

    def eval(self, device_id: str) -> str:
        return f"{self.base}/eval/{device_id}"

    def importance(self, device_id: str) -> str:
        return f"{self.base}/importance/{device_id}"

    def init(self, device_id: str) -> str:
        return f"{self.base}/init/{device_id}"

    def personal(self, device_id: str) -> str:
        return f"{self.base}/personal/{device_id}"

    def progress(self, device_id: str) -> str:
        return f"{self.base}/progress/{device_id}"

    def error(self, device_id: str) -> str:
        return f"{self.base}/error/{device_id}"

    def artifact_request(self, device_id: str) -> str:
        return f"{self.base}/artifact_request/{device_id}"

    # aggregator -> devices: artifacts for devices without PyTorch
    def artifact_offer(self, backend: str) -> str:
        """Retained: what ``ArtifactOffer`` the aggregator serves for ``backend``."""
        return f"{self.base}/artifacts/{backend}"

    def artifact_data(self, device_id: str) -> str:
        """The bytes one device asked for (a device's ACL can allow it only its own)."""
        return f"{self.base}/artifact_data/{device_id}"

    def receipt(self, device_id: str) -> str:
        """The aggregator's receipts for one device's results (only that device reads them)."""
        return f"{self.base}/receipt/{device_id}"

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one device-message kind from every device."""
        return f"{self.base}/{kind}/+"

    def device_of(self, topic: str) -> str | None:
        """The device id a device topic names, or None if ``topic`` is not one."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) != 2 or parts[0] not in DEVICE_TOPIC_KINDS:
            return None
        return parts[1]

    def sender_of(self, topic: str) -> str | None:
        """Who publishes on ``topic``: a device id, ``AGGREGATOR_ID``, or None if not ours."""
        device = self.device_of(topic)
        if device is not None:
            return device
        if topic in (self.task, self.aggregator_status) or topic.startswith(
            (self.global_adapter + "/", f"{self.base}/artifacts/", f"{self.base}/artifact_data/",
             f"{self.base}/receipt/")
        ):
            return AGGREGATOR_ID
        return None
