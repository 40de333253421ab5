"""The result desk: a device's answer to a round is checked (for this round, from a member, the
first time, its content fitting the fleet), written to the journal as received, recorded, and
acknowledged with a receipt; a refused one gets a refusal receipt with its reason.

Group commit: the round loop hands the desk every message it drained from its inbox at once; a
result that passes its checks is staged in the journal and waits (``_waiting``), and only after
``commit`` made the batch durable with one fsync is it accepted into the round and acknowledged.

What a result must contain and how it is recorded is its task kind's handler's business
(``tasks/``); the desk keeps the rules every result shares. Every refusal is a counted reason
(docs/security.md). A device resends an unanswered result with the same nonce: the desk
answers it with the receipt it got the first time and counts it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgetune.logsafe import shown
from edgetune.transport import TransportError
from edgetune.transport.channel import Channel
from edgetune.wire import FILE_VERSIONS, TASK_OF_RESULT, Receipt, Signed, TaskKind, Topics, decode_message
from edgetune.wire.signing import unwrap
from edgetune.wire.workers import WorkerReport

from .fleet import Fleet
from .health import Health
from .journal import RoundJournal
from .membership import Membership
from .tasks.base import RoundContext, TaskHandler
from .validation import Refusal

log = logging.getLogger("edgetune_aggregator.daemon")

#: error codes of a device that goes on with its round (the rest mean it gave the round up)
CONTINUING_ERRORS = ("oom_backoff", "busy", "resumed")
#: a device's training policy paused it (edgetune.policy), and it went on: busy, not gone
POLICY_CODES = ("busy", "resumed")


@dataclass(frozen=True)
class _Waiting:
    """A result staged in the journal, accepted and acknowledged once the commit is done."""

    ctx: RoundContext
    handler: TaskHandler
    message: object
    nonce: bytes
    norm: float | None
    topic: str


class ResultDesk:
    def __init__(self, fleet: Fleet, members: Membership, handlers: dict[TaskKind, TaskHandler], journal: RoundJournal,
                 channel: Channel, topics: Topics, health: Health, signed_fleet: bool, metrics=None):
        self.fleet = fleet
        #: the fleet has device keys: results and error reports count only signed
        self.signed_fleet = signed_fleet
        self.members = members
        self.handlers = handlers
        self.journal = journal
        self.channel = channel
        self.topics = topics
        self.health = health
        self.metrics = metrics
        #: results staged in the journal, in the order they came: acknowledged by ``commit``
        self._waiting: dict[tuple[str, int], _Waiting] = {}

    def on_result(self, topic: str, opened, ctx: RoundContext | None) -> None:
        """A device's answer to a round: checked, written to the journal, then acknowledged
        with a ``Receipt`` (a device resends an unanswered result with the same nonce)."""
        message = opened.message
        handler = self.handlers[TASK_OF_RESULT[type(message)]]
        refusal = self._check_round(handler, message, opened.nonce, ctx) or handler.check(message, ctx)
        norm = None
        if refusal is None:  # (measured once, on an intake thread if it could: Opened.measured)
            norm, refusal = handler.measure(message, measured=opened.measured)
        self._take(topic, opened, ctx, handler, message, norm, refusal)

    def on_worker_report(self, topic: str, opened, ctx: RoundContext | None) -> None:
        """A worker took a device's update in (its content checked, journaled there) or refused
        it: the desk decides for the round as for an update of its own, journals the report (a
        small record naming the worker that holds the update), and answers the device."""
        report: WorkerReport = opened.message
        message, handler = report.update, self.handlers[TaskKind.TRAIN]
        if not report.journaled:
            refusal = Refusal(report.reason or "refused", report.detail)
        else:
            refusal = self._check_round(handler, message, report.nonce, ctx) or handler.check(message, ctx, content=False)
        self._take(topic, opened, ctx, handler, message, report.norm, refusal, report.nonce, report.worker)

    def _take(self, topic: str, opened, ctx, handler: TaskHandler, message, norm, refusal: Refusal | None,
              nonce: bytes | None = None, holder: str | None = None) -> None:
        sender = message.device_id
        nonce = opened.nonce if nonce is None else nonce
        if refusal is not None:
            self.channel.drop(sender, topic, refusal.reason, refusal.detail)
            # an unknown sender gets no answer; a replay got its first answer again
            if refusal.reason not in ("unknown_device", "replayed"):
                self._receipt(message, nonce, refusal.reason, ctx)
            return
        if holder is not None:
            handler.held(message, ctx, holder)
        if ctx.journal:  # on disk, as received, before anyone hears of it: a crash after the commit keeps it
            self.journal.stage(ctx.number, sender, opened.payload, message.round if message.round < ctx.number else None)
            self._waiting[(sender, message.round)] = _Waiting(ctx, handler, message, nonce, norm, topic)
            return
        self._accepted(ctx, handler, message, nonce, norm)

    def commit(self) -> None:
        """Make the staged results durable (one fsync for all), then accept and acknowledge
        them. If the disk fails, none is acknowledged: each device resends its result."""
        waiting, self._waiting = self._waiting, {}
        if not waiting:
            return
        try:
            self.journal.commit()
        except OSError as exc:
            log.error("could not journal %d result(s): %s; their devices will resend them", len(waiting), exc)
            self.health.storage_failed(exc)
            for w in waiting.values():
                self.channel.drop(w.message.device_id, w.topic, "internal_error", f"{type(exc).__name__}: {exc}"[:200])
            return
        self.health.wrote()
        for w in waiting.values():
            self._accepted(w.ctx, w.handler, w.message, w.nonce, w.norm)

    def _accepted(self, ctx: RoundContext, handler: TaskHandler, message, nonce: bytes, norm: float | None) -> None:
        self._accept(ctx, handler, message, nonce, norm)
        self._receipt(message, nonce, "", ctx)
        if self.metrics is not None:
            self.metrics.accepted(ctx.kind.value)

    def on_error(self, topic: str, opened, ctx: RoundContext | None) -> None:
        """A device reports an error in a round. One that gave up on the open round (missed its
        deadline, ran out of memory, failed) will not answer: the quorum stops waiting for it.
        Backing off is no giving up; in a fleet with keys only a signed report counts."""
        report, sender = opened.message, opened.message.device_id
        if report.code in POLICY_CODES:
            log.info("device %s is %s in round %d: %s", shown(sender, 64), report.code, report.round,
                     shown(report.message, 300))
            if ctx is not None and report.round == ctx.number and sender in self.members.devices:
                ctx.busy[sender] = (f"busy: {shown(report.message, 200)}" if report.code == "busy"
                                    else f"{ctx.busy.get(sender, 'busy')}; resumed {shown(report.message, 60)}")
            return
        log.warning("device %s reports %s in round %d: %s", shown(sender, 64), shown(report.code, 32), report.round,
                    shown(report.message, 300))
        if (ctx is not None and report.round == ctx.number and report.code not in CONTINUING_ERRORS
                and sender in self.members.devices and (not self.signed_fleet or opened.signed is not None)):
            ctx.declined[sender] = f"{shown(report.code, 32)}: {shown(report.message, 260)}"
            self.members.answer(sender, ctx.number)

    def replay(self, ctx: RoundContext, payload: bytes) -> None:
        """Re-accept a journaled result after a restart (checked when it first arrived)."""
        message = decode_message(payload, FILE_VERSIONS)  # (as received: by any version it took in)
        if isinstance(message, WorkerReport):  # (a worker holds the update itself)
            report, handler = message, self.handlers[TaskKind.TRAIN]
            message, nonce = report.update, report.nonce
            handler.held(message, ctx, report.worker)
            self._accept(ctx, handler, message, nonce, report.norm)
            ctx.remember(Receipt(message.device_id, message.round, nonce, True))
            return
        nonce = message.nonce if isinstance(message, Signed) else b""
        message = unwrap(message, FILE_VERSIONS)
        handler = self.handlers[TASK_OF_RESULT[type(message)]]
        self._accept(ctx, handler, message, nonce, handler.measure(message, replayed=True)[0])
        ctx.remember(Receipt(message.device_id, message.round, nonce, True))

    def _accept(self, ctx: RoundContext, handler: TaskHandler, message, nonce: bytes, norm: float | None) -> None:
        self.members.answer(message.device_id, ctx.number)
        handler.accept(ctx, message, norm)

    # --- the rules every result shares ----------------------------------------------------

    def _check_round(self, handler: TaskHandler, message, nonce: bytes, ctx: RoundContext | None) -> Refusal | None:
        """Whether a result belongs to the open round, from a member, for the first time."""
        sender, state = message.device_id, self.fleet.state
        if sender not in self.members.devices:
            return Refusal("unknown_device", "no hello received from it")
        if state and sender in state.left_out:
            return Refusal("init_mismatch", f"left out of this fleet: its starting adapter differed "
                           f"({state.left_out[sender]})")
        current = ctx.number if ctx else (state.round if state else 0) + 1
        staged = self._waiting.get((sender, message.round))
        if staged is not None:  # (in this very batch: acknowledged once it is durable)
            if staged.nonce == nonce and nonce:
                return Refusal("replayed", f"nonce {nonce.hex()[:8]}… is being journaled already")
            return Refusal("duplicate", f"second result for round {message.round}")
        if message.round < current or (ctx is None and state and message.round <= state.round):
            if ctx is None or ctx.kind is not handler.kind or not handler.accepts_late:
                return Refusal("stale_round", f"{type(message).__name__} for round {message.round}, which is closed")
            return self._replayed(ctx, sender, nonce) or handler.late(message, ctx)
        if ctx is None or ctx.kind is not handler.kind or message.round != ctx.number:
            open_round = f"round {ctx.number} ({ctx.kind.value})" if ctx else "no round"
            return Refusal("unknown_round", f"{type(message).__name__} for round {message.round}; {open_round} is open")
        replayed = self._replayed(ctx, sender, nonce)
        if replayed is not None:
            return replayed
        if sender in ctx.seen:
            return Refusal("duplicate", f"second result for round {ctx.number}")
        return None

    def _replayed(self, ctx: RoundContext, sender: str, nonce: bytes) -> Refusal | None:
        """The same signed message again: a device resending (the receipt is repeated) or a replay."""
        earlier = ctx.answered(sender, nonce)
        if earlier is None:
            return None
        self._send_receipt(earlier, "resend")
        return Refusal("replayed", f"nonce {nonce.hex()[:8]}… was seen in round {ctx.number} already")

    def _receipt(self, message, nonce: bytes, reason: str, ctx: RoundContext | None) -> None:
        receipt = Receipt(message.device_id, message.round, nonce, not reason, reason)
        if ctx is not None:
            ctx.remember(receipt)
        self._send_receipt(receipt, "send")

    def _send_receipt(self, receipt: Receipt, verb: str) -> None:
        try:
            self.channel.send(self.topics.receipt(receipt.device_id), receipt)
        except TransportError as exc:  # the device resends and gets the receipt then
            log.warning("could not %s %s its receipt: %s", verb, receipt.device_id, exc)
