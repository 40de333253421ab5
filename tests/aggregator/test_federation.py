"""Whole federations: a daemon and devices with a tiny Llama, in memory and over real brokers.

The test watches the broker itself and recomputes every global adapter from the updates it
saw there, so the daemon's merge is checked against an independent computation.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections import defaultdict

import msgpack
import numpy as np
import pytest
from edgetune.data import generate_device_texts, split_heldout
from edgetune.device import Device, DeviceConfig
from edgetune.models import load_model
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import (
    SCHEMA_VERSION,
    GlobalAdapter,
    LoraSpec,
    RoundTask,
    TaskKind,
    Topics,
    TrainMetrics,
    TrainSettings,
    Update,
    encode_message,
)
from edgetune.wire.signing import unwrap
from edgetune.workload import Workload
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
from edgetune_aggregator.store import StateStore
from edgetune_aggregator.strategies import DEFAULT_SERVER_OPTIMIZER, ServerOptimizerConfig

SPEC = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
TRAIN = TrainSettings(local_steps=2, batch_size=2, seq_len=32, learning_rate=1e-2)


def workload(index: int, records: int = 40) -> Workload:
    texts = generate_device_texts(index, records)
    train, heldout = split_heldout(texts, 0.25, seed=index)
    return Workload(load_model("tiny-llama"), train, heldout, threads=1)


class Observer:
    """A bystander on the broker that records every update and global adapter it sees."""

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
    # (merged_rank=-1: the exact strategies unbounded, so check_rounds can check exactness; the
    # bounded default is tested in test_strategies.py and test_planned_federation.py)
    fields = dict(fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=3, round_timeout_s=120,
                  join_timeout_s=60, adapter=SPEC, train=TRAIN, merged_rank=-1)
    fields.update(overrides)
    if "model" not in fields:  # (these fleets' tiny models are not the default one pinned by default)
        fields.setdefault("model_from_first_hello", True)
    return AggregatorConfig(**fields)


def start_aggregator(url: str, config: AggregatorConfig, **kwargs) -> tuple[Aggregator, threading.Thread]:
    aggregator = Aggregator(config, open_transport(url, client_id=f"agg-{config.fleet}", connect_timeout=10), **kwargs)
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    assert aggregator.ready.wait(30)  # subscribed: what tests publish from here on is seen
    return aggregator, thread


def join_device(url: str, fleet: str, index: int, start: bool = True) -> Device:
    device_id = f"dev-{index}"
    transport = open_transport(url, client_id=f"{fleet}-{device_id}", connect_timeout=10)
    device = Device(DeviceConfig(fleet, device_id), transport, workload(index))
    device.connect()
    return device.start() if start else device


def expected_fedavg(previous: GlobalAdapter, updates: list[Update]) -> dict[str, np.ndarray]:
    """FedAvg of (zero-padded) deltas recomputed here, independently of the strategy modules."""
    total = sum(u.num_samples for u in updates)
    out = {}
    for name, value in previous.tensors.items():
        acc = value.astype(np.float64)
        for u in updates:
            d = u.delta[name].astype(np.float64)
            padded = np.zeros_like(acc)
            padded[: d.shape[0], : d.shape[1]] = d
            acc = acc + u.num_samples * padded / total
        out[name] = acc
    return out


def trained_factors(previous: GlobalAdapter, update: Update, module: str) -> tuple[np.ndarray, np.ndarray]:
    dA, dB = (update.delta[f"{module}.{f}"].astype(np.float64) for f in ("lora_A", "lora_B"))
    r = dA.shape[0]
    A0 = previous.tensors[f"{module}.lora_A"].astype(np.float64)[:r]
    B0 = previous.tensors[f"{module}.lora_B"].astype(np.float64)[:, :r]
    return B0 + dB, A0 + dA


def expected_hetlora(previous: GlobalAdapter, updates: list[Update]) -> dict[str, np.ndarray]:
    """Per module: deltas weighted by samples × ‖Bₖ·Aₖ‖_F (dense here)."""
    out = {}
    for name in previous.tensors:
        module = name.rsplit(".", 1)[0]
        weights = [u.num_samples * np.linalg.norm(np.matmul(*trained_factors(previous, u, module))) for u in updates]
        acc = previous.tensors[name].astype(np.float64)
        for u, w in zip(updates, weights):
            d = u.delta[name].astype(np.float64)
            padded = np.zeros_like(acc)
            padded[: d.shape[0], : d.shape[1]] = d
            acc = acc + w * padded / sum(weights)
        out[name] = acc
    return out


def effective_delta(adapter: GlobalAdapter, module: str) -> np.ndarray:
    """The weight update a global adapter makes to one layer: merged + (alpha/rank)·B·A."""
    spec = adapter.adapter
    B = adapter.tensors[f"{module}.lora_B"].astype(np.float64)
    A = adapter.tensors[f"{module}.lora_A"].astype(np.float64)
    total = spec.alpha / spec.rank * B @ A
    if f"{module}.merged_B" in adapter.merged:
        total = total + adapter.merged[f"{module}.merged_B"].astype(np.float64) @ adapter.merged[f"{module}.merged_A"]
    return total


def expected_exact(previous: GlobalAdapter, updates: list[Update], module: str) -> np.ndarray:
    """Σ pₖ·ΔWₖ: each device's whole model update (its frozen rest included), densely."""
    spec = previous.adapter
    s = spec.alpha / spec.rank
    total = sum(u.num_samples for u in updates)
    result = effective_delta(previous, module)
    for u in updates:
        B, A = trained_factors(previous, u, module)
        r = A.shape[0]
        B0 = previous.tensors[f"{module}.lora_B"].astype(np.float64)[:, :r]
        A0 = previous.tensors[f"{module}.lora_A"].astype(np.float64)[:r]
        result = result + u.num_samples / total * s * (B @ A - B0 @ A0)
    return result


def check_rounds(store: StateStore, observer: Observer, rounds: int, devices: int, strategy: str | None = None,
                 optimizer: ServerOptimizerConfig = DEFAULT_SERVER_OPTIMIZER) -> None:
    """Every round's global is the strategy's merge of what was seen (default: the fleet's own),
    stepped by the server optimizer (default: the daemon's, FedAvgM: the merge plus β times the
    previous round's step; one round's step is the difference of two stored globals)."""
    assert optimizer.name in ("fedavg", "fedavgm") and optimizer.lr == 1.0, "recomputed here for those only"
    beta = optimizer.momentum if optimizer.name == "fedavgm" else 0.0
    strategy = strategy or store.load_state().strategy
    for r in range(1, rounds + 1):
        seen = observer.updates[r]
        assert len(seen) == devices, f"round {r}: saw {len(seen)} updates"
        previous, merged = store.load_global(r - 1), store.load_global(r)
        before = store.load_global(r - 2) if r >= 2 else None
        assert all(u.base_version == r - 1 for u in seen)
        if strategy in ("fedit", "hetlora"):
            expected = (expected_fedavg if strategy == "fedit" else expected_hetlora)(previous, seen)
            for name, value in expected.items():
                if before is not None:
                    value = value + beta * (previous.tensors[name].astype(np.float64) - before.tensors[name])
                np.testing.assert_allclose(merged.tensors[name], value, rtol=1e-5, atol=1e-7)
        else:
            for name in previous.tensors:
                if name.endswith(".lora_A"):
                    module = name.rsplit(".", 1)[0]
                    want = expected_exact(previous, seen, module)
                    if before is not None:
                        want = want + beta * (effective_delta(previous, module) - effective_delta(before, module))
                    got = effective_delta(merged, module)
                    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-7, module
        for name in merged.tensors:
            # what was published on the broker is what was written to disk
            np.testing.assert_array_equal(observer.globals[r].tensors[name], merged.tensors[name])
        for name in merged.merged:
            np.testing.assert_array_equal(observer.globals[r].merged[name], merged.merged[name])
        assert any(not np.allclose(merged.tensors[n], previous.tensors[n]) for n in previous.tensors)


def run_federation(url: str, tmp_path, fleet: str):
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet))
    devices = [join_device(url, fleet, i) for i in range(3)]
    thread.join(timeout=240)
    assert not thread.is_alive(), "the aggregator did not finish its rounds"
    for device in devices:
        assert device.finished.wait(30)
        device.stop()
    observer.close()
    return aggregator, observer, devices


def test_federation_in_memory(tmp_path):
    fleet = f"mem-{uuid.uuid4().hex[:8]}"
    aggregator, observer, devices = run_federation(f"memory://{fleet}", tmp_path, fleet)
    store = aggregator.store
    check_rounds(store, observer, rounds=2, devices=3)
    log = store.rounds()
    assert [(r["round"], r["kind"], r["status"]) for r in log] == [
        (1, "train", "aggregated"), (2, "train", "aggregated"), (3, "evaluate", "evaluated")]
    assert all(d["global_ppl"] > 1 and d["local_ppl"] > 1 and d["bytes_sent"] > 0 for d in log[0]["devices"])
    assert {d.config.device_id: d.rounds_done for d in devices} == {f"dev-{i}": [1, 2] for i in range(3)}
    assert all(d.current_adapter.version == 2 for d in devices)
    assert (tmp_path / "state" / "adapter" / "adapter_model.safetensors").exists()
    assert not aggregator.drops


@pytest.mark.slow
def test_federation_over_real_brokers(broker_url, tmp_path):
    fleet = f"mqtt-{uuid.uuid4().hex[:8]}"
    aggregator, observer, _ = run_federation(broker_url, tmp_path, fleet)
    check_rounds(aggregator.store, observer, rounds=2, devices=3)
    assert not aggregator.drops


def test_device_joining_late_gets_the_retained_global_adapter(broker_url, tmp_path):
    """dev-1 leaves after round 1; dev-2 connects only then, and round 2 cannot close
    without it, so it must have picked up global v1 and the round-2 task from the broker."""
    fleet = f"late-{uuid.uuid4().hex[:8]}"
    late: list[Device] = []
    devices: list[Device] = []

    def after_round(record) -> None:
        if record.round == 1:
            devices[1].stop()  # its presence goes offline before round 2 opens
            late.append(join_device(broker_url, fleet, 2))

    observer = Observer(broker_url, fleet)
    config = fleet_config(tmp_path, fleet, min_devices=2, evaluate_final=False)
    aggregator, thread = start_aggregator(broker_url, config, on_round=after_round)
    devices.extend(join_device(broker_url, fleet, i) for i in range(2))
    thread.join(timeout=240)
    assert not thread.is_alive()
    assert late and late[0].rounds_done == [2]
    # (the daemon is done once it has published; the device leaves once the final adapter is in)
    assert late[0].finished.wait(60) and late[0].current_adapter.version == 2
    round2 = {u.device_id: u for u in observer.updates[2]}
    assert set(round2) == {"dev-0", "dev-2"} and round2["dev-2"].base_version == 1
    check_rounds(aggregator.store, observer, rounds=2, devices=2)
    for device in devices + late:
        device.stop()
    observer.close()


def _bad_update(device_id: str, round_number: int, shapes: dict, **overrides) -> bytes:
    delta = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    fields = dict(device_id=device_id, round=round_number, base_version=0, num_samples=5, delta=delta,
                  metrics=TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
    fields.update(overrides)
    return encode_message(Update(**fields))


def test_bad_input_is_logged_counted_and_dropped(broker_url, tmp_path, caplog):
    fleet = f"bad-{uuid.uuid4().hex[:8]}"
    observer = Observer(broker_url, fleet)
    config = fleet_config(tmp_path, fleet, rounds=1, min_devices=2, evaluate_final=False)
    # devices connect (hello) but only start working once the bad input is in
    devices = [join_device(broker_url, fleet, i, start=False) for i in range(2)]
    caplog.set_level(logging.WARNING, logger="edgetune.transport.channel")
    aggregator, thread = start_aggregator(broker_url, config)
    observer.wait_task(1)
    topics, shapes = Topics(fleet), {n: a.shape for n, a in observer.globals[0].tensors.items()}
    wrong_shape = {n: s for n, s in shapes.items()}
    first = sorted(wrong_shape)[0]
    wrong_shape[first] = (wrong_shape[first][0] + 1, wrong_shape[first][1])
    nan = {n: s for n, s in shapes.items()}
    newer = msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "update", "body": {}})
    injected = [
        ("dev-0", b"\x00garbage\xff"),
        ("dev-0", newer),
        ("dev-0", _bad_update("dev-0", 1, wrong_shape)),
        ("dev-1", _bad_update("dev-1", 7, shapes)),
        ("mallory", _bad_update("mallory", 1, shapes)),
        ("dev-1", _bad_update("dev-0", 1, shapes)),
    ]
    for device_id, payload in injected:
        observer.transport.publish(topics.update(device_id), payload)
    nan_update = Update("dev-1", 1, 0, 5, {n: np.full(s, np.nan, np.float32) for n, s in nan.items()},
                        TrainMetrics(1.0, 1, 1.0, 1.0, 1.0))
    observer.transport.publish(topics.update("dev-1"), encode_message(nan_update))
    observer.transport.flush()
    expected = {"bad_msgpack": 1, "schema_version": 1, "wrong_shape": 1, "not_finite": 1, "unknown_round": 1,
                "unknown_device": 1, "sender_mismatch": 1}
    deadline = threading.Event()
    for _ in range(200):
        if dict(aggregator.drops) == expected:
            break
        deadline.wait(0.05)
    assert dict(aggregator.drops) == expected
    # the observer decodes the five well-formed injected updates too: forget them
    for _ in range(200):
        if sum(map(len, observer.updates.values())) == 5:
            break
        deadline.wait(0.05)
    observer.updates.clear()
    for device in devices:
        device.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    # the round completed with the two valid updates, and only with them
    (record,) = aggregator.store.rounds()
    assert record["status"] == "aggregated" and {d["device_id"] for d in record["devices"]} == {"dev-0", "dev-1"}
    assert record["dropped"] == expected
    check_rounds(aggregator.store, observer, rounds=1, devices=2)
    text = caplog.text
    assert "dropped message from dev-0" in text and "bad_msgpack" in text and "schema_version" in text
    assert "dropped message from mallory" in text and "unknown_device" in text
    for device in devices:
        device.stop()
    observer.close()



def _wait(predicate, timeout: float = 30) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        event.wait(0.05)
    return predicate()


def test_last_will_marks_a_vanished_device_offline(tmp_path, caplog):
    fleet = f"will-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.INFO, logger="edgetune_aggregator.daemon")
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, min_devices=2))
    device = join_device(url, fleet, 0, start=False)
    assert _wait(lambda: "dev-0" in aggregator.online)
    device.transport.crash()  # power cut: no goodbye, the broker publishes the will
    assert _wait(lambda: "dev-0" not in aggregator.online)
    aggregator.stop()
    thread.join(timeout=10)
    assert "device dev-0 is offline" in caplog.text


def test_daemon_resumes_from_its_state_dir(tmp_path, caplog):
    fleet = f"resume-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    caplog.set_level(logging.INFO, logger="edgetune_aggregator.daemon")
    config = fleet_config(tmp_path, fleet, rounds=1, min_devices=1, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config)
    first = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and aggregator.state.global_version == 1
    first.stop()
    # a new daemon on the same state dir, asked for 2 rounds, runs round 2 from global v1
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=2, min_devices=1,
                                                                evaluate_final=False))
    second = join_device(url, fleet, 1)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert "resuming fleet" in caplog.text
    assert [(u.device_id, u.base_version) for u in observer.updates[2]] == [("dev-1", 1)]
    assert [r["round"] for r in aggregator.store.rounds()] == [1, 2]
    assert aggregator.state.global_version == 2
    second.stop()
    observer.close()


def test_a_hello_with_an_unusable_model_is_dropped_and_the_daemon_keeps_serving(tmp_path):
    from edgetune.wire import Hello, ModelManifest

    fleet = f"hello-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                                evaluate_final=False))
    rogue = open_transport(url, client_id="rogue")
    rogue.connect()
    assert _wait(lambda: aggregator.transport.stats.messages_sent > 0)  # subscribed (its hello is not retained)
    no_targets = ModelManifest("odd", "f" * 16, {"lm_head": (4, 4)})
    rogue.publish(Topics(fleet).hello("rogue"), encode_message(Hello("rogue", "0", no_targets)))
    assert _wait(lambda: aggregator.drops.get("bad_model") == 1)
    device = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and aggregator.state.global_version == 1
    device.stop()


@pytest.mark.parametrize("journal", [True, False], ids=["journaled", "no-journal"])
def test_a_round_left_open_by_a_stopped_daemon_continues_on_resume(tmp_path, journal):
    fleet = f"open-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    config = fleet_config(tmp_path, fleet, rounds=2, min_devices=2, evaluate_final=False)
    aggregator, thread = start_aggregator(url, config)
    device = join_device(url, fleet, 0)
    idle = join_device(url, fleet, 1, start=False)  # says hello, never trains
    # round 1 opens but cannot close (one update of two); dev-0 trains it
    assert _wait(lambda: device.rounds_done == [1])
    assert _wait(lambda: len(list((tmp_path / "state" / "journal").glob("r000001/dev-0.msgpack"))) == 1)
    aggregator.stop()
    thread.join(timeout=30)
    if not journal:  # a state dir from before round journals: the round's number is skipped
        shutil.rmtree(tmp_path / "state" / "journal")
    observer = Observer(url, fleet)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=2, min_devices=1,
                                                                evaluate_final=False))
    thread.join(timeout=60)
    assert not thread.is_alive()
    log = aggregator.store.rounds()
    if journal:  # round 1 continues with the update accepted before the stop, which is not redone
        assert [(r["round"], r["status"]) for r in log] == [(1, "aggregated"), (2, "aggregated")]
        assert device.rounds_done == [1, 2] and observer.updates[2][0].base_version == 1
    else:
        assert [(r["round"], r["status"]) for r in log] == [(1, "failed"), (2, "aggregated")]
        assert device.rounds_done == [1, 2] and observer.updates[2][0].base_version == 0
    assert not list((tmp_path / "state" / "journal").glob("r*"))  # closed rounds leave no journal
    device.stop()
    idle.close()
    observer.close()


def test_a_stale_finished_task_does_not_send_new_devices_home(tmp_path):
    fleet = f"stale-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    leftover = open_transport(url, client_id="leftover")
    leftover.connect()
    leftover.publish(Topics(fleet).task, encode_message(RoundTask(9, TaskKind.FINISHED, 3, "x" * 16)), retain=True)
    aggregator, thread = start_aggregator(url, fleet_config(tmp_path, fleet, rounds=1, min_devices=1,
                                                                evaluate_final=False))
    assert _wait(lambda: aggregator.online is not None and aggregator.transport.stats.messages_sent > 0)
    device = join_device(url, fleet, 0)
    thread.join(timeout=60)
    assert not thread.is_alive() and device.rounds_done == [1]
    device.stop()
