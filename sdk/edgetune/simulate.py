"""Light simulated devices: the device protocol users run, with a worker that loads no model.

A ``LightDevice`` is ``edgetune.protocol.DeviceProtocol`` (the protocol ``Device`` runs: hello,
tasks, outbox, resends, reconnections, the fleet's end) driven by a ``LightWorker``, which
answers each train round with a random delta of the right shapes (seeded by device and round,
so a run can be repeated exactly) and each evaluation with a fixed score. The aggregator's
fault-injection tests and its benchmark (``benchmarks/aggregator.py``) run fleets of them where
loading a model per device would be too slow, and so test the protocol's real code.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

import numpy as np

from .adapters.registry import adapter_shapes
from .protocol import DeviceConfig, DeviceProtocol
from .work import RoundEnv, Worker
from .transport import Transport
from .wire import DEFAULT_MAX_PACKET, EvalMetrics, EvalReport, ModelManifest, RoundTask, TrainMetrics, Update

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


class LightWorker(Worker):
    """Trains nothing: a seeded random delta of the task's shapes (at the device's planned
    rank). ``skip`` (round -> bool) makes it sit rounds out, e.g. to drop a share of the fleet
    each round; ``think_s`` is the most it "trains" before each answer (spread by device and
    round). Calibration and initialization rounds it sits out."""

    def __init__(self, device_id: str, model: ModelManifest = None, num_samples: int = 10,
                 skip: Callable[[int], bool] | None = None, think_s: float = 0.0):
        self.device_id = device_id
        self.model = model or TINY
        self._num_samples = num_samples
        self.skip = skip or (lambda round_number: False)
        self.think_s = think_s
        #: set to stop "thinking" at once (the device stops)
        self.stopping = threading.Event()

    @property
    def manifest(self) -> ModelManifest:
        return self.model

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _think(self, task: RoundTask) -> bool:
        """Take the round's time; False if the round is to be sat out."""
        if self.skip(task.round):
            return False
        if self.think_s:
            fraction = hashlib.sha256(f"{self.device_id}/{task.round}/think".encode()).digest()[0] / 255
            self.stopping.wait(self.think_s * fraction)
        return True

    def train(self, task: RoundTask, env: RoundEnv) -> Update | None:
        if not self._think(task):
            return None
        plan = task.plans.get(self.device_id)
        shapes = adapter_shapes(task.adapter, self.model, plan.rank if plan else None)
        return Update(self.device_id, task.round, task.global_version, self.num_samples,
                      simulated_delta(shapes, self.device_id, task.round), TrainMetrics(1.0, 0, 0.0, 1.0, 1.0),
                      task.run_id)

    def evaluate(self, task: RoundTask, env: RoundEnv) -> EvalReport | None:
        if not self._think(task):
            return None
        return EvalReport(self.device_id, task.round, task.global_version, self.num_samples, EvalMetrics(1.0, 1))


class LightDevice(DeviceProtocol):
    """The device protocol with a ``LightWorker``: ``start()`` connects and runs it on a thread.

    Being the protocol ``Device`` runs, it behaves as one: ``finished`` is set when a run it took
    part in finishes and its final adapter has arrived (or 30 s of waiting for it passed);
    ``rounds_done`` lists the train rounds it answered; it stays connected after the fleet
    finishes until ``stop()``, which publishes its offline presence before disconnecting."""

    def __init__(self, transport: Transport, fleet: str, device_id: str, model: ModelManifest = TINY,
                 signer=None, num_samples: int = 10, skip=None, resend_after_s: float = 5.0, think_s: float = 0.0,
                 fleet_key=None, state_dir=None, max_packet: int = DEFAULT_MAX_PACKET):
        config = DeviceConfig(fleet, device_id, exit_when_finished=False, resend_after_s=resend_after_s,
                              fleet_key=fleet_key, state_dir=state_dir, max_packet=max_packet)
        super().__init__(config, transport, LightWorker(device_id, model, num_samples, skip, think_s), signer=signer)

    def start(self) -> LightDevice:
        self.connect()
        return super().start()

    def stop(self, timeout: float = 10.0) -> None:
        self.worker.stopping.set()
        super().stop(timeout)
