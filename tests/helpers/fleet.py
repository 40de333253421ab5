"""Whole fleets for the federation tests: the daemon on a thread, devices with a tiny Llama and
real training, and an observer on the broker that records what went over it.

They talk over any transport URL (``memory://…`` or a real broker's), so one test body runs in
memory in milliseconds and against Mosquitto for the real thing.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict

from edgetune.data import generate_device_texts, split_heldout
from edgetune.device import Device, DeviceConfig
from edgetune.models import load_model
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import GlobalAdapter, LoraSpec, RoundTask, Topics, TrainSettings, Update
from edgetune.wire.signing import unwrap
from edgetune.workload import Workload
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig

#: the adapter and the training every test fleet uses unless it says otherwise: small, so rounds take seconds
SPEC = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
TRAIN = TrainSettings(local_steps=2, batch_size=2, seq_len=32, learning_rate=1e-2)


def workload(index: int, records: int = 40) -> Workload:
    """Device ``index``'s own generated texts (non-IID across indices) on a fresh tiny Llama."""
    texts = generate_device_texts(index, records)
    train, heldout = split_heldout(texts, 0.25, seed=index)
    return Workload(load_model("tiny-llama"), train, heldout, threads=1)


class Observer:
    """A bystander on the broker that records every update, global adapter and task it sees:
    what went over the wire, from which ``helpers.merges.check_rounds`` recomputes each merge."""

    def __init__(self, url: str, fleet: str):
        self.topics = Topics(fleet)
        self.transport = open_transport(url, client_id=f"observer-{uuid.uuid4().hex[:6]}", connect_timeout=10)
        self.transport.connect()
        channel = Channel(self.transport, self.topics.sender_of)
        self.updates: dict[int, list[Update]] = defaultdict(list)
        self.globals: dict[int, GlobalAdapter] = {}
        self.tasks: list[RoundTask] = []
        self.task_seen = threading.Condition()
        channel.subscribe(self.topics.all_devices("update"), self._on)
        channel.subscribe(self.topics.global_adapter + "/+", self._on)
        channel.subscribe(self.topics.task, self._on)

    def _on(self, topic, message) -> None:
        message = unwrap(message)  # devices sign what they send
        if isinstance(message, Update):
            self.updates[message.round].append(message)
        elif isinstance(message, GlobalAdapter):
            self.globals[message.version] = message
        elif isinstance(message, RoundTask):
            with self.task_seen:
                self.tasks.append(message)
                self.task_seen.notify_all()

    def close(self) -> None:
        self.transport.close()

    def wait_task(self, round_number: int, timeout: float = 60) -> None:
        with self.task_seen:
            assert self.task_seen.wait_for(lambda: any(t.round == round_number for t in self.tasks), timeout)


def fleet_config(tmp_path, fleet: str, **overrides) -> AggregatorConfig:
    """The daemon's config for a test fleet: 2 rounds of 3 devices, ``SPEC`` and ``TRAIN``, state
    under ``tmp_path``; ``overrides`` are AggregatorConfig fields."""
    # (merged_rank=-1: the exact strategies unbounded, so check_rounds can check exactness; the
    # bounded default is tested in test_strategies.py and test_planned_federation.py)
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=3, round_timeout_s=120,
                  join_timeout_s=60, adapter=SPEC, train=TRAIN, merged_rank=-1)
    fields.update(overrides)
    if "model" not in fields:  # (these fleets' tiny models are not the default one pinned by default)
        fields.setdefault("model_from_first_hello", True)
    return AggregatorConfig(**fields)


def start_aggregator(url: str, config: AggregatorConfig, cluster_nodes: tuple[str, ...] = (),
                     **kwargs) -> tuple[Aggregator, threading.Thread]:
    """The daemon serving on a thread of the test, returned once it has subscribed, so that what
    the test publishes afterwards is seen; the thread ends when the fleet's rounds are done.
    ``cluster_nodes``: the other nodes of a clustered broker (``open_transport``)."""
    transport = open_transport(url, client_id=f"agg-{config.fleet}", connect_timeout=10, cluster_nodes=cluster_nodes)
    aggregator = Aggregator(config, transport, **kwargs)
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    assert aggregator.ready.wait(30)  # subscribed: what tests publish from here on is seen
    return aggregator, thread


def join_device(url: str, fleet: str, index: int, start: bool = True) -> Device:
    """Device ``dev-{index}`` connected (its hello sent) and, unless ``start`` is False, working."""
    device_id = f"dev-{index}"
    transport = open_transport(url, client_id=f"{fleet}-{device_id}", connect_timeout=10)
    device = Device(DeviceConfig(fleet, device_id), transport, workload(index))
    device.connect()
    return device.start() if start else device


def start_device(url: str, fleet: str, index: int, worker_class=None, **config):
    """Device ``dev-{index}`` running the device protocol with a real tiny Llama worker of
    ``worker_class`` (default ``WorkloadWorker``; a test's own subclass poisons or scores),
    connected and started; ``config``: more ``DeviceConfig`` fields."""
    from edgetune.clock import DeviceClock
    from edgetune.protocol import DeviceProtocol
    from edgetune.worker import WorkloadWorker

    clock = DeviceClock()
    worker = (worker_class or WorkloadWorker)(workload(index), f"dev-{index}", clock)
    transport = open_transport(url, client_id=f"{fleet}-{index}-{uuid.uuid4().hex[:4]}", connect_timeout=10)
    device = DeviceProtocol(DeviceConfig(fleet, f"dev-{index}", **config), transport, worker, clock)
    device.connect()
    return device.start()


def stop_fleet(aggregator, thread: threading.Thread, devices) -> None:
    """Stop the devices, then the daemon, and wait for its thread."""
    for device in devices:
        device.stop()
    aggregator.stop()
    thread.join(30)
