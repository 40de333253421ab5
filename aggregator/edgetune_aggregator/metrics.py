"""Prometheus metrics and a ``/healthz`` endpoint for one aggregator daemon.

Import this module only when metrics are turned on: it imports ``prometheus_client`` at the
top, and ``import edgetune_aggregator.daemon`` must not (the daemon imports this module
lazily, the way it imports ``artifacts``).

The fleet is exposed once, as ``edgetune_fleet_info{fleet="..."} 1``, rather than as a
``fleet`` label on every series. A label that is the same on every series of a target is a
target label: Prometheus attaches those at scrape time (``static_configs`` labels or
relabelling), and a scraped label of the same name would clash with it (and be renamed
``exported_fleet``). A query that wants the fleet joins on the info metric:
``rate(edgetune_updates_rejected_total[5m]) * on(instance) group_left(fleet) edgetune_fleet_info``.

Each daemon gets its own :class:`CollectorRegistry`, so several daemons in one process (the
tests) never see each other's counts.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger(__name__)

__all__ = ["MAX_LABEL_VALUES", "OTHER", "AggregatorMetrics", "HealthServer"]

#: distinct values one label may take; later newcomers are counted under OTHER
MAX_LABEL_VALUES = 64
OTHER = "other"
#: what a label value may look like: a short identifier, never free text from a message
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: rounds last from seconds (a tiny fleet) to the round timeout (600 s by default) and beyond
_ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class _LabelCap:
    """Maps a label value to itself while fewer than ``limit`` values have been seen, and to
    OTHER after that (or when it is not a short identifier), so no caller can make the
    number of series grow without bound."""

    def __init__(self, metric: str, label: str, limit: int):
        self.metric, self.label, self.limit = metric, label, limit
        self._seen: set[str] = set()
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            return OTHER
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
            if not self._warned:
                self._warned = True
                log.warning("%s{%s}: more than %d distinct values; counting %r and later ones as %r",
                            self.metric, self.label, self.limit, value, OTHER)
        return OTHER


class AggregatorMetrics:
    """One daemon's metrics in its own CollectorRegistry (tests run several daemons in one process).

    Every method is safe to call from any thread. The values ``/healthz`` reports are kept
    here as plain attributes too, so the health check never reads prometheus_client internals.
    """

    def __init__(self, fleet: str, max_label_values: int = MAX_LABEL_VALUES):
        if max_label_values < 1:
            raise ValueError(f"max_label_values must be at least 1, not {max_label_values}")
        self.fleet = fleet
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory, CPU, open files (Linux only)
        r = self.registry
        Info("edgetune_fleet", "The fleet this aggregator serves", registry=r).info({"fleet": fleet})

        self._rounds = Counter("edgetune_rounds", "Rounds closed, by task kind and outcome",
                               ["kind", "status"], registry=r)
        self._round_duration = Histogram("edgetune_round_duration_seconds", "Time from opening a round to closing it",
                                         ["kind"], buckets=_ROUND_BUCKETS, registry=r)
        self._round = Gauge("edgetune_round", "Number of the current (or last) round", registry=r)
        self._round_open = Gauge("edgetune_round_open", "1 while a round collects updates, else 0", registry=r)
        self._global_version = Gauge("edgetune_global_version", "Version of the published global adapter", registry=r)
        self._serving_version = Gauge("edgetune_serving_version", "Version of the global adapter devices serve "
                                      "(docs/operations.md)", registry=r)
        self._serving_reports = Counter("edgetune_serving_reports", "Devices' reports on a version they were told "
                                        "to serve, by whether they switched to it", ["switched"], registry=r)
        self._gate = Counter("edgetune_gate_verdicts", "The validation gate's verdicts on new global versions "
                             "(refused: a regression kept it from being served)", ["verdict"], registry=r)
        self._canary = Counter("edgetune_canary_verdicts", "Staged rollouts decided by their canaries' reports "
                               "(rolled_back: the canaries went back to the serving version)", ["verdict"], registry=r)
        self._accepted = Counter("edgetune_updates_accepted", "Device messages accepted, by kind",
                                 ["kind"], registry=r)
        self._rejected = Counter("edgetune_updates_rejected", "Device messages dropped, by reason",
                                 ["reason"], registry=r)
        self._globals_rejected = Counter("edgetune_globals_rejected", "Merged candidates not published: non-finite, "
                                         "off the fleet's layout or moved too far (guard.py)", registry=r)
        self._received = Counter("edgetune_received_bytes", "Payload bytes received from devices", registry=r)
        self._sent = Counter("edgetune_sent_bytes", "Payload bytes published to devices", registry=r)
        self._known = Gauge("edgetune_devices_known", "Devices that have said hello to this fleet", registry=r)
        self._connected = Gauge("edgetune_devices_connected", "Devices whose presence is online", registry=r)
        self._broker = Gauge("edgetune_broker_connected", "1 while connected to the MQTT broker, else 0", registry=r)
        self._heartbeat = Gauge("edgetune_last_heartbeat_timestamp_seconds",
                                "Unix time of the serve loop's last iteration", registry=r)

        def cap(metric: str, label: str) -> _LabelCap:
            return _LabelCap(metric, label, max_label_values)

        self._round_kind, self._round_status = cap("edgetune_rounds", "kind"), cap("edgetune_rounds", "status")
        self._accepted_kind = cap("edgetune_updates_accepted", "kind")
        self._rejected_reason = cap("edgetune_updates_rejected", "reason")

        # what /healthz reports; None until the daemon has said
        self.round: int | None = None
        self.round_open = False
        self.version: int | None = None
        self.devices_connected = 0
        self.is_broker_connected = False
        self._last_beat: float | None = None  # time.monotonic(), immune to clock changes
        #: cause ("storage", "planning") -> what is wrong: the daemon serves, but not fully
        self.problems: dict[str, str] = {}

    def round_opened(self, number: int) -> None:
        self.round, self.round_open = number, True
        self._round.set(number)
        self._round_open.set(1)

    def round_closed(self, kind: str, status: str, duration_s: float) -> None:
        kind = self._round_kind(kind)
        self._rounds.labels(kind=kind, status=self._round_status(status)).inc()
        self._round_duration.labels(kind=kind).observe(duration_s)
        self.round_open = False
        self._round_open.set(0)

    def global_version(self, version: int) -> None:
        self.version = version
        self._global_version.set(version)

    def serving_version(self, version: int) -> None:
        self._serving_version.set(version)

    def gate_verdict(self, passed: bool | None) -> None:
        self._gate.labels(verdict={True: "passed", False: "refused", None: "not_judged"}[passed]).inc()

    def canary_verdict(self, passed: bool) -> None:
        self._canary.labels(verdict="passed" if passed else "rolled_back").inc()

    def serving_report(self, switched: bool) -> None:
        self._serving_reports.labels(switched="true" if switched else "false").inc()

    def accepted(self, kind: str) -> None:
        self._accepted.labels(kind=self._accepted_kind(kind)).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=self._rejected_reason(reason)).inc()

    def global_rejected(self) -> None:
        self._globals_rejected.inc()

    def received_bytes(self, n: int) -> None:
        self._received.inc(n)

    def sent_bytes(self, n: int) -> None:
        self._sent.inc(n)

    def devices(self, known: int, connected: int) -> None:
        self.devices_connected = connected
        self._known.set(known)
        self._connected.set(connected)

    def broker_connected(self, up: bool) -> None:
        self.is_broker_connected = bool(up)
        self._broker.set(1 if up else 0)

    def problem(self, cause: str, why: str | None) -> None:
        """Report (``why``) or clear (None) a condition that degrades the daemon."""
        if why is None:
            self.problems.pop(cause, None)
        else:
            self.problems[cause] = why[:300]

    def heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        self._heartbeat.set(time.time())

    def health(self, stale_after_s: float) -> dict:
        """The ``/healthz`` document. Nothing reported yet counts as unhealthy: a daemon whose
        serve loop has not started, or that has not reached the broker, cannot run rounds.
        "degraded": it runs rounds, but something it needs is failing (the state dir cannot be
        written, so results are refused; planning fails, so devices train with the defaults)."""
        beat = self._last_beat
        age = None if beat is None else time.monotonic() - beat
        reasons = []
        if age is None:
            reasons.append("the serve loop has not reported a heartbeat yet")
        elif age > stale_after_s:
            reasons.append(f"the serve loop's last heartbeat is {age:.1f} s old (limit {stale_after_s:g} s)")
        if not self.is_broker_connected:
            reasons.append("not connected to the MQTT broker")
        degraded = [f"{cause}: {why}" for cause, why in sorted(self.problems.items())]
        return {
            "status": "unhealthy" if reasons else "degraded" if degraded else "ok",
            "fleet": self.fleet,
            "round": self.round,
            "round_open": self.round_open,
            "global_version": self.version,
            "devices_connected": self.devices_connected,
            "broker_connected": self.is_broker_connected,
            "last_heartbeat_age_s": None if age is None else round(age, 3),
            "reasons": reasons + degraded,
        }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that connects and says nothing gives its thread back after this

    def do_GET(self) -> None:  # the name http.server dispatches to
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                status, ctype, body = HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics.registry)
            elif path == "/healthz":
                report = self.server.metrics.health(self.server.stale_after_s)
                status = HTTPStatus.OK if report["status"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
                ctype, body = "application/json", json.dumps(report).encode()
            else:
                status, ctype = HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8"
                body = b"not found: try /metrics or /healthz\n"
        except Exception:  # a bug here must cost one response, never the daemon
            log.exception("serving %s failed", path)
            status, ctype, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a scrape in flight never keeps the process alive

    def __init__(self, address: tuple[str, int], metrics: AggregatorMetrics, stale_after_s: float):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics, self.stale_after_s = metrics, stale_after_s
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # called inside socketserver's except block; the default prints the traceback to
        # stderr, but a client hanging up mid-reply is routine
        log.debug("request from %s failed", client_address, exc_info=True)  # noqa: LOG014


class HealthServer:
    """HTTP on host:port: GET /metrics (Prometheus text format, from the registry), GET /healthz
    (JSON; 200 when healthy, 503 when not), anything else 404. Threaded, daemon threads, never
    lets a request crash the daemon; start() returns the bound port (port 0 = pick a free one); close()."""

    def __init__(self, metrics: AggregatorMetrics, host: str = "127.0.0.1", port: int = 9108,
                 stale_after_s: float = 30.0):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, not {stale_after_s}")
        self.metrics, self.host, self.port, self.stale_after_s = metrics, host, port, stale_after_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("the health server is already running")
        try:
            server = _Server((self.host, self.port), self.metrics, self.stale_after_s)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}; "
                                     "choose another port (0 picks a free one)") from exc
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"edgetune-health-{self.port}", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self.port

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
