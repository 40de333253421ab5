"""An aggregator worker: the daemon's intake stages with another sink.

Several workers subscribe to the devices' update topics through one MQTT 5 shared subscription
(``$share/{group}/…/update/+``): the broker hands each update to one of them. A worker runs
the same stages as the daemon (``receiver.py``: receive → verify and decode; then validate,
journal with group commit), checking each update against what the coordinator announced for
the open round (``WorkerRound``), and its sink is a ``WorkerReport`` to the coordinator
instead of a receipt: the coordinator decides (a member, the open round, the first time) and
answers the device. At the round's close the coordinator sends the plan (``MergeRequest``)
and the worker streams the updates it holds, in name order, through the strategy and sends
back the running sums of its share (``PartialMerge``).

Its journal is its own (``--state-dir``): a worker killed at any instant restarts into it,
reports what it holds again (the coordinator counts each device's result once), and answers
the merge. Float64 sums cross the wire as two float32 parts (``split64``): packed tensors are
float32 at most, and hi + lo keeps 48 bits of mantissa.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.adapters.registry import adapter_kind, adapter_shapes
from edgetune.downlink import DownlinkGuard
from edgetune.transport import Transport
from edgetune.transport.channel import Channel
from edgetune.wire import AGGREGATOR_ID, DEFAULT_MAX_PACKET, FILE_VERSIONS, Signed, Topics, Update, decode_message
from edgetune.wire.signing import FleetKey, unwrap
from edgetune.wire.workers import MergeRequest, PartialMerge, WorkerReport, WorkerRound

from .inbox import Inbox, drain
from .intake import Intake, Opened
from .journal import RoundJournal
from .receiver import Received, Receiver
from .strategies import RoundStart, make_strategy
from .validation import (Refusal, UpdateLimits, check_layout, check_norm, check_samples, delta_norm, measure_delta,
                         max_result_bytes)
from .weighting import scaled

log = logging.getLogger(__name__)

#: the most bytes an update may have before the round's layout is announced
_UNANNOUNCED_LIMIT = 64 << 20


@dataclass(frozen=True)
class WorkerConfig:
    fleet: str
    worker_id: str
    state_dir: Path
    #: the shared subscription's group: every worker of one fleet uses the same
    group: str = "edgetune-workers"
    device_keys: Path | None = None
    #: the fleet's public key (``fleet.pub``): the coordinator's announcements and merge
    #: requests must carry its signature (None: the broker's ACL is their only guard)
    fleet_key: Path | None = None
    max_packet: int = DEFAULT_MAX_PACKET
    intake_threads: int = 2
    inbox_bytes: int = 16 << 20
    commit_batch: int = 64


def split64(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Float64 arrays as float32 pairs ``name`` (x rounded) and ``name~lo`` (the rest), and the
    scalars among them as floats: what a ``PartialMerge`` carries."""
    out, scalars = {}, {}
    for name, value in arrays.items():
        value = np.asarray(value, np.float64)
        if value.ndim == 0:
            scalars[name] = float(value)
            continue
        hi = value.astype(np.float32)
        out[name], out[f"{name}~lo"] = hi, (value - hi.astype(np.float64)).astype(np.float32)
    return out, scalars


def join64(arrays: Mapping[str, np.ndarray], scalars: Mapping[str, float]) -> dict[str, np.ndarray]:
    """``split64`` undone."""
    out = {name: np.asarray(value, np.float64) + np.asarray(arrays[f"{name}~lo"], np.float64)
           for name, value in arrays.items() if not name.endswith("~lo")}
    return out | {name: np.array(value, np.float64) for name, value in scalars.items()}


class Worker:
    def __init__(self, config: WorkerConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self.topics = Topics(config.fleet)
        self.intake = Intake(self.topics, config.device_keys)
        # (an update may come before the round's announcement, which says how big it can be)
        self.intake.result_limit = _UNANNOUNCED_LIMIT
        self.channel = Channel(transport, self.topics.sender_of, config.max_packet, limit_of=self.intake.limit_of)
        self.inbox = Inbox(config.inbox_bytes)
        self.receiver = Receiver(self.intake, self.inbox, config.intake_threads)
        self.journal = RoundJournal(config.state_dir)
        #: checks the coordinator's signature and refuses replays, as a device's guard does
        self.guard = DownlinkGuard(self.topics, FleetKey.load(config.fleet_key)) if config.fleet_key else None
        #: the open round as the coordinator announced it
        self.round: WorkerRound | None = None
        #: reports of what this worker journaled, waiting for the commit
        self._pending: list[WorkerReport] = []
        #: updates for a round not announced yet (the announcement and the devices' updates
        #: reach the broker on different connections: no order between them), bounded in bytes
        self._early: list[tuple[str, Update, Opened]] = []
        self._stop = threading.Event()
        self.ready = threading.Event()
        #: updates journaled, refused, partial merges sent (for tests and logs)
        self.counts = {"journaled": 0, "refused": 0, "merged": 0}

    # --- running ----------------------------------------------------------------------------

    def _control(self, topic: str, message: object) -> None:
        """(On the network thread.) The coordinator's announcement or merge request, into the
        inbox: with the fleet key only if the daemon signed it for this topic and it is not
        older than one already taken (the same one again, retained, is taken again)."""
        if self.guard is not None:
            if not isinstance(message, Signed):
                self.channel.drop(AGGREGATOR_ID, topic, "unsigned", f"a {type(message).__name__} without the "
                                  "aggregator's signature")
                return
            message, reason, detail = self.guard.verify(topic, message)
            if message is None:
                self.channel.drop(AGGREGATOR_ID, topic, reason, detail)
                return
        self.inbox.put(Received(topic, value=Opened(unwrap(message))))

    def serve(self) -> None:
        self.inbox.reader = threading.get_ident()
        self.channel.subscribe(self.topics.workers_round, self._control)
        self.channel.subscribe(self.topics.workers_merge, self._control)
        self.channel.subscribe_whole(f"$share/{self.config.group}/{self.topics.all_devices('update')}",
                                     self.receiver.enqueue)
        self.transport.connect()
        self.ready.set()
        log.info("worker %s of fleet %s: taking updates in (shared subscription group %s)", self.config.worker_id,
                 self.config.fleet, self.config.group)
        try:
            while not self._stop.is_set():
                self._receive(0.5)
        finally:
            self.inbox.close()
            self.receiver.close()
            self.transport.close()

    def stop(self) -> None:
        self._stop.set()

    def _receive(self, timeout: float) -> None:
        try:
            drain(self.inbox, self._take, timeout, self.config.commit_batch,
                  lambda: self.journal.staged_bytes >= self.config.inbox_bytes)
        finally:
            self._commit()

    def _take(self, item: Received) -> None:
        opened = item.result()
        sender = self.topics.device_of(item.topic) or item.topic
        if isinstance(opened, Refusal):
            return self.channel.drop(sender, item.topic, opened.reason, opened.detail)
        message = opened.message
        if isinstance(message, WorkerRound):
            return self._new_round(message)
        if isinstance(message, MergeRequest):
            return self._merge(message)
        if not isinstance(message, Update) or message.device_id != sender:
            return self.channel.drop(sender, item.topic, "unexpected_kind", type(message).__name__)
        return self._update(item.topic, message, opened)

    # --- the round ----------------------------------------------------------------------------

    def _new_round(self, announced: WorkerRound) -> None:
        first = self.round is None
        self.round = announced
        self.intake.result_limit = max_result_bytes(adapter_shapes(announced.adapter, announced.model))
        self.channel.reassembler.max_pending_bytes = max(32 << 20, 4 * self.intake.result_limit)
        journaled = self.journal.load(announced.round)
        if journaled is not None and journaled.task != announced.run_id.encode():  # (another run's round)
            self.journal.discard_before(announced.round + 1)
            journaled = None
        if journaled is None:  # (the run is what the journal's task field keeps)
            self.journal.open(announced.round, "train", announced.run_id.encode(), time.time())
        oldest = min(map(int, announced.bases), default=announced.round)
        self.journal.discard_before(oldest)
        if first:  # (a restarted worker: what it journaled before goes to the coordinator again)
            self._report_journaled()
        early, self._early = self._early, []
        for topic, update, opened in early:
            self._update(topic, update, opened)

    def _report_journaled(self) -> None:
        for number in self.journal.numbers():
            journaled = self.journal.load(number)
            if journaled.task != self.round.run_id.encode():
                continue  # (another run's)
            for name, record in sorted(journaled.results.items()):
                update, nonce = _read(record.read_bytes())
                self._send(WorkerReport(self.config.worker_id, _without_delta(update), nonce, True,
                                        delta_norm(update.delta)))

    def _update(self, topic: str, update: Update, opened: Opened) -> None:
        announced = self.round
        if announced is None or update.round > announced.round:
            if sum(len(o.payload) for _, _, o in self._early) + len(opened.payload) <= self.config.inbox_bytes:
                self._early.append((topic, update, opened))  # (taken when its round is announced)
            else:
                self.channel.drop(update.device_id, topic, "unknown_round", "a round not announced yet; no room to hold it")
            return
        refusal, norm = self._check(update, announced, opened.measured)
        if refusal is not None:
            self.counts["refused"] += 1
            self.channel.drop(update.device_id, topic, refusal.reason, refusal.detail)
            if announced is not None:
                self._send(WorkerReport(self.config.worker_id, _without_delta(update), opened.nonce, False,
                                        reason=refusal.reason, detail=refusal.detail[:1024]))
            return
        late = update.round if update.round != announced.round else None
        self.journal.stage(announced.round, update.device_id, opened.payload, late)
        self._pending.append(WorkerReport(self.config.worker_id, _without_delta(update), opened.nonce, True, norm))

    def _check(self, update: Update, announced: WorkerRound | None,
               measured: tuple[float, Refusal | None] | None = None) -> tuple[Refusal | None, float]:
        if announced is None:
            return Refusal("unknown_round", "no round announced to this worker yet"), 0.0
        if update.run_id != announced.run_id and update.run_id:
            return Refusal("other_run", f"update for run {update.run_id}, this is run {announced.run_id}"), 0.0
        base = announced.bases.get(str(update.round))
        if base is None or base != update.base_version:
            return Refusal("stale_round", f"round {update.round} on v{update.base_version} is not open"), 0.0
        limits = UpdateLimits(announced.max_norm, announced.norm_action, announced.min_samples, announced.max_samples)
        refusal = check_samples(update.num_samples, limits)
        if refusal:
            return refusal, 0.0
        try:
            shapes = adapter_kind(announced.adapter).update_shapes(announced.adapter, announced.model, update.delta)
        except ValueError as exc:
            return Refusal("wrong_shape", str(exc)), 0.0
        refusal = check_layout(update.delta, shapes, values=False)
        if refusal:
            return refusal, 0.0
        # (the finite check and the norm, one pass: on the intake thread, if it could)
        norm, refusal = measure_delta(update.delta) if measured is None else measured
        return refusal or check_norm(norm, limits), norm

    def _commit(self) -> None:
        """Journal what was staged (one fsync), then tell the coordinator: nothing it is told of
        is lost if this worker dies next."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self.journal.commit()
        except OSError as exc:  # nothing reported: the devices resend, to this worker or another
            log.error("worker %s could not journal %d update(s): %s", self.config.worker_id, len(pending), exc)
            return
        self.counts["journaled"] += len(pending)
        for report in pending:
            self._send(report)

    def _send(self, report: WorkerReport) -> None:
        self.channel.send(self.topics.worker_report(self.config.worker_id), report)

    # --- the close ----------------------------------------------------------------------------

    def _merge(self, request: MergeRequest) -> None:
        mine = sorted(name for name, worker in request.holders.items() if worker == self.config.worker_id)
        if not mine or self.round is None or request.run_id != self.round.run_id:
            return  # (not ours, or a close of another run's round)
        records = {}
        for number in self.journal.numbers():  # (a result carried from a failed round is in that round's journal)
            records.update({name: record for name, record in self.journal.load(number).results.items()
                            if name in request.holders and (number == request.round or name not in records)})
        strategy = make_strategy(request.strategy, merged_rank=None if request.merged_rank < 0 else request.merged_rank)
        start = RoundStart(dict(request.start), dict(request.merged), request.scale, seed=request.seed)
        merge = strategy.begin(start)
        kind = adapter_kind(self.round.adapter) if self.round is not None else None
        change = kind.change_meter(start.tensors, start.scale) if kind is not None else None
        changes, missing = {}, []
        for name in mine:
            record = records.get(name)
            if record is None:
                missing.append(name)
                continue
            delta = _read(record.read_bytes())[0].delta
            scale, weight = request.plan[name]
            delta = scaled(delta, scale)
            merge.add(delta, weight)
            if change is not None:
                changes[name] = change(delta)
        self.counts["merged"] += 1
        log.info("worker %s: round %d, merged %d update(s)%s", self.config.worker_id, request.round,
                 len(mine) - len(missing), f", {len(missing)} missing" if missing else "")
        sums, scalars = split64(merge.partial()) if merge.count else ({}, {})
        self.channel.send(self.topics.worker_partial(self.config.worker_id),
                          PartialMerge(self.config.worker_id, request.round, sums, changes, tuple(missing), scalars))


def _read(payload: bytes) -> tuple[Update, bytes]:
    """A journaled update as received, and its signature's nonce (b"" if unsigned)."""
    message = decode_message(payload, FILE_VERSIONS)
    nonce = getattr(message, "nonce", b"") if not isinstance(message, Update) else b""
    return unwrap(message, FILE_VERSIONS), nonce


def _without_delta(update: Update) -> Update:
    return Update(update.device_id, update.round, update.base_version, update.num_samples, {}, update.metrics,
                  update.run_id)


__all__ = ["Worker", "WorkerConfig", "join64", "split64"]
