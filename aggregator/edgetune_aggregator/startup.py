"""How a daemon takes up its fleet: resumed from the state dir, or started afresh.

A fresh fleet waits for its first devices, takes the pinned model (or the first hello's), runs
a calibration round when the layout is chosen by importance and an initialization round when
the adapter kind starts from the base's weights, and publishes global v0. Nothing is saved
before v0: a daemon stopped earlier starts the fleet afresh (a new run id, so devices score and
propose again). A resumed fleet takes its state, devices, global adapter, strategy and server
optimizer from the state dir, and the round that was open goes on (``RoundRunner.run``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from edgetune.adapters.registry import adapter_kind, adapter_shapes
from edgetune.clock import Clock
from edgetune.planning.layout import candidate_modules
from edgetune.transport.channel import Channel
from edgetune.wire import GlobalAdapter, LoraSpec, TaskKind
from edgetune.wire.manifest_file import mismatch

from .config import AggregatorConfig
from .fleet import Fleet
from .intake import Intake
from .journal import RoundJournal
from .membership import Membership
from .publisher import Publisher
from .runner import RoundRunner
from .store import FleetState, RoundRecord, RoundStatus
from .strategies import make_strategy
from .tasks import InitializeHandler, TrainHandler
from .validation import max_result_bytes

log = logging.getLogger("edgetune_aggregator.daemon")


class Startup:
    def __init__(self, config: AggregatorConfig, clock: Clock, fleet: Fleet, members: Membership, runner: RoundRunner,
                 publisher: Publisher, journal: RoundJournal, intake: Intake, channel: Channel,
                 train: TrainHandler, initialize: InitializeHandler,
                 receive: Callable[[object, float], None], stop: threading.Event):
        self.config = config
        self.clock = clock
        self.fleet = fleet
        self.members = members
        self.runner = runner
        self.publisher = publisher
        self.journal = journal
        self.intake = intake
        self.channel = channel
        self.train = train
        self.initialize = initialize
        self.receive = receive
        self.stop = stop

    def resume(self) -> bool:
        """Take up the state dir's fleet, if it has one (no network yet: a persistent session
        delivers what was queued for the daemon as soon as it connects)."""
        self.members.load()
        store, config, pinned = self.fleet.store, self.config, self.members.pinned
        state = store.load_state()
        if state is None:
            return False
        if pinned is not None and mismatch(pinned, state.model):
            raise RuntimeError(
                f"state dir {store.directory} holds a fleet of {state.model.name} ({state.model.fingerprint}), "
                f"not the configured {pinned.name} ({pinned.fingerprint}): use another --state-dir, "
                "or pin that model with --model-manifest"
            )
        if state.fleet != config.fleet:
            raise RuntimeError(f"state dir {store.directory} belongs to fleet {state.fleet!r}, not "
                               f"{config.fleet!r}: use another --state-dir")
        if state.adapter != config.adapter:
            log.warning("the state dir's fleet trains %s; ignoring the configured %s (use a new --state-dir "
                        "to change the adapter)", state.adapter, config.adapter)
        self.fleet.state = state
        self.fleet.global_adapter = store.load_global(state.global_version)
        if state.strategy != config.strategy_name:
            log.warning("the state dir's fleet merges with %s; ignoring the configured %s", state.strategy,
                        config.strategy_name)
        self.fleet.strategy = make_strategy(state.strategy, config.server_optimizer, config.merged_rank_for(state.adapter))
        self.fleet.strategy.optimizer.load_state_dict(store.load_server_state(state.global_version))
        self.fleet.backfill_versions()
        log.info("resuming fleet %s after round %d (global v%d)", state.fleet, state.round, state.global_version)
        self.set_limits()
        records = store.rounds()
        self.train.resume(records)
        self.members.known_answers(records)
        if state.opened > state.round:
            journaled = self.journal.load(state.opened)
            if journaled is not None:
                # the round goes on: its task and accepted results are on disk (RoundRunner.run)
                log.info("round %d was open with %d accepted result(s): continuing it",
                         journaled.number, len(journaled.results))
            else:
                # No journal (a state dir from before journals): devices may have done that
                # round already and would not redo it, so its number is skipped.
                record = RoundRecord(state.opened, TaskKind.TRAIN.value, state.global_version,
                                     status=RoundStatus.FAILED, note="the daemon stopped before the round closed")
                store.append_round(record)
                self.fleet.update(save=True, round=state.opened)
        return True

    def set_limits(self) -> None:
        """Size limits that follow from the fleet's adapter (updates can be no larger)."""
        state = self.fleet.state
        self.intake.result_limit = max_result_bytes(adapter_shapes(state.adapter, state.model))
        # room for a few devices' results to arrive at once, chunk by chunk
        self.channel.reassembler.max_pending_bytes = max(self.config.reassembly_bytes, 4 * self.intake.result_limit)

    def start(self) -> bool:
        """Wait for the first devices, take their model as the fleet's, publish global v0."""
        config, members = self.config, self.members
        need = config.start_devices or config.min_devices
        log.info("waiting for %d device(s) to join fleet %s", need, config.fleet)
        deadline = None if config.join_timeout_s is None else self.clock.monotonic() + config.join_timeout_s
        while len(members.devices) < need:
            if self.stop.is_set() or (deadline is not None and self.clock.monotonic() > deadline):
                log.error("only %d of %d devices joined; giving up", len(members.devices), need)
                return False
            self.receive(None, 0.5)
        model = members.pinned or next(iter(members.devices.values())).model
        spec = config.adapter
        self.fleet.state = FleetState(config.fleet, model, spec, base_model=config.base_model,
                                      strategy=config.strategy_name)
        self.fleet.strategy = make_strategy(config.strategy_name, config.server_optimizer,
                                            config.merged_rank_for(spec))
        self.set_limits()
        if config.layout == "importance":
            spec = self._calibrate()
            self.set_limits()
            if self.stop.is_set():
                return False
        kind = adapter_kind(spec)
        tensors = kind.initial(spec, model, config.seed)
        if tensors is None:  # (a kind that starts from the base's weights: devices propose it)
            tensors = self._initialize()
            if tensors is None:
                return False
        self.fleet.new_version(GlobalAdapter(0, 0, model.fingerprint, spec, tensors), None, "initial")
        self.fleet.save()
        self.publisher.publish_global()
        n = sum(t.size for t in tensors.values())
        what = kind.describe(spec, model) + (f" ({self.fleet.state.layout} layout)" if kind.has_layout else "")
        log.info("fleet model %s (%s); adapter: %s, %d parameters; merging with %s",
                 model.name, model.fingerprint, what, n, self.fleet.state.strategy)
        return True

    def _initialize(self) -> dict | None:
        """Run the initialization round: devices compute the starting adapter from their base
        (the daemon has none). None if no majority answered; like calibration, nothing is saved
        before, so a restarted daemon begins afresh."""
        record = self.runner.run(self.fleet.state.round + 1, TaskKind.INITIALIZE)
        if record.status is not RoundStatus.INITIALIZED:
            log.error("initialization failed (%s): the fleet cannot start", record.note)
            return None
        self.fleet.update(first_train_round=record.round + 1)
        return self.initialize.initial

    def _calibrate(self) -> LoraSpec:
        """Run the calibration round and choose the layout; the fixed layout if it fails.

        Nothing is saved before the layout is chosen: a daemon that stops here starts the
        fleet afresh (a new run id, so devices score again).
        """
        spec, modules = self.config.adapter, self.fleet.state.model.modules
        try:
            candidates = candidate_modules(modules, self.config.layout_candidates)
        except ValueError as exc:
            log.warning("no importance layout: %s; using the fixed layout", exc)
            return spec
        kinds = tuple(sorted({name.rsplit(".", 1)[-1] for name in candidates}))
        self.fleet.update(adapter=dataclasses.replace(spec, target_modules=kinds))
        record = self.runner.run(self.fleet.state.round + 1, TaskKind.CALIBRATE)
        if record.status is not RoundStatus.CALIBRATED:
            log.warning("calibration failed (%s); using the fixed layout %s", record.note, ",".join(spec.target_modules))
            chosen, layout = spec, "fixed"
        else:
            chosen, layout = dataclasses.replace(spec, target_modules=tuple(record.layout)), "importance"
        self.fleet.update(adapter=chosen, layout=layout, first_train_round=record.round + 1)
        return chosen
