"""The aggregator hands ONNX Runtime artifacts to devices in chunks; the device checks each
file against the manifest's digest, resumes partial downloads and refuses corrupted ones."""

from __future__ import annotations

import threading
import uuid

import pytest

pytest.importorskip("onnxruntime.training")

from edgetune.ort.artifacts import ArtifactError  # noqa: E402
from edgetune.ort.build import build_artifacts  # noqa: E402
from edgetune.ort.fetch import ensure_artifacts, fetch_artifacts  # noqa: E402
from edgetune.transport import open_transport  # noqa: E402
from edgetune.wire import ArtifactRequest, Topics, encode_message  # noqa: E402
from edgetune_aggregator.artifacts import ArtifactServer  # noqa: E402
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-llama"
    build_artifacts("tiny-llama", out, rank=4, alpha=8.0)
    return out


def serve(url: str, fleet: str, folder, tmp_path, max_packet: int = 32 * 1024) -> tuple[Aggregator, threading.Thread]:
    """A daemon that only waits for devices (none will join), serving ``folder`` meanwhile."""
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", min_devices=1, join_timeout_s=60,
                              ort_artifacts=folder, max_packet=max_packet)
    aggregator = Aggregator(config, open_transport(url, client_id=f"agg-{fleet}", connect_timeout=10))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    assert aggregator.ready.wait(30)  # subscribed: requests are not retained
    return aggregator, thread


def test_a_device_downloads_the_artifacts_in_chunks_over_mosquitto(mosquitto_url, artifacts, tmp_path):
    fleet = f"fetch-{uuid.uuid4().hex[:6]}"
    aggregator, thread = serve(mosquitto_url, fleet, artifacts, tmp_path)
    target = tmp_path / "device" / "artifacts"
    ensure_artifacts(mosquitto_url, fleet, "dev-1", target, timeout_s=30, connect_timeout=10)
    aggregator.stop()
    thread.join(10)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in artifacts.iterdir())
    assert all((target / p.name).read_bytes() == p.read_bytes() for p in artifacts.iterdir())
    largest = max(p.stat().st_size for p in artifacts.iterdir())
    assert aggregator.artifacts.requests >= largest // (32 * 1024)  # it really was chunked
    assert not (tmp_path / "device" / "artifacts.partial").exists()
    ensure_artifacts(mosquitto_url, fleet, "dev-1", target, timeout_s=1)  # present: nothing to do, no broker needed
    # the stopped daemon withdrew its retained offer: a device starting now is not sent to it
    with pytest.raises(ArtifactError, match="no aggregator offered"):
        ensure_artifacts(mosquitto_url, fleet, "dev-2", tmp_path / "late", timeout_s=2, connect_timeout=10)


def test_a_partial_download_resumes_and_corruption_is_refused(artifacts, tmp_path):
    fleet = f"fetch-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    aggregator, thread = serve(url, fleet, artifacts, tmp_path)
    partial = tmp_path / "dev" / "artifacts.partial"
    partial.mkdir(parents=True)
    (partial / "eval_model.onnx").write_bytes((artifacts / "eval_model.onnx").read_bytes())  # one whole file
    (partial / "checkpoint").write_bytes(b"half")
    device = open_transport(url, client_id="dev-2")
    device.connect()
    try:
        before = aggregator.artifacts.requests
        fetch_artifacts(device, fleet, "dev-2", tmp_path / "dev" / "artifacts", timeout_s=30)
        served = aggregator.artifacts.bytes_served
        assert served == sum(p.stat().st_size for p in artifacts.iterdir()
                             if p.name not in ("eval_model.onnx", "edgetune-ort.json"))
        assert aggregator.artifacts.requests > before

        # the server's folder changes under it: the device sees the digest mismatch
        data = bytearray((artifacts / "training_model.onnx").read_bytes())
        try:
            (artifacts / "training_model.onnx").write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
            with pytest.raises(ArtifactError, match="training_model.onnx arrived with sha256"):
                fetch_artifacts(device, fleet, "dev-2", tmp_path / "other", timeout_s=30)
        finally:
            (artifacts / "training_model.onnx").write_bytes(bytes(data))
    finally:
        device.close()
        aggregator.stop()
        thread.join(10)


def test_bad_requests_are_dropped_and_counted(artifacts, tmp_path):
    fleet = f"fetch-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    aggregator, thread = serve(url, fleet, artifacts, tmp_path)
    topics = Topics(fleet)
    device = open_transport(url, client_id="dev-3")
    device.connect()
    try:
        for request in (ArtifactRequest("dev-3", "ort", "secrets.txt", 0, 10),
                        ArtifactRequest("dev-3", "ort", "checkpoint", 1 << 30, 10),
                        ArtifactRequest("dev-3", "tflite", "checkpoint", 0, 10)):
            device.publish(topics.artifact_request("dev-3"), encode_message(request))
        device.publish(topics.artifact_request("dev-4"), encode_message(ArtifactRequest("dev-3", "ort", "checkpoint", 0, 10)))
        deadline = threading.Event()
        for _ in range(100):
            if sum(aggregator.drops.values()) >= 4:
                break
            deadline.wait(0.05)
        assert aggregator.drops["bad_request"] == 3 and aggregator.drops["sender_mismatch"] == 1
        assert thread.is_alive()  # still serving
    finally:
        device.close()
        aggregator.stop()
        thread.join(10)


def test_a_damaged_folder_is_never_offered(artifacts, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(artifacts, broken)
    (broken / "checkpoint").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        ArtifactServer(broken)
    with pytest.raises(ArtifactError, match="no aggregator offered"):
        fleet = f"fetch-{uuid.uuid4().hex[:6]}"
        transport = open_transport(f"memory://{fleet}", client_id="lonely")
        transport.connect()
        fetch_artifacts(transport, fleet, "lonely", tmp_path / "none", timeout_s=1)


def test_a_download_never_replaces_a_folder_of_other_files(tmp_path):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "keep.bin").write_bytes(b"the user's own file")
    with pytest.raises(ArtifactError, match="holds no ONNX Runtime artifacts"):
        ensure_artifacts("memory://nobody", "nobody", "dev-9", mine, timeout_s=1)
    assert (mine / "keep.bin").read_bytes() == b"the user's own file"
