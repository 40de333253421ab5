"""What a device accepts from the aggregator: with the fleet's public key, only what the
aggregator signed, unaltered, for the topic it arrived on, and newer than what the device holds.

TLS and the broker's ACL keep strangers off the aggregator's topics, but whoever controls the
broker (or a bridge, or a leaked aggregator password) could otherwise hand every device a
forged global adapter or task. The fleet key closes that: ``provision`` makes it, the daemon
signs with it (``edgetune.wire.signing.FleetSigner``), devices hold its public half
(``fleet.pub``). Each signed message carries an ``issued`` number the aggregator only ever
raises, so an old message, genuine but replayed (an earlier global adapter, a task of an earlier
run), is refused too. What is refused is logged with its reason, counted in the channel's drops,
and changes nothing: the device keeps the last good task and adapter and trains on.

The newest number per retained topic (task, global adapter, artifact offer) is kept in the
device's state dir, so a replay is refused after a restart as well. Receipts and refusals are
per device and not retained: their numbers are kept while the device runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .logsafe import shown
from .wire import DOWNLINK_SIGNED, Chunk, Signed, Topics, WireError, decode_message
from .wire.kinds import Direction
from .wire.signing import FleetKey

log = logging.getLogger("edgetune.device")

__all__ = ["DownlinkGuard", "STATE_FILE"]

#: in the device's state dir: the newest ``issued`` accepted per retained topic
STATE_FILE = "downlink.json"
#: topics whose newest number is remembered while running (a device's receipts and refusals)
_MAX_TOPICS = 64


class DownlinkGuard:
    """``open(topic, message)``: the message to act on, or why it is refused. Without a fleet
    key it only unwraps what the aggregator signed (nothing is verified: the device trusts the
    broker, and says so once in its log)."""

    def __init__(self, topics: Topics, key: FleetKey | None = None, state_dir: Path | None = None):
        self.topics = topics
        self.key = key
        self._file = Path(state_dir) / STATE_FILE if state_dir is not None and key is not None else None
        #: write what it accepted to the state dir (off for a second process of the device,
        #: ``device personalize``: the running one's record is the one that counts)
        self.remember = True
        #: topic -> (issued, SHA-256 of the signed payload) of the newest message accepted
        self._newest: dict[str, tuple[int, bytes]] = self._load()
        self._lock = threading.Lock()  # (the transport may deliver on more than one thread)
        self._said_unverified = False

    @property
    def verifies(self) -> bool:
        return self.key is not None

    def newest_issued(self) -> int:
        """The newest number of the aggregator's it holds (its hello says so: a daemon whose
        count is behind counts on from it)."""
        with self._lock:
            return max((issued for issued, _ in self._newest.values()), default=0)

    def open(self, topic: str, message: Any) -> tuple[Any, str, str]:
        """``(message, "", "")`` to act on, or ``(None, reason, detail)``."""
        found = self.topics.kind_of(topic)
        if found is None or found[0].direction is not Direction.DOWN:
            return message, "", ""  # (another device's presence, progress: not the aggregator's)
        kind = found[0]
        if not isinstance(message, Signed):
            if self.key is not None and kind.name in DOWNLINK_SIGNED:
                return None, "unsigned", f"a {type(message).__name__} without the aggregator's signature"
            return message, "", ""
        if self.key is None:
            if not self._said_unverified:
                self._said_unverified = True
                log.info("the aggregator signs what it publishes; this device does not verify it (no fleet key: "
                         "--fleet-key fleet.pub)")
            return self._inner(message)
        return self.verify(self.topics.message_topic(topic), message, save=kind.retained)

    def verify(self, signed_for: str, message: Signed, save: bool = False) -> tuple[Any, str, str]:
        """``open`` past the topic's kind: the aggregator's signature for ``signed_for`` and an
        ``issued`` number not older than the newest taken there (the same message again is
        taken again). Also for topics outside the device table (an aggregator worker's
        announcements); ``save``: remember the number in the state dir."""
        why = self.key.verify(signed_for, message)
        if why:
            detail = {"sender_mismatch": f"signed by {shown(message.device_id, 64)}, not the aggregator",
                      "unknown_key": f"key {shown(message.key_id, 16)} is not the fleet's {self.key.key_id}",
                      "bad_signature": "the signature does not match the message"}[why]
            return None, why, detail
        digest = hashlib.sha256(message.payload).digest()
        with self._lock:
            newest = self._newest.get(signed_for)
            if newest is not None and (message.issued < newest[0] or (message.issued == newest[0]
                                                                        and digest != newest[1])):
                return None, "replayed", (f"issued {message.issued}, older than the {newest[0]} this device holds "
                                          f"for {shown(signed_for, 200)}")
            fresh = newest is None or message.issued > newest[0]
            if fresh:
                self._newest[signed_for] = (message.issued, digest)
        inner = self._inner(message)
        if inner[0] is not None and fresh and save:
            self._save()
        return inner

    def _inner(self, message: Signed) -> tuple[Any, str, str]:
        try:
            inner = decode_message(message.payload)
        except WireError as exc:
            return None, exc.reason, exc.detail
        if isinstance(inner, (Signed, Chunk)):
            return None, "bad_payload", f"a signed {type(inner).__name__} is not an aggregator message"
        return inner, "", ""

    # --- the state dir ------------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[int, bytes]]:
        if self._file is None:
            return {}
        try:
            saved = json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # (written atomically: only tampering or a bad disk)
            log.warning("cannot read %s (%s): replays are refused from the next message on", self._file, exc)
            return {}
        if not isinstance(saved, dict) or saved.get("fleet") != self.topics.fleet or saved.get("key") != self.key.key_id:
            return {}  # (another fleet's, or another fleet key's numbers: they say nothing of this one)
        newest = {}
        for topic, entry in (saved.get("newest") or {}).items():
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str):
                try:
                    newest[topic] = (entry[0], bytes.fromhex(entry[1]))
                except ValueError:
                    continue
        return newest

    def _save(self) -> None:
        if self._file is None or not self.remember:
            return
        with self._lock:
            retained = {t: [i, d.hex()] for t, (i, d) in self._newest.items() if self._retained(t)}
            if len(self._newest) > _MAX_TOPICS:  # (receipts of past rounds: only the retained matter later)
                self._newest = {t: v for t, v in self._newest.items() if self._retained(t)}
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._file, {"format": 1, "fleet": self.topics.fleet, "key": self.key.key_id,
                                           "newest": retained})
        except OSError as exc:  # (the device trains on; a replay after a restart is then not caught)
            log.warning("cannot write %s: %s", self._file, exc)

    def _retained(self, topic: str) -> bool:
        found = self.topics.kind_of(topic) or self.topics.kind_of(topic + "/0")
        return found is not None and found[0].retained
