"""Federated prompt tuning: a daemon and three tiny-Llama devices over Mosquitto train a soft
prompt; the starting prompt comes from the devices' token embeddings, and every global prompt
is recomputed here from the updates seen on the broker."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("peft")

from edgetune.adapters.prompt import PROMPT  # noqa: E402
from edgetune.data import generate_device_texts, split_heldout  # noqa: E402
from edgetune.device import Device, DeviceConfig  # noqa: E402
from edgetune.models import load_model  # noqa: E402
from edgetune.personalize import PersonalizeSettings  # noqa: E402
from edgetune.transport import open_transport  # noqa: E402
from edgetune.workload import Workload  # noqa: E402
from edgetune.trainers.torch_prompt import embedding_rows  # noqa: E402
from edgetune.wire import PromptSpec, TrainSettings  # noqa: E402
from edgetune_aggregator.store import StateStore  # noqa: E402

from helpers.fleet import Observer, fleet_config, start_aggregator  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402

SPEC = PromptSpec(num_virtual_tokens=6, init="text", init_text="Answer briefly:")


def site_data(index: int) -> tuple[list[str], list[str]]:
    return split_heldout(generate_device_texts(index, 40), 0.25, seed=index)


def join(url: str, fleet: str, index: int) -> Device:
    """A device whose robustness set is the other two sites' held-out text."""
    train, heldout = site_data(index)
    others = [t for j in range(3) if j != index for t in site_data(j)[1]]
    workload = Workload(load_model("tiny-llama"), train, heldout, threads=1, robustness_texts=others)
    config = DeviceConfig(fleet, f"dev-{index}", exit_when_finished=False)  # stays, to personalize after
    device = Device(config, open_transport(url, client_id=f"{fleet}-dev-{index}", connect_timeout=10), workload)
    device.connect()
    return device.start()


def test_a_prompt_fleet_then_personalization_with_both_scores_reported(mosquitto_url, tmp_path):
    fleet = "prompts"
    observer = Observer(mosquitto_url, fleet)
    train = TrainSettings(local_steps=3, batch_size=2, seq_len=32, learning_rate=3e-2)
    config = fleet_config(tmp_path, fleet, adapter=SPEC, train=train, linger_s=None)
    assert config.strategy_name == "dense"
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices = [join(mosquitto_url, fleet, i) for i in range(3)]
    for device in devices:
        assert device.finished.wait(240), "the fleet did not finish"
    # after federation, each site personalizes and reports to the (lingering) aggregator
    settings = PersonalizeSettings(learning_rate=5e-2, steps=8, batch_size=2, seq_len=32)
    reports = [device.personalize(settings) for device in devices]
    store = StateStore(tmp_path / "state")
    wait_for(lambda: len(store.personalizations()) == 3, 60)
    aggregator.stop()
    thread.join(timeout=30)
    for device in devices:
        assert device.serving == "personal"
        device.rollback()
        assert device.serving_adapter()[1] is device.global_adapter.tensors
        device.stop()
    observer.close()
    final = store.load_global(2)
    for report, entry in zip(sorted(reports, key=lambda r: r.device_id),
                             sorted(store.personalizations(), key=lambda e: e["device_id"])):
        assert entry["device_id"] == report.device_id and entry["global_version"] == final.version
        assert entry["alpha"] == report.alpha and entry["personal_ppl"] == pytest.approx(report.personal_ppl)
        # both scores, for the global adapter and the personal one
        for key in ("global_ppl", "personal_ppl", "global_robust_ppl", "personal_robust_ppl", "local_robust_ppl"):
            assert entry[key] is not None and entry[key] > 1
        # α is the validation split's best (ties to the smaller); the held-out score may differ
        best = min(entry["validation"].items(), key=lambda kv: (kv[1], float(kv[0])))
        assert float(best[0]) == entry["alpha"]
    rounds = store.rounds()
    assert [r["kind"] for r in rounds] == ["initialize", "train", "train", "evaluate"]
    assert rounds[0]["status"] == "initialized" and len(rounds[0]["devices"]) == 3  # all three agreed

    # v0 is the embeddings of the init text's tokens, repeated to 6 (computed here independently)
    loaded = load_model("tiny-llama")
    ids = loaded.tokenizer.encode(SPEC.init_text)
    want = embedding_rows(loaded.model, [ids[i % len(ids)] for i in range(6)])
    v0 = store.load_global(0)
    np.testing.assert_allclose(v0.tensors[PROMPT], want, rtol=0, atol=0)
    assert v0.adapter == SPEC

    for r in (1, 2):
        seen = observer.updates[r + 1]  # (round 1 was the initialization)
        assert len(seen) == 3
        previous, merged = store.load_global(r - 1), store.load_global(r)
        total = sum(u.num_samples for u in seen)
        expected = previous.tensors[PROMPT].astype(np.float64) + sum(
            u.num_samples / total * u.delta[PROMPT].astype(np.float64) for u in seen)
        if r >= 2:  # the default FedAvgM adds β × the previous round's step
            expected = expected + config.server_optimizer.momentum * (
                previous.tensors[PROMPT].astype(np.float64) - store.load_global(r - 2).tensors[PROMPT])
        np.testing.assert_allclose(merged.tensors[PROMPT], expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(merged.tensors[PROMPT], previous.tensors[PROMPT])
    # the round log shows the prompt learning: held-out perplexity of the global prompt falls,
    # and every round carries the robustness score too
    assert rounds[-1]["global_ppl"] < rounds[1]["global_ppl"]
    for r in rounds[1:]:
        assert r["global_robust_ppl"] is not None
        assert all(d["global_robust_ppl"] is not None for d in r["devices"])
    # the state dir holds a PEFT prompt-tuning adapter
    import json

    config_json = json.loads((tmp_path / "state" / "adapter" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "PROMPT_TUNING" and config_json["num_virtual_tokens"] == 6


def test_a_device_with_another_base_is_left_out_of_a_prompt_fleet(tmp_path):
    """Three devices answer the initialization round; the one whose base differs (same
    architecture, other weights) computes another starting prompt: the two that agree decide
    v0, and the third is excluded from the fleet's tasks."""
    import threading

    from edgetune_aggregator.daemon import Aggregator, AggregatorConfig

    url = "memory://init-mismatch"
    config = AggregatorConfig(model_from_first_hello=True, fleet="mismatch", state_dir=tmp_path / "state", rounds=0, min_devices=3,
                              round_timeout_s=60, join_timeout_s=60, adapter=SPEC, evaluate_final=False)
    aggregator = Aggregator(config, open_transport(url, client_id="agg"))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    devices = []
    for i, ref in enumerate(["tiny-llama", "tiny-llama:seed=7", "tiny-llama"]):
        train, heldout = site_data(i)
        device = Device(DeviceConfig("mismatch", f"dev-{i}"), open_transport(url, client_id=f"dev-{i}"),
                        Workload(load_model(ref), train, heldout, threads=1))
        device.connect()
        devices.append(device.start())
    thread.join(timeout=120)
    assert not thread.is_alive()
    (record,) = StateStore(tmp_path / "state").rounds()
    assert record["status"] == "initialized" and "dev-1" in record["note"]
    assert set(aggregator.state.left_out) == {"dev-1"}
    assert StateStore(tmp_path / "state").load_state().left_out.keys() == {"dev-1"}  # kept out after a restart
    loaded = load_model("tiny-llama")
    ids = loaded.tokenizer.encode(SPEC.init_text)
    want = embedding_rows(loaded.model, [ids[i % len(ids)] for i in range(SPEC.num_virtual_tokens)])
    np.testing.assert_array_equal(aggregator.global_adapter.tensors[PROMPT], want)
    assert "dev-1" in aggregator.task.excluded  # (the finished task lists it too)
    for device in devices:
        device.stop()


def test_a_resumed_prompt_fleet_checks_devices_against_its_own_adapter(tmp_path):
    """A restart with the default (LoRA) configuration keeps the state dir's prompt fleet, and
    admits a device that trains only prompts."""
    from edgetune.wire import Capabilities, Hello, LoraSpec
    from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
    from edgetune_aggregator.store import FleetState

    manifest = load_model("tiny-llama").manifest
    StateStore(tmp_path / "state").save_state(FleetState("resume", manifest, SPEC, strategy="dense"))
    config = AggregatorConfig(model_from_first_hello=True, fleet="resume", state_dir=tmp_path / "state", adapter=LoraSpec())
    aggregator = Aggregator(config, open_transport("memory://resume", client_id="agg"))
    aggregator.fleet.state = aggregator.store.load_state()
    assert aggregator.state.adapter == SPEC
    prompt_only = Hello("dev-0", "0", manifest, Capabilities(backends=("ort",), adapters=("prompt",)))
    assert aggregator.check_model(prompt_only) is None
    lora_only = Hello("dev-1", "0", manifest, Capabilities(backends=("ort",), adapters=("lora",)))
    assert "trains prompt adapters" in aggregator.check_model(lora_only)


def test_the_starting_adapter_needs_a_strict_majority():
    from edgetune.adapters.tensors import consensus as _consensus

    a, b = {PROMPT: np.ones((2, 3), np.float32)}, {PROMPT: np.full((2, 3), 2.0, np.float32)}
    assert _consensus({"x": a})[0] is a
    chosen, left_out = _consensus({"x": a, "y": b, "z": dict(b)})
    assert chosen is b and set(left_out) == {"x"}
    chosen, left_out = _consensus({"x": a, "y": b})  # one against one: nobody can tell
    assert chosen is None and set(left_out) == {"x", "y"}
