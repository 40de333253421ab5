"""Hostile input on a real Mosquitto: forged, unsigned, replayed, stale, NaN, wrong-shape,
oversize and over-norm updates are refused with their counted reasons, and the rounds complete
with the honest devices' updates only (and exactly them)."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from edgetune.simulate import TINY, LightDevice, simulated_delta
from edgetune.transport import open_transport
from edgetune.transport.channel import Channel
from edgetune.wire import Chunk, Signed, Topics, TrainSettings, decode_message, encode_message
from edgetune.wire.signing import Signer, write_key_file
from edgetune_aggregator.daemon import AggregatorConfig
from edgetune_aggregator.strategies.robust import robust_combine, trimmed_mean
from edgetune_aggregator.influence import InfluenceBounds
from edgetune_aggregator.strategies import RoundStart, make_strategy
from edgetune_aggregator.validation import UpdateLimits, check_norm, delta_norm
from edgetune_aggregator.weighting import Entry, Weighting

from helpers.journal import has
from helpers.fleet import SPEC, Observer, start_aggregator
from helpers.manual import SHAPES, Manual, manuals, memory_fleet
from helpers.waiting import wait_for


def test_hostile_updates_are_refused_by_reason_and_rounds_complete_with_the_honest_ones(mosquitto_url, tmp_path):
    fleet = f"sec-{uuid.uuid4().hex[:8]}"
    signers = {d: Signer.generate(d) for d in ("dev-0", "dev-1", "dev-2")}
    write_key_file(tmp_path / "keys.json", fleet, {d: s.public_key for d, s in signers.items()})
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=2, min_devices=3, round_timeout_s=120,
                              join_timeout_s=60, adapter=SPEC, train=TrainSettings(), planning=False,
                              evaluate_final=False, device_keys=tmp_path / "keys.json",
                              limits=UpdateLimits(max_norm=5.0, norm_action="reject"))
    topics = Topics(fleet)
    raw: dict[str, list[bytes]] = {"dev-0": []}
    spy = open_transport(mosquitto_url, client_id="spy", connect_timeout=10)
    spy.connect()
    spy.subscribe(topics.update("dev-0"), lambda t, p: raw["dev-0"].append(p))
    observer = Observer(mosquitto_url, fleet)
    aggregator, thread = start_aggregator(mosquitto_url, config)
    honest = [LightDevice(open_transport(mosquitto_url, client_id=f"{fleet}-{d}", connect_timeout=10), fleet, d, TINY,
                          signer=signers[d]).start() for d in ("dev-0", "dev-1")]
    manual = Manual(mosquitto_url, fleet, signers["dev-2"])
    assert wait_for(lambda: has(tmp_path / "state", 1, "dev-0", "dev-1"))
    assert raw["dev-0"]
    manual.run_id = aggregator.state.run_id

    mallory = Signer.generate("dev-2")  # a key the fleet does not know, under dev-2's name
    forged = Channel(spy, topics.sender_of, signer=mallory)
    forged.send(topics.update("dev-2"), manual.update(1))
    unsigned = Channel(spy, topics.sender_of)
    unsigned.send(topics.update("dev-2"), manual.update(1))
    genuine = decode_message(manual.channel.prepare(topics.update("dev-2"), manual.update(1))[0])
    tampered = Signed(genuine.device_id, genuine.key_id, genuine.nonce,
                      encode_message(manual.update(1, samples=10_000)), genuine.signature)
    spy.publish(topics.update("dev-2"), encode_message(tampered))
    # dev-2's own signature on another device's topic
    spy.publish(topics.update("dev-1"), manual.channel.prepare(topics.update("dev-2"), manual.update(1))[0])
    for frame in raw["dev-0"]:  # dev-0's accepted update, again
        spy.publish(topics.update("dev-0"), frame)
    nan = {n: np.full(s, np.nan, np.float32) for n, s in SHAPES.items()}
    manual.send(manual.update(1, nan))
    wrong = dict(simulated_delta(SHAPES, "dev-2", 1))
    first = sorted(wrong)[0]
    wrong[first] = np.zeros((wrong[first].shape[0] + 1, wrong[first].shape[1]), np.float32)
    manual.send(manual.update(1, wrong))
    manual.send(manual.update(1, {n: np.ones(s, np.float32) for n, s in SHAPES.items()}))  # norm ≫ 5
    manual.send(manual.update(0))  # a round that closed long ago (the initial one)
    manual.run_id = "an-old-run"  # a signed update from an earlier run of the fleet
    manual.send(manual.update(1))
    manual.run_id = aggregator.state.run_id
    huge = Chunk("0" * 64, 0, 4096, 1 << 28, b"x" * 1000)  # claims 256 MiB
    spy.publish(topics.update("dev-2"), manual.channel.prepare(topics.update("dev-2"), huge)[0])
    spy.publish(topics.update("dev-2"), encode_message(huge))
    spy.flush()
    expected = {"unknown_key": 1, "unsigned": 1, "bad_signature": 1, "sender_mismatch": 1,
                "replayed": len(raw["dev-0"]) and 1, "not_finite": 1, "wrong_shape": 1, "norm_exceeded": 1,
                "stale_round": 1, "oversize": 1, "other_run": 1}
    assert wait_for(lambda: all(aggregator.drops[k] >= v for k, v in expected.items()), 30), dict(aggregator.drops)
    assert not has(tmp_path / "state", 1, "dev-2")  # nothing of that got in
    told = {"not_finite", "wrong_shape", "norm_exceeded", "stale_round", "other_run"}  # (signed by dev-2)
    assert wait_for(lambda: told <= {r.reason for r in manual.receipts if not r.accepted}, 30), manual.receipts

    round1 = manual.update(1)
    manual.send(round1)
    assert wait_for(lambda: any(r.accepted and r.round == 1 for r in manual.receipts))
    observer.wait_task(2)
    for frame in raw["dev-0"][:1]:  # round 1's update in round 2
        spy.publish(topics.update("dev-0"), frame)
    spy.flush()
    assert wait_for(lambda: aggregator.drops["stale_round"] >= 2, 30)
    manual.send(manual.update(2, version=1))
    thread.join(timeout=120)
    assert not thread.is_alive()

    log = aggregator.store.rounds()
    assert [(r["round"], r["status"]) for r in log] == [(1, "aggregated"), (2, "aggregated")]
    for record in log:
        assert sorted(d["device_id"] for d in record["devices"]) == ["dev-0", "dev-1", "dev-2"]
    # exactly the honest updates: the global adapter is their sample-weighted mean (fedit)
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    for name in SHAPES:
        mean = np.mean([simulated_delta(SHAPES, d, 1)[name] for d in ("dev-0", "dev-1", "dev-2")], axis=0)
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + mean, rtol=1e-5, atol=1e-7)
    for device in honest:
        device.stop()
    manual.close()
    observer.close()
    spy.close()


def test_a_device_without_a_fleet_key_does_not_join(tmp_path):
    fleet = f"keys-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    signer = Signer.generate("dev-0")
    write_key_file(tmp_path / "keys.json", fleet, {"dev-0": signer.public_key})
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=1, min_devices=1, round_timeout_s=30,
                              join_timeout_s=30, adapter=SPEC, planning=False, evaluate_final=False,
                              device_keys=tmp_path / "keys.json")
    aggregator, thread = start_aggregator(url, config)
    # no provisioned key: it signs with a key of its own run, which the fleet does not know
    stranger = LightDevice(open_transport(url, client_id="x"), fleet, "dev-1", TINY).start()
    assert wait_for(lambda: aggregator.drops["unknown_key"] >= 1, 10)
    assert not aggregator.devices
    member = LightDevice(open_transport(url, client_id="y"), fleet, "dev-0", TINY, signer=signer).start()
    thread.join(timeout=60)
    assert not thread.is_alive() and list(aggregator.devices) == ["dev-0"]
    assert aggregator.store.rounds()[0]["status"] == "aggregated"
    member.stop()
    stranger.stop()


def test_norm_clipping_scales_onto_the_bound_and_keeps_the_direction():
    delta = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full((3,), 4.0, np.float32)}
    norm = np.sqrt(4 * 9 + 3 * 16)
    start = RoundStart({n: np.zeros_like(t) for n, t in delta.items()}, {}, 1.0)
    clipping = Weighting(UpdateLimits(max_norm=1.0), InfluenceBounds(None, None))
    merge = clipping.begin(make_strategy("dense"), start, [Entry(10, delta_norm(delta))], {})
    clipped = merge.add(0, delta)
    assert delta_norm(delta) == pytest.approx(norm)
    assert np.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in clipped.values())) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], delta["a"] / norm, rtol=1e-6)
    np.testing.assert_allclose(merge.finish().tensors["b"], delta["b"] / norm, rtol=1e-6)  # what the round merges
    assert check_norm(norm, UpdateLimits(max_norm=1.0, norm_action="reject")).reason == "norm_exceeded"
    within = Weighting(UpdateLimits(max_norm=100.0), InfluenceBounds(None, None))
    same = within.begin(make_strategy("dense"), start, [Entry(10, norm)], {}).add(0, delta)
    assert same["a"] is delta["a"]


def test_robust_combinations_resist_a_poisoned_minority():
    honest = [{"w": np.full((2, 3), v, np.float32)} for v in (1.0, 1.1, 0.9, 1.05)]
    poisoned = honest + [{"w": np.full((2, 3), 1e6, np.float32)}]
    median = robust_combine(poisoned, {"w": (2, 3)}, "median")["w"]
    np.testing.assert_allclose(median, 1.05)
    trimmed = robust_combine(poisoned, {"w": (2, 3)}, "trimmed_mean", trim=0.2)["w"]
    np.testing.assert_allclose(trimmed, np.mean([1.0, 1.1, 1.05]), rtol=1e-6)
    # a lower-rank LoRA delta is zero-padded to the full rank first
    low = [{"x.lora_A": np.ones((1, 3), np.float32)}] * 3
    padded = robust_combine(low, {"x.lora_A": (2, 3)}, "median")["x.lora_A"]
    np.testing.assert_array_equal(padded, [[1, 1, 1], [0, 0, 0]])
    values = np.array([[5.0], [1.0], [3.0], [100.0], [2.0]])
    assert trimmed_mean(values, 0.2)[0] == pytest.approx(np.mean([2.0, 3.0, 5.0]))
    assert trimmed_mean(values, 0.0)[0] == pytest.approx(values.mean())


def test_robust_aggregation_runs_in_a_fleet_and_ignores_an_outlier(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "rob", min_devices=3, strategy="fedit", robust="median")
    devices = [LightDevice(open_transport(url, client_id=d), fleet, d, TINY).start() for d in ("a", "b")]
    bad = Manual(url, fleet, Signer.generate("z"))
    bad.channel.signer = None  # (this fleet checks no keys)
    bad.send(bad.update(1, {n: np.full(s, 50.0, np.float32) for n, s in SHAPES.items()}))
    thread.join(timeout=60)
    assert not thread.is_alive()
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    for name in SHAPES:
        expected = np.median([simulated_delta(SHAPES, "a", 1)[name], simulated_delta(SHAPES, "b", 1)[name],
                              np.full(SHAPES[name], 50.0)], axis=0)
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + expected, rtol=1e-5, atol=1e-6)
        assert np.abs(v1.tensors[name] - v0.tensors[name]).max() < 1.0  # the outlier moved nothing far
    for device in devices:
        device.stop()
    bad.close()


def test_a_late_update_for_a_closed_round_is_refused_as_stale(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "late", rounds=2)
    device = LightDevice(open_transport(url, client_id="a"), fleet, "a", TINY, skip=lambda r: r == 2).start()
    late = Manual(url, fleet, Signer.generate("b"))
    late.channel.signer = None
    assert wait_for(lambda: aggregator.store.rounds() and aggregator.store.rounds()[0]["status"] == "aggregated")
    late.send(late.update(1))  # round 1 closed with device a alone
    assert wait_for(lambda: aggregator.drops["stale_round"] == 1, 10)
    assert wait_for(lambda: any(r.reason == "stale_round" for r in late.receipts), 10)
    late.send(late.update(2, version=1))
    thread.join(timeout=60)
    assert [r["status"] for r in aggregator.store.rounds()] == ["aggregated", "aggregated"]
    device.stop()
    late.close()


def test_late_updates_are_folded_in_with_a_staleness_weight_once(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "buf", rounds=2, min_devices=2, round_timeout_s=60,
                                                  strategy="fedit", max_staleness=1, staleness_exponent=0.5)
    m1, m2, m3 = manuals(url, fleet, aggregator, "m1", "m2", "m3")
    m1.send(m1.update(1))
    m2.send(m2.update(1))
    assert wait_for(lambda: aggregator.state.global_version == 1)
    late = m3.update(1)  # trained on v0 for round 1, arrives in round 2
    payload = m3.channel.prepare(m3.topics.update("m3"), late)[0]
    m3.transport.publish(m3.topics.update("m3"), payload)
    assert wait_for(lambda: any(r.accepted and r.round == 1 for r in m3.receipts))
    m3.transport.publish(m3.topics.update("m3"), payload)  # resent: answered again, counted once
    m3.send(m3.update(1))  # another update for round 1 from m3
    m1.send(m1.update(1))  # m1's round 1 is in v1 already
    assert wait_for(lambda: aggregator.drops["replayed"] == 1 and aggregator.drops["duplicate"] == 2, 10)
    assert sum(r.accepted and r.round == 1 for r in m3.receipts) == 2  # the resend got its receipt again
    m1.send(m1.update(2, version=1))
    thread.join(timeout=60)
    assert not thread.is_alive()
    log = aggregator.store.rounds()
    assert [(d["device_id"], d["from_round"]) for d in log[1]["devices"]] == [("m3", 1), ("m1", None)]
    v0, v1, v2 = (aggregator.store.load_global(v) for v in (0, 1, 2))
    w_late = 10 * 2 ** -0.5  # one version behind
    beta = aggregator.config.server_optimizer.momentum  # (the default FedAvgM: plus β × round 1's step)
    assert aggregator.config.server_optimizer.name == "fedavgm"
    for name in SHAPES:
        expected = (w_late * late.delta[name] + 10 * simulated_delta(SHAPES, "m1", 2)[name]) / (w_late + 10)
        step = expected + beta * (v1.tensors[name].astype(np.float64) - v0.tensors[name])
        np.testing.assert_allclose(v2.tensors[name], v1.tensors[name] + step, rtol=1e-5, atol=1e-7)
    for m in (m1, m2, m3):
        m.close()


def test_staleness_needs_an_averaging_strategy():
    with pytest.raises(ValueError, match="fedit"):
        AggregatorConfig(model_from_first_hello=True, fleet="f", state_dir="x", adapter=SPEC, strategy="svd", max_staleness=1)


def test_a_late_update_counts_once_even_after_failed_rounds(tmp_path):
    """Failed rounds do not move the global version: the window is counted in versions."""
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "win", rounds=4, round_timeout_s=1.0, strategy="fedit",
                                                  max_staleness=1)
    (a,) = manuals(url, fleet, aggregator, "a")
    first = a.channel.prepare(a.topics.update("a"), a.update(1))[0]
    a.transport.publish(a.topics.update("a"), first)
    assert wait_for(lambda: aggregator.state.global_version == 1)
    assert wait_for(lambda: aggregator.task.round == 4, 10)  # rounds 2 and 3 failed: nobody answered them
    a.transport.publish(a.topics.update("a"), first)  # the same bytes again, in round 4
    assert wait_for(lambda: aggregator.drops["duplicate"] == 1, 10), dict(aggregator.drops)
    thread.join(timeout=30)
    assert [r["status"] for r in aggregator.store.rounds()] == ["aggregated", "failed", "failed", "failed"]
    assert aggregator.state.global_version == 1
    a.close()


def test_the_staleness_window_refuses_recounts_and_invented_rounds(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "win2", rounds=4, min_devices=2, round_timeout_s=1.5,
                                                  strategy="fedit", max_staleness=1)
    a, b = manuals(url, fleet, aggregator, "a", "b")
    a.send(a.update(1))
    b.send(b.update(1))
    assert wait_for(lambda: aggregator.state.global_version == 1)
    # round 2 fails (nobody answers); in round 3, a's round-1 update again, and invented rounds
    assert wait_for(lambda: aggregator.state.round >= 2 and aggregator.task.round == 3, 10)
    a.send(a.update(1))  # a new nonce, but a's round 1 is in v1 already
    for invented in (-1, 0, 2):  # no train round started from v0 there (round 2 started from v1)
        b.send(b.update(invented))
    assert wait_for(lambda: aggregator.drops["duplicate"] == 1 and aggregator.drops["stale_round"] == 3, 10), \
        dict(aggregator.drops)
    thread.join(timeout=30)
    assert all(d.get("from_round") is None for r in aggregator.store.rounds() for d in r["devices"])
    a.close()
    b.close()


def test_accepted_results_of_a_failed_round_count_in_the_next_one(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "carry", rounds=2, min_devices=2, round_timeout_s=1.5)
    a, b = manuals(url, fleet, aggregator, "a", "b")
    a.send(a.update(1))  # accepted, but round 1 fails: b never answers it
    assert wait_for(lambda: any(r.accepted for r in a.receipts))
    assert wait_for(lambda: aggregator.task.round == 2, 10)
    assert "a" in aggregator.task.excluded  # its round-1 result counts in round 2: it need not train
    a.send(a.update(2))  # sent anyway: refused, a counts once
    b.send(b.update(2))
    thread.join(timeout=30)
    log = aggregator.store.rounds()
    assert [r["status"] for r in log] == ["failed", "aggregated"]
    assert sorted((d["device_id"], d["from_round"]) for d in log[1]["devices"]) == [("a", 1), ("b", None)]
    assert aggregator.drops["duplicate"] == 1
    v0, v1 = aggregator.store.load_global(0), aggregator.store.load_global(1)
    for name in SHAPES:
        mean = (simulated_delta(SHAPES, "a", 1)[name] + simulated_delta(SHAPES, "b", 2)[name]) / 2
        np.testing.assert_allclose(v1.tensors[name], v0.tensors[name] + mean, rtol=1e-5, atol=1e-7)
    a.close()
    b.close()


def test_a_malformed_update_cannot_crash_the_daemon(tmp_path):
    url, fleet, aggregator, thread = memory_fleet(tmp_path, "crash")
    (m,) = manuals(url, fleet, aggregator, "m")
    m.send(m.update(1, {**simulated_delta(SHAPES, "m", 1), "0.lora_A": np.zeros((), np.float32)}))
    assert wait_for(lambda: aggregator.drops["wrong_shape"] == 1, 10)
    m.send(m.update(1))
    thread.join(timeout=30)
    assert not thread.is_alive() and aggregator.store.rounds()[0]["status"] == "aggregated"
    m.close()


class _Killed(BaseException):
    """Ends the daemon's thread at a chosen line, as SIGKILL would end its process."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the simulated kill)
def test_a_daemon_killed_between_the_journal_and_the_state_loses_no_round(tmp_path, monkeypatch):
    """The journal is written before the state names the round as open: a kill between the two
    leaves a round whose task never went out, which a restart opens afresh (not a failed round)."""
    from edgetune_aggregator.store import StateStore

    real_save = StateStore.save_state
    killed = threading.Event()

    def save_state(store, state):
        if state.opened == 2 and state.round == 1 and not killed.is_set():
            killed.set()
            raise _Killed  # round 2's journal is on disk, the state still says round 1 closed
        real_save(store, state)

    monkeypatch.setattr(StateStore, "save_state", save_state)
    fleet = f"kill-{uuid.uuid4().hex[:8]}"
    url = f"memory://{fleet}"
    config = AggregatorConfig(model_from_first_hello=True, fleet=fleet, state_dir=tmp_path / "state", rounds=3, min_devices=2, round_timeout_s=30,
                              join_timeout_s=30, adapter=SPEC, planning=False, evaluate_final=False)
    devices = [LightDevice(open_transport(url, client_id=d), fleet, d, TINY, resend_after_s=0.5).start() for d in "ab"]
    first, thread = start_aggregator(url, config)
    thread.join(timeout=60)
    assert killed.is_set() and not thread.is_alive()
    assert (tmp_path / "state" / "journal" / "r000002").exists()
    first.transport.close()
    second, thread = start_aggregator(url, config)
    thread.join(timeout=60)
    assert not thread.is_alive()
    log = second.store.rounds()
    assert [(r["round"], r["status"]) for r in log] == [(1, "aggregated"), (2, "aggregated"), (3, "aggregated")]
    assert second.state.global_version == 3
    for device in devices:
        device.stop()
