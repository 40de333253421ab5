"""One round, from its task to its close: open (journal, state, task), wait for results until
the quorum or the deadline, close (the task kind's handler decides, then disk before network).

A round survives restarts: its task and every accepted result are journaled before anyone is
told, the state names the round as open only once the journal exists, and a resumed round
replays its journal and keeps its deadline (docs/reliability.md). Which results close a round
early is ``needed``: ``min_devices``, or the quorum of the devices the task asked, less those
that gave it up.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable

from edgetune.clock import Clock
from edgetune.transport.channel import Channel
from edgetune.wire import FILE_VERSIONS, TASKS, RoundTask, TaskKind, decode_message, encode_message

from .config import AggregatorConfig
from .desk import ResultDesk
from .fleet import Fleet
from .journal import RoundJournal
from .membership import Membership
from .publisher import Publisher
from .store import RoundRecord, RoundStatus
from .taskmaker import TaskMaker
from .tasks import RoundContext, TaskHandler

log = logging.getLogger("edgetune_aggregator.daemon")


class RoundRunner:
    def __init__(self, config: AggregatorConfig, clock: Clock, fleet: Fleet, members: Membership, tasks: TaskMaker,
                 publisher: Publisher, desk: ResultDesk, journal: RoundJournal, channel: Channel,
                 handlers: dict[TaskKind, TaskHandler], receive: Callable[[RoundContext | None, float], None],
                 stop: threading.Event, metrics=None):
        self.config = config
        self.clock = clock
        self.fleet = fleet
        self.members = members
        self.tasks = tasks
        self.publisher = publisher
        self.desk = desk
        self.journal = journal
        self.channel = channel
        self.handlers = handlers
        #: ``(ctx, timeout)``: take one message from the inbox and act on it
        self.receive = receive
        self.stop = stop
        self.metrics = metrics
        #: called when a round opens, with its task and its record so far (plans, exclusions)
        self.on_task: Callable[[RoundTask, RoundRecord], None] | None = None
        #: called when a round closes, with its record
        self.on_round: Callable[[RoundRecord], None] | None = None
        #: called with a closing round's record before it and the state are written (the
        #: validation gate's verdict: in-memory changes, saved with the round)
        self.on_closing: Callable[[RoundRecord], None] | None = None
        #: called once a fleet round's close is on disk, before its global is published (``serving.py``)
        self.on_closed: Callable[[RoundRecord], None] | None = None
        self._open: RoundRecord | None = None  # the open round's record (latecomers join it)

    def run(self, number: int, kind: TaskKind) -> RoundRecord:
        """Open (or resume) round ``number``, collect its results, close it; its record. Left
        open when the daemon is stopped: a resumed daemon continues it, as after a crash."""
        state, handler, journal = self.fleet.state, self.handlers[kind], TASKS[kind].journaled
        journaled = self.journal.load(number) if state.opened == number else None
        if journaled is not None and journaled.kind != kind.value:
            journaled = None
        opened_at = journaled.opened_at if journaled else self.clock.time()
        record = RoundRecord(number, kind.value, state.global_version, started_at=opened_at)
        drops_before = Counter(self.channel.drops)
        bytes_before = Counter(self.channel.bytes_from)
        ctx = RoundContext(number, kind, record)
        handler.begin(ctx)
        carried = handler.carried(number)
        if journaled is not None:
            task = decode_message(journaled.task, FILE_VERSIONS)
        else:
            # a device whose result a failed round carried over has done this round already
            task = self.tasks.make(number, kind, {device: f"its result of round {r} counts in this round"
                                                  for _, (device, r) in carried.values()})
            # Journal, then state, then the task goes out. A daemon killed between the first two
            # has a journal the state does not name: the task never left, and the round opens
            # afresh on restart. (State first would leave an open round without a journal, which
            # a resumed daemon must treat as possibly answered and skip, losing a round.)
            if journal:
                self.journal.open(number, kind.value, encode_message(task), opened_at)
            self.fleet.update(save=journal, opened=number)
        if journal:
            present = self.journal.load(number).results  # (after a restart: what is there is skipped)
            for name, (path, (device, trained_for)) in carried.items():
                if name not in present:
                    self.journal.stage(number, device, path.read_bytes(), late_from=trained_for)
            self.journal.commit()  # (one segment for all of them)
            self.journal.discard(keep=number)
            for _, path in sorted(self.journal.load(number).results.items()):
                self.desk.replay(ctx, path.read_bytes())
        self.publisher.publish_task(task)  # after a restart, the same task again: devices that did it do not redo it
        self._open = record
        record.asked = sorted(self.members.reachable() - set(task.excluded))
        record.excluded = dict(task.excluded)
        record.plans = self.tasks.recorded_plans(task)
        record.downlink_bytes = self.publisher.global_bytes + len(encode_message(task))
        if self.on_task:
            try:  # (a dashboard's bug must not stop the fleet)
                self.on_task(task, record)
            except Exception:
                log.exception("the on_task callback failed for round %d", number)
        log.info("round %d (%s) %s on global v%d%s; %d device(s) online", number, kind.value,
                 "resumed" if journaled else "open", state.global_version,
                 f" with {len(record.devices)} accepted result(s)" if record.devices else "",
                 len(self.members.online))
        ctx.journal = journal
        if self.metrics is not None:
            self.metrics.round_opened(number)
        deadline = self.clock.monotonic() + max(0.0, opened_at + self.config.round_timeout_s - self.clock.time())
        # (recomputed as devices come and go: one that joins the open round is asked too)
        while len(record.devices) < self.needed(handler, task, ctx) and not self.stop.is_set():
            left = deadline - self.clock.monotonic()
            if left <= 0:
                break
            self.receive(ctx, min(left, 0.5))
        record.duration_s = self.clock.time() - opened_at
        if self.stop.is_set():
            return record  # left open: a resumed daemon continues it, as after a crash
        record.dropped = dict(Counter(self.channel.drops) - drops_before)
        record.declined = dict(ctx.declined)
        record.busy = dict(ctx.busy)
        # What each device sent in this round, as measured here (its own report can only
        # count what it sent before the update that carries the report).
        sent = Counter(self.channel.bytes_from) - bytes_before
        for device in record.devices:
            device.bytes_sent = sent[device.device_id]
        self._close(ctx, handler)
        return record

    def needed(self, handler: TaskHandler, task: RoundTask, ctx: RoundContext | None = None) -> int:
        """Results that close the round before its deadline: ``min_devices``, or the quorum of
        the devices the task asked (less those that said they gave up on it); every online
        device where the kind wants every device's say (an initialization round)."""
        needed = self.config.min_devices
        asked = self.members.reachable() - set(task.excluded) - set(ctx.declined if ctx else ())
        heard = {d for d, first in self.members.answered.items() if first < task.round}
        if self.members.open_fleet and asked & heard:
            # Anyone can say hello to an open fleet (no --device-keys, no --admit): a device not
            # heard from in an earlier round of this run is asked and its result counts, but it
            # does not hold the round open, or 2,000 made-up hellos would keep every round
            # waiting for its deadline.
            asked &= heard
        if handler.waits_for_all:
            needed = max(needed, len(self.members.reachable()))
        elif self.config.quorum is not None:
            needed = max(needed, math.ceil(self.config.quorum * len(asked)))
        return needed

    def latecomer(self, device: str) -> None:
        """A device with a profile joined the fleet: plan it into the open round (and its record)."""
        added = self.tasks.plan_latecomer(device)
        record, task = self._open, self.publisher.task
        if added is None or record is None or task is None or record.round != task.round:
            return
        plan, excluded = added  # the round log says so too
        if plan is not None:
            record.plans[device] = plan
            record.asked = sorted({*record.asked, device})
        else:
            record.excluded[device] = excluded

    def _close(self, ctx: RoundContext, handler: TaskHandler) -> None:
        record = ctx.record
        handler.close(ctx, len(record.devices) >= self.config.min_devices)
        if record.status is RoundStatus.OPEN:  # (the handler found nothing to decide on)
            record.status = RoundStatus.FAILED
            record.note = (f"{len(record.devices)} of {self.config.min_devices} required devices "
                           f"reported within {self.config.round_timeout_s:.0f} s")
            log.warning("round %d failed: %s; the global adapter stays at v%d",
                        ctx.number, record.note, self.fleet.state.global_version)
        self.fleet.update(round=ctx.number)
        if self.on_closing is not None:
            self.on_closing(record)
        # Disk before network: the global file, the round log, then the state that names
        # them; only then is the new version published.
        self.fleet.store.append_round(record)
        if TASKS[ctx.kind].journaled:  # (the other kinds precede the fleet's first saved state)
            self.fleet.save()
            # the round is closed: its results live in the global adapter, or go on into the next round
            self.journal.discard(keep=ctx.number if handler.keeps_journal(ctx) else None)
            handler.closed(ctx)
            if self.on_closed is not None:  # (what the fleet serves, before the new global goes out:
                self.on_closed(record)  # a device then still holds the version it is told to serve)
        rated = [d for d in record.devices if d.global_ppl is not None]
        if rated:  # what the devices measured of the version the round started from
            self.fleet.versions.measured(record.base_version, ppl=record.global_ppl,
                                         robust_ppl=record.global_robust_ppl, evaluated_by=len(rated))
        if record.status is RoundStatus.AGGREGATED:
            self.publisher.publish_global()
        self._log_close(ctx)
        if self.metrics is not None:
            self.metrics.round_closed(ctx.kind.value, record.status.value, record.duration_s)
            self.metrics.global_version(self.fleet.state.global_version)
        if self.on_round:
            try:  # a dashboard's bug must not stop the fleet
                self.on_round(record)
            except Exception:
                log.exception("the on_round callback failed for round %d", ctx.number)

    @staticmethod
    def _log_close(ctx: RoundContext) -> None:
        record, scores = ctx.record, ""
        if record.global_ppl is not None:  # personalization and robustness of the round's base adapter
            scores = f"; global v{record.base_version} ppl own {record.global_ppl:.2f}"
            if record.global_robust_ppl is not None:
                scores += f", others' {record.global_robust_ppl:.2f}"
        log.info("round %d %s with %d device(s) in %.1f s%s%s", ctx.number, record.status.value,
                 len(record.devices), record.duration_s, scores,
                 f"; dropped {record.dropped}" if record.dropped else "")
