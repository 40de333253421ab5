"""The ``[serve]`` table of ``edgetune-aggregator serve --config``: how this process reaches the
broker and reports on itself. Runtime-only: these are not the fleet's settings
(``AggregatorConfig``), and nothing here is written to the state dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ServeSettings:
    #: mqtt://HOST:PORT or mqtts://HOST:PORT
    broker: str
    #: the other nodes of a clustered broker whose nodes each index their own retained messages
    #: (ejabberd): the daemon publishes and reads its retained messages through each of them too
    #: (docs/deploy.md). Not needed with a broker that shares them (EMQX) or a single one.
    cluster_nodes: tuple[str, ...] = ()
    #: give up on the broker after this many seconds (None: retry forever)
    connect_timeout_s: float | None = None
    #: CA certificate of an mqtts:// broker; this daemon's client certificate and its key
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: serve /metrics (Prometheus) and /healthz on this port (0: any free port; None: not at all)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    #: the fleet's model, read from a file ``edgetune manifest`` wrote (becomes AggregatorConfig.model)
    model_manifest: Path | None = None

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.connect_timeout_s is not None and not self.connect_timeout_s >= 0:
            raise ValueError(f"connect_timeout_s must be ≥ 0 (None: retry forever), got {self.connect_timeout_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 (0: any free port), got {self.metrics_port}")

    @property
    def tls(self) -> dict[str, str]:
        """``open_transport``'s TLS arguments, those given."""
        files = {"ca_certs": self.tls_ca, "certfile": self.tls_cert, "keyfile": self.tls_key}
        return {k: str(v) for k, v in files.items() if v is not None}
