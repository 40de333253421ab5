"""The daemon's bounded inbox: backpressure on the network thread, never on its reader."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from edgetune_aggregator.inbox import Inbox

from helpers.manual import manuals, memory_fleet
from helpers.waiting import wait_for


def test_a_full_inbox_blocks_writers_until_read_and_close_releases_them():
    inbox = Inbox(max_bytes=100)
    inbox.put("a", 60)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (inbox.put("b", 60), done.set()), daemon=True)
    writer.start()
    assert not done.wait(0.2)  # 120 > 100: it waits
    assert inbox.get(1) == "a"
    assert done.wait(2) and inbox.get(1) == "b"
    inbox.put("huge", 1000)  # one item always fits, however large
    stuck = threading.Thread(target=lambda: inbox.put("c", 60), daemon=True)
    stuck.start()
    time.sleep(0.1)
    inbox.close()  # the daemon stops: nobody will read
    stuck.join(2)
    assert not stuck.is_alive() and not inbox.put("d", 1)
    with pytest.raises(queue.Empty):
        inbox.get(0.05)


def test_the_reader_never_waits_for_itself():
    inbox = Inbox(max_bytes=10)
    inbox.reader = threading.get_ident()
    for i in range(5):  # e.g. retained messages handed over while the daemon subscribes
        assert inbox.put(i, 10)
    assert [inbox.get(0.1) for _ in range(5)] == list(range(5))


def test_a_daemon_stopped_during_the_final_evaluation_does_not_announce_the_end(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "stopev", round_timeout_s=60, evaluate_final=True)
    (m,) = manuals(url, fleet, aggregator, "m")
    m.send(m.update(1))
    assert wait_for(lambda: aggregator.task.kind.value == "evaluate")
    aggregator.stop()
    thread.join(timeout=30)
    assert not thread.is_alive() and not aggregator.finished.is_set()
    assert aggregator.task.kind.value == "evaluate"  # devices are not told the fleet is over
    m.close()
