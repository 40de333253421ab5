"""The daemon's state directory: every global adapter version, the round log, and where the
fleet stands, each written atomically so a crash at any instant leaves a consistent state.

Layout::

    state.json                 fleet, model manifest, adapter spec, last round, current version
    global/v000003.msgpack     global adapter version 3 (a wire GlobalAdapter message)
    server/v000003.msgpack     the server optimizer's state after version 3 (tensors, msgpack)
    adapter/                   the current global adapter in PEFT format (load with peft)
    rounds.json                one record per closed round (see RoundRecord)
    personalization.json       each device's personalization scores (PersonalizationReport)
    devices/{id}.msgpack       each device's accepted hello (a wire Hello message)
    journal/r000007/           the open round's task and accepted results (journal.py)
    client_id                  the daemon's MQTT client id (``serve``; not guessable)
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from edgetune.adapters.peft_format import write_peft_adapter
from edgetune.adapters.registry import spec_from_dict
from edgetune.atomic import atomic_write_bytes, atomic_write_json
from edgetune.wire.manifest_file import manifest_from_dict
import msgpack
import numpy as np

from edgetune.wire import (
    FILE_VERSIONS,
    AdapterSpec,
    GlobalAdapter,
    Hello,
    ModelManifest,
    WireError,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
)

log = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass
class DeviceRecord:
    device_id: str
    num_samples: int
    train_loss: float | None = None
    local_ppl: float | None = None
    global_ppl: float | None = None
    train_tokens: int = 0
    train_seconds: float = 0.0
    #: payload bytes the aggregator received from the device during the round
    bytes_sent: int = 0
    #: payload bytes the device received since its previous report (task, global adapter)
    bytes_received: int = 0
    #: robustness: perplexity of the global / trained adapter on the other sites' held-out text
    global_robust_ppl: float | None = None
    local_robust_ppl: float | None = None
    #: a late update: trained for this earlier round, folded into this one with a staleness weight
    from_round: int | None = None
    #: train rounds: the L2 norm of the update's delta as sent
    norm: float | None = None
    #: the samples it counted with, where the influence bound cut its claim (None: as claimed)
    counted_samples: float | None = None
    #: the factor its delta was scaled by, where a norm bound clipped it (None: untouched)
    norm_scale: float | None = None
    #: its share of the round's merge weight (samples counted × staleness, normalised)
    weight: float | None = None
    #: the version it serves, where not the round's, and that version's perplexity on the same
    #: held-out blocks as ``global_ppl`` (the validation gate)
    serving_version: int | None = None
    serving_ppl: float | None = None


class RoundStatus(str, Enum):
    OPEN = "open"
    AGGREGATED = "aggregated"
    EVALUATED = "evaluated"
    CALIBRATED = "calibrated"
    INITIALIZED = "initialized"
    FAILED = "failed"
    #: the merged candidate failed the check before publication (guard.py): nothing changed
    REJECTED = "rejected"


@dataclass
class RoundRecord:
    """What happened in one round, for people and for later analysis (``rounds.json``)."""

    round: int
    kind: str
    base_version: int
    new_version: int | None = None
    status: RoundStatus = RoundStatus.OPEN
    started_at: float = 0.0
    duration_s: float = 0.0
    devices: list[DeviceRecord] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    note: str = ""
    #: seconds the strategy took to merge the round's updates into the next global adapter
    aggregation_s: float = 0.0
    #: calibration rounds: the weight matrices chosen to carry adapters
    layout: list[str] = field(default_factory=list)
    #: the devices the task asked (online, not excluded) when the round opened
    asked: list[str] = field(default_factory=list)
    #: devices the task left out, and why (the planner, the fleet's rules)
    excluded: dict[str, str] = field(default_factory=dict)
    #: each planned device's configuration: DevicePlan's fields, with the cost model's
    #: predicted peak memory (bytes) and step time (s) when the planner made it
    plans: dict[str, dict] = field(default_factory=dict)
    #: asked devices that gave the round up, and why (their error report: deadline, memory, …)
    declined: dict[str, str] = field(default_factory=dict)
    #: devices their training policy paused during the round (busy, not gone), and what they said
    busy: dict[str, str] = field(default_factory=dict)
    #: bytes a device downloads for the round: the global adapter it trains on, and the task
    downlink_bytes: int = 0
    #: the validation gate's verdict on the version the round started from (gate.Verdict), if it judged one
    gate: dict | None = None
    #: what happened to what the fleet serves while the round was open: staged rollout steps,
    #: promotions, rollbacks (``serving.py``), in order
    rollout: list[dict] = field(default_factory=list)
    #: exact strategies with a bounded downlink: the relative Frobenius error of truncating the
    #: merged update (‖ΔW − ΔW_kept‖ / ‖ΔW‖, largest over layers; 0 when nothing was cut)
    truncation_error: float | None = None

    @property
    def global_ppl(self) -> float | None:
        """Sample-weighted perplexity of the base-version global adapter on held-out data."""
        return _weighted(self.devices, "global_ppl")

    @property
    def global_robust_ppl(self) -> float | None:
        """The same on the other sites' held-out text (the devices that have some)."""
        return _weighted(self.devices, "global_robust_ppl")


def _weighted(devices: list[DeviceRecord], name: str) -> float | None:
    rows = [d for d in devices if getattr(d, name) is not None]
    total = sum(d.num_samples for d in rows)
    return sum(getattr(d, name) * d.num_samples for d in rows) / total if total else None


@dataclass
class FleetState:
    fleet: str
    model: ModelManifest
    adapter: AdapterSpec
    round: int = 0  # last closed round
    opened: int = 0  # last round whose task was published (> round: it never closed)
    global_version: int = 0
    global_chunks: int = 0  # retained chunk topics in use (to clear leftovers)
    base_model: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: the aggregation strategy the fleet's global adapters follow (fixed for a state dir)
    strategy: str = "fedit"
    #: how the adapter layout was chosen: "fixed" or "importance" (after a calibration round)
    layout: str = "fixed"
    #: round number of the first train round (a calibration round comes before it)
    first_train_round: int = 1
    #: devices left out of the fleet, and why (their starting adapter showed another base)
    left_out: dict[str, str] = field(default_factory=dict)
    #: the version devices serve (None: none promoted yet); rounds train on ``global_version``
    serving_version: int | None = None
    #: a staged rollout's candidate (served by ``canaries`` only until their reports pass)
    candidate_version: int | None = None
    canaries: list[str] = field(default_factory=list)
    #: when the canaries were told (wall-clock seconds): their reports are due within the timeout
    canary_started: float = 0.0
    #: a version promoted while the canaries tried another: staged once they are decided
    queued: int | None = None
    #: retained chunk topics in use per served version ("7" -> 3), to clear them when unnamed
    served_chunks: dict[str, int] = field(default_factory=dict)
    #: a rollback's training part, done before the next round opens: the version to restart
    #: from, and the operator request that asked for it
    reset_to: int | None = None
    reset_request: str = ""
    #: the newest stored version the validation gate has yet to judge (None: none waits)
    awaiting: int | None = None
    #: a version the gate passed, to serve once its round's close is on disk (``serving.py``)
    promote_next: int | None = None
    #: the first round of the lineage training follows now (after a rollback: the rounds
    #: before it built versions no late update may still join)
    lineage_round: int = 0


class StateStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            (self.directory / "global").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"state dir {self.directory} is not writable: {exc}") from None

    # --- fleet state ------------------------------------------------------------------------

    def load_state(self) -> FleetState | None:
        path = self.directory / "state.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        if raw.get("format") != STATE_FORMAT:
            raise RuntimeError(f"{path} has format {raw.get('format')}; expected {STATE_FORMAT}")
        return FleetState(
            fleet=raw["fleet"],
            model=manifest_from_dict(raw["model"]),
            adapter=spec_from_dict(raw["adapter"]),
            round=raw["round"],
            opened=raw.get("opened", raw["round"]),
            global_version=raw["global_version"],
            global_chunks=raw.get("global_chunks", 0),
            base_model=raw.get("base_model", ""),
            run_id=raw.get("run_id", ""),
            strategy=raw.get("strategy", "fedit"),
            layout=raw.get("layout", "fixed"),
            first_train_round=raw.get("first_train_round", 1),
            left_out=dict(raw.get("left_out", {})),
            serving_version=raw.get("serving_version"),
            candidate_version=raw.get("candidate_version"),
            canaries=list(raw.get("canaries", [])),
            canary_started=raw.get("canary_started", 0.0),
            queued=raw.get("queued"),
            served_chunks={str(k): int(v) for k, v in raw.get("served_chunks", {}).items()},
            reset_to=raw.get("reset_to"),
            reset_request=raw.get("reset_request", ""),
            awaiting=raw.get("awaiting"),
            promote_next=raw.get("promote_next"),
            lineage_round=raw.get("lineage_round", 0),
        )

    def save_state(self, state: FleetState) -> None:
        atomic_write_json(self.directory / "state.json", {"format": STATE_FORMAT, **asdict(state)})

    # --- global adapters --------------------------------------------------------------------

    def global_path(self, version: int) -> Path:
        return self.directory / "global" / f"v{version:06d}.msgpack"

    def save_global(self, adapter: GlobalAdapter, base_model: str = "") -> None:
        """Keep every version (rollback, audit) and refresh the PEFT export of the latest."""
        atomic_write_bytes(self.global_path(adapter.version), encode_message(adapter))
        write_peft_adapter(self.directory / "adapter", adapter.adapter, adapter.tensors, base_model, adapter.merged)

    def global_versions(self) -> list[int]:
        """The versions stored, oldest first."""
        found = []
        for path in (self.directory / "global").glob("v*.msgpack"):
            try:
                found.append(int(path.stem[1:]))
            except ValueError:
                continue
        return sorted(found)

    def load_global(self, version: int) -> GlobalAdapter:
        message = decode_message(self.global_path(version).read_bytes(), FILE_VERSIONS)
        if not isinstance(message, GlobalAdapter):
            raise RuntimeError(f"{self.global_path(version)} does not hold a global adapter")
        return message

    # --- server optimizer state --------------------------------------------------------------

    def _server_path(self, version: int) -> Path:
        return self.directory / "server" / f"v{version:06d}.msgpack"

    def save_server_state(self, version: int, tensors: dict[str, np.ndarray]) -> None:
        """Moments of the server optimizer after ``version`` (written before the version is
        named in state.json, so a restart finds the state that belongs to its version)."""
        self._server_path(version).parent.mkdir(exist_ok=True)
        payload = msgpack.packb({name: encode_tensor(np.ascontiguousarray(t)) for name, t in tensors.items()})
        atomic_write_bytes(self._server_path(version), payload)

    def load_server_state(self, version: int) -> dict[str, np.ndarray]:
        path = self._server_path(version)
        if not path.exists():
            return {}
        raw = msgpack.unpackb(path.read_bytes())
        return {name: decode_tensor(t) for name, t in raw.items()}

    # --- devices ----------------------------------------------------------------------------

    def save_device(self, hello: Hello) -> None:
        """A device's accepted hello (verified when it came), so a restarted daemon knows the
        fleet before the broker re-sends retained hellos, or after a broker that lost them."""
        directory = self.directory / "devices"
        directory.mkdir(exist_ok=True)
        atomic_write_bytes(directory / f"{hello.device_id}.msgpack", encode_message(hello))

    def load_devices(self) -> dict[str, Hello]:
        devices = {}
        for path in sorted((self.directory / "devices").glob("*.msgpack")):
            try:
                # (a hello kept from wire v1 is not read: its device must say hello again in v2,
                # with the capabilities a v1 hello does not carry)
                hello = decode_message(path.read_bytes())
            except WireError as exc:
                if exc.reason == "schema_version":
                    log.info("%s was written by an older edgetune; its device joins again when it says hello", path)
                else:  # written atomically: only tampering gets here; the device says hello again
                    log.warning("ignoring %s: %s", path, exc)
                continue
            except Exception as exc:
                log.warning("ignoring %s: %s", path, exc)
                continue
            if isinstance(hello, Hello) and hello.device_id == path.stem:
                devices[hello.device_id] = hello
        return devices

    # --- round log --------------------------------------------------------------------------

    def load_issued(self) -> int:
        """The highest number the fleet key signed with (``downlink.json``; 0 if none)."""
        try:
            saved = json.loads((self.directory / "downlink.json").read_text())
        except (OSError, ValueError):
            return 0
        issued = saved.get("issued") if isinstance(saved, dict) else None
        return issued if isinstance(issued, int) and issued > 0 else 0

    def save_issued(self, issued: int) -> None:
        """Remember the highest number signed, so a restart on a clock set back counts on from it."""
        atomic_write_json(self.directory / "downlink.json", {"format": 1, "issued": issued})

    def writable(self) -> bool:
        """Whether a small file can be written here now (a full or read-only disk: False)."""
        try:
            atomic_write_bytes(self.directory / ".probe", b"ok")
            return True
        except OSError:
            return False

    def rounds(self) -> list[dict]:
        path = self.directory / "rounds.json"
        return json.loads(path.read_text()) if path.exists() else []

    def append_round(self, record: RoundRecord) -> None:
        rounds = [r for r in self.rounds() if (r["round"], r["kind"]) != (record.round, record.kind)]
        entry = asdict(record)
        entry["status"] = record.status.value
        entry["global_ppl"] = record.global_ppl
        entry["global_robust_ppl"] = record.global_robust_ppl
        atomic_write_json(self.directory / "rounds.json", rounds + [entry])

    # --- personalization reports ------------------------------------------------------------

    def personalizations(self) -> list[dict]:
        path = self.directory / "personalization.json"
        return json.loads(path.read_text()) if path.exists() else []

    def append_personalization(self, entry: dict, keep: int = 20) -> None:
        """One device's ``PersonalizationReport`` (as a dict, with when it arrived); the newest
        ``keep`` per device are kept, so the file's size depends on the fleet, not on time."""
        entries = self.personalizations() + [entry]
        device = entry["device_id"]
        mine = [i for i, e in enumerate(entries) if e.get("device_id") == device]
        drop = set(mine[:-keep]) if len(mine) > keep else set()
        atomic_write_json(self.directory / "personalization.json", [e for i, e in enumerate(entries) if i not in drop])

