"""What the daemon lives with (``health.py``): a full disk is retried every two seconds and
what waited for room is saved once it takes a write again, whether or not /metrics is served."""

from __future__ import annotations

from edgetune.transport import open_transport
from edgetune_aggregator.health import Health
from edgetune_aggregator.store import StateStore


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_a_full_disk_clears_itself_without_metrics(tmp_path):
    clock, saved = _Clock(), []
    health = Health(None, StateStore(tmp_path / "state"), open_transport("memory://health", client_id="a"), clock)
    health.on_storage_back = lambda: saved.append("hellos")
    health.storage_failed(OSError(28, "No space left on device"))
    assert health.storage_degraded and "No space left" in health.problems["storage"]
    clock.now = 1.0
    health.tick()  # (probed only every two seconds)
    assert health.storage_degraded and saved == []
    clock.now = 2.5
    health.tick()  # the state dir takes a write: what waited is saved, the problem is over
    assert saved == ["hellos"] and not health.storage_degraded


def test_a_disk_still_full_stays_a_problem(tmp_path):
    clock = _Clock()
    health = Health(None, StateStore(tmp_path / "state"), open_transport("memory://health2", client_id="a"), clock)

    def still_full():
        raise OSError(28, "No space left on device")

    health.on_storage_back = still_full
    health.storage_failed(OSError(28, "No space left on device"))
    clock.now = 3.0
    health.tick()
    assert health.storage_degraded
