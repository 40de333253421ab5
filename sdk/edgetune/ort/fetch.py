"""Downloading ONNX Runtime artifacts from the aggregator over MQTT (``--ort-artifacts`` on the
daemon; ``edgetune.aggregator.artifacts`` has the server side).

The device reads the retained :class:`ArtifactOffer` (the manifest and file sizes), then pulls
each file in chunks, a few requests in flight at a time, writing every chunk at its offset in
``<folder>.partial/``. When nothing has arrived for a while, the outstanding requests are asked
again (so a slow link is not flooded with repeats); duplicates and chunks of the wrong length
are ignored. A file is checked against the manifest's SHA-256 when it is complete (a mismatch
deletes it and fails), and only a folder whose manifest verifies is renamed into place, so
``folder`` is either absent or complete. A partial folder left by an interrupted download is
resumed file by file: whole files that verify are kept, the others fetched again.

Only the standard library, numpy-free code and the transport: a torch-free device runs this
before it can say which model it has.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from pathlib import Path

from ..transport import Transport
from ..downlink import DownlinkGuard
from ..transport.channel import Channel
from ..wire import ArtifactData, ArtifactOffer, ArtifactRequest, Topics
from ..wire.signing import FleetKey
from .artifacts import MANIFEST_FILE, ArtifactError, ArtifactManifest, file_digest, load_manifest

#: how long a device waits for the aggregator's offer, and for each download to progress
FETCH_TIMEOUT_S = 600.0

log = logging.getLogger(__name__)

__all__ = ["ensure_artifacts", "fetch_artifacts"]


def ensure_artifacts(broker: str, fleet: str, device_id: str, folder: Path, timeout_s: float = FETCH_TIMEOUT_S,
                     connect_timeout: float | None = None, fleet_key: Path | None = None, **tls: str) -> None:
    """Download the artifacts into ``folder`` unless it holds some already (they are verified
    when loaded), over a connection of its own that is closed afterwards (``tls``: the
    ``ca_certs``/``certfile``/``keyfile`` of an ``mqtts://`` broker; ``fleet_key``: accept only
    an offer the aggregator signed, ``edgetune.downlink``)."""
    from ..transport import open_transport

    if (Path(folder) / MANIFEST_FILE).is_file():
        return
    _check_target(Path(folder))
    log.info("%s: no artifacts in %s; asking the aggregator of fleet %s", device_id, folder, fleet)
    transport = open_transport(broker, client_id=f"edgetune-{fleet}-{device_id}-fetch", connect_timeout=connect_timeout,
                               **tls)
    transport.connect()
    try:
        fetch_artifacts(transport, fleet, device_id, Path(folder), timeout_s=timeout_s, fleet_key=fleet_key)
    finally:
        transport.close()


def fetch_artifacts(
    transport: Transport,
    fleet: str,
    device_id: str,
    folder: Path,
    *,
    backend: str = "ort",
    timeout_s: float = 600.0,
    window: int = 4,
    retry_s: float = 15.0,
    fleet_key: Path | None = None,
) -> ArtifactManifest:
    """Download the offered artifacts into ``folder`` (which must not hold artifacts yet) over
    a connected ``transport``; returns the verified manifest. Raises :class:`ArtifactError`
    when nothing is offered within ``timeout_s``, or no progress is made for that long."""
    folder = Path(folder).resolve()
    _check_target(folder)
    topics = Topics(fleet)
    channel = Channel(transport, topics.sender_of)
    # (the offer's manifest holds every file's SHA-256: with the fleet key, it is the aggregator's)
    channel.opener = DownlinkGuard(topics, FleetKey.load(fleet_key) if fleet_key is not None else None).open
    inbox: queue.Queue = queue.Queue()
    channel.subscribe(topics.artifact_offer(backend) + "/+", lambda topic, message: inbox.put(message))
    channel.subscribe(topics.artifact_data(device_id), lambda topic, message: inbox.put(message))
    offer = _wait_for_offer(inbox, timeout_s)
    try:
        manifest = ArtifactManifest.from_json(json.loads(offer.manifest))
    except ValueError as exc:
        raise ArtifactError(f"the aggregator offers a manifest this SDK cannot read: {exc}") from exc
    if set(offer.sizes) != set(manifest.files):
        raise ArtifactError("the aggregator's offer lists other files than its manifest")
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    started, total = time.monotonic(), sum(offer.sizes.values())
    for name in sorted(manifest.files):
        _fetch_file(channel, topics, inbox, device_id, backend, partial / name, offer.sizes[name],
                    manifest.files[name], offer.chunk_size, window, retry_s, timeout_s)
    (partial / MANIFEST_FILE).write_bytes(offer.manifest)
    # each file was checked against the manifest's digest as it completed: no second hashing here
    checked = load_manifest(partial, verify_files=False)
    if folder.exists():
        folder.rmdir()  # empty (checked above): never a folder of the user's
    os.rename(partial, folder)
    seconds = time.monotonic() - started
    log.info("%s: downloaded ONNX Runtime artifacts (%.1f MB) in %.1f s (%.1f MB/s) into %s", device_id,
             total / 1e6, seconds, total / 1e6 / max(seconds, 1e-9), folder)
    return checked


def _check_target(folder: Path) -> None:
    """Downloads go only into an absent or empty folder: never over a folder of other files."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ArtifactError(f"{folder} exists and holds no ONNX Runtime artifacts ({MANIFEST_FILE} is missing); "
                            "pass an absent or empty folder for the download, or a folder from `edgetune build-ort`")


def _wait_for_offer(inbox: queue.Queue, timeout_s: float) -> ArtifactOffer:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ArtifactError(f"no aggregator offered ONNX Runtime artifacts within {timeout_s:.0f} s: start it with "
                                "--ort-artifacts DIR, or copy a folder made by `edgetune build-ort` to the device")
        try:
            message = inbox.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if isinstance(message, ArtifactOffer):
            return message


def _fetch_file(channel: Channel, topics: Topics, inbox: queue.Queue, device_id: str, backend: str, path: Path,
                size: int, digest: str, chunk: int, window: int, retry_s: float, timeout_s: float) -> None:
    if path.is_file() and path.stat().st_size == size and file_digest(path) == digest:
        log.info("%s: %s already complete", device_id, path.name)
        return
    missing = set(range(0, size, chunk))
    outstanding: set[int] = set()
    last_progress = last_retry = time.monotonic()
    with open(path, "wb") as f:
        f.truncate(size)
        while missing:
            now = time.monotonic()
            if now - last_progress > timeout_s:
                raise ArtifactError(f"downloading {path.name} stalled: no data for {timeout_s:.0f} s")
            if outstanding and now - max(last_progress, last_retry) >= retry_s:
                outstanding.clear()  # nothing came for a while: lost requests or answers; ask again
                last_retry = now  # (the stall clock keeps running from the last chunk)
                log.info("%s: no data for %.0f s; asking again for %s", device_id, now - last_progress, path.name)
            for offset in sorted(missing - outstanding)[: max(0, window - len(outstanding))]:
                outstanding.add(offset)
                request = ArtifactRequest(device_id, backend, path.name, offset, min(chunk, size - offset))
                channel.send(topics.artifact_request(device_id), request)
            try:
                message = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if not isinstance(message, ArtifactData) or message.file != path.name or message.offset not in missing:
                continue  # an offer re-sent, another file's late chunk, or a duplicate
            if message.size != size:
                raise ArtifactError(f"the aggregator now serves {path.name} with {message.size} bytes, not {size}: "
                                    "its artifacts changed during the download; start again")
            if len(message.data) != min(chunk, size - message.offset):
                raise ArtifactError(f"the aggregator serves {path.name} in other chunks than it offered (restarted "
                                    "with another packet size, or its file changed): start the download again")
            os.pwrite(f.fileno(), message.data, message.offset)
            missing.discard(message.offset)
            outstanding.discard(message.offset)
            last_progress = time.monotonic()
        f.flush()
        os.fsync(f.fileno())
    actual = file_digest(path)
    if actual != digest:
        path.unlink()
        raise ArtifactError(f"{path.name} arrived with sha256 {actual[:12]}…, not the manifest's {digest[:12]}…: "
                            "the download was corrupted; start again")
