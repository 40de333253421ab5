"""Light simulated devices: the whole device protocol, no model.

A ``LightDevice`` says hello with a model manifest, follows the fleet's tasks and answers each
train round with a random delta of the right shapes (seeded by device and round, so a run
can be repeated exactly) through the same channel, signing and outbox as a real device. The
aggregator's fault-injection tests and its benchmark (``benchmarks/aggregator.py``) run
fleets of them where loading a model per device would be too slow.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading

import numpy as np

from . import __version__
from .adapters.registry import adapter_shapes
from .outbox import Outbox
from .transport import Transport, Will
from .transport.channel import Channel
from .wire import (
    AGGREGATOR_ID,
    Capabilities,
    EvalMetrics,
    EvalReport,
    GlobalAdapter,
    Hello,
    ModelManifest,
    Presence,
    Receipt,
    RoundTask,
    TaskKind,
    Topics,
    TrainMetrics,
    Update,
    encode_message,
)
from .wire.signing import Signer

log = logging.getLogger(__name__)


def manifest(name: str, layers: int, hidden: int, kv: int, intermediate: int, vocab: int) -> ModelManifest:
    """A Llama-style manifest (q/k/v/o and the MLP of every layer)."""
    modules = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        modules |= {f"{p}.self_attn.q_proj": (hidden, hidden), f"{p}.self_attn.k_proj": (kv, hidden),
                    f"{p}.self_attn.v_proj": (kv, hidden), f"{p}.self_attn.o_proj": (hidden, hidden),
                    f"{p}.mlp.gate_proj": (intermediate, hidden), f"{p}.mlp.up_proj": (intermediate, hidden),
                    f"{p}.mlp.down_proj": (hidden, intermediate)}
    fingerprint = hashlib.sha256(repr(sorted(modules.items())).encode()).hexdigest()[:16]
    return ModelManifest(name, fingerprint, modules, vocab, hidden, layers)


#: SmolLM2-135M's linear layers: LoRA r=8 on q,v is 460,800 parameters, as measured on the model
SMOLLM2_135M = manifest("SmolLM2-135M (simulated)", 30, 576, 192, 1536, 49152)
#: a tiny model for tests
TINY = manifest("tiny (simulated)", 2, 32, 16, 64, 128)


def simulated_delta(shapes: dict, device_id: str, round_number: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """The delta a device "trains": Gaussian, the same for the same device and round."""
    seed = int.from_bytes(hashlib.sha256(f"{device_id}/{round_number}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in sorted(shapes.items())}


class LightDevice:
    """A device that trains nothing. ``skip`` (round -> bool) makes it sit rounds out, e.g.
    to drop a share of the fleet each round."""

    def __init__(self, transport: Transport, fleet: str, device_id: str, model: ModelManifest = TINY,
                 signer=None, num_samples: int = 10, skip=None, resend_after_s: float = 5.0, think_s: float = 0.0):
        self.transport = transport
        self.device_id = device_id
        self.model = model
        self.num_samples = num_samples
        self.skip = skip or (lambda round_number: False)
        #: at most this long "training" before each answer (spread by device and round)
        self.think_s = think_s
        self.topics = Topics(fleet)
        # (a key of this run without a provisioned one: nonces make resends idempotent)
        self.channel = Channel(transport, self.topics.sender_of, signer=signer or Signer.generate(device_id))
        self.outbox = Outbox(self.channel, resend_after_s=resend_after_s)
        self.rounds_done: list[int] = []
        self.finished = threading.Event()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._global: GlobalAdapter | None = None
        self._task: RoundTask | None = None
        self._done: set[tuple[str, int]] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> LightDevice:
        me = self.device_id
        self.transport.on_reconnect(lambda present: self._inbox.put(("<reconnected>", present)))
        self.transport.connect(will=Will(self.topics.presence(me), encode_message(Presence(me, False))))
        for topic in (self.topics.task, self.topics.global_adapter + "/+", self.topics.receipt(me)):
            self.channel.subscribe(topic, lambda t, m: self._inbox.put((t, m)))
        self._announce()
        self._thread = threading.Thread(target=self._run, name=f"light-{me}", daemon=True)
        self._thread.start()
        return self

    def _announce(self) -> None:
        me = self.device_id
        hello = Hello(me, __version__, self.model, Capabilities(), self.num_samples)
        self.transport.publish(self.topics.presence(me), encode_message(Presence(me, True)), retain=True)
        self.transport.publish(self.topics.hello(me), self.channel.prepare(self.topics.hello(me), hello)[0], retain=True)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self.transport.close()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.finished.is_set():
            try:
                topic, message = self._inbox.get(timeout=0.2)
            except queue.Empty:
                self.outbox.resend(self._task.round if self._task else None)
                continue
            if topic == "<reconnected>":
                self._announce()
                self.outbox.resend(self._task.round if self._task else None, everything=True)
            elif isinstance(message, Receipt):
                self.outbox.on_receipt(message)
            elif isinstance(message, GlobalAdapter):
                self._global = message
            elif isinstance(message, RoundTask):
                self._task = message
            else:
                self.channel.drop(AGGREGATOR_ID, topic, "unexpected_kind", type(message).__name__)
            if self._task is not None:
                self._act(self._task)

    def _act(self, task: RoundTask) -> None:
        if task.kind is TaskKind.FINISHED:
            self.finished.set()
            return
        key = (task.run_id, task.round)
        if key in self._done or self._global is None or self._global.version != task.global_version:
            return
        self._done.add(key)
        if self.skip(task.round) or self.device_id in task.excluded:
            return
        me = self.device_id
        if self.think_s:
            fraction = hashlib.sha256(f"{me}/{task.round}/think".encode()).digest()[0] / 255
            self._stop.wait(self.think_s * fraction)
        if task.kind is TaskKind.TRAIN:
            plan = task.plans.get(me)
            shapes = adapter_shapes(task.adapter, self.model, plan.rank if plan else None)
            metrics = TrainMetrics(1.0, 0, 0.0, 1.0, 1.0)
            update = Update(me, task.round, task.global_version, self.num_samples,
                            simulated_delta(shapes, me, task.round), metrics, task.run_id)
            self.outbox.send(self.topics.update(me), task.round, update)
        elif task.kind is TaskKind.EVALUATE:
            report = EvalReport(me, task.round, task.global_version, self.num_samples, EvalMetrics(1.0, 1))
            self.outbox.send(self.topics.eval(me), task.round, report)
        self.rounds_done.append(task.round)
