"""What the round loop asks of the handler of one task kind, and the open round they share.

The loop (``runner.py``) and the result desk (``desk.py``) know nothing of what a task asks:
for every result they call the handler of the task kind it answers (``edgetune.wire.TASKS``
says which), and at the round's close the handler decides the outcome. One handler per kind:
``train.py``, ``evaluate.py``, ``calibrate.py``, ``initialize.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from edgetune.wire import Receipt, TaskKind

from ..store import RoundRecord
from ..validation import Refusal

log = logging.getLogger("edgetune_aggregator.daemon")


@dataclass
class RoundContext:
    """The open round: its record (what ``rounds.json`` keeps) and who answered how."""

    number: int
    kind: TaskKind
    record: RoundRecord
    #: accepted results are written to the round journal (``TaskSpec.journaled``)
    journal: bool = False
    seen: set[str] = field(default_factory=set)
    #: (device, nonce) -> the receipt it got: a resent or replayed result gets it again
    receipts: dict[tuple[str, bytes], Receipt] = field(default_factory=dict)
    #: the latest refusal per device (a device with a key could send refused results without
    #: end: only its last is kept, so the round's memory follows the fleet, not the traffic)
    refusals: dict[str, Receipt] = field(default_factory=dict)
    #: devices that reported giving this round up (an error report), and why: not waited for
    declined: dict[str, str] = field(default_factory=dict)
    #: devices their training policy paused in this round (edgetune.policy): busy, still waited for
    busy: dict[str, str] = field(default_factory=dict)

    def remember(self, receipt: Receipt) -> None:
        if receipt.accepted:
            self.receipts[(receipt.device_id, receipt.nonce)] = receipt
        else:
            self.refusals[receipt.device_id] = receipt

    def answered(self, device: str, nonce: bytes) -> Receipt | None:
        """The receipt this exact message got already in this round, if any."""
        if not nonce:
            return None
        refusal = self.refusals.get(device)
        return self.receipts.get((device, nonce)) or (refusal if refusal and refusal.nonce == nonce else None)


class TaskHandler:
    """The defaults are those of a result that needs no more than its round's checks."""

    kind: TaskKind
    #: the round waits for every reachable device, not a quorum (a fleet's start needs everyone's say)
    waits_for_all = False

    def begin(self, ctx: RoundContext) -> None:
        """A round of this kind opens (or resumes): forget the last one's results."""

    def check(self, message, ctx: RoundContext | None, content: bool = True) -> Refusal | None:
        """Whether the result fits the fleet (layout, values, configured bounds; ``content``
        False: what a worker checked already, the layout and values, is left out)."""
        return None

    def held(self, message, ctx: RoundContext, worker: str) -> None:
        """A worker holds this result (it journaled it): the round's close asks it for its share."""
        raise NotImplementedError(f"{self.kind.value} results are not taken in by workers")

    def measure(self, message, replayed: bool = False,
                measured: tuple[float, Refusal | None] | None = None) -> tuple[float | None, Refusal | None]:
        """``(norm, refusal)``: the result's size where the kind bounds it (train: the delta's L2
        norm, computed once and kept with the round), and a refusal if it is over (``replayed``:
        a journaled result read again after a restart, measured quietly; ``measured``: what the
        intake thread's ``measure_delta`` found)."""
        return None, None

    @property
    def accepts_late(self) -> bool:
        """Results for an earlier, closed round may join an open round of this kind (``late``)."""
        return False

    def late(self, message, ctx: RoundContext) -> Refusal | None:
        """Whether this late result may join the open round (None: it may)."""
        return Refusal("stale_round", f"{type(message).__name__} for round {message.round}, which is closed")

    def accept(self, ctx: RoundContext, message, norm: float | None) -> None:
        """Record an accepted result in the round (journaled already where the kind journals)."""

    def close(self, ctx: RoundContext, enough: bool) -> None:
        """Decide the round's outcome: ``ctx.record.status`` and note (``enough``: at least
        ``min_devices`` results). Left unset, the round failed for want of results."""

    def carried(self, number: int) -> dict:
        """Results of earlier rounds that count in round ``number`` (journal name -> (file,
        (device, round it answered))): none but a train round's."""
        return {}

    def keeps_journal(self, ctx: RoundContext) -> bool:
        """The closed round's journal stays (its results go on into a later round)."""
        return False

    def closed(self, ctx: RoundContext) -> None:
        """The round's close is on disk."""


def score(value: float | None, device: str) -> float | None:
    """A reported perplexity, or None if it is not one (finite, > 0): an optional metric must
    neither poison the round's averages nor cost the device its update."""
    if value is None or (math.isfinite(value) and value > 0):
        return value
    log.warning("device %s reported perplexity %r; ignored", device, value)
    return None
