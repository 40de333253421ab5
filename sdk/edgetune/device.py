"""The device side of a fleet: what an edge application embeds.

A :class:`Device` announces itself, follows the retained round task and global adapter, trains
when told, sends only the adapter delta, and keeps the newest global adapter for the
application to use. Training failures become :class:`ErrorReport` messages, never exceptions
in the application around it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from . import __version__
from .adapters.lora import targets
from .adapters.registry import adapter_kind
from .backoff import MemoryBudgetExceeded, is_out_of_memory, next_fallback, resident_bytes
from .clock import DeviceClock
from .logsafe import shown
from .trainers.result import TrainResult
from .transport import Transport, TransportError, Will, open_transport
from .transport.channel import Channel
from .wire import (
    AGGREGATOR_ID,
    BY_NAME,
    AdapterInit,
    DEFAULT_MAX_PACKET,
    Capabilities,
    DevicePlan,
    DeviceProfile,
    ErrorReport,
    EvalMetrics,
    EvalReport,
    GlobalAdapter,
    Hello,
    ImportanceReport,
    Presence,
    Progress,
    Receipt,
    RoundTask,
    TaskKind,
    Topics,
    TrainMetrics,
    Update,
    encode_message,
)
from .outbox import Outbox
from .workload import Workload

log = logging.getLogger(__name__)
#: what the inbox holds after the broker connection came back
_RECONNECTED = "<reconnected>"
#: how long a device waits for the final global adapter after the "finished" task
_FINAL_ADAPTER_WAIT_S = 30.0


class DeadlineMissed(Exception):
    """The round's deadline passes before training could finish: the update would be refused."""


@dataclass(frozen=True)
class DeviceConfig:
    fleet: str
    device_id: str
    heldout_fraction: float = 0.1
    #: cap on held-out blocks evaluated per round (bounds evaluation time on slow devices)
    max_eval_blocks: int = 16
    max_packet: int = DEFAULT_MAX_PACKET
    #: leave the loop when the aggregator says the fleet is finished
    exit_when_finished: bool = True
    #: announced in the hello so the aggregator can plan for this device; its memory_bytes is
    #: also the budget training must stay within (exceeding it triggers a back-off)
    profile: DeviceProfile | None = None
    #: this device's Ed25519 private key (PEM): everything it sends is signed (docs/security.md)
    signing_key: Path | None = None
    #: resend a round result the aggregator has not acknowledged after this many seconds
    #: (doubling each time)
    resend_after_s: float = 30.0


class Device:
    """One device in a fleet. ``run()`` blocks; ``start()`` runs it on a background thread."""

    def __init__(self, config: DeviceConfig, transport: Transport, workload: Workload,
                 clock: DeviceClock | None = None):
        self.config = config
        self.transport = transport
        self.workload = workload
        #: this device's time: real, stretched to an emulated slower board, or simulated
        self.clock = clock or DeviceClock()
        #: resident bytes of this device now, checked against its profile's memory each step
        #: (the fleet simulator, with several devices in one process, counts each one's own)
        self.memory_gauge: Callable[[], int] = resident_bytes
        self.topics = Topics(config.fleet)
        from .wire.signing import Signer

        # Without a provisioned key, a key of this run: the aggregator cannot tell who signed,
        # but each message gets a nonce, so a resent result is recognised and counted once.
        signer = (Signer.load(config.device_id, config.signing_key) if config.signing_key is not None
                  else Signer.generate(config.device_id))
        self.channel = Channel(transport, self.topics.sender_of, config.max_packet, signer=signer)
        self.outbox = Outbox(self.channel, config.resend_after_s, now=self.clock.now)
        self.global_adapter: GlobalAdapter | None = None
        self.task: RoundTask | None = None
        self.finished = threading.Event()
        self.rounds_done: list[int] = []
        self.on_progress: Callable[[Progress], None] | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bytes_reported = (0, 0)
        self._last_round = (None, 0)  # (run id, round) of the last task acted on
        #: the personal adapter of the last ``personalize`` (None before), and whether it is served
        self.personal_adapter = None
        self.serving = "global"
        # rounds (on the loop's thread) and personalize (on the application's) share the trainer
        self._trainer_lock = threading.Lock()
        self._global_arrived = threading.Event()
        self._closed = False
        self._announced = True  # connect(announce=False): no hello, presence or will to undo
        self._running = False  # run() reads the inbox
        self._finish_seen: float | None = None  # when a "finished" task came before its adapter
        self._send_lock = threading.Lock()  # close() vs a report being sent
        #: the plan this device last trained with (after any back-off): personalization's too
        self.last_plan: DevicePlan | None = None
        self._task_seen_at: dict[tuple[str, int], float] = {}  # (run, round) -> when its task came
        #: runs this device saw a task of other than "finished": only their end makes it leave
        self._runs_seen: set[str] = set()
        self._waiting_for_run: str | None = None  # a finished run it took no part in (logged once)
        self._plan_logged: tuple | None = None

    @classmethod
    def join(
        cls,
        broker: str,
        fleet: str,
        device_id: str,
        data: str | Path | list[str],
        model: str | None = None,
        **options,
    ) -> Device:
        """Load the model and data, and connect: the one call an edge application needs.

        ``trainer="ort"`` (or ``"auto"`` without PyTorch) trains ONNX Runtime ``artifacts``,
        downloaded from the aggregator first when the folder holds none (docs/ort.md).
        ``robustness`` (a file or records) is the other sites' held-out text the operator
        gives this device, for the robustness score (docs/personalization.md).

        The device is planned for: without a ``profile`` it measures itself on its first start
        and caches the result in ``state_dir`` (default ``~/.local/state/edgetune/FLEET/ID``;
        ``reprofile=True`` measures again), and the aggregator picks its rank, base precision,
        batch size and steps. ``emulate`` (a profile, or its YAML file) makes it behave as that
        slower device class: its memory budget and its speed (docs/simulation.md).
        ``plan=False`` sends no profile: the device trains the fleet's uniform settings."""
        from .workload import choose_backend

        trainer, artifacts = options.pop("trainer", "auto"), options.pop("artifacts", None)
        model_hash, robustness = options.pop("model_hash", None), options.pop("robustness", None)
        tls = {k: str(options.pop(k)) for k in ("ca_certs", "certfile", "keyfile") if options.get(k) is not None}
        for k in ("ca_certs", "certfile", "keyfile"):
            options.pop(k, None)
        plan, state_dir = options.pop("plan", True), options.pop("state_dir", None)
        reprofile, emulate, threads = options.pop("reprofile", False), options.pop("emulate", None), options.pop("threads", None)
        given = options.pop("profile", None)
        config = DeviceConfig(fleet, device_id, **options)
        if choose_backend(trainer, artifacts) == "ort":
            from .ort.fetch import ensure_artifacts

            ensure_artifacts(broker, fleet, device_id, Path(artifacts), **tls)
        workload = Workload.load(data, model, config.heldout_fraction, seed=hash_seed(device_id), trainer=trainer,
                                 artifacts=artifacts, model_hash=model_hash, robustness=robustness, threads=threads)
        # A persistent session: the broker queues the task and global adapter for this
        # device while it is offline, and paho resends unacknowledged results on reconnecting.
        transport = open_transport(broker, client_id=client_id(fleet, device_id, config.signing_key),
                                   clean_session=False, **tls)
        profile, clock = announced_profile(fleet, device_id, plan=plan, profile=given, state_dir=state_dir,
                                           reprofile=reprofile, emulate=emulate, threads=threads)
        device = cls(dataclasses.replace(config, profile=profile), transport, workload, clock)
        device.connect()
        return device

    # --- lifecycle --------------------------------------------------------------------------

    def connect(self, announce: bool = True) -> None:
        """Connect and follow the fleet. ``announce=False`` skips the hello, presence and last
        will: a second process of a device that runs already (``edgetune device personalize``)
        must not replace what the first announced."""
        me = self.config.device_id
        will = Will(self.topics.presence(me), encode_message(Presence(me, False))) if announce else None
        self.transport.on_reconnect(lambda session_present: self._inbox.put((_RECONNECTED, session_present, 0.0)))
        self.transport.connect(will=will)
        self._announced = announce
        self.channel.subscribe(self.topics.task, self._enqueue)
        self.channel.subscribe(self.topics.global_adapter + "/+", self._enqueue)
        self.channel.subscribe(self.topics.receipt(me), self._enqueue)
        if announce:
            self._announce()
            log.info("%s joined fleet %s (%d training samples)", me, self.config.fleet, self.workload.num_samples)

    def _announce(self) -> None:
        """Presence and hello, retained (again after a broker restart that lost them)."""
        me = self.config.device_id
        self.transport.publish(self.topics.presence(me), encode_message(Presence(me, True)), retain=True)
        hello = Hello(
            device_id=me,
            sdk_version=__version__,
            model=self.workload.manifest,
            capabilities=Capabilities(backends=(self.workload.backend,), adapters=self.workload.adapters,
                                      max_packet=self.config.max_packet, max_rank=self.workload.max_rank),
            num_samples=self.workload.num_samples,
            profile=self.config.profile,
        )
        self.transport.publish(self.topics.hello(me), self.channel.prepare(self.topics.hello(me), hello)[0], retain=True)

    def run(self) -> None:
        """Follow the fleet's tasks until it finishes (or ``stop()``)."""
        self._running = True
        try:
            while not self._stop.is_set():
                if self.poll(0.5):
                    break
        finally:
            self._running = False
            self.close()

    def poll(self, timeout: float = 0.0) -> bool:
        """Take one message (waiting up to ``timeout`` s) and act on the task: one turn of
        ``run()``'s loop, for a caller that drives the device itself (the fleet simulator).
        True once the fleet is finished and the device should leave."""
        return bool((self._receive(timeout) or self._finish_seen) and self.task and self._step(self.task))

    @property
    def has_messages(self) -> bool:
        """Messages wait in the inbox (what ``poll`` would take)."""
        return not self._inbox.empty()

    def _receive(self, timeout: float) -> bool:
        """Take one message from the inbox and apply it; False if none came or it was bad."""
        try:
            topic, message, arrived = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self.outbox.resend(self.task.round if self.task else None)
            return False
        if topic is _RECONNECTED:  # the broker may have restarted and lost what we retained
            if self._announced:
                self._announce()
            self.outbox.resend(self.task.round if self.task else None, everything=True)
            return False
        if isinstance(message, Receipt):
            self.outbox.on_receipt(message)
            return False
        if isinstance(message, GlobalAdapter):
            self._on_global(message)
        elif isinstance(message, RoundTask):
            self.task = message
            # the round's deadline counts from when its task came (devices' clocks are not in sync)
            self._task_seen_at.setdefault((message.run_id, message.round), arrived)
            if len(self._task_seen_at) > 16:
                self._task_seen_at.pop(next(iter(self._task_seen_at)))
            if message.kind is not TaskKind.FINISHED:
                self._finish_seen = None  # (a new run of the fleet)
                self._runs_seen.add(message.run_id)
        else:
            self.channel.drop(AGGREGATOR_ID, topic, "unexpected_kind", type(message).__name__)
            return False
        return True

    def start(self) -> Device:
        self._thread = threading.Thread(target=self.run, name=f"edgetune-{self.config.device_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def close(self) -> None:
        """Leave cleanly: mark offline (the will is only for unexpected deaths)."""
        me = self.config.device_id
        with self._send_lock:
            self._closed = True
            try:
                if self._announced:
                    self.transport.publish(self.topics.presence(me), encode_message(Presence(me, False)), retain=True)
            finally:
                self.transport.close()

    @property
    def current_adapter(self) -> GlobalAdapter | None:
        """The newest global adapter this device has."""
        return self.global_adapter

    # --- personalization (docs/personalization.md) ------------------------------------------

    def wait_for_global(self, timeout: float = 60.0) -> GlobalAdapter:
        """Block until a global adapter has arrived (retained on the broker, so at once when
        the fleet has one), for a device used without ``run()``."""
        if self._running:  # run() reads the inbox: wait for it to see the adapter
            if not self._global_arrived.wait(timeout):
                raise TimeoutError(f"no global adapter of fleet {self.config.fleet} within {timeout:.0f} s")
            return self.global_adapter
        deadline = time.monotonic() + timeout
        while self.global_adapter is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no global adapter of fleet {self.config.fleet} within {timeout:.0f} s")
            self._receive(min(left, 0.5))
        return self.global_adapter

    def personalize(self, settings=None, report: bool = True):
        """Fine-tune the current global adapter on this device's data and keep the result as
        its personal adapter, which it then serves (``serving == "personal"``); returns the
        :class:`~edgetune.wire.PersonalizationReport` (also sent to the aggregator unless
        ``report`` is False). Safe to call between rounds while ``run()`` goes on."""
        from .personalize import PersonalizeSettings, personalize

        settings = settings or PersonalizeSettings()
        if self.global_adapter is None:
            raise RuntimeError("no global adapter yet: join a fleet and wait for one (wait_for_global)")
        if report and self._closed:
            raise RuntimeError("this device left the fleet (run() returns when the fleet finishes and disconnects): "
                               "personalize before, keep it connected with DeviceConfig(exit_when_finished=False), "
                               "or pass report=False")
        plan = self.last_plan  # what its memory affords, as the planner (and any back-off) found
        with self._trainer_lock:
            personal, result = personalize(self.workload, self.global_adapter, settings, self.config.device_id,
                                           max_eval_blocks=self.config.max_eval_blocks,
                                           quantization=plan.quantization if plan else "float32",
                                           rank=plan.rank if plan else None,
                                           checkpointing=plan.gradient_checkpointing if plan else False)
        self.personal_adapter, self.serving = personal, "personal"
        if report:
            with self._send_lock:  # run() may have left the fleet while this trained
                if self._closed:
                    raise RuntimeError("the device left the fleet while personalizing (run() returned): the "
                                       "personal adapter is kept and served, but the report was not sent")
                self.channel.send(self.topics.personal(self.config.device_id), result)
                self._flush()
        return result

    def use_personal(self) -> None:
        """Serve the personal adapter (after ``personalize``)."""
        if self.personal_adapter is None:
            raise RuntimeError("no personal adapter: call personalize() first")
        self.serving = "personal"

    def rollback(self) -> None:
        """Serve the global adapter again; the personal one is kept (``use_personal``)."""
        self.serving = "global"

    def serving_adapter(self) -> tuple[object, dict, dict]:
        """``(spec, tensors, merged)`` of the adapter this device serves now."""
        if self.serving == "personal" and self.personal_adapter is not None:
            p = self.personal_adapter
            return p.spec, p.tensors, p.merged
        if self.global_adapter is None:
            raise RuntimeError("no adapter yet")
        g = self.global_adapter
        return g.adapter, g.tensors, g.merged

    def save_adapter(self, directory: Path, base_model: str = "") -> Path:
        """Write the adapter served now in PEFT format (``PeftModel.from_pretrained`` loads it)."""
        from .adapters.peft_format import write_peft_adapter

        spec, tensors, merged = self.serving_adapter()
        return write_peft_adapter(Path(directory), spec, tensors, base_model, merged)

    # --- protocol ---------------------------------------------------------------------------

    def _enqueue(self, topic: str, message: object) -> None:
        # when it came, not when the loop gets to it: a device busy with the last round is late
        self._inbox.put((topic, message, self.clock.arrival()))

    def _on_global(self, adapter: GlobalAdapter) -> None:
        if adapter.model_fingerprint != self.workload.manifest.fingerprint:
            self.channel.drop(AGGREGATOR_ID, self.topics.global_adapter, "model_mismatch",
                              f"global adapter for model {adapter.model_fingerprint}")
            return
        # The retained topic holds the aggregator's current adapter: take it even if its
        # version is lower (a rollback, or a daemon restarted from an older state dir).
        if self.global_adapter is None or adapter.version != self.global_adapter.version:
            self.global_adapter = adapter
            log.info("%s: global adapter v%d", self.config.device_id, adapter.version)
        self._global_arrived.set()

    def _step(self, task: RoundTask) -> bool:
        """Act on the task if we can; True when the fleet is finished."""
        if task.kind is TaskKind.FINISHED and task.run_id not in self._runs_seen:
            # A retained "finished" of a run this device took no part in: the previous run's,
            # read before the new run's daemon is up. Leaving on it would miss the new run.
            if self._waiting_for_run != task.run_id:
                self._waiting_for_run = task.run_id
                log.info("%s: the fleet's run %s finished before this device joined it; waiting for the next "
                         "run", self.config.device_id, shown(task.run_id, 32))
            return False
        if task.kind is TaskKind.FINISHED:
            # Leave with the final adapter: its chunks travel on other topics than the task,
            # and a broker need not keep their order across topics.
            have = self.global_adapter.version if self.global_adapter else -1
            if have < task.global_version:
                now = self.clock.now()
                waited = now - (self._finish_seen or now)
                self._finish_seen = self._finish_seen or now
                if waited < _FINAL_ADAPTER_WAIT_S:
                    return False
                log.warning("%s: the fleet finished with global v%d, which never arrived (have v%d)",
                            self.config.device_id, task.global_version, have)
            self.finished.set()
            return self.config.exit_when_finished
        run, last = self._last_round
        if task.run_id == run and task.round <= last:
            return False  # done already (the retained task is redelivered on reconnect)
        if task.model_fingerprint != self.workload.manifest.fingerprint:
            self._report_error(task, "model_mismatch", "this device runs a different base model")
            self._last_round = (task.run_id, task.round)
            return False
        if task.kind in (TaskKind.CALIBRATE, TaskKind.INITIALIZE):  # come before any global adapter exists
            self._last_round = (task.run_id, task.round)
            self._guarded(task, self._calibrate if task.kind is TaskKind.CALIBRATE else self._initialize)
            return False
        if self.global_adapter is None or self.global_adapter.version != task.global_version:
            # Older: the task's adapter is still on the way. Newer: the round was closed and
            # the next task is on the way (global v(n+1) is published just before task n+1).
            return False
        self._last_round = (task.run_id, task.round)
        if task.kind is TaskKind.TRAIN:
            self._guarded(task, self._train)
        elif task.kind is TaskKind.EVALUATE:
            self._guarded(task, self._evaluate)
        return False

    def _guarded(self, task: RoundTask, action: Callable[[RoundTask], None]) -> None:
        try:
            with self._trainer_lock, self.clock.computing(self._compute_dtype(task)):
                action(task)
        except DeadlineMissed as exc:
            log.warning("%s: round %d: %s", self.config.device_id, task.round, exc)
            self._report_error(task, "deadline_missed", str(exc))
        except Exception as exc:  # the application around us must survive a failed round
            log.exception("%s: round %d failed", self.config.device_id, task.round)
            self._report_error(task, type(exc).__name__, str(exc)[:500])

    def _compute_dtype(self, task: RoundTask) -> str:
        """The dtype this round's matmuls run in (what an emulated or simulated clock scales)."""
        from .planning.costmodel import compute_dtype

        plan = task.plans.get(self.config.device_id)
        return compute_dtype(plan.quantization) if plan else "float32"

    def _eval_blocks(self, task: RoundTask) -> int:
        """Held-out blocks to score this round (0 in a train round: none, the fleet is scored
        elsewhere; an evaluation round always scores at least one)."""
        blocks = min(self.config.max_eval_blocks, task.train.eval_blocks)
        return blocks if task.kind is TaskKind.TRAIN else max(1, blocks)

    def _check_deadline(self, task: RoundTask, step_s: float) -> None:
        """Stop a round that cannot end before its deadline: the update would be refused, and
        the device has better uses for its CPU. (With late updates allowed, it goes on.)"""
        if task.max_staleness:
            return
        seen = self._task_seen_at.get((task.run_id, task.round))
        if seen is None:
            return
        elapsed = self.clock.now() - seen
        if elapsed + step_s > task.deadline_s:
            raise DeadlineMissed(f"{elapsed:.0f} s into a {task.deadline_s:.0f} s round, another step "
                                 f"({step_s:.1f} s) would end after the deadline; stopping")

    def _log_plan(self, task: RoundTask, plan: DevicePlan) -> None:
        """The plan, once per change: rank, base precision, batch, steps and layout size."""
        key = (task.run_id, plan, task.adapter)
        if key == self._plan_logged:
            return
        self._plan_logged = key
        source = "the planner's" if self.config.device_id in task.plans else "the fleet's uniform"
        layout = adapter_kind(task.adapter).plan_note(task.adapter, self.workload.manifest, plan.rank)
        log.info("%s: %s plan: rank %d, %s base, batch %d%s, %d steps%s", self.config.device_id, source, plan.rank,
                 plan.quantization, plan.batch_size, ", checkpointing" if plan.gradient_checkpointing else "",
                 plan.local_steps, layout)

    def _plan(self, task: RoundTask) -> DevicePlan:
        """The planner's choice for this device, or the fleet's defaults."""
        plan = task.plans.get(self.config.device_id)
        if plan is not None:
            return plan
        rank = adapter_kind(task.adapter).rank(task.adapter) or 1  # (a kind without a rank: 1, unused)
        if self.workload.max_rank:  # ONNX Runtime artifacts train up to their own rank
            rank = min(rank, self.workload.max_rank)
        return DevicePlan(rank, "float32", task.train.batch_size, task.train.local_steps)

    def _train(self, task: RoundTask) -> None:
        """Train this round, backing off (smaller batch, checkpointing, lower rank, stronger
        quantization) when memory runs out; each back-off is reported to the aggregator."""
        me = self.config.device_id
        if me in task.excluded:
            log.warning("%s: sits out round %d: %s", me, task.round, task.excluded[me])
            return
        plan, grad_accum = self._plan(task), task.train.grad_accum
        self._log_plan(task, plan)
        torch_backend = self.workload.backend == "torch"  # the others can neither quantize nor checkpoint
        supported = self.config.profile.quantization if self.config.profile and torch_backend else ()
        while True:
            try:
                return self._train_with(task, plan, grad_accum)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.clock.checkpoint()  # (the failed attempt took the device's time too)
                fallback = next_fallback(plan, grad_accum, supported, checkpointing=torch_backend)
                gc.collect()
                if fallback is None:
                    self._report_error(task, "out_of_memory", f"nothing smaller left to try: {exc}")
                    return None
                plan, grad_accum, change = fallback
                log.warning("%s: round %d out of memory (%s); backing off: %s", me, task.round, exc, change)
                self._report_error(task, "oom_backoff", f"{change} after {type(exc).__name__}: {exc}"[:500])

    def _calibrate(self, task: RoundTask) -> None:
        """Score the candidate weight matrices (``task.adapter.target_modules``) on local data
        and report the scores; the aggregator picks the adapter layout from every device's."""
        me = self.config.device_id
        if me in task.excluded:
            log.warning("%s: sits out calibration round %d: %s", me, task.round, task.excluded[me])
            return
        plan = self._plan(task)
        # weight gradients need a float base: a device planned on int8/nf4 scores in bfloat16
        supported = self.config.profile.quantization if self.config.profile else ()
        if plan.quantization in ("float32", "bfloat16"):
            quantization = plan.quantization
        else:
            quantization = "bfloat16" if "bfloat16" in supported else "float32"
        self.clock.dtype = "bfloat16" if quantization == "bfloat16" else "float32"
        modules = targets(task.adapter, self.workload.manifest.modules)
        settings = dataclasses.replace(task.train, batch_size=min(plan.batch_size, task.importance.batch_size))
        result = self.workload.importance(modules, settings, task.importance, quantization,
                                          seed=task.train.seed + hash_seed(me))
        self.clock.checkpoint()
        report = ImportanceReport(me, task.round, self.workload.num_samples, result.scores, result.tokens, result.seconds)
        self.outbox.send(self.topics.importance(me), task.round, report)
        self._flush()
        log.info("%s: scored %d weight matrices on %d tokens in %.1f s", me, len(result.scores), result.tokens,
                 result.seconds)

    def _initialize(self, task: RoundTask) -> None:
        """Compute the fleet's starting adapter from this device's base (a soft prompt's token
        embeddings) and report it; the aggregator publishes it as global v0."""
        me = self.config.device_id
        if me in task.excluded:
            log.warning("%s: sits out initialization round %d: %s", me, task.round, task.excluded[me])
            return
        kind = adapter_kind(task.adapter)
        if not kind.initialized_on_devices:
            raise ValueError(f"an initialization round for a {task.adapter.kind} adapter")
        tensors = self.workload.initial_adapter(task.adapter, seed=task.train.seed)
        self.clock.checkpoint()
        self.outbox.send(self.topics.init(me), task.round, AdapterInit(me, task.round, tensors))
        self._flush()
        log.info("%s: reported the starting adapter (%s)", me, kind.describe(task.adapter))

    def _start_model(self, task: RoundTask, rank: int, quantization: str, checkpointing: bool):
        """A trainer holding the global model with its leading ``rank`` components trainable:
        the components beyond ``rank`` and the global's frozen delta are applied as a frozen
        merged delta, so training starts from exactly the global model at any rank. (A soft
        prompt is trained whole.)"""
        adapter, spec = self.global_adapter, task.adapter
        begin = adapter_kind(spec).training_start(spec, adapter.tensors, adapter.merged, rank)
        trainer = self.workload.trainer(begin.spec, quantization, checkpointing)
        trainer.set_adapter(begin.tensors)
        trainer.set_merged(begin.merged)
        return trainer, begin.tensors

    def _train_with(self, task: RoundTask, plan: DevicePlan, grad_accum: int) -> None:
        from .planning.costmodel import compute_dtype

        me, adapter = self.config.device_id, self.global_adapter
        self.last_plan = plan
        self.clock.dtype = compute_dtype(plan.quantization)
        trainer, start = self._start_model(task, plan.rank, plan.quantization, plan.gradient_checkpointing)
        blocks = self._eval_blocks(task)  # (0: the fleet is evaluated elsewhere; no scores)
        heldout = self.workload.heldout_blocks(task.train.seq_len)[:blocks]
        robust = self.workload.robustness_blocks(task.train.seq_len, blocks) if blocks else heldout[:0]

        def score(data):
            return trainer.perplexity(data) if len(data) else None

        global_ppl = score(heldout)
        global_robust = score(robust)
        local_robust = global_robust
        budget = self.config.profile.memory_bytes if self.config.profile else None

        self.clock.checkpoint()  # (loading the model and evaluating the global adapter)
        self._check_deadline(task, 0.0)  # (a task that waited while the device was busy may be over)

        def on_step(step: int, total: int, loss: float) -> None:
            resident = self.memory_gauge() if budget is not None else 0
            if budget is not None and resident > budget:
                raise MemoryBudgetExceeded(f"resident memory {resident / 2**20:,.0f} MiB is over "
                                           f"the device's budget of {budget / 2**20:,.0f} MiB")
            step_s = self.clock.checkpoint()
            if step < total:
                self._check_deadline(task, step_s)
            progress = Progress(me, task.round, step, total, float(loss))
            self.transport.publish(self.topics.progress(me), encode_message(progress), qos=BY_NAME["progress"].qos)
            if self.on_progress:
                self.on_progress(progress)

        settings = dataclasses.replace(task.train, batch_size=plan.batch_size, local_steps=plan.local_steps,
                                       grad_accum=grad_accum)
        batches = self.workload.batches(settings, seed=task.train.seed + hash_seed(me))
        if settings.algorithm == "fedsgd":
            # one gradient at the global adapter; the server steps with its own learning rate.
            # Weighted by the blocks it averages, the fleet's mean is the gradient of the union.
            micro = [next(batches) for _ in range(settings.grad_accum)]
            grads, loss, tokens = trainer.gradient(micro)
            delta = {name: -g for name, g in grads.items()}
            weight = sum(len(b) for b in micro)
            result = TrainResult(loss, loss, tokens, 0.0, 1)
            local_ppl = global_ppl
        else:
            if settings.local_epochs:
                per_step = settings.batch_size * settings.grad_accum
                steps = settings.local_epochs * -(-self.workload.train_blocks(settings.seq_len) // per_step)
                if me in task.plans and steps > plan.local_steps:
                    log.info("%s: %d epochs are %d steps; the plan allows %d", me, settings.local_epochs, steps,
                             plan.local_steps)
                    steps = plan.local_steps
                settings = dataclasses.replace(settings, local_steps=max(1, steps))
            result = trainer.train(batches, settings, on_step)
            local_ppl = score(heldout)
            local_robust = score(robust)
            trained = trainer.get_adapter()
            delta = {name: trained[name] - start[name] for name in trained}
            weight = self.workload.num_samples
        self.clock.checkpoint()
        sent, received = self._bytes_since_report()
        metrics = TrainMetrics(result.mean_loss, result.tokens, result.seconds, local_ppl, global_ppl, sent, received,
                               global_robust, local_robust)
        update = Update(me, task.round, adapter.version, weight, delta, metrics, task.run_id)
        size = self.outbox.send(self.topics.update(me), task.round, update)
        self._flush()
        self.rounds_done.append(task.round)
        scores = f", held-out ppl {global_ppl:.2f} -> {local_ppl:.2f}" if global_ppl is not None else ""
        log.info("%s: round %d (rank %d, %s, batch %d, %d steps) loss %.3f%s, sent %d bytes", me, task.round,
                 plan.rank, plan.quantization, plan.batch_size, result.steps, result.mean_loss, scores, size)

    def _evaluate(self, task: RoundTask) -> None:
        me = self.config.device_id
        if me in task.excluded:
            log.warning("%s: sits out evaluation round %d: %s", me, task.round, task.excluded[me])
            return
        plan = self._plan(task)  # evaluate at full rank, on the base precision this device can afford
        rank = adapter_kind(task.adapter).rank(task.adapter) or plan.rank
        if self.workload.max_rank:  # ONNX Runtime artifacts hold their own rank; the rest rides frozen
            rank = min(rank, self.workload.max_rank)
        trainer, _ = self._start_model(task, rank, plan.quantization, plan.gradient_checkpointing)
        blocks = self._eval_blocks(task)
        heldout = self.workload.heldout_blocks(task.train.seq_len)[:blocks]
        robust = self.workload.robustness_blocks(task.train.seq_len, blocks)
        ppl = trainer.perplexity(heldout)
        robust_ppl = trainer.perplexity(robust) if len(robust) else None
        self.clock.checkpoint()
        report = EvalReport(me, task.round, self.global_adapter.version, self.workload.num_samples,
                            EvalMetrics(ppl, int(heldout.size), robust_ppl))
        self.outbox.send(self.topics.eval(me), task.round, report)
        self._flush()
        log.info("%s: global adapter v%d held-out ppl %.2f", me, self.global_adapter.version, ppl)

    def _flush(self) -> None:
        try:
            self.transport.flush(timeout=60.0)
        except TransportError as exc:  # not lost: the MQTT client resends after reconnecting
            log.warning("%s: %s", self.config.device_id, exc)

    def _report_error(self, task: RoundTask, code: str, message: str) -> None:
        me = self.config.device_id
        self.clock.checkpoint()
        try:
            self.channel.send(self.topics.error(me), ErrorReport(me, task.round, code, message))
        except Exception:
            log.exception("%s: could not report the error either", me)

    def _bytes_since_report(self) -> tuple[int, int]:
        sent, received = self.transport.stats.snapshot()
        last_sent, last_received = self._bytes_reported
        self._bytes_reported = (sent, received)
        return sent - last_sent, received - last_received


def announced_profile(fleet: str, device_id: str, *, plan: bool = True, profile=None, state_dir=None,
                      reprofile: bool = False, emulate=None, threads: int | None = None,
                      uplink_mbps: float | None = None) -> tuple[DeviceProfile | None, DeviceClock]:
    """The profile a device sends in its hello (None: not planned) and its clock.

    ``profile`` (a DeviceProfile or a YAML file) is taken as it is; otherwise the device
    measures itself, cached in ``state_dir`` (``edgetune.profiling.auto``). With ``emulate``
    (a profile or its file) it announces that class, capped by what it measured, and its
    clock stretches compute to the class's speed (``edgetune.clock.ThrottledClock``)."""
    from .clock import ThrottledClock
    from .profiling import load_profile

    if not plan:
        if profile is not None or emulate is not None:
            log.warning("%s: planning is off (--no-plan): the profile is not sent", device_id)
        return None, DeviceClock()
    if profile is not None:
        if emulate is not None:
            log.warning("%s: a given profile is announced as it is; emulate applies to measured ones", device_id)
        return (profile if isinstance(profile, DeviceProfile) else load_profile(profile)), DeviceClock()
    if isinstance(emulate, (str, Path)):
        emulate = load_profile(emulate)
    from .profiling.auto import default_state_dir, self_profile

    measured = self_profile(Path(state_dir) if state_dir else default_state_dir(fleet, device_id), device_id,
                            threads=threads, reprofile=reprofile, emulate=emulate, uplink_mbps=uplink_mbps)
    found = measured.profile
    log.info("%s: profile %s%s: %.1f GiB for training, %s GFLOP/s, bases %s", device_id, found.name,
             " (cached measurement)" if measured.cached else "", found.memory_bytes / 2**30,
             ", ".join(f"{k} {v:g}" for k, v in found.gflops.items()), ", ".join(("float32", *found.quantization)))
    if measured.emulated:
        slow = measured.slowdown("float32")
        log.info("%s: emulating %s on this machine: memory capped at %.1f GiB, compute stretched %.1f×",
                 device_id, emulate.name, found.memory_bytes / 2**30, slow)
        return found, ThrottledClock(measured.slowdown, threads or _torch_threads())
    return found, DeviceClock()


def _torch_threads() -> int:
    """The threads training will use when none were given (torch's default, else 1)."""
    try:
        import torch
    except ImportError:
        return 1
    return torch.get_num_threads()


def client_id(fleet: str, device_id: str, signing_key: Path | None = None, suffix: str = "") -> str:
    """The MQTT client id of a device's connection: stable (a persistent session survives
    restarts) and, with a signing key, not guessable by other clients (see ``Signer.client_tag``)."""
    tag = ""
    if signing_key is not None:
        from .wire.signing import Signer

        tag = "-" + Signer.load(device_id, signing_key).client_tag
    return f"edgetune-{fleet}-{device_id}{suffix}{tag}"


def hash_seed(text: str) -> int:
    """A stable small integer from a name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


__all__ = ["Device", "DeviceConfig"]
