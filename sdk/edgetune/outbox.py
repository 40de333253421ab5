"""Round results a device sent and the aggregator has not yet acknowledged.

QoS 1 gets a message to the broker, not into the aggregator's journal: the broker may restart
without persistence, the daemon may die before it writes the result down. So a device keeps
each result until a ``Receipt`` for it arrives, and resends the *same bytes* (the same nonce)
with backoff; the aggregator answers a resend it already holds with the same receipt and
counts it once. A result whose round has moved on is forgotten: the daemon would refuse it
as stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .transport.channel import Channel
from .wire import Receipt

log = logging.getLogger(__name__)


@dataclass
class _Sent:
    topic: str
    payload: bytes
    nonce: bytes
    sent_at: float
    whole: bool = False
    attempts: int = 1


class Outbox:
    def __init__(self, channel: Channel, resend_after_s: float = 30.0, max_backoff_s: float = 300.0,
                 now: Callable[[], float] = time.monotonic):
        self.channel = channel
        #: the device's clock (virtual in the fleet simulator: resends follow the device's time)
        self.now = now
        self.resend_after_s = resend_after_s
        self.max_backoff_s = max_backoff_s
        self._sent: dict[int, _Sent] = {}  # round -> the result sent for it
        self._lock = threading.Lock()  # receipts arrive on the transport's thread
        #: the receipts that arrived, newest last (what the application may inspect)
        self.receipts: list[Receipt] = []

    def send(self, topic: str, round_number: int, message, whole: bool = False) -> int:
        """Publish a round result and keep it until it is acknowledged; returns the bytes sent.
        ``whole``: in one message, not in chunks (``RoundTask.whole_updates``), resends too."""
        payload, nonce = self.channel.prepare(topic, message)
        with self._lock:
            self._sent[round_number] = _Sent(topic, payload, nonce, self.now(), whole)
        return self.channel.send_payload(topic, payload, whole=whole)

    def on_receipt(self, receipt: Receipt) -> None:
        with self._lock:
            sent = self._sent.get(receipt.round)
            if sent is None or sent.nonce != receipt.nonce:
                return  # for a result resent earlier, or not ours
            del self._sent[receipt.round]
            self.receipts.append(receipt)
            del self.receipts[:-100]
        if receipt.accepted:
            log.debug("%s: round %d result acknowledged", receipt.device_id, receipt.round)
        else:
            log.warning("%s: the aggregator refused the round %d result: %s", receipt.device_id, receipt.round,
                        receipt.reason)

    def pending(self) -> list[int]:
        with self._lock:
            return sorted(self._sent)

    def resend(self, current_round: int | None, everything: bool = False) -> int:
        """Resend what is due (``everything``: all of it, e.g. after a reconnection); results
        for rounds other than ``current_round`` are forgotten. Returns how many were resent."""
        now, due = self.now(), []
        with self._lock:
            for round_number in list(self._sent):
                if current_round is not None and round_number != current_round:
                    del self._sent[round_number]
                    continue
                sent = self._sent[round_number]
                wait = min(self.resend_after_s * 2 ** (sent.attempts - 1), self.max_backoff_s)
                if everything or now - sent.sent_at >= wait:
                    sent.sent_at, sent.attempts = now, sent.attempts + 1
                    due.append((round_number, sent))
        for round_number, sent in due:
            log.info("resending the round %d result on %s (attempt %d): no receipt yet", round_number, sent.topic,
                     sent.attempts)
            self.channel.send_payload(sent.topic, sent.payload, whole=sent.whole)
        return len(due)
