"""Every message on the wire, and the name each travels under (``MESSAGE_KINDS``).

Both sides (devices in ``edgetune``, the daemon in ``edgetune_aggregator``) know the wire through
``edgetune.wire`` alone; ``docs/protocol.md`` describes it for people. Messages are frozen
dataclasses; ``edgetune.wire.codec`` turns them into msgpack maps
``{"v": SCHEMA_VERSION, "kind": KIND, "body": {...}}`` and back, validating every field. Which
topic carries which message, with what QoS, and whether it must be signed: ``kinds.py``.

Rules that keep old and new peers talking: a new field gets a default (older senders omit it),
unknown fields are ignored on receipt, and anything that changes the meaning of an existing
field bumps ``SCHEMA_VERSION``, as does a new field of tensors (its bytes would sit in the
message's buffer where an older peer's check finds no index naming them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .names import check_labels, check_name, check_positive
from .served import Serving, ServingReport
from .specs import (
    DELTA_PRECISIONS,
    MAX_MANIFEST_MODULES,
    AdapterSpec,
    Capabilities,
    DevicePlan,
    DeviceProfile,
    ImportanceSettings,
    LoraSpec,
    ModelManifest,
    TrainSettings,
)

__all__ = ["SCHEMA_VERSION", "MAX_ARTIFACT_CHUNK", "Hello", "Presence", "TrainMetrics", "Update", "ImportanceReport", "AdapterInit", "EvalMetrics", "EvalReport", "PersonalizationReport", "Progress", "ErrorReport", "TaskKind", "RoundTask", "GlobalAdapter", "ArtifactOffer", "ArtifactRequest", "ArtifactData", "Chunk", "Signed", "Receipt", "Refusal", "Serving", "ServingReport", "MESSAGE_KINDS", "KIND_OF"]

SCHEMA_VERSION = 2
#: the most bytes one ArtifactData carries (it must fit one MQTT packet with its envelope)
MAX_ARTIFACT_CHUNK = 1 << 19
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Hello:
    """Sent (retained) when a device joins, so a daemon that starts later still sees it."""

    device_id: str
    sdk_version: str
    model: ModelManifest
    capabilities: Capabilities = field(default_factory=Capabilities)
    num_samples: int = 0
    profile: DeviceProfile | None = None
    #: the newest ``issued`` of the aggregator's signed messages this device holds: a daemon
    #: whose count is behind (a new host, a clock set back) counts on from it, or the device
    #: would refuse its tasks as replays
    downlink_issued: int = 0
    #: what the operator says of the device (``site = "plant-3"``, ``class = "pi4"``): a staged
    #: rollout may choose its canaries by them (docs/operations.md)
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if not 0 <= self.downlink_issued < 1 << 63:
            raise ValueError("Hello.downlink_issued must be in 0..2^63-1")
        check_labels(self.labels)


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
    #: the validation gate (docs/operations.md): the version this device serves, where it is
    #: not the one it started from, and its perplexity on the same held-out blocks
    serving_version: int | None = None
    serving_ppl: float | None = None


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
    #: the version this device serves, where it is not the one evaluated, and its perplexity
    #: on the same blocks (the validation gate, docs/operations.md)
    serving_version: int | None = None
    serving_ppl: float | None = None


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
    #: what a device sends its update as ("fp32", "fp16", "int8"; its plan may say otherwise)
    delta_precision: str = "fp32"
    #: a device carries what quantizing its update dropped into its next one. Off where the
    #: strategy restarts the factors every round (``stack``, ``svd``): the remainder belongs to
    #: factors the aggregator has already folded away
    error_feedback: bool = True
    #: send round results as one message whatever their size (not in chunks): the aggregator
    #: takes them in through workers behind a shared subscription, and a broker that deals its
    #: messages one by one (Mosquitto) would hand the chunks of one update to different workers
    whole_updates: bool = False

    def __post_init__(self) -> None:
        check_positive(self.deadline_s, "RoundTask.deadline_s")
        if self.max_staleness < 0:
            raise ValueError(f"RoundTask.max_staleness must be ≥ 0, got {self.max_staleness}")
        if self.delta_precision not in DELTA_PRECISIONS:
            raise ValueError(f"RoundTask.delta_precision {self.delta_precision[:16]!r} is not one of "
                             f"{', '.join(DELTA_PRECISIONS)}")

    def precision_for(self, device_id: str) -> str:
        """What ``device_id`` sends its update as: its plan's precision, else the task's."""
        plan = self.plans.get(device_id)
        return plan.delta_precision if plan is not None and plan.delta_precision else self.delta_precision


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
    """A message with its sender's Ed25519 signature (``edgetune.wire.signing``): a device's,
    or the aggregator's with the fleet key (``issued`` then orders what it signed).

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
    #: the aggregator's messages (``device_id`` "aggregator", signed with the fleet key): larger
    #: than the number of anything it signed before, and covered by the signature, so a device
    #: refuses an older message replayed on the topic. 0 on device messages.
    issued: int = 0

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if len(self.nonce) != 16 or len(self.signature) != 64 or len(self.key_id) != 16:
            raise ValueError("Signed needs a 16-byte nonce, a 64-byte signature and a 16-digit key id")
        if not 0 <= self.issued < 1 << 63:
            raise ValueError("Signed.issued must be in 0..2^63-1")


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


@dataclass(frozen=True)
class Refusal:
    """The aggregator's answer to a device it will not serve: its hello was refused (not
    admitted, another model, an adapter it cannot train, a wire it cannot read). Sent to that
    device alone and not retained; the device logs and counts it and keeps its hello up, so a
    fixed cause (an admission list, an upgrade of the aggregator) lets it in without a restart.
    ``upgrade`` says what to upgrade, when an upgrade is what it takes ("" otherwise)."""

    device_id: str
    #: the counted reason (as the aggregator's log and metrics name it)
    reason: str
    detail: str
    upgrade: str = ""
    #: SHA-256 (hex) of the hello payload it answers, as received: a device acts only on the
    #: refusal of the hello it sent last (not on one provoked by a hello forged in its name, nor
    #: on an old one replayed)
    hello: str = ""

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if len(self.reason) > 64 or len(self.detail) > 1024 or len(self.upgrade) > 256 or len(self.hello) > 64:
            raise ValueError("Refusal: reason ≤ 64, detail ≤ 1024, upgrade ≤ 256 and hello ≤ 64 characters")


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
    "refusal": Refusal,
    "serving": Serving,
    "serving_report": ServingReport,
    "artifact_offer": ArtifactOffer,
    "artifact_request": ArtifactRequest,
    "artifact_data": ArtifactData,
}


def _register_workers() -> None:
    """The aggregator's messages to and from its workers (``workers.py``, which needs ``Update``)."""
    from .workers import MergeRequest, PartialMerge, WorkerReport, WorkerRound

    MESSAGE_KINDS.update({"worker_round": WorkerRound, "worker_report": WorkerReport, "merge_request": MergeRequest,
                          "partial_merge": PartialMerge})


_register_workers()
KIND_OF: dict[type, str] = {cls: kind for kind, cls in MESSAGE_KINDS.items()}
