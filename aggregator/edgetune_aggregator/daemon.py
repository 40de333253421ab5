"""The aggregator daemon: its parts, wired together, and the loop that runs the fleet.

Network callbacks only decode and enqueue; one thread (``serve``) makes every decision, so the
round state needs no locks. Bad input never stops the loop: it is logged with its sender and
reason, counted, and dropped, and the round completes with the valid updates.

The parts (docs/architecture.md), each with the others it needs given explicitly:

- ``Fleet`` (fleet.py): the fleet's state, global adapter and strategy, which the parts share;
- ``Membership`` (membership.py): hellos, presence, who answered, who may send results;
- ``Publisher`` (publisher.py): what the daemon keeps on the broker (task, global, presence);
- ``TaskMaker`` (taskmaker.py): each round's task, with the planner's per-device plans;
- ``ResultDesk`` (desk.py): a result's checks, journal and receipt; error reports;
- one handler per task kind (tasks/): what its results must be, and what its close decides,
  with update weighting (weighting.py) wrapped around the strategy in train rounds;
- ``RoundRunner`` (runner.py): a round's open, wait and close; ``Startup`` (startup.py): a
  fresh or resumed fleet; ``Health`` (health.py): /healthz and the metrics.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from edgetune.clock import WALL, Clock
from edgetune.logsafe import shown
from edgetune.transport import Transport
from edgetune.transport.channel import Channel
from edgetune.wire import (
    TASK_OF_RESULT,
    ArtifactRequest,
    ErrorReport,
    GlobalAdapter,
    Hello,
    PersonalizationReport,
    Presence,
    RoundTask,
    ServingReport,
    TaskKind,
    Topics,
)

from .config import DEFAULT_CANDIDATES, LAYOUTS, MAX_ADAPTER_PARAMETERS, AggregatorConfig  # noqa: F401 (re-exported)
from .desk import ResultDesk
from .fleet import Fleet
from .health import Health
from .inbox import Inbox, drain
from .intake import Intake
from .journal import RoundJournal
from .membership import Membership
from .personal import PersonalizationLog
from .publisher import Publisher
from .receiver import Received, Receiver
from .runner import RoundRunner
from .serving import Rollout
from .startup import Startup
from .store import FleetState, RoundRecord, StateStore
from .strategies import Strategy
from .taskmaker import TaskMaker
from .tasks import CalibrateHandler, EvaluateHandler, InitializeHandler, RoundContext, TrainHandler
from .validation import Refusal
from .intake import Opened

log = logging.getLogger(__name__)

#: the most bytes of the workers' shares being put together at once (a dense float64 sum per
#: adapted layer: 106 MB for SmolLM2-135M r=8 on q, v)
_WORKER_REASSEMBLY_BYTES = 2 << 30
#: what the inbox holds after the broker connection came back (see ``Publisher.republish``)
_RECONNECTED = "<reconnected>"


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        transport: Transport,
        on_round: Callable[[RoundRecord], None] | None = None,
        metrics=None,
        clock: Clock = WALL,
        on_task: Callable[[RoundTask, RoundRecord], None] | None = None,
    ):
        self.config = config
        #: deadlines and round times: the wall clock, or the fleet simulator's virtual time
        self.clock = clock
        #: an ``AggregatorMetrics`` (``edgetune_aggregator.metrics``) to keep current, or None
        self.metrics = metrics
        self.transport = transport
        self.topics = Topics(config.fleet)
        self.intake = Intake(self.topics, config.device_keys)
        self.channel = Channel(transport, self.topics.sender_of, config.max_packet, limit_of=self.intake.limit_of)
        self.channel.reassembler.max_pending_bytes = config.reassembly_bytes
        if metrics is not None:
            self.channel.on_drop = metrics.rejected
        self.store = StateStore(config.state_dir)
        if config.fleet_key is not None:  # everything published is signed (receipts, tasks, adapters)
            from edgetune.wire.signing import FleetSigner

            self.channel.signer = FleetSigner.load(config.fleet_key, floor=self.store.load_issued(),
                                                   reserve=self._reserve_issued)
        self.journal = RoundJournal(config.state_dir)
        self.artifacts = None  # what devices without PyTorch can download (checked before serving)
        if config.ort_artifacts is not None:
            from .artifacts import ArtifactServer

            self.artifacts = ArtifactServer(config.ort_artifacts, ArtifactServer.chunk_for(config.max_packet))
        self._inbox = Inbox(config.inbox_bytes, clock)
        self.receiver = Receiver(self.intake, self._inbox, config.intake_threads)
        self._stop = threading.Event()
        #: set once the fleet's last round closed and ``finished`` was published
        self.finished = threading.Event()
        #: set once connected and subscribed: messages published from then on are seen
        self.ready = threading.Event()

        # --- the parts ---
        self.fleet = Fleet(self.store)
        self.health = Health(metrics, self.store, transport, clock)
        self.members = Membership(config, self.fleet, self.channel, self.topics, self.intake, self.health)
        self.publisher = Publisher(transport, self.channel, self.topics, self.fleet, self.artifacts,
                                   config.downlink_precision)
        self.tasks = TaskMaker(config, self.fleet, self.members, self.publisher, self.health)
        train = TrainHandler(config, self.fleet, self.journal, signed_fleet=self.intake.signed, metrics=metrics)
        initialize = InitializeHandler(self.fleet)
        handlers = {handler.kind: handler for handler in (train, EvaluateHandler(), CalibrateHandler(config, self.fleet),
                                                           initialize)}
        self.desk = ResultDesk(self.fleet, self.members, handlers, self.journal, self.channel, self.topics, self.health,
                               signed_fleet=self.intake.signed, metrics=metrics)
        self.personalization = PersonalizationLog(self.fleet, self.members, self.channel)
        self.runner = RoundRunner(config, clock, self.fleet, self.members, self.tasks, self.publisher, self.desk,
                                  self.journal, self.channel, handlers, self._receive, self._stop, metrics)
        self.runner.on_round, self.runner.on_task = on_round, on_task
        self.rollout = Rollout(config, self.fleet, self.publisher, clock, metrics, self._devices)
        self.runner.on_closing = self.rollout.judge
        self.runner.on_closed = self.rollout.closed
        self._train = train
        self.startup = Startup(config, clock, self.fleet, self.members, self.runner, self.publisher, self.journal,
                               self.intake, self.channel, train, initialize, self._receive, self._stop)
        self.channel.admit = self.members.admit_payload
        self.members.on_join = self.runner.latecomer
        self.members.on_refusal = self.publisher.refuse
        self.members.on_issued = self._device_holds
        self.intake.on_undecodable = self.members.on_undecodable
        self.health.on_storage_back = self.members.save_unsaved
        self.health.device_counts = lambda: (len(self.members.devices), len(self.members.online))
        # what each kind of device message goes to (results: the desk, whatever task they answer)
        self._routes: dict[type, Callable[[str, object, RoundContext | None], None]] = {
            Hello: lambda topic, opened, ctx: self.members.on_hello(topic, opened.message, opened.payload),
            Presence: lambda topic, opened, ctx: self.members.on_presence(opened.message.device_id, opened.message),
            ErrorReport: self.desk.on_error,
            ArtifactRequest: lambda topic, opened, ctx: self._on_artifact_request(topic, opened.message),
            PersonalizationReport: lambda topic, opened, ctx: self.personalization.record(topic, opened.message),
            ServingReport: lambda topic, opened, ctx: self.rollout.on_report(opened.message),
            **{cls: self.desk.on_result for cls in TASK_OF_RESULT},
        }
        if config.workers:
            self._use_workers(train)

    # --- workers (worker.py) ------------------------------------------------------------------

    def _use_workers(self, train: TrainHandler) -> None:
        """Devices' updates come from the workers' reports; the close asks them for their shares."""
        from edgetune.wire.workers import PartialMerge, WorkerReport

        self.publisher.taken_elsewhere = frozenset({"update"})
        self._partials: dict[tuple[int, str], object] = {}
        self._routes[WorkerReport] = self.desk.on_worker_report
        self._routes[PartialMerge] = lambda topic, opened, ctx: self._partials.__setitem__(
            (opened.message.round, opened.message.worker), opened.message)
        train.announce, train.collect = self._announce, self._collect

    def _worker_message(self, topic: str, message: object, payload: bytes) -> None:
        """(On the network thread.) A worker's report or share, into the inbox like the rest."""
        self._inbox.put(Received(topic, value=Opened(message, payload=payload)), len(payload) + 1024)

    def _announce(self, number: int, bases: dict[int, int]) -> None:
        from edgetune.wire.workers import WorkerRound

        state, limits = self.fleet.state, self.config.limits
        announced = WorkerRound(number, state.run_id, {str(r): v for r, v in bases.items()}, state.model, state.adapter,
                                limits.min_samples, limits.max_samples, limits.max_norm, limits.norm_action)
        self.transport.publish(self.topics.workers_round, self.channel.prepare(self.topics.workers_round, announced)[0],
                               retain=True)

    def _collect(self, request, workers: set[str]):
        """Send the close's plan (retained: a worker that restarts gets it) and yield every
        holder's share in the order of the workers' ids, each as soon as it and those before it
        have come, taking other messages meanwhile (results then go to the next round). The
        caller adds each share up before the next is yielded: a share of an exact strategy is
        its dense sums (~106 MB for SmolLM2 q,v), and only shares that came early wait here.
        Ends early, short of shares, at ``merge_timeout_s`` or a stop."""
        payload = self.channel.prepare(self.topics.workers_merge, request)[0]
        self.transport.publish(self.topics.workers_merge, payload, retain=True)
        deadline = self.clock.monotonic() + self.config.merge_timeout_s
        for worker in sorted(workers):
            key = (request.round, worker)
            while key not in self._partials and not self._stop.is_set() and self.clock.monotonic() <= deadline:
                self._receive(None, 0.5)
            if key not in self._partials:
                return
            yield self._partials.pop(key)

    def _devices(self, reachable: bool = True) -> dict[str, Hello]:
        """The fleet's devices (their hellos), or those reachable now."""
        if not reachable:
            return self.members.devices
        now = self.members.reachable()
        return {d: h for d, h in self.members.devices.items() if d in now}

    def _reserve_issued(self, issued: int) -> None:
        try:
            self.store.save_issued(issued)
        except OSError as exc:  # (the clock still counts up; only a restart on a clock set back is exposed)
            log.warning("could not record the fleet key's issued numbers: %s", exc)

    def _device_holds(self, issued: int) -> None:
        """A device holds a signed message numbered ``issued``: count on from it, and publish the
        task and adapter again if it would have refused them (this daemon's numbers were behind:
        a new host, a clock set back)."""
        signer = self.channel.signer
        if signer is not None and signer.raise_floor(issued):
            log.warning("a device holds messages signed up to %d, beyond this daemon's count: counting on from "
                        "there (a new host, or a clock set back?)", issued)
            self.publisher.publish_again()

    # --- public -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Run rounds until ``config.rounds`` are done (or ``stop()``); blocking."""
        # The state, layout and known devices come first: a persistent session delivers the
        # updates queued while the daemon was away as soon as it connects.
        self._inbox.reader = threading.get_ident()
        resumed = self.startup.resume()
        if self.config.workers:
            # (a channel of their own: a share of an exact strategy's merge is its dense sums, far
            # bigger than what the devices' reassembly bound is sized for; only the aggregator's
            # processes may publish here: the broker's ACL, docs/deploy.md)
            workers = Channel(self.transport, lambda topic: None, self.config.max_packet)
            workers.reassembler.max_pending_bytes = _WORKER_REASSEMBLY_BYTES
            workers.reassembler.max_transfer_bytes = _WORKER_REASSEMBLY_BYTES
            workers.on_drop = self.channel.on_drop
            for what in ("report", "partial"):
                workers.subscribe(f"{self.topics.base}/workers/+/{what}", self._worker_message, raw=True)
        self.publisher.connect(self.receiver.enqueue, self._reconnected)
        self.ready.set()
        try:
            if resumed:
                self.publisher.publish_global()
                self.rollout.publish()
                self.rollout.resumed()
            elif not self.startup.start():
                return
            else:
                self.rollout.stored(0)
            self.rollout.check_model()
            self._run_rounds()
        finally:
            self.rollout.close()
            self._inbox.close()  # before closing the connection: see Inbox.close
            self.receiver.close()
            self.publisher.close()

    def stop(self) -> None:
        self._stop.set()

    @property
    def state(self) -> FleetState | None:
        return self.fleet.state

    @property
    def global_adapter(self) -> GlobalAdapter | None:
        return self.fleet.global_adapter

    @property
    def strategy(self) -> Strategy | None:
        return self.fleet.strategy

    @property
    def devices(self):
        """Device id -> its accepted hello."""
        return self.members.devices

    @property
    def online(self) -> set[str]:
        return self.members.online

    @property
    def answered(self) -> dict[str, int]:
        """Device -> the round it first answered in (a result or an error report)."""
        return self.members.answered

    @property
    def pinned(self):
        """The fleet's model as the operator pinned it (None: the first hello's)."""
        return self.members.pinned

    @property
    def open_fleet(self) -> bool:
        return self.members.open_fleet

    def check_model(self, hello: Hello) -> str | None:
        """Why the fleet cannot train on this device's model (None if it can)."""
        return self.members.check_model(hello)

    @property
    def drops(self) -> Counter:
        return self.channel.drops

    @property
    def task(self) -> RoundTask | None:
        """The task published now (retained on the broker), None before the first."""
        return self.publisher.task

    @property
    def inbox(self) -> Inbox:
        """Decoded messages waiting for the round loop (the fleet simulator watches it wait)."""
        return self._inbox

    # --- the fleet's rounds -----------------------------------------------------------------

    def _run_rounds(self) -> None:
        while not self._stop.is_set():
            state = self.fleet.state
            if self.config.rounds is not None and state.round + 1 - state.first_train_round >= self.config.rounds:
                break
            self.rollout.reset_training(self._train.forget_lineage)
            self.runner.run(self.fleet.state.round + 1, TaskKind.TRAIN)
        if self._stop.is_set():
            return
        state = self.fleet.state
        # (a daemon restarted after the evaluation round closed must not evaluate again)
        evaluation_round = state.first_train_round + (self.config.rounds or 0)
        if self.config.evaluate_final and state.round < evaluation_round:
            self.rollout.reset_training(self._train.forget_lineage)  # (a rollback's: evaluate what follows it)
            self.runner.run(self.fleet.state.round + 1, TaskKind.EVALUATE)
            if self._stop.is_set():  # (left open: a restarted daemon continues it)
                return
        self.tasks.publish(self.fleet.state.round + 1, TaskKind.FINISHED)
        log.info("fleet %s finished: global adapter v%d in %s", self.config.fleet,
                 self.fleet.state.global_version, self.store.directory / "adapter")
        self.finished.set()
        self._linger()

    def _linger(self) -> None:
        """Devices personalize after the fleet finishes: keep recording their reports."""
        linger = self.config.linger_s
        if linger is not None and linger <= 0:
            return
        log.info("recording personalization reports %s", "until stopped" if linger is None else f"for {linger:.0f} s")
        deadline = None if linger is None else self.clock.monotonic() + linger
        while not self._stop.is_set() and (deadline is None or self.clock.monotonic() < deadline):
            self._receive(None, 0.5)

    # --- the inbox --------------------------------------------------------------------------

    def _reconnected(self, session_present: bool) -> None:
        self._inbox.put(Received(_RECONNECTED, value=session_present))

    def _receive(self, ctx: RoundContext | None, timeout: float) -> None:
        """Take the messages in the inbox (waiting up to ``timeout`` s for the first) and act on
        them; the results among them are journaled together, then acknowledged (desk.commit).
        Without an open round, one message: what it changes (a hello completing the fleet) may
        open a round that the next ones answer."""
        self.health.tick()
        self.rollout.tick()
        try:  # (what waits for the commit is held in memory: as much as the inbox holds, at most)
            drain(self._inbox, lambda item: self._take(item, ctx), timeout,
                  self.config.commit_batch if ctx is not None else 1,
                  lambda: self.journal.staged_bytes >= self.config.inbox_bytes)
        finally:
            self.desk.commit()

    def _take(self, item: Received, ctx: RoundContext | None) -> None:
        topic, opened = item.topic, item.result()
        if topic is _RECONNECTED:
            return self.publisher.republish(opened)
        sender = self.topics.device_of(topic) or topic
        if isinstance(opened, Refusal):
            return self.channel.drop(sender, topic, opened.reason, opened.detail)
        try:
            return self._dispatch(topic, opened, ctx)
        except Exception as exc:  # a bug or a full disk must not stop the fleet; no receipt: it is resent
            log.exception("handling a message on %s failed", shown(topic, 200))
            if isinstance(exc, OSError):
                self.health.storage_failed(exc)
            return self.channel.drop(sender, topic, "internal_error", f"{type(exc).__name__}: {str(exc)[:200]}")

    def _dispatch(self, topic: str, opened, ctx: RoundContext | None) -> None:
        sender = self.topics.device_of(topic) or topic
        message = opened.message
        if getattr(message, "device_id", sender) != sender:
            return self.channel.drop(sender, topic, "sender_mismatch", f"message names device {message.device_id!r}")
        route = self._routes.get(type(message))
        if route is None:
            return self.channel.drop(sender, topic, "unexpected_kind", type(message).__name__)
        return route(topic, opened, ctx)

    def _on_artifact_request(self, topic: str, request: ArtifactRequest) -> None:
        """Any device may download the artifacts (before its hello: it needs them to say which
        model it runs); the broker's ACL decides who may ask at all."""
        if self.artifacts is None:
            return self.channel.drop(request.device_id, topic, "no_artifacts",
                                     "this aggregator serves no artifacts (start it with --ort-artifacts)")
        answer = self.artifacts.answer(request)
        if isinstance(answer, str):
            return self.channel.drop(request.device_id, topic, "bad_request", answer)
        self.channel.send(self.topics.artifact_data(request.device_id), answer)
        return None
