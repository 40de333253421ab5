"""The round journal keeps each accepted result as it arrived: the very bytes the device
published (reassembled from chunks), not an encoding of what the daemon decoded. So a field the
daemon does not know (a newer device's) survives in the journal, and a restarted daemon replays
exactly what came in."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edgetune.wire import DEFAULT_MAX_PACKET, Update, decode_message, encode_message
from edgetune.wire.signing import unwrap

from helpers.journal import journaled as journal_of
from helpers.manual import SHAPES, manuals, memory_fleet
from helpers.waiting import wait_for


def _with_unknown_field(payload: bytes) -> bytes:
    """The message as a newer device would send it: one more field, which this version ignores."""
    envelope = msgpack.unpackb(payload, raw=False)
    envelope["body"]["from_a_newer_sdk"] = "ignored here, kept in the journal"
    return msgpack.packb(envelope, use_bin_type=True)


@pytest.mark.parametrize("packet", [DEFAULT_MAX_PACKET, 4096], ids=["one frame", "chunked"])
def test_the_journal_holds_the_payload_exactly_as_the_device_published_it(tmp_path, packet):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "journal", min_devices=2, round_timeout_s=60)
    try:
        device, _ = manuals(url, fleet, aggregator, "dev-0", "dev-1")  # dev-1 said hello: the round stays open
        device.channel.max_packet = packet
        update = device.update(1)
        payload = _with_unknown_field(encode_message(update))  # (unsigned: the fleet has no device keys)
        assert payload != encode_message(update)
        device.channel.send_payload(device.topics.update(device.id), payload)
        assert wait_for(lambda: any(r.accepted for r in device.receipts), 30)
        journaled = journal_of(tmp_path / "state", 1, "dev-0")
        assert journaled == payload  # as received, not re-encoded (which would drop the unknown field)
        again = unwrap(decode_message(journaled))
        assert isinstance(again, Update) and again.device_id == "dev-0"
        for name in SHAPES:
            np.testing.assert_array_equal(again.delta[name], update.delta[name])
    finally:
        aggregator.stop()
        thread.join(timeout=30)


def test_segments_are_numbered_on_across_restarts_with_the_folder_listed_once_per_round(tmp_path, monkeypatch):
    """A commit per batch writes a new segment; its index is counted in memory (listing a
    round's folder at every commit grew with the round), from what is on disk when a process
    first commits to the round: a restarted daemon numbers on, and every result loads."""
    from pathlib import Path

    from edgetune_aggregator.journal import RoundJournal

    first = RoundJournal(tmp_path)
    first.open(1, "train", b"task", 0.0)
    for i in range(3):
        first.record(1, f"dev-{i}", f"payload {i}".encode())

    listings = []
    glob = Path.glob

    def counted(self, pattern):
        if pattern == "s*.seg":
            listings.append(self.name)
        return glob(self, pattern)

    monkeypatch.setattr(Path, "glob", counted)
    restarted = RoundJournal(tmp_path)
    for i in range(3, 8):
        restarted.record(1, f"dev-{i}", f"payload {i}".encode())
    assert listings == ["r000001"]  # (once, for the first commit of this process)
    monkeypatch.setattr(Path, "glob", glob)

    segments = sorted(p.name for p in (tmp_path / "journal" / "r000001").glob("s*.seg"))
    assert segments == [f"s{i:06d}.seg" for i in range(1, 9)]
    loaded = restarted.load(1).results
    assert {name: record.read_bytes() for name, record in loaded.items()} == {
        f"dev-{i}": f"payload {i}".encode() for i in range(8)}
    restarted.discard()
    restarted.open(1, "train", b"task again", 1.0)  # (a round number used again after a discard starts at 1)
    restarted.record(1, "dev-0", b"again")
    assert sorted(p.name for p in (tmp_path / "journal" / "r000001").glob("s*.seg")) == ["s000001.seg"]
