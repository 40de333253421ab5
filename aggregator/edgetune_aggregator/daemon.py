"""The round loop: open a round, collect and validate updates, merge, persist, publish.

Network callbacks only decode and enqueue; one thread (``serve``) makes every decision, so the
round state needs no locks. Bad input never stops the loop: it is logged with its sender and
reason, counted, and dropped, and the round completes with the valid updates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgetune.adapters.tensors import as_float32
from edgetune.adapters.lora import targets
from edgetune.clock import WALL, Clock
from edgetune.logsafe import shown
from edgetune.adapters.registry import adapter_kind, adapter_shapes
from edgetune.adapters.tensors import consensus
from edgetune.planning.layout import adapter_cost, candidate_modules, combine_scores, select_layout
from edgetune.transport import Transport, Will
from edgetune.transport.channel import Channel
from edgetune.wire import (
    AGGREGATOR_ID,
    DEVICE_KINDS,
    AdapterInit,
    ArtifactRequest,
    ErrorReport,
    EvalReport,
    GlobalAdapter,
    Hello,
    ImportanceReport,
    LoraSpec,
    PersonalizationReport,
    Presence,
    RoundTask,
    TaskKind,
    Topics,
    Update,
    decode_message,
    encode_message,
)
from edgetune.wire.manifest_file import mismatch
from edgetune.wire.signing import unwrap

from .config import DEFAULT_CANDIDATES, LAYOUTS, MAX_ADAPTER_PARAMETERS, AggregatorConfig  # noqa: F401 (re-exported)
from .inbox import Inbox, message_bytes
from .fleet_model import pinned_model
from .intake import Intake, hello_limit
from .guard import check_candidate
from .influence import bound_influence, lower_median
from .journal import RoundJournal, parse_name, result_name
from .results import ResultHandling, RoundContext
from .store import FleetState, RoundRecord, RoundStatus, StateStore
from .strategies import (
    RoundMerge,
    RoundStart,
    Strategy,
    make_strategy,
)
from .strategies.robust import robust_combine
from .validation import Refusal, clip_scale, delta_norm

log = logging.getLogger(__name__)

#: what the inbox holds after the broker connection came back (see ``_republish``)
_RECONNECTED = "<reconnected>"
#: error codes of a device that goes on with its round (the rest mean it gave the round up)
CONTINUING_ERRORS = ("oom_backoff",)


class Aggregator(ResultHandling):
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
        self._stats_seen = (0, 0)  # transport bytes already counted in the metrics
        #: (device, round) of every update in a global adapter or the open round, for the
        #: rounds a late update may still come from: none is counted twice
        self._counted: set[tuple[str, int]] = set()
        #: devices that answered a task of this run (a result, or an error report saying why
        #: not): in an open fleet only they hold a round open (see ``_needed``)
        self.answered: dict[str, int] = {}  # device -> the round it first answered in
        self._hellos_heard: set[str] = set()  # senders of a hello the channel passed on
        #: train round -> the global version it started from, for the rounds a late update may
        #: still come from (the versions within ``max_staleness`` of the current one)
        self._round_bases: dict[int, int] = {}
        self.transport = transport
        self.topics = Topics(config.fleet)
        self.intake = Intake(self.topics, config.device_keys)
        self.channel = Channel(transport, self.topics.sender_of, config.max_packet, limit_of=self.intake.limit_of)
        self.store = StateStore(config.state_dir)
        self.journal = RoundJournal(config.state_dir)
        if metrics is not None:
            self.channel.on_drop = metrics.rejected
        self.channel.admit = self._admit_payload
        self.channel.reassembler.max_pending_bytes = config.reassembly_bytes
        self.on_round = on_round
        #: called when a round opens, with its task and its record so far (plans, exclusions)
        self.on_task = on_task
        self.devices: dict[str, Hello] = {}
        self._manifests: dict[str, object] = {}  # fingerprint -> the first manifest (see _on_hello)
        #: the fleet's model, pinned by the operator (fleet_model.py); None: the first hello's
        self.pinned = pinned_model(config.model, config.model_from_first_hello)
        if self.pinned is not None:  # a hello is a manifest and a profile: no need for 8 MiB
            self.intake.hello_limit = hello_limit(self.pinned)
        self.online: set[str] = set()
        self.state: FleetState | None = None
        self.global_adapter: GlobalAdapter | None = None
        self._inbox = Inbox(config.inbox_bytes, clock)
        self._stop = threading.Event()
        #: set once the fleet's last round closed and ``finished`` was published
        self.finished = threading.Event()
        #: set once connected and subscribed: messages published from then on are seen
        self.ready = threading.Event()
        self._task: RoundTask | None = None  # the task now published
        self.strategy: Strategy | None = None  # made once the fleet's state is known
        self._calibration = None  # the cost model's coefficients, read once when first needed
        self._predicted: dict[str, dict] = {}  # the last plan's predicted peak memory and step time
        self._global_bytes = 0  # payload bytes of the published global adapter
        self._open_record: RoundRecord | None = None  # the open round's record (latecomers join it)
        self._problem_probe = 0.0  # when the state dir was last found unwritable or probed
        self._unsaved: set[str] = set()  # devices whose hello could not be written yet (disk full)
        self._initial: dict | None = None  # a prompt fleet's starting adapter (initialization round)
        self.artifacts = None  # what devices without PyTorch can download (checked before serving)
        if config.ort_artifacts is not None:
            from .artifacts import ArtifactServer

            self.artifacts = ArtifactServer(config.ort_artifacts, ArtifactServer.chunk_for(config.max_packet))

    # --- public -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Run rounds until ``config.rounds`` are done (or ``stop()``); blocking."""
        # The state, layout and known devices come first: a persistent session delivers the
        # updates queued while the daemon was away as soon as it connects.
        self._inbox.reader = threading.get_ident()
        resumed = self._load()
        self._connect()
        self.ready.set()
        try:
            if resumed:
                self._publish_global()
            elif not self._start_fleet():
                return
            while not self._stop.is_set():
                next_round = self.state.round + 1
                trained = next_round - self.state.first_train_round
                if self.config.rounds is not None and trained >= self.config.rounds:
                    break
                self._run_round(next_round, TaskKind.TRAIN)
            if self._stop.is_set():
                return
            # (a daemon restarted after the evaluation round closed must not evaluate again)
            evaluation_round = self.state.first_train_round + (self.config.rounds or 0)
            if self.config.evaluate_final and self.state.round < evaluation_round:
                self._run_round(self.state.round + 1, TaskKind.EVALUATE)
                if self._stop.is_set():  # (left open: a restarted daemon continues it)
                    return
            self._publish_task(self.state.round + 1, TaskKind.FINISHED)
            log.info("fleet %s finished: global adapter v%d in %s", self.config.fleet,
                     self.state.global_version, self.store.directory / "adapter")
            self.finished.set()
            self._linger()
        finally:
            self._inbox.close()  # before closing the connection: see Inbox.close
            if self.artifacts is not None:
                self.artifacts.withdraw(self.channel, self.topics)
            self._publish_presence(False)
            self.transport.close()

    def stop(self) -> None:
        self._stop.set()

    def _linger(self) -> None:
        """Devices personalize after the fleet finishes: keep recording their reports."""
        linger = self.config.linger_s
        if linger is not None and linger <= 0:
            return
        log.info("recording personalization reports %s", "until stopped" if linger is None else f"for {linger:.0f} s")
        deadline = None if linger is None else self.clock.monotonic() + linger
        while not self._stop.is_set() and (deadline is None or self.clock.monotonic() < deadline):
            self._handle_next(None, timeout=0.5)

    @property
    def drops(self) -> Counter:
        return self.channel.drops

    @property
    def task(self) -> RoundTask | None:
        """The task published now (retained on the broker), None before the first."""
        return self._task

    @property
    def inbox(self) -> Inbox:
        """Decoded messages waiting for the round loop (the fleet simulator watches it wait)."""
        return self._inbox

    # --- setup ------------------------------------------------------------------------------

    def _connect(self) -> None:
        will = Will(self.topics.aggregator_status, encode_message(Presence(AGGREGATOR_ID, False)))
        self.transport.on_reconnect(lambda session_present: self._inbox.put((_RECONNECTED, session_present)))
        # Handlers before the connection: what the persistent session queued while the daemon
        # was away arrives right after it, and goes through the bounded inbox like the rest.
        for kind in DEVICE_KINDS:
            if kind.aggregator_reads:
                self.channel.subscribe(kind.pattern(self.topics.base), self._enqueue, qos=kind.qos, sized=True)
        self.transport.connect(will=will)
        # A retained task left by an earlier run (e.g. "finished") must not steer devices
        # that connect before this run publishes its own.
        self.transport.publish(self.topics.task, b"", retain=True)
        if self.artifacts is not None:
            self.artifacts.publish(self.channel, self.topics)
        else:  # an offer retained by an earlier run must not send devices to a daemon without one
            self.transport.publish(self.topics.artifact_offer("ort") + "/0", b"", retain=True)
        self._publish_presence(True)

    def _enqueue(self, topic: str, message: object, size: int) -> None:
        # what holding it costs: its payload, or its tensors if they decoded larger
        self._inbox.put((topic, message), max(size, message_bytes(message)))  # blocks while full: see inbox.py

    def _problem(self, cause: str, why: str | None) -> None:
        """A condition /healthz reports as degraded (None: it is over)."""
        if self.metrics is not None:
            self.metrics.problem(cause, why)
        if why is not None:
            self._problem_probe = self.clock.monotonic()

    def _tick(self) -> None:
        """Bring the metrics up to date (the serve loop passes here at least twice a second)."""
        if self.metrics is None:
            return
        if "storage" in self.metrics.problems and self.clock.monotonic() - self._problem_probe >= 2.0:
            self._problem_probe = self.clock.monotonic()
            if self.store.writable():  # the disk has room again (or is writable again)
                self._storage_recovered()
        self.metrics.heartbeat()
        self.metrics.devices(len(self.devices), len(self.online))  # (only known devices are ever online)
        self.metrics.broker_connected(self.transport.connected)
        sent, received = self.transport.stats.snapshot()
        self.metrics.sent_bytes(sent - self._stats_seen[0])
        self.metrics.received_bytes(received - self._stats_seen[1])
        self._stats_seen = (sent, received)

    def _storage_recovered(self) -> None:
        """The state dir took a write again: save what waited for room, and say so."""
        try:
            for device in sorted(self._unsaved):
                self.store.save_device(self.devices[device])
        except OSError as exc:
            self._problem("storage", f"writing {self.store.directory} failed: {exc}")
            return
        self._unsaved.clear()
        log.info("the state dir %s is writable again", self.store.directory)
        self._problem("storage", None)

    def _republish(self, session_present: bool) -> None:
        """After a reconnection: a broker restarted without persistence lost the retained
        task, global adapter and status, which devices need to go on; publishing them again
        is harmless when it kept them."""
        log.info("reconnected to the broker (%s); republishing the task and global adapter",
                 "session kept" if session_present else "session lost")
        self._publish_presence(True)
        if self._task is not None:
            self.transport.publish(self.topics.task, encode_message(self._task), retain=True)
        if self.global_adapter is not None and self.state is not None:
            self.channel.send_retained(self.topics.global_adapter, self.global_adapter, self.state.global_chunks)
        if self.artifacts is not None:
            self.artifacts.publish(self.channel, self.topics)

    def _publish_presence(self, online: bool) -> None:
        self.transport.publish(
            self.topics.aggregator_status, encode_message(Presence(AGGREGATOR_ID, online)), retain=True
        )

    def _load(self) -> bool:
        """Take up the state dir's fleet, if it has one (no network: see ``serve``)."""
        self.devices = self.store.load_devices()
        if self.pinned is not None:  # (admitted under another pin or none: they say hello again)
            self.devices = {d: h for d, h in self.devices.items() if mismatch(self.pinned, h.model) is None}
        if self.config.admit is not None:
            self.devices = {d: h for d, h in self.devices.items() if d in self.config.admit}
        for hello in self.devices.values():
            self._manifests.setdefault(hello.model.fingerprint, hello.model)
        state = self.store.load_state()
        if state is None:
            return False
        if self.pinned is not None and mismatch(self.pinned, state.model):
            raise RuntimeError(
                f"state dir {self.store.directory} holds a fleet of {state.model.name} ({state.model.fingerprint}), "
                f"not the configured {self.pinned.name} ({self.pinned.fingerprint}): use another --state-dir, "
                "or pin that model with --model-manifest"
            )
        if state.fleet != self.config.fleet:
            raise RuntimeError(
                f"state dir {self.store.directory} belongs to fleet {state.fleet!r}, not "
                f"{self.config.fleet!r}: use another --state-dir"
            )
        if state.adapter != self.config.adapter:
            log.warning("the state dir's fleet trains %s; ignoring the configured %s (use a new --state-dir "
                        "to change the adapter)", state.adapter, self.config.adapter)
        self.state = state
        self.global_adapter = self.store.load_global(state.global_version)
        if state.strategy != self.config.strategy_name:
            log.warning("the state dir's fleet merges with %s; ignoring the configured %s", state.strategy,
                        self.config.strategy_name)
        self.strategy = make_strategy(state.strategy, self.config.server_optimizer, self.config.merged_rank_for(state.adapter))
        self.strategy.optimizer.load_state_dict(self.store.load_server_state(state.global_version))
        log.info("resuming fleet %s after round %d (global v%d)", state.fleet, state.round, state.global_version)
        self._set_layout()
        for record in self.store.rounds():
            if record["kind"] == TaskKind.TRAIN.value:
                self._round_bases[record["round"]] = record["base_version"]
                self._counted |= {(d["device_id"], record["round"] if d.get("from_round") is None else d["from_round"])
                                  for d in record["devices"]}
            for device in [d["device_id"] for d in record["devices"]] + list(record.get("declined") or {}):
                self.answered.setdefault(device, record["round"])
        self._forget_old_rounds()
        if state.opened > state.round:
            journaled = self.journal.load(state.opened)
            if journaled is not None:
                # the round goes on: its task and accepted results are on disk (_run_round)
                log.info("round %d was open with %d accepted result(s): continuing it",
                         journaled.number, len(journaled.results))
            else:
                # No journal (a state dir from before journals): devices may have done that
                # round already and would not redo it, so its number is skipped.
                record = RoundRecord(state.opened, TaskKind.TRAIN.value, state.global_version,
                                     status=RoundStatus.FAILED, note="the daemon stopped before the round closed")
                self.store.append_round(record)
                self.state = dataclasses.replace(state, round=state.opened)
                self.store.save_state(self.state)
        return True

    def _set_layout(self) -> None:
        """Size limits that follow from the fleet's adapter (updates can be no larger)."""
        from .validation import max_result_bytes

        self.intake.result_limit = max_result_bytes(adapter_shapes(self.state.adapter, self.state.model))
        # room for a few devices' results to arrive at once, chunk by chunk
        self.channel.reassembler.max_pending_bytes = max(self.config.reassembly_bytes, 4 * self.intake.result_limit)

    def check_model(self, hello: Hello) -> str | None:
        """Why the fleet cannot train on this device's model (None if it can)."""
        spec = self.state.adapter if self.state else self.config.adapter  # a resumed fleet keeps its own
        kind = spec.kind
        if kind not in hello.capabilities.adapters:
            return (f"the fleet trains {kind} adapters; this device trains only "
                    f"{', '.join(hello.capabilities.adapters) or 'none'} (with {', '.join(hello.capabilities.backends)})")
        try:
            shapes = adapter_shapes(spec, hello.model)
        except ValueError as exc:
            return str(exc)
        size = sum(a * b for a, b in shapes.values())
        if size > MAX_ADAPTER_PARAMETERS:
            return f"the adapter would have {size:,} parameters (at most {MAX_ADAPTER_PARAMETERS:,})"
        return None

    def _start_fleet(self) -> bool:
        """Wait for the first devices, take their model as the fleet's, publish global v0."""
        need = self.config.start_devices or self.config.min_devices
        log.info("waiting for %d device(s) to join fleet %s", need, self.config.fleet)
        deadline = None if self.config.join_timeout_s is None else self.clock.monotonic() + self.config.join_timeout_s
        while len(self.devices) < need:
            if self._stop.is_set() or (deadline is not None and self.clock.monotonic() > deadline):
                log.error("only %d of %d devices joined; giving up", len(self.devices), need)
                return False
            self._handle_next(None, timeout=0.5)
        model = self.pinned or next(iter(self.devices.values())).model
        spec = self.config.adapter
        self.state = FleetState(self.config.fleet, model, spec, base_model=self.config.base_model,
                                strategy=self.config.strategy_name)
        self.strategy = make_strategy(self.state.strategy, self.config.server_optimizer,
                                      self.config.merged_rank_for(self.state.adapter))
        self._set_layout()
        if self.config.layout == "importance":
            spec = self._calibrate()
            self._set_layout()
            if self._stop.is_set():
                return False
        kind = adapter_kind(spec)
        tensors = kind.initial(spec, model, self.config.seed)
        if tensors is None:  # (a kind that starts from the base's weights: devices propose it)
            tensors = self._initialize()
            if tensors is None:
                return False
        self.global_adapter = GlobalAdapter(0, 0, model.fingerprint, spec, tensors)
        self.store.save_global(self.global_adapter, self.config.base_model)
        self.store.save_state(self.state)
        self._publish_global()
        n = sum(t.size for t in tensors.values())
        what = kind.describe(spec, model) + (f" ({self.state.layout} layout)" if kind.has_layout else "")
        log.info("fleet model %s (%s); adapter: %s, %d parameters; merging with %s",
                 model.name, model.fingerprint, what, n, self.state.strategy)
        return True

    def _initialize(self) -> dict | None:
        """Run the initialization round of a prompt fleet: devices compute the starting prompt
        from their base's token embeddings (the daemon has none). None if no device answered;
        like calibration, nothing is saved before, so a restarted daemon begins afresh."""
        record = self._run_round(self.state.round + 1, TaskKind.INITIALIZE)
        if record.status is not RoundStatus.INITIALIZED:
            log.error("initialization failed (%s): the fleet cannot start", record.note)
            return None
        self.state = dataclasses.replace(self.state, first_train_round=record.round + 1)
        return self._initial
    def _calibrate(self) -> LoraSpec:
        """Run the calibration round and choose the layout; the fixed layout if it fails.

        Nothing is saved before the layout is chosen: a daemon that stops here starts the
        fleet afresh (a new run id, so devices score again).
        """
        spec, modules = self.config.adapter, self.state.model.modules
        try:
            candidates = candidate_modules(modules, self.config.layout_candidates)
        except ValueError as exc:
            log.warning("no importance layout: %s; using the fixed layout", exc)
            return spec
        kinds = tuple(sorted({name.rsplit(".", 1)[-1] for name in candidates}))
        self.state = dataclasses.replace(self.state, adapter=dataclasses.replace(spec, target_modules=kinds))
        record = self._run_round(self.state.round + 1, TaskKind.CALIBRATE)
        if record.status is not RoundStatus.CALIBRATED:
            log.warning("calibration failed (%s); using the fixed layout %s", record.note, ",".join(spec.target_modules))
            chosen, layout = spec, "fixed"
        else:
            chosen, layout = dataclasses.replace(spec, target_modules=tuple(record.layout)), "importance"
        self.state = dataclasses.replace(self.state, adapter=chosen, layout=layout,
                                         first_train_round=record.round + 1)
        return chosen

    def _choose_layout(self, ctx: RoundContext) -> tuple[str, ...]:
        """Combine the devices' scores (sample-weighted) and select matrices within the budget."""
        spec, modules = self.config.adapter, self.state.model.modules
        budget = self.config.adapter_budget or adapter_cost(modules, targets(spec, modules), spec.rank)
        scores = combine_scores([(report.scores, report.num_samples) for report in ctx.reports])
        layout = select_layout(scores, {m: modules[m] for m in scores}, spec.rank, budget)
        kinds = Counter(name.rsplit(".", 1)[-1] for name in layout.modules)
        ctx.record.note = (f"importance layout: {len(layout.modules)} matrices ({dict(sorted(kinds.items()))}), "
                           f"{layout.cost:,} of {budget:,} adapter parameters, {layout.score_covered:.0%} of the score")
        log.info("round %d: %s", ctx.number, ctx.record.note)
        return layout.modules

    def _publish_global(self) -> None:
        """Publish the current adapter (retained). The state naming it is on disk already, so
        a crash here republishes the same version on restart."""
        count = self.channel.send_retained(
            self.topics.global_adapter, self.global_adapter, self.state.global_chunks
        )
        self._global_bytes = self.channel.last_retained_bytes
        if count != self.state.global_chunks:
            self.state = dataclasses.replace(self.state, global_chunks=count)
            self.store.save_state(self.state)

    def _plan(self, kind: TaskKind, only: str | None = None) -> tuple[dict, dict]:
        """Per-device plans and exclusions for the devices that sent a profile (``only``: for
        that one device, when devices are independent of each other). ``config.plan`` says
        how: each device's best configuration (auto), the best one every device can run
        (weakest), or the fleet's own settings where they fit in memory (uniform)."""
        self._predicted = {}
        profiles = {d: h.profile for d, h in self.devices.items() if h.profile is not None}
        if not (self.config.planning and profiles) or kind in (TaskKind.FINISHED, TaskKind.INITIALIZE):
            return {}, {}
        if not adapter_kind(self.state.adapter).plannable:  # the cost model knows LoRA only (docs/planner.md)
            return {}, {}
        if self.config.train.algorithm == "fedsgd":  # one gradient at the full rank: nothing to plan
            return {}, {}
        from edgetune.planning.profile_check import profile_problem

        # an impossible profile (NaN, zero, beyond any hardware) excludes its device, not the fleet
        unusable = {d: f"its profile is unusable: {why}" for d, p in profiles.items() if (why := profile_problem(p))}
        profiles = {d: p for d, p in profiles.items() if d not in unusable}
        if only is not None and only in unusable:
            return {}, {only: unusable[only]}
        if not profiles:
            return {}, unusable
        from edgetune.planning.costmodel import Arch, Calibration, Config
        from edgetune.planning.planner import (
            PlanOptions,
            for_capabilities,
            plan_fleet,
            plan_uniform,
            plan_weakest,
            ranks_up_to,
        )

        independent = self.config.uplink_budget_mb is None and self.config.plan in ("auto", "uniform")
        if only is not None and independent:
            # Without a fleet-wide budget each device's optimum is its own: plan just this one.
            profiles = {only: profiles[only]}
        if self._calibration is None:
            self._calibration = Calibration.load()

        try:
            arch = Arch.from_manifest(self.state.model)
        except ValueError as exc:
            log.warning("not planning: %s", exc)
            return {}, {}
        spec, train = self.state.adapter, self.config.train
        # what a device evaluates each round: its own held-out blocks before and after training,
        # and as often the robustness set (the planner counts the worst case)
        eval_tokens = 4 * train.eval_blocks * train.seq_len if kind is TaskKind.TRAIN else 0
        options = PlanOptions(
            deadline_s=self.config.round_timeout_s,
            seq_len=train.seq_len,
            ranks=ranks_up_to(spec.rank),
            target_modules=spec.target_modules,
            max_local_steps=train.local_steps,
            uplink_budget_bytes=self.config.uplink_budget_mb * 1e6 if self.config.uplink_budget_mb else None,
            eval_tokens=eval_tokens,
            download_bytes=float(self._global_bytes),
        )
        narrowed = {d: for_capabilities(options, self.devices[d].capabilities) for d in profiles}
        device_options = {d: o for d, o in narrowed.items() if o is not options}
        if self.config.plan == "uniform":
            config = Config(spec.rank, "float32", train.batch_size, train.seq_len, False, spec.target_modules)
            plan = plan_uniform(profiles, arch, options, config, train.local_steps, self._calibration)
        elif self.config.plan == "weakest":
            plan = plan_weakest(profiles, arch, options, self._calibration, device_options)
        else:
            plan = plan_fleet(profiles, arch, options, self._calibration, device_options)
        excluded = {**plan.excluded, **unusable}
        for device, reason in excluded.items():
            log.warning("planner leaves %s out: %s", device, reason)
        for device, choice in plan.chosen.items():
            c = choice.config
            self._predicted[device] = {"predicted_peak_bytes": int(choice.memory_bytes),
                                       "predicted_step_s": round(choice.step_s, 4)}
            log.info("plan for %s: rank %d, %s base, batch %d%s, %d steps (predicted %.0f MiB, %.1f s/step)",
                     device, c.rank, c.quantization, c.batch_size, ", checkpointing" if c.gradient_checkpointing else "",
                     choice.local_steps, choice.memory_bytes / 2**20, choice.step_s)
        return plan.plans(), excluded

    def _publish_task(self, round_number: int, kind: TaskKind) -> RoundTask:
        task = self._make_task(round_number, kind)
        self._send_task(task)
        return task

    def _make_task(self, round_number: int, kind: TaskKind, sit_out: dict[str, str] | None = None) -> RoundTask:
        train = dataclasses.replace(self.config.train, seed=self.config.train.seed + round_number)
        try:
            plans, excluded = self._plan(kind)
            self._problem("planning", None)
        except Exception as exc:  # planning is an optimisation: without it, devices use the defaults
            log.exception("planning round %d failed; devices train with the fleet's defaults", round_number)
            self._problem("planning", f"round {round_number}: {type(exc).__name__}: {exc}")
            plans, excluded = {}, {}
        if self.state.left_out:  # another base: their updates would be dropped anyway
            excluded = {**excluded, **{d: f"computed another starting adapter ({why})"
                                       for d, why in self.state.left_out.items()}}
        if sit_out:
            excluded = {**excluded, **sit_out}
        if kind is TaskKind.CALIBRATE:  # scoring needs weight gradients, which only PyTorch computes
            excluded = {**excluded, **{d: "trains with ONNX Runtime, which cannot score weight importance"
                                       for d, h in self.devices.items() if h.capabilities.torch_free}}
            excluded = {**excluded, **{d: why for d, why in self._scoring_misfits(plans).items() if d not in excluded}}
            plans = {d: p for d, p in plans.items() if d not in excluded}
        task = RoundTask(
            round=round_number,
            kind=kind,
            global_version=self.state.global_version,
            model_fingerprint=self.state.model.fingerprint,
            adapter=self.state.adapter,
            train=train,
            deadline_s=self.config.round_timeout_s,
            plans=plans,
            excluded=excluded,
            run_id=self.state.run_id,
            importance=self.config.importance,
            max_staleness=self.config.max_staleness,
        )
        return task

    def _scoring_misfits(self, plans: dict) -> dict[str, str]:
        """Devices whose memory cannot hold importance scoring (a state for every candidate
        weight), and why: they sit the calibration round out rather than run out of memory."""
        from edgetune.planning.costmodel import Arch, Calibration, estimate_scoring_memory

        try:
            arch = Arch.from_manifest(self.state.model)
        except ValueError:
            return {}
        if self._calibration is None:
            self._calibration = Calibration.load()
        modules = self.state.model.modules
        candidates = sum(modules[m][0] * modules[m][1] for m in targets(self.state.adapter, modules))
        out = {}
        for device, hello in self.devices.items():
            if hello.profile is None:
                continue
            batch = min(plans[device].batch_size if device in plans else self.config.train.batch_size,
                        self.config.importance.batch_size)
            need = estimate_scoring_memory(arch, candidates, batch, self.config.train.seq_len, self._calibration)
            allowed = hello.profile.memory_bytes * 0.85
            if need > allowed:
                out[device] = (f"importance scoring needs about {need / 2**20:,.0f} MiB (moving averages for "
                               f"{candidates:,} candidate weights) but this device may use {allowed / 2**20:,.0f} MiB")
        return out

    def _send_task(self, task: RoundTask) -> None:
        # Not flushed: waiting for the broker's acknowledgement here could wait on a network
        # thread that waits for room in the inbox (paho resends it after a reconnection).
        self._task = task
        self.transport.publish(self.topics.task, encode_message(task), retain=True)

    def _plan_latecomer(self, device: str) -> None:
        """A device with a profile joined an open round: add its plan to the task. Plans
        already handed out stay as they are (devices may be training on them)."""
        task = self._task
        if task is None or task.kind is not TaskKind.TRAIN or device in task.plans or device in task.excluded:
            return
        try:
            plans, excluded = self._plan(task.kind, only=device)
        except Exception:
            log.exception("planning for %s failed; it trains with the fleet's defaults", device)
            return
        if device in plans or device in excluded:
            added_plans = {**task.plans, **({device: plans[device]} if device in plans else {})}
            added_excluded = {**task.excluded, **({device: excluded[device]} if device in excluded else {})}
            self._send_task(dataclasses.replace(task, plans=added_plans, excluded=added_excluded))
            record = self._open_record
            if record is not None and record.round == task.round:  # the round log says so too
                if device in plans:
                    record.plans[device] = dataclasses.asdict(plans[device]) | self._predicted.get(device, {})
                    record.asked = sorted({*record.asked, device})
                else:
                    record.excluded[device] = excluded[device]

    # --- one round --------------------------------------------------------------------------

    def _run_round(self, number: int, kind: TaskKind) -> RoundRecord:
        journaled = self.journal.load(number) if self.state.opened == number else None
        if journaled is not None and journaled.kind != kind.value:
            journaled = None
        opened_at = journaled.opened_at if journaled else self.clock.time()
        record = RoundRecord(number, kind.value, self.state.global_version, started_at=opened_at)
        drops_before = Counter(self.channel.drops)
        bytes_before = Counter(self.channel.bytes_from)
        round_ctx = RoundContext(number, kind, record)
        if kind is TaskKind.TRAIN:
            self._round_bases[number] = self.state.global_version
        journal = kind in (TaskKind.TRAIN, TaskKind.EVALUATE)  # (the others precede the first saved state)
        carried = self._carried(number) if kind is TaskKind.TRAIN else {}
        if journaled is not None:
            task = decode_message(journaled.task)
        else:
            # a device whose result a failed round carried over has done this round already
            task = self._make_task(number, kind, {device: f"its result of round {r} counts in this round"
                                                  for _, (device, r) in carried.values()})
            # Journal, then state, then the task goes out. A daemon killed between the first two
            # has a journal the state does not name: the task never left, and the round opens
            # afresh on restart. (State first would leave an open round without a journal, which
            # _load must treat as possibly answered and skip, losing a round.)
            if journal:
                self.journal.open(number, kind.value, encode_message(task), opened_at)
            self.state = dataclasses.replace(self.state, opened=number)
            if journal:
                self.store.save_state(self.state)
        if journal:
            for name, (path, (device, trained_for)) in carried.items():  # (after a restart: what is there is skipped)
                if not self.journal.has(number, name):
                    self.journal.record(number, device, path.read_bytes(), late_from=trained_for)
            self.journal.discard(keep=number)
            for name, path in sorted(self.journal.load(number).results.items()):
                self._replay(round_ctx, name, path.read_bytes())
        self._send_task(task)  # after a restart, the same task again: devices that did the round do not redo it
        self._open_record = record
        record.asked = sorted((self.online & set(self.devices)) - set(task.excluded))
        record.excluded = dict(task.excluded)
        record.plans = {d: dataclasses.asdict(p) | self._predicted.get(d, {}) for d, p in task.plans.items()}
        record.downlink_bytes = self._global_bytes + len(encode_message(task))
        if self.on_task:
            try:  # (a dashboard's bug must not stop the fleet)
                self.on_task(task, record)
            except Exception:
                log.exception("the on_task callback failed for round %d", number)
        log.info("round %d (%s) %s on global v%d%s; %d device(s) online", number, kind.value,
                 "resumed" if journaled else "open", self.state.global_version,
                 f" with {len(round_ctx.record.devices)} accepted result(s)" if round_ctx.record.devices else "",
                 len(self.online))
        round_ctx.journal = journal
        if self.metrics is not None:
            self.metrics.round_opened(number)
        start = self.clock.monotonic()
        deadline = start + max(0.0, opened_at + self.config.round_timeout_s - self.clock.time())
        # (recomputed as devices come and go: one that joins the open round is asked too)
        while len(record.devices) < self._needed(kind, task, round_ctx) and not self._stop.is_set():
            left = deadline - self.clock.monotonic()
            if left <= 0:
                break
            self._handle_next(round_ctx, timeout=min(left, 0.5))
        record.duration_s = self.clock.time() - opened_at
        if self._stop.is_set():
            return record  # left open: a resumed daemon continues it, as after a crash
        record.dropped = dict(Counter(self.channel.drops) - drops_before)
        record.declined = dict(round_ctx.declined)
        # What each device sent in this round, as measured here (its own report can only
        # count what it sent before the update that carries the report).
        sent = Counter(self.channel.bytes_from) - bytes_before
        for device in record.devices:
            device.bytes_sent = sent[device.device_id]
        self._close_round(round_ctx)
        return record

    def _forget_old_rounds(self) -> None:
        """Keep only the rounds whose global is young enough for a late update to join."""
        oldest = self.state.global_version - self.config.max_staleness
        self._round_bases = {r: base for r, base in self._round_bases.items() if base >= oldest}
        self._counted = {(d, r) for d, r in self._counted if r in self._round_bases}

    def _carried(self, number: int) -> dict[str, tuple[Path, tuple[str, int]]]:
        """The accepted results of failed train rounds before ``number``, still journaled:
        result name in this round -> (file, (device, round it was trained for)). A failed
        round merged nothing and left the global version as it was, so they belong here."""
        failed = {r["round"] for r in self.store.rounds() if r["kind"] == TaskKind.TRAIN.value
                  and r["status"] == RoundStatus.FAILED.value}
        carried = {}
        for previous in self.journal.numbers():
            old = self.journal.load(previous) if previous < number and previous in failed else None
            if old is None or old.kind != TaskKind.TRAIN.value:
                continue
            for name, path in old.results.items():
                device, trained_for = parse_name(name)
                trained_for = previous if trained_for is None else trained_for
                carried[result_name(device, trained_for)] = (path, (device, trained_for))
        return carried

    def _needed(self, kind: TaskKind, task: RoundTask, ctx: RoundContext | None = None) -> int:
        """Results that close the round before its deadline: ``min_devices``, or the quorum of
        the devices the task asked (less those that said they gave up on it); every online
        device for an initialization round."""
        needed = self.config.min_devices
        asked = (self.online & set(self.devices)) - set(task.excluded) - set(ctx.declined if ctx else ())
        heard = {d for d, first in self.answered.items() if first < task.round}
        if self.open_fleet and asked & heard:
            # Anyone can say hello to an open fleet (no --device-keys, no --admit): a device not
            # heard from in an earlier round of this run is asked and its result counts, but it
            # does not hold the round open, or 2,000 made-up hellos would keep every round
            # waiting for its deadline.
            asked &= heard
        if kind is TaskKind.INITIALIZE:  # every device online gets a say in the fleet's start
            needed = max(needed, len(self.online & set(self.devices)))
        elif self.config.quorum is not None:
            needed = max(needed, math.ceil(self.config.quorum * len(asked)))
        return needed

    def _merge(self, ctx: RoundContext) -> tuple[RoundMerge, float]:
        """The round's accepted updates, read back from the journal in device order (a round
        interrupted by restarts merges exactly what an uninterrupted one would, bit for bit),
        within the influence bounds (``influence.py``), and the change a typical one (the lower
        median) would make alone: what ``guard.py`` measures the candidate global against."""
        start = self._round_start(ctx.number)
        merge = self.strategy.begin(start)
        journaled = self.journal.load(ctx.number)
        paths = journaled.results if journaled is not None else {}
        names = sorted(paths)
        records = {(d.device_id, d.from_round): d for d in ctx.record.devices}
        rows = [records.get(parse_name(name)) for name in names]
        updates = [None if row is not None and row.norm is not None else unwrap(decode_message(paths[n].read_bytes()))
                   for n, row in zip(names, rows)]  # (a record without a norm: from before norms were kept)
        samples = [row.num_samples if u is None else u.num_samples for row, u in zip(rows, updates)]
        norms = [row.norm if u is None else delta_norm(u.delta) for row, u in zip(rows, updates)]
        absolute = [clip_scale(n, self.config.limits) for n in norms]
        bounded = bound_influence(samples, [n * a for n, a in zip(norms, absolute)], self.config.influence)
        spec = self.state.adapter
        kind = adapter_kind(spec)
        deltas, weights, changes = [], [], []
        for name, row, update, a, b in zip(names, rows, updates, absolute, bounded):
            update = update or unwrap(decode_message(paths[name].read_bytes()))
            scale = a * b.scale
            delta = update.delta if scale == 1.0 else {k: as_float32(t) * np.float32(scale) for k, t in update.delta.items()}
            changes.append(kind.update_change(start.tensors, delta, start.scale))
            # a late update weighs less the older the global it trained on (0 lag: 1)
            lag = self.state.global_version - update.base_version
            weight = b.samples * (1.0 + lag) ** -self.config.staleness_exponent
            if self.config.robust:
                deltas.append(delta)
            else:
                merge.add(delta, weight)
            weights.append(weight)
            if row is not None:
                row.counted_samples = b.samples if b.samples < update.num_samples else None
                row.norm_scale = scale if scale < 1.0 else None
        if deltas:
            shapes = adapter_shapes(self.state.adapter, self.state.model)
            merge.add(robust_combine(deltas, shapes, self.config.robust, self.config.trim), 1.0)
        total = sum(weights)
        for row, weight in zip(rows, weights):
            if row is not None and total > 0:
                row.weight = weight / total
        capped = [r.device_id for r in rows if r is not None and (r.counted_samples is not None or r.norm_scale)]
        if capped:
            log.info("round %d: influence bounded for %s (samples counted at most %s× the round's median, norms at most "
                     "%s× its median)", ctx.number, ", ".join(capped), self.config.influence.sample_ratio,
                     self.config.influence.norm_ratio)
        return merge, lower_median(changes) if changes else 0.0

    def _check_global(self, ctx: RoundContext, result, typical: float) -> str | None:
        """Why the round's candidate global must not be published (None: it may)."""
        spec, adapter = self.state.adapter, self.global_adapter
        return check_candidate(adapter_kind(spec), spec, adapter_shapes(spec, self.state.model),
                               (adapter.tensors, adapter.merged), (result.tensors, result.merged), typical,
                               self.config.max_global_change, self.config.server_optimizer)

    def _round_start(self, number: int) -> RoundStart:
        spec, adapter = self.state.adapter, self.global_adapter
        scale = adapter_kind(spec).scale(spec)
        return RoundStart(dict(adapter.tensors), dict(adapter.merged), scale, seed=self.config.seed + number)

    def _close_round(self, ctx: RoundContext) -> None:
        record = ctx.record
        enough = len(record.devices) >= self.config.min_devices
        if ctx.kind is TaskKind.TRAIN and enough:
            version = self.state.global_version + 1
            started = time.perf_counter()
            optimizer_state = self.strategy.optimizer.state_dict()  # (kept if the candidate is refused)
            merge, typical = self._merge(ctx)
            result = self.strategy.finish(merge)
            record.aggregation_s = time.perf_counter() - started
            record.truncation_error = result.truncation_error
            if result.truncation_error:
                log.info("round %d: the downlink bound cut %.2g of the merged update (relative Frobenius, worst layer)",
                         ctx.number, result.truncation_error)
            problem = self._check_global(ctx, result, typical)
            if problem is None:
                self.global_adapter = GlobalAdapter(version, ctx.number, self.state.model.fingerprint,
                                                    self.state.adapter, result.tensors, result.merged)
                self.store.save_global(self.global_adapter, self.state.base_model)
                self.store.save_server_state(version, self.strategy.optimizer.state_dict())
                self.state = dataclasses.replace(self.state, global_version=version)
                record.new_version, record.status = version, RoundStatus.AGGREGATED
            else:
                self.strategy.optimizer.load_state_dict(optimizer_state)
                contributors = ", ".join(sorted(d.device_id for d in record.devices))
                record.status = RoundStatus.REJECTED
                record.note = f"candidate v{version} not published: {problem}; contributors: {contributors}"
                log.error("round %d: %s; the global adapter stays at v%d", ctx.number, record.note,
                          self.state.global_version)
                if self.metrics is not None:
                    self.metrics.global_rejected()
        elif ctx.kind is TaskKind.INITIALIZE and ctx.inits:
            initial, disagree = consensus(ctx.inits)
            if initial is None:
                record.status = RoundStatus.FAILED
                record.note = f"no majority for a starting adapter: {disagree}"
            else:
                self._initial = initial
                for device, why in disagree.items():
                    log.warning("device %s computed another starting adapter than the fleet (%s): it is left out "
                                "of this fleet; check its base model", device, why)
                # saved with the state the fleet's v0 is saved with: a restart keeps them out
                self.state = dataclasses.replace(self.state, left_out={**self.state.left_out, **disagree})
                if disagree:
                    record.note = f"left out (another starting adapter): {', '.join(sorted(disagree))}"
                record.status = RoundStatus.INITIALIZED
        elif ctx.kind is TaskKind.CALIBRATE and enough:
            try:
                record.layout = list(self._choose_layout(ctx))
                record.status = RoundStatus.CALIBRATED
            except ValueError as exc:
                record.status, record.note = RoundStatus.FAILED, f"no layout: {exc}"
        elif ctx.kind is TaskKind.EVALUATE and record.devices:
            record.status = RoundStatus.EVALUATED
        else:
            record.status = RoundStatus.FAILED
            record.note = (f"{len(record.devices)} of {self.config.min_devices} required devices "
                           f"reported within {self.config.round_timeout_s:.0f} s")
            log.warning("round %d failed: %s; the global adapter stays at v%d",
                        ctx.number, record.note, self.state.global_version)
        self.state = dataclasses.replace(self.state, round=ctx.number)
        # Disk before network: the global file, the round log, then the state that names
        # them; only then is the new version published.
        self.store.append_round(record)
        if ctx.kind not in (TaskKind.CALIBRATE, TaskKind.INITIALIZE):
            self.store.save_state(self.state)
            if ctx.kind is TaskKind.TRAIN and record.status is RoundStatus.FAILED:
                self.journal.discard(keep=ctx.number)  # its results go on into the next train round
            else:
                self.journal.discard()  # the round is closed: its results live in the global adapter
            self._forget_old_rounds()
        if record.status is RoundStatus.AGGREGATED:
            self._publish_global()
        scores = ""
        if record.global_ppl is not None:  # personalization and robustness of the round's base adapter
            scores = f"; global v{record.base_version} ppl own {record.global_ppl:.2f}"
            if record.global_robust_ppl is not None:
                scores += f", others' {record.global_robust_ppl:.2f}"
        log.info("round %d %s with %d device(s) in %.1f s%s%s", ctx.number, record.status.value,
                 len(record.devices), record.duration_s, scores,
                 f"; dropped {record.dropped}" if record.dropped else "")
        if self.metrics is not None:
            self.metrics.round_closed(ctx.kind.value, record.status.value, record.duration_s)
            self.metrics.global_version(self.state.global_version)
        if self.on_round:
            try:  # a dashboard's bug must not stop the fleet
                self.on_round(record)
            except Exception:
                log.exception("the on_round callback failed for round %d", ctx.number)

    # --- inbox ------------------------------------------------------------------------------

    def _handle_next(self, ctx: RoundContext | None, timeout: float) -> None:
        self._tick()
        try:
            topic, message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        if topic is _RECONNECTED:
            return self._republish(message)
        try:
            return self._dispatch(topic, message, ctx)
        except Exception as exc:  # a bug or a full disk must not stop the fleet; no receipt: it is resent
            log.exception("handling a message on %s failed", shown(topic, 200))
            if isinstance(exc, OSError):
                self._problem("storage", f"writing {self.store.directory} failed: {exc}")
            return self.channel.drop(self.topics.device_of(topic) or topic, topic, "internal_error",
                                     f"{type(exc).__name__}: {str(exc)[:200]}")

    def _dispatch(self, topic: str, message: object, ctx: RoundContext | None) -> None:
        sender = self.topics.device_of(topic) or topic
        opened = self.intake.open(topic, message)
        if isinstance(opened, Refusal):
            return self.channel.drop(sender, topic, opened.reason, opened.detail)
        message = opened.message
        if getattr(message, "device_id", sender) != sender:
            return self.channel.drop(sender, topic, "sender_mismatch", f"message names device {message.device_id!r}")
        if isinstance(message, Hello):
            self._on_hello(topic, message)
        elif isinstance(message, Presence):
            if sender not in self.devices:  # (it decides quorums: only the fleet's devices count)
                return None
            (self.online.add if message.online else self.online.discard)(sender)
            log.info("device %s is %s", shown(sender, 64), "online" if message.online else "offline")
        elif isinstance(message, ErrorReport):
            log.warning("device %s reports %s in round %d: %s", shown(sender, 64), shown(message.code, 32), message.round,
                        shown(message.message, 300))
            # A device that gave up on the open round (missed its deadline, ran out of memory,
            # failed) will not answer: the quorum stops waiting for it. Backing off is no giving up.
            if (ctx is not None and message.round == ctx.number and message.code not in CONTINUING_ERRORS
                    and sender in self.devices and (self.intake.keyring is None or opened.signed is not None)):
                ctx.declined[sender] = f"{shown(message.code, 32)}: {shown(message.message, 260)}"
                self.answered.setdefault(sender, ctx.number)
        elif isinstance(message, (Update, EvalReport, ImportanceReport, AdapterInit)):
            self._on_result(topic, opened, ctx)
        elif isinstance(message, ArtifactRequest):
            self._on_artifact_request(topic, message)
        elif isinstance(message, PersonalizationReport):
            self._on_personalization(topic, message)
        else:
            self.channel.drop(sender, topic, "unexpected_kind", type(message).__name__)
        return None

    def _on_personalization(self, topic: str, report: PersonalizationReport) -> None:
        """Record a device's personalization scores (any time: devices personalize on their own
        schedule) in ``personalization.json``."""
        if report.device_id not in self.devices:
            return self.channel.drop(report.device_id, topic, "unknown_device", "no hello received from it")
        if self.state and report.device_id in self.state.left_out:
            return self.channel.drop(report.device_id, topic, "init_mismatch", "left out of this fleet")
        values = [report.global_ppl, report.local_ppl, report.personal_ppl, report.global_robust_ppl,
                  report.local_robust_ppl, report.personal_robust_ppl, *report.validation.values()]
        if not all(v is None or (math.isfinite(v) and v > 0) for v in values):
            return self.channel.drop(report.device_id, topic, "bad_scores", "perplexities must be finite and > 0")
        why = _check_report(report)
        if why:
            return self.channel.drop(report.device_id, topic, "bad_field", why)
        entry = dataclasses.asdict(report) | {"received_at": time.time()}
        try:
            self.store.append_personalization(entry)
        except (OSError, ValueError) as exc:  # (a damaged file) the rounds go on; this report is lost and says so
            log.error("could not record %s's personalization report: %s", report.device_id, exc)
            return None
        robust = (f", others' {report.global_robust_ppl:.2f} -> {report.personal_robust_ppl:.2f}"
                  if report.global_robust_ppl is not None and report.personal_robust_ppl is not None else "")
        log.info("device %s personalized global v%d with α=%.2f: own held-out ppl %.2f -> %.2f%s", report.device_id,
                 report.global_version, report.alpha, report.global_ppl, report.personal_ppl, robust)
        return None

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

    def _admit_payload(self, sender: str, topic: str) -> tuple[str, str] | None:
        """(On the network thread.) A result (the large payloads) from a device the daemon
        has no hello from is refused before it is decoded or reassembled. Hellos, presence and
        error reports are small, and may overtake the hello on its way to the round loop; an
        artifact request comes before any hello (a device without PyTorch fetches first)."""
        kind = self.topics.device_kind(topic)
        if kind is not None and kind.name == "hello":  # (its result may come before the round loop has read the hello)
            if len(self._hellos_heard) >= 100_000:
                self._hellos_heard.clear()
            self._hellos_heard.add(sender)
        if kind is None or not kind.result or sender in self.devices or sender in self._hellos_heard:
            return None
        return "unknown_device", "no hello received from it"

    @property
    def open_fleet(self) -> bool:
        """Anyone who can publish may join: no device keys, no admission list."""
        return self.intake.keyring is None and self.config.admit is None

    def _on_hello(self, topic: str, hello: Hello) -> None:
        if self.config.admit is not None and hello.device_id not in self.config.admit:
            self.channel.drop(hello.device_id, topic, "not_admitted", "not on the fleet's --admit list")
            return
        if self.pinned is not None:
            why = mismatch(self.pinned, hello.model)
            if why:
                self.channel.drop(hello.device_id, topic, "model_mismatch", why)
                return
            if hello.model is not self.pinned:  # the operator's sizes, not the device's claims
                hello = dataclasses.replace(hello, model=self.pinned)
        why = self.check_model(hello)
        if why:
            self.channel.drop(hello.device_id, topic, "bad_model", why)
            return
        fleet_model = self.state.model if self.state else None
        if fleet_model and hello.model.fingerprint != fleet_model.fingerprint:
            self.channel.drop(hello.device_id, topic, "model_mismatch",
                              f"model {hello.model.name} ({hello.model.fingerprint}) is not the "
                              f"fleet's {fleet_model.name} ({fleet_model.fingerprint})")
            return
        if not fleet_model and self.devices:
            first = next(iter(self.devices.values())).model
            if hello.model.fingerprint != first.fingerprint:
                self.channel.drop(hello.device_id, topic, "model_mismatch",
                                  f"model {hello.model.fingerprint} differs from {first.fingerprint}")
                return
        # One manifest object per model: a fleet's devices send the same one, and a copy per
        # device (hundreds of layers each) would make the daemon's memory grow with the fleet.
        known = self._manifests.setdefault(hello.model.fingerprint, hello.model)
        if known is not hello.model and known == hello.model:
            hello = dataclasses.replace(hello, model=known)
        new = hello.device_id not in self.devices
        if new:
            log.info("device %s joined (sdk %s, %d samples)", shown(hello.device_id, 64), shown(hello.sdk_version, 32),
                     hello.num_samples)
        if self.devices.get(hello.device_id) != hello:  # (retained hellos come again on every restart)
            try:
                self.store.save_device(hello)
                self._unsaved.discard(hello.device_id)
            except OSError as exc:  # a full disk: it joins now, and is saved once there is room
                log.error("could not save %s's hello: %s", hello.device_id, exc)
                self._unsaved.add(hello.device_id)
                self._problem("storage", f"writing {self.store.directory} failed: {exc}")
        self.devices[hello.device_id] = hello
        self.online.add(hello.device_id)
        if new and hello.profile is not None and self.state is not None:
            self._plan_latecomer(hello.device_id)


def _check_report(report: PersonalizationReport) -> str | None:
    """Why a personalization report is not worth keeping (None if it is): it is stored as
    sent, so its free-form parts are bounded here."""
    for key in report.validation:
        if len(key) > 16:
            return f"validation key {key[:20]!r}… is not an α"
        try:
            alpha = float(key)
        except ValueError:
            return f"validation key {key[:20]!r} is not an α"
        if not 0.0 <= alpha <= 1.0:
            return f"validation α {alpha} is outside [0, 1]"
    if any(len(k) > 64 or len(v) > 64 for k, v in report.settings.items()):
        return "settings entries are limited to 64 characters"
    if not (math.isfinite(report.train_seconds) and report.train_seconds >= 0) or report.global_version < 0:
        return "train_seconds and global_version must be ≥ 0"
    return None
