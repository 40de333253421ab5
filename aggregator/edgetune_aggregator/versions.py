"""Every global adapter is a version: its number, parent, strategy, contributors, metrics,
digest and time, in ``versions.json`` (the tensors are ``global/v{n}.msgpack``).

Two versions matter at any time: the *training* version rounds build on (``FleetState.
global_version``) and the *serving* version devices run (``FleetState.serving_version``),
which moves only by promotion (``serving.py``): the fleet can serve v7 while rounds build v9.
A rollback makes an older version the serving one and restarts training from a copy of it,
numbered as a new version whose parent is the old one, so numbers only grow and every
version's lineage stays readable. The digest (``edgetune.adapters.digest``) is what devices
check before they serve a version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgetune.atomic import atomic_write_json

log = logging.getLogger(__name__)

VERSIONS_FORMAT = 1


@dataclass
class VersionRecord:
    version: int
    #: the version it was built from (None: the fleet's first)
    parent: int | None
    #: the round that built it (0: the fleet's start; a rollback: the round it was made before)
    round: int
    #: how it was made: the strategy's name, "initial", or "rollback"
    strategy: str
    digest: str
    #: wall-clock seconds (time.time()) when it was stored
    created: float
    #: devices whose updates it merged
    contributors: list[str] = field(default_factory=list)
    #: what was measured of it: ``ppl`` / ``robust_ppl`` (sample-weighted, over ``evaluated_by``
    #: devices' held-out text, from the round that trained on it), ``train_loss`` of the round
    #: that built it, and the gate's and rollout's findings
    metrics: dict[str, float] = field(default_factory=dict)
    #: why it exists or what happened to it, for people ("rollback to v3", "gate: …")
    note: str = ""
    #: the operator request that made it (a rollback), so a request applied twice makes it once
    request: str = ""
    #: the validation gate's verdict on it (``gate.Verdict.as_dict``; None: not judged)
    gate: dict | None = None


class VersionLog:
    """``versions.json``: one record per version, written atomically at every change."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "versions.json"
        self._records: dict[int, VersionRecord] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = json.loads(self.path.read_text())
        if raw.get("format") != VERSIONS_FORMAT:
            raise RuntimeError(f"{self.path} has format {raw.get('format')}; expected {VERSIONS_FORMAT}")
        names = {f.name for f in fields(VersionRecord)}
        for entry in raw["versions"]:
            record = VersionRecord(**{k: v for k, v in entry.items() if k in names})
            self._records[record.version] = record

    def save(self) -> None:
        atomic_write_json(self.path, {"format": VERSIONS_FORMAT,
                                      "versions": [asdict(r) for _, r in sorted(self._records.items())]})

    def add(self, record: VersionRecord, save: bool = True) -> None:
        self._records[record.version] = record
        if save:
            self.save()

    def get(self, version: int) -> VersionRecord | None:
        return self._records.get(version)

    def all(self) -> list[VersionRecord]:
        return [r for _, r in sorted(self._records.items())]

    def by_request(self, request: str) -> VersionRecord | None:
        return next((r for r in self._records.values() if request and r.request == request), None)

    def measured(self, version: int, **metrics: float | None) -> None:
        """Add what was measured of ``version`` (None values are left out)."""
        record = self._records.get(version)
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if record is None or not values:
            return
        record.metrics.update(values)
        self.save()

    def judged(self, version: int, verdict: dict) -> None:
        record = self._records.get(version)
        if record is not None:
            record.gate = verdict
            self.save()

    def noted(self, version: int, note: str) -> None:
        record = self._records.get(version)
        if record is not None:
            record.note = f"{record.note}; {note}" if record.note else note
            self.save()
