"""Serving ONNX Runtime training artifacts to devices over MQTT.

A device without PyTorch cannot build its own artifacts (that needs torch), and copying a
folder onto every device by hand does not scale. With ``--ort-artifacts DIR`` the daemon
publishes a retained :class:`ArtifactOffer` (the folder's manifest, verbatim, and the file
sizes) and answers each :class:`ArtifactRequest` with one :class:`ArtifactData` chunk on the
asking device's own topic. Devices pull (``edgetune.ort.fetch``): they ask for a few chunks at
a time, so neither side queues hundreds of megabytes, a lost chunk is simply asked for again,
and an interrupted download keeps the files it completed. Every file is checked
against the manifest's SHA-256 on the device, and the manifest itself was checked here at
start-up, so a corrupted folder is never offered.

This module reads the manifest as JSON and never imports onnxruntime: the daemon stays numpy,
msgpack and paho only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgetune.ort.artifacts import MANIFEST_FILE, load_manifest
from edgetune.transport.channel import Channel
from edgetune.wire import ArtifactData, ArtifactOffer, ArtifactRequest, Topics

log = logging.getLogger(__name__)

__all__ = ["ArtifactServer"]

DEFAULT_CHUNK = 1 << 19


class ArtifactServer:
    """Hands out the files of one verified artifact folder."""

    backend = "ort"

    def __init__(self, folder: Path, chunk_size: int = DEFAULT_CHUNK):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)  # checks every file's digest once, here
        self.chunk_size = chunk_size
        self.sizes = {name: (self.folder / name).stat().st_size for name in self.manifest.files}
        self.bytes_served = 0
        self.requests = 0
        self._frames = 0  # retained frames of the published offer, cleared by withdraw()

    @staticmethod
    def chunk_for(max_packet: int) -> int:
        """The largest chunk whose ArtifactData message fits one packet (with room for its
        msgpack envelope and the frame header)."""
        return max(1024, min(max_packet - 4096, DEFAULT_CHUNK))

    def offer(self) -> ArtifactOffer:
        return ArtifactOffer(self.backend, (self.folder / MANIFEST_FILE).read_bytes(), dict(self.sizes), self.chunk_size)

    def publish(self, channel: Channel, topics: Topics) -> None:
        self._frames = channel.send_retained(topics.artifact_offer(self.backend), self.offer())
        log.info("offering ONNX Runtime artifacts of %s (%s, %.1f MB) from %s", self.manifest.model.name,
                 self.manifest.adapter.describe(), sum(self.sizes.values()) / 1e6, self.folder)

    def withdraw(self, channel: Channel, topics: Topics) -> None:
        """Clear the retained offer, so devices that start later do not wait on a daemon that
        is gone."""
        prefix = topics.artifact_offer(self.backend)
        for index in range(self._frames):
            channel.transport.publish(f"{prefix}/{index}", b"", qos=1, retain=True)
        self._frames = 0

    def answer(self, request: ArtifactRequest) -> ArtifactData | str:
        """The chunk asked for, or why it cannot be given (a drop reason's detail)."""
        if request.backend != self.backend:
            return f"no artifacts for backend {request.backend!r}"
        size = self.sizes.get(request.file)
        if size is None:
            return f"{request.file!r} is not an artifact file"
        if request.offset >= size and not (size == 0 and request.offset == 0):
            return f"offset {request.offset} is past the end of {request.file} ({size} bytes)"
        length = min(request.length, self.chunk_size, size - request.offset)
        try:
            with open(self.folder / request.file, "rb") as f:
                data = os.pread(f.fileno(), length, request.offset)
        except OSError as exc:  # the folder changed under the daemon: keep serving the rest
            log.error("cannot read artifact %s: %s", request.file, exc)
            return f"cannot read {request.file}: {exc.strerror}"
        self.requests += 1
        self.bytes_served += len(data)
        return ArtifactData(request.file, request.offset, size, data)
