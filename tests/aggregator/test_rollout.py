"""Staged rollout (docs/operations.md): a promoted version goes to canaries first, chosen
reproducibly (optionally by label); the rest follow once the canaries' reports pass; if they
fail, only the canaries go back. Over Mosquitto with real tiny Llama devices, whose canary
reports carry both versions' perplexity on their held-out text.
"""

from __future__ import annotations

import uuid

from edgetune.simulate import LightDevice
from edgetune.transport import open_transport
from edgetune_aggregator.canary import RolloutSettings, canary_verdict, choose_canaries
from edgetune_aggregator.cli import main
from edgetune_aggregator.gate import GateSettings

from helpers.fleet import fleet_config, start_aggregator, start_device, stop_fleet
from helpers.poison import AscendingWorker
from helpers.waiting import wait_for

# --- choosing and judging ----------------------------------------------------------------------


def test_canaries_are_reproducible_a_fraction_and_by_label():
    devices = {f"d{i}": {"site": "a" if i < 6 else "b"} for i in range(10)}
    settings = RolloutSettings(canary_fraction=0.2)
    chosen = choose_canaries(devices, settings, "run-1", 7)
    assert len(chosen) == 2 and chosen == choose_canaries(dict(reversed(list(devices.items()))), settings, "run-1", 7)
    assert any(choose_canaries(devices, settings, "run-1", v) != chosen for v in range(8, 12))  # (not always the same)
    by_site = choose_canaries(devices, RolloutSettings(canary_fraction=0.2, canary_labels={"site": "b"}), "run-1", 7)
    assert len(by_site) == 2 and all(devices[d]["site"] == "b" for d in by_site)
    assert choose_canaries(devices, RolloutSettings(canary_fraction=0.01), "r", 1) != []  # (at least one)
    assert choose_canaries(devices, RolloutSettings(), "r", 1) == []  # (no stage)
    assert choose_canaries({"d0": {}}, RolloutSettings(canary_fraction=0.5), "r", 1) == []  # (a fleet of one)


def test_the_canaries_verdict():
    settings = RolloutSettings(canary_fraction=0.5, max_canary_regression=0.05, canary_timeout_s=60)
    ok = {"version": 5, "switched": True, "previous": 4, "ppl": 10.2, "previous_ppl": 10.0}
    worse = {**ok, "ppl": 11.0}
    assert canary_verdict(5, 4, ["a", "b"], {"a": ok}, {}, settings, timed_out=False) is None  # (b is due)
    late = canary_verdict(5, 4, ["a", "b"], {"a": ok}, {}, settings, timed_out=True)
    assert late.passed is False and "b did not report" in late.reason
    assert canary_verdict(5, 4, ["a", "b"], {"a": ok, "b": ok}, {}, settings, False).passed is True
    failed = canary_verdict(5, 4, ["a", "b"], {"a": ok, "b": worse}, {}, settings, False)
    assert failed.passed is False and failed.reason.startswith("b's rose +10.0%")
    refused = {**ok, "switched": False, "reason": "digest_mismatch: …"}
    assert "a did not switch" in canary_verdict(5, 4, ["a"], {"a": refused}, {}, settings, False).reason
    unscored = {**ok, "ppl": None, "previous_ppl": None}  # (light devices: they switched, none measured)
    assert canary_verdict(5, 4, ["a"], {"a": unscored}, {}, settings, False).passed is True


# --- a fleet ------------------------------------------------------------------------------------


def test_a_failed_canary_rolls_back_only_the_canaries_over_mosquitto(mosquitto_url, tmp_path):
    """Four devices at two sites; canaries from site b. v1 (honest) passes its canaries and goes
    to all; v2, poisoned by site b's devices (their text was bad that round), fails at the
    canaries, which go back to v1, while site a's devices never serve it."""
    fleet = f"canary-{uuid.uuid4().hex[:6]}"
    # (the operator's canary threshold: 0.5 %; here the honest v1 lowers the canaries' perplexity
    # by about 2 %, the poisoned v2 raises it by 1–2 %)
    rollout = RolloutSettings(canary_fraction=0.5, canary_labels={"site": "b"}, max_canary_regression=0.005)
    config = fleet_config(tmp_path, fleet, rounds=None, min_devices=4, planning=False, promote="manual",
                          gate=GateSettings(max_regression=None), rollout=rollout)
    state_dir = config.state_dir
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices, seen = [], {f"dev-{i}": set() for i in range(4)}
    for index in range(4):
        devices.append(start_device(mosquitto_url, fleet, index, AscendingWorker if index >= 2 else None,
                                    exit_when_finished=False, labels={"site": "a" if index < 2 else "b"}))

    def serve(version: int, timeout: float = 90) -> bool:
        def served() -> bool:
            for device in devices:
                if device.promoted.version is not None:
                    seen[device.device_id].add(device.promoted.version)
            return all(d.promoted.version == version for d in devices) and aggregator.state.candidate_version is None
        return wait_for(served, timeout)

    try:
        assert wait_for(lambda: aggregator.state is not None and aggregator.state.global_version >= 2, 90)
        assert main(["promote", "0", "--state-dir", str(state_dir)]) == 0  # (nothing served yet: straight to all)
        assert serve(0)
        assert main(["promote", "1", "--state-dir", str(state_dir)]) == 0
        assert wait_for(lambda: aggregator.state.candidate_version in (1, None), 10)
        assert serve(1)  # the canaries passed it: everyone serves v1
        steps = [s for r in aggregator.store.rounds() for s in r.get("rollout", [])] + aggregator.rollout.steps
        staged = next(s for s in steps if s["step"] == "canary" and s["version"] == 1)
        assert staged["canaries"] == ["dev-2", "dev-3"]
        assert aggregator.rollout.reports["dev-2"]["ppl"] is not None  # (a canary scores both versions)

        assert main(["promote", "2", "--state-dir", str(state_dir)]) == 0
        assert wait_for(lambda: any(s["step"] == "rolled_back" and s["version"] == 2 for s in
                                    [s for r in aggregator.store.rounds() for s in r.get("rollout", [])]
                                    + aggregator.rollout.steps), 90)
        assert serve(1)  # the canaries went back; the others never left v1
        assert 2 in seen["dev-2"] or 2 in seen["dev-3"]
        assert 2 not in seen["dev-0"] and 2 not in seen["dev-1"]
        found: list[dict] = []

        def rolled_back() -> bool:  # (the daemon moves its steps into the round's record as it closes: look again)
            found[:] = [s for s in aggregator.rollout.steps + [s for r in aggregator.store.rounds()
                                                                for s in r.get("rollout", [])] if s["step"] == "rolled_back"]
            return bool(found)

        assert wait_for(rolled_back, 10)
        rolled = found[0]
        assert rolled["canaries"] == ["dev-2", "dev-3"] and "rose" in rolled["why"]
        assert aggregator.state.serving_version == 1
        assert "canaries failed" in aggregator.fleet.versions.get(2).note
    finally:
        stop_fleet(aggregator, thread, devices)
    # every step is in the round log (those since the last round closed: with the next one)
    logged = [s["step"] for r in aggregator.store.rounds() for s in r.get("rollout", [])]
    logged += [s["step"] for s in aggregator.rollout.steps]
    assert logged.count("canary") == 2 and logged.count("rolled_back") == 1 and logged.count("promoted") >= 2


def test_automatic_promotion_goes_through_canaries_one_stage_at_a_time(tmp_path):
    fleet = f"stages-{uuid.uuid4().hex[:6]}"
    url = f"memory://{fleet}"
    config = fleet_config(tmp_path, fleet, rounds=4, min_devices=4, planning=False, linger_s=None,
                          rollout=RolloutSettings(canary_fraction=0.25))
    aggregator, thread = start_aggregator(url, config)
    devices = []
    for index in range(4):
        transport = open_transport(url, client_id=f"{fleet}-{index}")
        devices.append(LightDevice(transport, fleet, f"d{index}", think_s=0.05).start())
    try:
        assert aggregator.finished.wait(60)
        assert wait_for(lambda: aggregator.state.candidate_version is None
                        and all(d.promoted.version == aggregator.state.serving_version for d in devices), 30)
        logged = [s for r in aggregator.store.rounds() for s in r.get("rollout", [])]
        steps = logged + aggregator.rollout.steps
        assert any(s["step"] == "canary" for s in logged)  # (in the round log)
        staged = [s for s in steps if s["step"] == "canary"]
        assert staged and all(len(s["canaries"]) == 1 for s in staged)
        promoted = [s["version"] for s in steps if s["step"] == "promoted"]
        assert promoted == sorted(promoted) and promoted[-1] == aggregator.state.serving_version
        # (each staged version went to all after its canary, or a newer one took its place)
        assert aggregator.state.serving_version == max(s["version"] for s in staged)
    finally:
        stop_fleet(aggregator, thread, devices)
