"""What ``edgetune device run`` and ``edgetune device personalize`` take: one dataclass, the
keys of ``--config DEVICE.toml`` (docs/configuration.md), its defaults defined here once.
Personalization's own settings are ``PersonalizeSettings`` (the ``[personalize]`` table).

All of it is this process's settings (runtime-only): where the broker, the data and the keys
are, how to log. The fleet's training settings come from the aggregator in each task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checks import check_labels
from .data.split import HELDOUT_FRACTION, VALIDATION_FRACTION
from .ort.fetch import FETCH_TIMEOUT_S
from .personalize import PersonalizeSettings
from .policy import PolicySettings

TRAINERS = ("torch", "ort", "auto")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class DeviceRunSettings:
    #: mqtt://HOST:PORT, mqtts://HOST:PORT or memory://NAME
    broker: str
    fleet: str
    device_id: str
    #: .txt (one record a line) or .jsonl ({"text": ...})
    data: Path
    #: GGUF file, model folder, or tiny-llama/tiny-gpt2 (None: SmolLM2-135M-Instruct GGUF)
    model: str | None = None
    #: training threads (None: all cores)
    threads: int | None = None
    #: PyTorch, ONNX Runtime artifacts (no PyTorch needed), or auto: torch when installed
    trainer: str = "auto"
    #: ONNX Runtime training artifacts from ``edgetune build-ort`` (the ort trainer's model)
    artifacts: Path | None = None
    #: when ``artifacts`` holds none, wait this long for the aggregator to offer them
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    #: refuse artifacts whose base weights do not have this SHA-256 (a prefix is enough)
    model_hash: str | None = None
    #: fraction of records held out for evaluation
    heldout_fraction: float = HELDOUT_FRACTION
    #: fraction of the training records (with at least 10) kept out of training to choose α on (0: none)
    validation_fraction: float = VALIDATION_FRACTION
    #: held-out text of the other sites (.txt/.jsonl): the robustness score is the perplexity on it
    robustness: Path | None = None
    #: give up on the broker after this many seconds (None: retry forever)
    connect_timeout_s: float | None = None
    #: send a profile so the aggregator plans this device (False: train the fleet's uniform settings)
    plan: bool = True
    #: announce this profile (from ``edgetune profile``) instead of measuring
    profile: Path | None = None
    #: where the measured profile is kept (None: ~/.local/state/edgetune/FLEET/DEVICE_ID)
    state_dir: Path | None = None
    #: measure this machine again, even if nothing about it changed
    reprofile: bool = False
    #: behave as this (slower) device class, e.g. profiles/raspberry-pi-4-4gb-gateway.yaml
    emulate: Path | None = None
    #: what this site's uplink sustains, Mbit/s (planning counts the upload time of updates)
    uplink_mbps: float | None = None
    #: this device's Ed25519 key (signing.key): everything it sends is signed
    signing_key: Path | None = None
    #: the fleet's public key (fleet.pub): tasks and adapters are accepted only signed by the aggregator
    fleet_key: Path | None = None
    #: what the operator says of this device (``{ site = "plant-3" }``): a staged rollout may
    #: choose its canaries by them (docs/operations.md)
    labels: dict[str, str] = field(default_factory=dict)
    #: when the device may train (``[policy]``: idle CPU, a time window, mains power)
    policy: PolicySettings = field(default_factory=PolicySettings)
    #: CA certificate of an mqtts:// broker; this device's client certificate and its key
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "INFO"
    #: log here instead of stderr
    log_file: Path | None = None
    #: device run: keep running after the fleet finishes
    stay: bool = False
    #: device personalize: how (``[personalize]``), how long to wait for the fleet's global
    #: adapter, and where to write the personal adapter in PEFT format (None: not written)
    personalize: PersonalizeSettings = field(default_factory=PersonalizeSettings)
    global_wait_s: float = 60.0
    personal_out: Path | None = None

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer {self.trainer!r} is not one of {', '.join(TRAINERS)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.uplink_mbps is not None and not self.uplink_mbps > 0:
            raise ValueError(f"uplink_mbps must be > 0, got {self.uplink_mbps}")
        check_labels(self.labels)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1 (None: all cores), got {self.threads}")

    @property
    def tls(self) -> dict[str, str]:
        """``open_transport``'s TLS arguments, those given."""
        files = {"ca_certs": self.tls_ca, "certfile": self.tls_cert, "keyfile": self.tls_key}
        return {k: str(v) for k, v in files.items() if v is not None}
