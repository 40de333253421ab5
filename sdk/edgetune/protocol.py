"""The device side of the protocol, once: announce, follow the retained task and global adapter,
act on each task once, send the answer through the outbox until a receipt arrives, and leave
when the fleet finishes.

What a device computes is its ``Worker``'s business: the PyTorch or ONNX Runtime worker
(``edgetune.worker``) trains real adapters, the light worker (``edgetune.simulate``) answers
with seeded random deltas for fault tests and benchmarks. Both run under this same protocol,
so a test of resends, reconnections or restarts with light devices tests the code edge
applications run. Which answer a task kind wants, and whether the device needs the task's
global adapter first, is the table ``edgetune.wire.TASKS``.

Network callbacks only enqueue; one thread (``run`` or a caller of ``poll``) decides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .clock import DeviceClock
from .data.split import HELDOUT_FRACTION
from .logsafe import shown
from .downlink import DownlinkGuard
from .outbox import Outbox
from .promoted import PromotedAdapter
from .transport import Transport, TransportError, Will
from .transport.channel import Channel
from .work import DeadlineMissed, RoundEnv, Worker
from .wire import (
    AGGREGATOR_ID,
    BY_NAME,
    DEFAULT_MAX_PACKET,
    TASKS,
    DeviceProfile,
    ErrorReport,
    GlobalAdapter,
    Hello,
    Presence,
    Progress,
    Receipt,
    Refusal,
    RoundTask,
    Serving,
    TaskKind,
    Topics,
    Update,
    encode_message,
)
from .wire.quantize import ErrorFeedback
from .wire.signing import FleetKey

log = logging.getLogger("edgetune.device")

__all__ = ["DeadlineMissed", "DeviceConfig", "DeviceProtocol", "RoundEnv", "Worker"]

#: what the inbox holds after the broker connection came back
_RECONNECTED = "<reconnected>"
#: how long a device waits for the final global adapter after the "finished" task
_FINAL_ADAPTER_WAIT_S = 30.0


@dataclass(frozen=True)
class DeviceConfig:
    fleet: str
    device_id: str
    heldout_fraction: float = HELDOUT_FRACTION
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
    #: the fleet's public key (``fleet.pub`` from ``provision``): the device accepts tasks,
    #: global adapters, receipts and offers only signed by the aggregator (edgetune.downlink)
    fleet_key: Path | None = None
    #: where the device remembers the newest signed task and adapter it accepted, so a replay
    #: of an older one is refused after a restart too (None: while it runs only)
    state_dir: Path | None = None
    #: what the operator says of this device (``{"site": "plant-3"}``), announced in the hello
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    #: when it may train (``edgetune.policy``; None: any time), asked before every step, and
    #: how often it is asked again while it says no
    policy: Callable[[], tuple[bool, str]] | None = None
    policy_check_s: float = 5.0


def _as_float32(adapter: GlobalAdapter) -> GlobalAdapter:
    """A global adapter sent in float16 (``--delta-precision fp16``) as the float32 the trainers
    start from (int8 decodes to float32 already)."""
    def wide(tensors: dict) -> dict:
        return {n: t.astype(np.float32) if t.dtype == np.float16 else t for n, t in tensors.items()}

    if any(t.dtype == np.float16 for t in (*adapter.tensors.values(), *adapter.merged.values())):
        return dataclasses.replace(adapter, tensors=wide(adapter.tensors), merged=wide(adapter.merged))
    return adapter


class DeviceProtocol:
    """One device in a fleet. ``run()`` blocks; ``start()`` runs it on a background thread;
    ``poll()`` is one turn of the loop for a caller that drives the device itself."""

    def __init__(self, config: DeviceConfig, transport: Transport, worker: Worker, clock: DeviceClock | None = None,
                 signer=None):
        self.config = config
        self.transport = transport
        self.worker = worker
        #: this device's time: real, stretched to an emulated slower board, or simulated
        self.clock = clock or DeviceClock()
        self.topics = Topics(config.fleet)
        if signer is None:
            from .wire.signing import Signer

            # Without a provisioned key, a key of this run: the aggregator cannot tell who signed,
            # but each message gets a nonce, so a resent result is recognised and counted once.
            signer = (Signer.load(config.device_id, config.signing_key) if config.signing_key is not None
                      else Signer.generate(config.device_id))
        self.channel = Channel(transport, self.topics.sender_of, config.max_packet, signer=signer)
        self.channel.stream_of = self.topics.message_topic
        #: what it accepts from the aggregator (verified against the fleet key, if it has one)
        self.downlink = DownlinkGuard(self.topics, FleetKey.load(config.fleet_key) if config.fleet_key else None,
                                      config.state_dir)
        self.channel.opener = self.downlink.open
        self.outbox = Outbox(self.channel, config.resend_after_s, now=self.clock.now)
        self.global_adapter: GlobalAdapter | None = None
        #: the version the fleet serves on this device (``promoted.py``), apart from the one it trains on
        self.promoted = PromotedAdapter(config.device_id, config.state_dir, worker.manifest.fingerprint)
        self.promoted.attach(self.channel, self.topics, self._enqueue, worker.score)
        self.task: RoundTask | None = None
        self.finished = threading.Event()
        #: train rounds this device sent an update for
        self.rounds_done: list[int] = []
        #: the aggregator's refusals of this device, by (reason, detail), newest last: while
        #: there are any it sits tasks out (its answers would be refused); a restart of the
        #: aggregator clears them
        self.refusals: dict[tuple[str, str], Refusal] = {}
        self._aggregator_online = False
        self._hello_digest = ""  # SHA-256 of the hello last published (what a refusal must name)
        #: what quantizing this device's updates dropped, carried into the next one
        self._feedback = ErrorFeedback()
        self.on_progress: Callable[[Progress], None] | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bytes_reported = (0, 0)
        self._last_round = (None, 0)  # (run id, round) of the last task acted on
        self._global_arrived = threading.Event()
        self._closed = False
        self._announced = True  # connect(announce=False): no hello, presence or will to undo
        self._running = False  # run() reads the inbox
        self._finish_seen: float | None = None  # when a "finished" task came before its adapter
        self._send_lock = threading.Lock()  # close() vs a report being sent
        self._task_seen_at: dict[tuple[str, int], float] = {}  # (run, round) -> when its task came
        #: runs this device saw a task of other than "finished": only their end makes it leave
        self._runs_seen: set[str] = set()
        self._waiting_for_run: str | None = None  # a finished run it took no part in (logged once)

    @property
    def device_id(self) -> str:
        return self.config.device_id

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
        self.downlink.remember = announce  # (a second process of the device leaves the record to the first)
        self.channel.subscribe(self.topics.task, self._enqueue)
        self.channel.subscribe(self.topics.global_adapter + "/+", self._enqueue)
        self.channel.subscribe(self.topics.receipt(me), self._enqueue)
        self.channel.subscribe(self.topics.refusal(me), self._enqueue)
        self.channel.subscribe(self.topics.aggregator_status, self._enqueue)
        if announce:  # (a second process of the device serves nothing: the first does)
            self.channel.subscribe(self.topics.serving, self._enqueue)
            self._announce()
            log.info("%s joined fleet %s (%d training samples)", me, self.config.fleet, self.worker.num_samples)

    def _announce(self) -> None:
        """Presence and hello, retained (again after a broker restart that lost them)."""
        me = self.config.device_id
        self.transport.publish(self.topics.presence(me), encode_message(Presence(me, True)), retain=True)
        hello = Hello(
            device_id=me,
            sdk_version=__version__,
            model=self.worker.manifest,
            capabilities=dataclasses.replace(self.worker.capabilities(self.config.max_packet),
                                             verifies_downlink=self.downlink.verifies,
                                             serves_versions=self._announced),
            num_samples=self.worker.num_samples,
            profile=self.config.profile,
            downlink_issued=self.downlink.newest_issued(),
            labels=dict(self.config.labels),
        )
        payload = self.channel.prepare(self.topics.hello(me), hello)[0]
        # a new hello, a new verdict: only a refusal of this one counts (it names its digest)
        self._hello_digest = hashlib.sha256(payload).hexdigest()
        self.refusals.clear()
        self.transport.publish(self.topics.hello(me), payload, retain=True)

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

    def start(self) -> DeviceProtocol:
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

    # --- the inbox --------------------------------------------------------------------------

    def _enqueue(self, topic: str, message: object) -> None:
        # when it came, not when the loop gets to it: a device busy with the last round is late
        self._inbox.put((topic, message, self.clock.arrival()))

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
        if isinstance(message, Refusal):
            self._on_refusal(message)
            return False
        if isinstance(message, Presence):  # the aggregator's: a restarted one reads the hello afresh
            if message.online and not self._aggregator_online and self.refusals:
                log.info("%s: the aggregator restarted; its refusals no longer hold", self.config.device_id)
                self.refusals.clear()
            self._aggregator_online = message.online
            return False
        if isinstance(message, Serving):
            self.promoted.on_notice(message, self.global_adapter)
            return False
        if isinstance(message, GlobalAdapter) and topic.startswith(self.topics.base + "/served/"):
            self.promoted.on_served(_as_float32(message))
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

    def _on_refusal(self, refusal: Refusal) -> None:
        """The aggregator will not serve this device: say why (once per reason and detail),
        and wait with the hello up: a fixed cause lets the device in without a restart."""
        if refusal.hello != self._hello_digest:  # (provoked by a hello forged in its name, or replayed)
            log.info("%s: ignoring a refusal of a hello this device did not send last (%s)", self.config.device_id,
                     shown(refusal.reason, 64))
            return
        key = (refusal.reason, refusal.detail)
        if self.refusals.get(key) is None:
            log.error("%s: the aggregator refuses this device: %s (%s)%s", self.config.device_id, shown(refusal.reason, 64),
                      shown(refusal.detail, 1024), f"; upgrade {shown(refusal.upgrade, 256)}" if refusal.upgrade else "")
        self.refusals[key] = refusal
        if len(self.refusals) > 16:
            self.refusals.pop(next(iter(self.refusals)))

    def _on_global(self, adapter: GlobalAdapter) -> None:
        if adapter.model_fingerprint != self.worker.manifest.fingerprint:
            self.channel.drop(AGGREGATOR_ID, self.topics.global_adapter, "model_mismatch",
                              f"global adapter for model {adapter.model_fingerprint}")
            return
        adapter = _as_float32(adapter)
        # The retained topic holds the aggregator's current adapter: take it even if its
        # version is lower (a rollback, or a daemon restarted from an older state dir).
        if self.global_adapter is None or adapter.version != self.global_adapter.version:
            self.global_adapter = adapter
            log.info("%s: global adapter v%d", self.config.device_id, adapter.version)
            self.promoted.on_global(adapter)
        self._global_arrived.set()

    # --- tasks ------------------------------------------------------------------------------

    def _step(self, task: RoundTask) -> bool:
        """Act on the task if we can; True when the fleet is finished."""
        if task.kind is TaskKind.FINISHED:
            return self._finish(task)
        run, last = self._last_round
        if task.run_id == run and task.round <= last:
            return False  # done already (the retained task is redelivered on reconnect)
        if task.model_fingerprint != self.worker.manifest.fingerprint:
            self._report_error(task, "model_mismatch", "this device runs a different base model")
            self._last_round = (task.run_id, task.round)
            return False
        if TASKS[task.kind].needs_global and (self.global_adapter is None
                                               or self.global_adapter.version != task.global_version):
            # Older: the task's adapter is still on the way. Newer: the round was closed and
            # the next task is on the way (global v(n+1) is published just before task n+1).
            return False
        self._last_round = (task.run_id, task.round)
        self._act(task)
        return False

    def _finish(self, task: RoundTask) -> bool:
        if task.run_id not in self._runs_seen:
            # A retained "finished" of a run this device took no part in: the previous run's,
            # read before the new run's daemon is up. Leaving on it would miss the new run.
            if self._waiting_for_run != task.run_id:
                self._waiting_for_run = task.run_id
                log.info("%s: the fleet's run %s finished before this device joined it; waiting for the next "
                         "run", self.config.device_id, shown(task.run_id, 32))
            return False
        # Leave with the final adapter: its chunks travel on other topics than the task,
        # and a broker need not keep their order across topics.
        have = self.global_adapter.version if self.global_adapter else -1
        if have < task.global_version:
            now = self.clock.now()
            waited = now - (self._finish_seen or now)
            self._finish_seen = self._finish_seen or now
            if waited < _FINAL_ADAPTER_WAIT_S:
                return False
            if not self.finished.is_set():  # (once: a device that stays polls on)
                log.warning("%s: the fleet finished with global v%d, which never arrived (have v%d)",
                            self.config.device_id, task.global_version, have)
        self.finished.set()
        return self.config.exit_when_finished

    def _act(self, task: RoundTask) -> None:
        """Have the worker compute this task's answer and send it; a failure becomes an error
        report, never an exception in the application around the device."""
        me, spec = self.config.device_id, TASKS[task.kind]
        if me in task.excluded:
            log.warning("%s: sits out %s round %d: %s", me, task.kind.value, task.round, task.excluded[me])
            return
        if self.refusals:
            log.warning("%s: sits out %s round %d: the aggregator refuses this device (%s)", me, task.kind.value,
                        task.round, ", ".join(shown(r.reason, 64) for r in self.refusals.values()))
            return
        env = RoundEnv(me, self.global_adapter, self.clock, self._task_seen_at.get((task.run_id, task.round)),
                       self._progress, lambda code, message: self._report_error(task, code, message), self._traffic,
                       self.promoted.adapter, lambda: self._hold(task))
        try:
            with self.worker.computing(task):
                answer = getattr(self.worker, task.kind.value)(task, env)
            if answer is None:
                return
            if isinstance(answer, Update):
                answer = self._compressed(task, answer)
            size = self.outbox.send(self.topics.of(spec.topic, me), task.round, answer, whole=task.whole_updates)
        except DeadlineMissed as exc:
            log.warning("%s: round %d: %s", me, task.round, exc)
            self._report_error(task, "deadline_missed", str(exc))
            return
        except Exception as exc:  # the application around us must survive a failed round (or send)
            log.exception("%s: round %d failed", me, task.round)
            self._report_error(task, type(exc).__name__, str(exc)[:500])
            return
        self._flush()
        if task.kind is TaskKind.TRAIN:
            self.rounds_done.append(task.round)
        log.info("%s: sent its %s answer for round %d (%d bytes)", me, task.kind.value, task.round, size)

    def _hold(self, task: RoundTask) -> None:
        """Wait while the training policy says not now (``edgetune.policy``): the round's work
        so far stays where it is, the aggregator hears the device is busy (not gone), and the
        paused time is not counted as compute."""
        if self.config.policy is not None:
            from .policy import hold

            seen = self._task_seen_at.get((task.run_id, task.round))
            left = None if task.max_staleness or seen is None else (lambda: seen + task.deadline_s - self.clock.now())
            if hold(self.config.policy, self.config.policy_check_s, self._stop, f"{self.config.device_id} (round "
                    f"{task.round})", lambda code, message: self._report_error(task, code, message), left):
                self.clock.rest()

    def _compressed(self, task: RoundTask, update: Update) -> Update:
        """The update at the precision the task (or this device's plan) asks for, with what
        quantizing it dropped carried into the next one (``ErrorFeedback``) where the task
        says that is sound."""
        precision = task.precision_for(self.config.device_id)
        if precision == "fp32" and not self._feedback.residual:
            return update
        # (a new key empties the memory: the run's, or each round's where feedback is off)
        key = (task.run_id, None if task.error_feedback else task.round)
        return dataclasses.replace(update, delta=self._feedback.compress(update.delta, precision, key))

    def _progress(self, progress: Progress) -> None:
        self.transport.publish(self.topics.progress(progress.device_id), encode_message(progress),
                               qos=BY_NAME["progress"].qos)
        if self.on_progress:
            self.on_progress(progress)

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

    def _traffic(self) -> tuple[int, int]:
        sent, received = self.transport.stats.snapshot()
        last_sent, last_received = self._bytes_reported
        self._bytes_reported = (sent, received)
        return sent - last_sent, received - last_received
