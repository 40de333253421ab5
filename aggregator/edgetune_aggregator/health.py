"""What ``/healthz`` and the metrics say about the daemon: problems it is living with (an
unwritable state dir, a planning failure), the devices it knows, the broker link and traffic.

The round loop calls ``tick`` at least twice a second; a problem is raised with a reason and
cleared with None. A full disk clears itself: the state dir is probed every two seconds and,
once it takes a write again, what waited for room is saved (``on_storage_back``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgetune.clock import Clock
from edgetune.transport import Transport

from .store import StateStore

log = logging.getLogger("edgetune_aggregator.daemon")

#: seconds between probes of an unwritable state dir
_PROBE_S = 2.0


class Health:
    def __init__(self, metrics, store: StateStore, transport: Transport, clock: Clock):
        #: an ``AggregatorMetrics`` (``edgetune_aggregator.metrics``) to keep current, or None
        self.metrics = metrics
        self.store = store
        self.transport = transport
        self.clock = clock
        #: ``() -> None`` saving what waited for room (raises OSError if the disk is still full)
        self.on_storage_back: Callable[[], None] | None = None
        #: ``() -> (known, online)`` device counts
        self.device_counts: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self._stats_seen = (0, 0)  # transport bytes already counted in the metrics
        self._probed = 0.0  # when the state dir was last found unwritable or probed
        #: the conditions the daemon lives with now (cause -> why), with or without metrics
        self.problems: dict[str, str] = {}

    def problem(self, cause: str, why: str | None) -> None:
        """A condition /healthz reports as degraded (None: it is over)."""
        if self.metrics is not None:
            self.metrics.problem(cause, why)
        if why is None:
            self.problems.pop(cause, None)
        else:
            self.problems[cause] = why
            self._probed = self.clock.monotonic()

    def storage_failed(self, exc: OSError) -> None:
        self.problem("storage", f"writing {self.store.directory} failed: {exc}")

    @property
    def storage_degraded(self) -> bool:
        return "storage" in self.problems

    def wrote(self) -> None:
        """A write to the state dir succeeded: if it was degraded, it is not any more."""
        if self.storage_degraded:
            self.storage_recovered()

    def storage_recovered(self) -> None:
        """The state dir took a write again: save what waited for room, and say so."""
        try:
            if self.on_storage_back is not None:
                self.on_storage_back()
        except OSError as exc:
            self.storage_failed(exc)
            return
        log.info("the state dir %s is writable again", self.store.directory)
        self.problem("storage", None)

    def tick(self) -> None:
        """Retry what a full disk held back, and bring the metrics up to date."""
        if self.storage_degraded and self.clock.monotonic() - self._probed >= _PROBE_S:
            self._probed = self.clock.monotonic()
            if self.store.writable():  # the disk has room again (or is writable again)
                self.storage_recovered()
        if self.metrics is None:
            return
        self.metrics.heartbeat()
        self.metrics.devices(*self.device_counts())  # (only known devices are ever online)
        self.metrics.broker_connected(self.transport.connected)
        sent, received = self.transport.stats.snapshot()
        self.metrics.sent_bytes(sent - self._stats_seen[0])
        self.metrics.received_bytes(received - self._stats_seen[1])
        self._stats_seen = (sent, received)
