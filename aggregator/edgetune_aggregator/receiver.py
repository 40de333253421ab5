"""The intake between the network thread and the round loop: whole payloads in, opened
messages out, in the order they came.

The stages an update goes through, each in its own module::

    receive   transport/channel.py   chunks put together on the network thread, nothing more
    verify    intake.py              SHA-256 of the transfer, decode, the device's signature,
                                     an update's values read once (finite, norm)
    validate  desk.py, validation.py for this round, from a member, layout, norm bound
    journal   journal.py             staged, then one fsync for what came together
    sink      desk.py                accepted into the round, then the receipt
    combine   weighting.py           at the close: streamed into the strategy

The network thread only reassembles, so it goes back to reading the socket at once; verify and
decode run on ``threads`` threads of their own (hashing and numpy release the GIL, so on a
multi-core host they overlap with the loop's work), and the loop takes their results in arrival
order: one device's messages are acted on in the order it sent them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .inbox import Inbox
from .intake import Intake, Opened
from .validation import Refusal

#: what a small message is charged in the inbox beyond its payload
_SMALL = 1024


class Received:
    """One inbox entry: a topic and (once its stage is done) what opening it gave."""

    __slots__ = ("topic", "_future", "_value")

    def __init__(self, topic: str, future: Future | None = None, value: object = None):
        self.topic, self._future, self._value = topic, future, value

    def result(self) -> object:
        """``Opened`` or ``Refusal`` (waits for the stage's thread if it is still busy)."""
        return self._future.result() if self._future is not None else self._value


class Receiver:
    def __init__(self, intake: Intake, inbox: Inbox, threads: int = 2):
        self.intake = intake
        self.inbox = inbox
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="edgetune-intake") if threads > 0 else None

    def enqueue(self, topic: str, payload: bytes | bytearray, transfer: str | None) -> None:
        """(On the network thread.) Hand a whole payload to the stage; blocks while the inbox is
        full (inbox.py), which stops the network thread reading: the broker holds the rest."""
        if self._pool is None:
            item = Received(topic, value=self._open(topic, payload, transfer))
        else:
            item = Received(topic, self._pool.submit(self._open, topic, payload, transfer))
        # what holding it costs: the payload, and about as much again while it is being decoded
        self.inbox.put(item, 2 * len(payload) + _SMALL)

    def _open(self, topic: str, payload: bytes | bytearray, transfer: str | None) -> Opened | Refusal:
        try:
            return self.intake.open_payload(topic, payload, transfer)
        except Exception as exc:  # a decoder bug must not lose the loop its order
            return Refusal("bad_payload", f"{type(exc).__name__}: {str(exc)[:200]}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
