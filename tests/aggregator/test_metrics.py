"""The aggregator's /metrics and /healthz, over real HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgetune_aggregator.metrics import MAX_LABEL_VALUES, OTHER, AggregatorMetrics, HealthServer

Served = Callable[..., tuple[AggregatorMetrics, int]]


@pytest.fixture
def served() -> Iterator[Served]:
    """Starts a HealthServer on a free port for a new (or given) AggregatorMetrics; closes all after."""
    servers: list[HealthServer] = []

    def start(metrics: AggregatorMetrics | None = None, **kwargs: object) -> tuple[AggregatorMetrics, int]:
        metrics = metrics or AggregatorMetrics("fleet-a")
        server = HealthServer(metrics, port=0, **kwargs)
        servers.append(server)
        return metrics, server.start()

    yield start
    for server in servers:
        server.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics, keyed by (sample name, its labels)."""
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def healthz(port: int) -> tuple[int, dict]:
    status, ctype, body = get(port, "/healthz")
    assert ctype == "application/json"
    return status, json.loads(body)


def test_metrics_show_what_was_counted(served: Served) -> None:
    metrics, port = served()
    metrics.round_opened(3)
    metrics.global_version(2)
    for kind in ("update", "update", "eval"):
        metrics.accepted(kind)
    for reason in ("bad_signature", "replayed", "replayed", "nan"):
        metrics.rejected(reason)
    metrics.received_bytes(1000)
    metrics.received_bytes(24)
    metrics.sent_bytes(512)
    metrics.devices(known=5, connected=4)
    metrics.broker_connected(True)

    samples = scrape(port)
    assert value(samples, "edgetune_fleet_info", fleet="fleet-a") == 1
    assert value(samples, "edgetune_round") == 3
    assert value(samples, "edgetune_round_open") == 1
    assert value(samples, "edgetune_global_version") == 2
    assert value(samples, "edgetune_updates_accepted_total", kind="update") == 2
    assert value(samples, "edgetune_updates_accepted_total", kind="eval") == 1
    assert value(samples, "edgetune_updates_rejected_total", reason="bad_signature") == 1
    assert value(samples, "edgetune_updates_rejected_total", reason="replayed") == 2
    assert value(samples, "edgetune_updates_rejected_total", reason="nan") == 1
    assert value(samples, "edgetune_received_bytes_total") == 1024
    assert value(samples, "edgetune_sent_bytes_total") == 512
    assert value(samples, "edgetune_devices_known") == 5
    assert value(samples, "edgetune_devices_connected") == 4
    assert value(samples, "edgetune_broker_connected") == 1


def test_closed_rounds_are_counted_and_timed(served: Served) -> None:
    metrics, port = served()
    metrics.round_opened(1)
    metrics.round_closed("train", "aggregated", 12.5)
    metrics.round_opened(2)
    metrics.round_closed("train", "failed", 600.0)
    metrics.round_closed("evaluate", "evaluated", 2.0)

    samples = scrape(port)
    assert value(samples, "edgetune_round_open") == 0
    assert value(samples, "edgetune_rounds_total", kind="train", status="aggregated") == 1
    assert value(samples, "edgetune_rounds_total", kind="train", status="failed") == 1
    assert value(samples, "edgetune_rounds_total", kind="evaluate", status="evaluated") == 1
    assert value(samples, "edgetune_round_duration_seconds_count", kind="train") == 2
    assert value(samples, "edgetune_round_duration_seconds_sum", kind="train") == 612.5
    assert value(samples, "edgetune_round_duration_seconds_bucket", kind="train", le="10.0") == 0
    assert value(samples, "edgetune_round_duration_seconds_bucket", kind="train", le="30.0") == 1
    assert value(samples, "edgetune_round_duration_seconds_bucket", kind="train", le="600.0") == 2


def test_healthz_is_ok_with_a_fresh_heartbeat_and_a_broker(served: Served) -> None:
    metrics, port = served()
    metrics.broker_connected(True)
    metrics.round_opened(7)
    metrics.global_version(6)
    metrics.devices(known=3, connected=2)
    metrics.heartbeat()

    status, body = healthz(port)
    assert status == 200
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["fleet"] == "fleet-a"
    assert (body["round"], body["round_open"], body["global_version"]) == (7, True, 6)
    assert body["devices_connected"] == 2 and body["broker_connected"] is True
    assert 0 <= body["last_heartbeat_age_s"] < 5
    assert get(port, "/healthz", method="HEAD")[0] == 200


def test_healthz_is_unhealthy_before_the_daemon_reports_anything(served: Served) -> None:
    _, port = served()
    status, body = healthz(port)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["round"] is None and body["last_heartbeat_age_s"] is None
    assert len(body["reasons"]) == 2  # no heartbeat, no broker


def test_healthz_turns_unhealthy_when_the_heartbeat_goes_stale(served: Served) -> None:
    metrics, port = served(stale_after_s=0.05)
    metrics.broker_connected(True)
    metrics.heartbeat()
    assert healthz(port)[0] == 200

    time.sleep(0.1)
    status, body = healthz(port)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["last_heartbeat_age_s"] >= 0.05
    assert ["heartbeat" in reason for reason in body["reasons"]] == [True]

    metrics.heartbeat()  # the loop is back
    assert healthz(port)[0] == 200


def test_healthz_is_unhealthy_while_the_broker_is_disconnected(served: Served) -> None:
    metrics, port = served()
    metrics.heartbeat()
    metrics.broker_connected(True)
    metrics.broker_connected(False)
    status, body = healthz(port)
    assert status == 503 and body["broker_connected"] is False
    assert ["broker" in reason for reason in body["reasons"]] == [True]
    assert value(scrape(port), "edgetune_broker_connected") == 0


@pytest.mark.parametrize("path", ["/", "/metrics/extra", "/health", "/favicon.ico"])
def test_other_paths_are_not_found(served: Served, path: str) -> None:
    _, port = served()
    assert get(port, path)[0] == 404


def test_a_query_string_does_not_change_the_route(served: Served) -> None:
    _, port = served()
    assert get(port, "/metrics?name[]=edgetune_round")[0] == 200


def test_label_values_are_capped_and_folded_into_other(served: Served) -> None:
    metrics, port = served()
    for i in range(MAX_LABEL_VALUES + 36):
        metrics.rejected(f"reason_{i}")
    metrics.rejected("reason_0")  # a value seen before the cap keeps its own series
    metrics.rejected("not an identifier {\"from\": \"a device\"}")
    metrics.rejected("x" * 1000)
    metrics.accepted(None)  # type: ignore[arg-type]

    samples = scrape(port)
    reasons = {dict(labels)["reason"] for name, labels in samples if name == "edgetune_updates_rejected_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1
    assert OTHER in reasons and f"reason_{MAX_LABEL_VALUES}" not in reasons
    assert value(samples, "edgetune_updates_rejected_total", reason="reason_0") == 2
    assert value(samples, "edgetune_updates_rejected_total", reason=OTHER) == 36 + 2
    assert value(samples, "edgetune_updates_accepted_total", kind=OTHER) == 1


def test_two_daemons_in_one_process_keep_separate_counts(served: Served) -> None:
    a, port_a = served(AggregatorMetrics("fleet-a"))
    b, port_b = served(AggregatorMetrics("fleet-b"))
    a.rejected("replayed")
    b.rejected("replayed")
    b.rejected("replayed")

    samples_a, samples_b = scrape(port_a), scrape(port_b)
    assert value(samples_a, "edgetune_updates_rejected_total", reason="replayed") == 1
    assert value(samples_b, "edgetune_updates_rejected_total", reason="replayed") == 2
    assert value(samples_a, "edgetune_fleet_info", fleet="fleet-a") == 1
    assert value(samples_a, "edgetune_fleet_info", fleet="fleet-b") is None
    assert healthz(port_b)[1]["fleet"] == "fleet-b"


def test_a_failing_request_costs_one_response_not_the_server(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, port = served()

    def broken(stale_after_s: float) -> dict:
        raise RuntimeError("a bug in the health check")

    monkeypatch.setattr(metrics, "health", broken)
    assert get(port, "/healthz")[0] == 500
    assert get(port, "/metrics")[0] == 200


def test_requests_are_not_logged_to_stderr(served: Served, capfd: pytest.CaptureFixture[str]) -> None:
    _, port = served()
    get(port, "/metrics")
    get(port, "/nowhere")
    assert "GET" not in capfd.readouterr().err


def test_close_frees_the_port() -> None:
    server = HealthServer(AggregatorMetrics("fleet-a"), port=0)
    port = server.start()
    assert get(port, "/metrics")[0] == 200
    server.close()
    server.close()  # twice is fine
    with pytest.raises(urllib.error.URLError):
        get(port, "/metrics")

    again = HealthServer(AggregatorMetrics("fleet-a"), port=port)
    try:
        assert again.start() == port
        assert get(port, "/metrics")[0] == 200
    finally:
        again.close()


def test_a_taken_port_is_reported_with_what_to_do() -> None:
    with HealthServer(AggregatorMetrics("fleet-a"), port=0) as first, \
            pytest.raises(OSError, match="choose another port"):
        HealthServer(AggregatorMetrics("fleet-a"), port=first.port).start()


def test_importing_the_daemon_does_not_import_prometheus_client() -> None:
    check = ("import sys, edgetune_aggregator.daemon, edgetune_aggregator.cli; "
             "print('prometheus_client' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
