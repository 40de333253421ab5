"""The messages of a fleet's versions (docs/operations.md): which version the fleet serves
(``Serving``, from the aggregator) and what a device serves (``ServingReport``, from it).
Kept apart from ``messages.py`` for size only: ``MESSAGE_KINDS`` there names them too."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .names import check_name

__all__ = ["Serving", "ServingReport"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Serving:
    """Which global adapter version the fleet serves (what devices run for inference), as
    against the newest one rounds train on: the fleet can serve v7 while rounds build v9.
    Retained and signed; the versions it names travel whole on ``served/{version}/{i}``.

    During a staged rollout ``candidate`` is served by the ``canaries`` alone (and everyone else
    keeps ``version``) until their reports pass. A device serves a version only if the digest
    (``edgetune.adapters.digest``) of the adapter it received equals the one named here."""

    version: int
    digest: str
    candidate: int | None = None
    candidate_digest: str = ""
    canaries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.version < 0 or (self.candidate is not None and self.candidate < 0):
            raise ValueError("Serving versions are ≥ 0")
        if not _HEX64.match(self.digest) or (self.candidate is not None and not _HEX64.match(self.candidate_digest)):
            raise ValueError("Serving digests are 64 lowercase hex digits")
        if self.candidate is None and self.canaries:
            raise ValueError("Serving names canaries without a candidate")
        if len(self.canaries) > 10_000:
            raise ValueError("Serving names at most 10,000 canaries")
        for device in self.canaries:
            check_name(device, "device id")

    def version_for(self, device_id: str) -> tuple[int, str]:
        """``(version, digest)`` that ``device_id`` serves."""
        if self.candidate is not None and device_id in self.canaries:
            return self.candidate, self.candidate_digest
        return self.version, self.digest


@dataclass(frozen=True)
class ServingReport:
    """A device's word on a version it was told to serve: switched to it (its digest checked),
    or not and why; with the perplexity of that version and of the one it served before on its
    own held-out text, where it measured them (a staged rollout's canaries do)."""

    device_id: str
    version: int
    digest: str
    switched: bool
    reason: str = ""
    #: the version it served before (None: none)
    previous: int | None = None
    ppl: float | None = None
    previous_ppl: float | None = None

    def __post_init__(self) -> None:
        check_name(self.device_id, "device id")
        if len(self.reason) > 256 or len(self.digest) > 64:
            raise ValueError("ServingReport: reason ≤ 256 characters, digest ≤ 64")
