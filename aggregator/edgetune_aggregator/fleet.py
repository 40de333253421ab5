"""The fleet as the daemon's parts share it: its persistent state, the global adapter now
published, and the strategy its versions follow.

One object, handed to every part that needs it, instead of each part reaching into the daemon:
parts read ``state``, ``global_adapter`` and ``strategy`` here and change them only through
these methods, so what must survive a restart is saved where it changes (``StateStore``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from edgetune.adapters.digest import adapter_digest
from edgetune.adapters.kind import AdapterKind
from edgetune.adapters.registry import adapter_kind
from edgetune.wire import GlobalAdapter

from .store import FleetState, StateStore
from .strategies import Strategy
from .versions import VersionLog, VersionRecord


class Fleet:
    def __init__(self, store: StateStore):
        self.store = store
        #: None until the fleet starts (first devices) or is resumed from the state dir
        self.state: FleetState | None = None
        #: the adapter devices hold now (retained on the broker)
        self.global_adapter: GlobalAdapter | None = None
        #: made once the fleet's state is known (its strategy is fixed for a state dir)
        self.strategy: Strategy | None = None
        #: every global adapter version's record (``versions.py``)
        self.versions = VersionLog(store.directory)

    @property
    def kind(self) -> AdapterKind:
        """The kind of adapter the fleet trains (``edgetune.adapters.registry``)."""
        return adapter_kind(self.state.adapter)

    def update(self, save: bool = False, **changes) -> FleetState:
        """Change fields of the state (``save``: and write it, atomically, before anyone is told)."""
        self.state = dataclasses.replace(self.state, **changes)
        if save:
            self.store.save_state(self.state)
        return self.state

    def save(self) -> None:
        self.store.save_state(self.state)

    def new_version(self, adapter: GlobalAdapter, parent: int | None, strategy: str, contributors: Iterable[str] = (),
                    metrics: dict[str, float] | None = None, note: str = "", request: str = "") -> VersionRecord:
        """Store ``adapter`` as a version (its tensors, the PEFT export, its record) and make it
        the one rounds train on; the caller saves the state that names it."""
        self.store.save_global(adapter, self.state.base_model)
        record = VersionRecord(adapter.version, parent, adapter.round, strategy,
                               adapter_digest(adapter.tensors, adapter.merged), time.time(), sorted(set(contributors)),
                               dict(metrics or {}), note, request)
        self.versions.add(record)
        self.global_adapter = adapter
        return record

    def backfill_versions(self) -> None:
        """Records for the versions a state dir from before ``versions.json`` holds (their
        lineage and contributors from ``rounds.json``)."""
        missing = [v for v in self.store.global_versions() if self.versions.get(v) is None]
        if not missing:
            return
        built = {r["new_version"]: r for r in self.store.rounds() if r.get("new_version") is not None}
        for version in missing:
            adapter = self.store.load_global(version)
            round_ = built.get(version)
            self.versions.add(VersionRecord(
                version, round_["base_version"] if round_ else (version - 1 if version else None), adapter.round,
                self.state.strategy if version else "initial", adapter_digest(adapter.tensors, adapter.merged),
                self.store.global_path(version).stat().st_mtime,
                sorted({d["device_id"] for d in round_["devices"]}) if round_ else [], note="recorded afterwards"),
                save=False)
        self.versions.save()
